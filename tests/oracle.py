"""Replay ipvs-oracle fixtures against ipvs2nft, in-process.

A fixture is a script run by ``../shared/oracle/ipvs-oracle`` (the real
ipvsadm on a real IPVS kernel) and its JSON-lines output
(``tests/fixtures/oracle/*.jsonl``).  ``replay`` runs the same entries
through our ``ipvsadm`` entry points with a fresh state file and the store-only
back end, and returns what we printed beside what ipvsadm printed.  In-process
calls keep a 600-line fixture well under a second.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ipvs2nft import host, netaddr, sync
from ipvs2nft.cli import ipvsadm as cli

FIXTURES = Path(__file__).parent / "fixtures" / "oracle"

# Where we differ on purpose; each entry is a row of compat-matrix.md.
#   "help-text": our -h wording is our own (issue 2); rc and streams still match.
#   "b-comma":   `-b ,` crashes ipvsadm 1.31 (SIGSEGV, 139); we report the bad flag.
KNOWN = {"help-text", "b-comma"}
HELP_START = "ipvsadm v1.31 2019/12/24 (compiled with popt and IPVS v1.2.1)\nUsage:"


@dataclass
class Outcome:
    record: dict
    rc: int | None
    stdout: str | None
    stderr: str | None

    @property
    def expected(self) -> tuple:
        r = self.record
        return (r["rc"], r["stdout"], r["stderr"])

    @property
    def got(self) -> tuple:
        return (self.rc, self.stdout, self.stderr)

    def deviation(self) -> str | None:
        """Which documented difference explains a mismatch, if any."""
        argv = self.record.get("argv") or []
        if self.record["kind"] == "ipvsadm" and argv[:1] in (["-h"], ["--help"]):
            return "help-text"
        text = " ".join(argv) + " " + (self.record.get("stdin") or "")
        if re.search(r"(-b|--sched-flags)[ =],(\s|$)", text):
            return "b-comma"
        return None

    def matches(self) -> bool:
        if self.got == self.expected:
            return True
        dev = self.deviation()
        if dev == "help-text" or (self.record["stdout"] or "").startswith(HELP_START):
            return self.rc == self.record["rc"] and self.stderr == self.record["stderr"] and bool(
                self.stdout) == bool(self.record["stdout"])
        if dev == "b-comma":
            return self.stdout == "" and self.stderr.startswith("invalid scheduler flag")
        return False


def load(name: str) -> list[dict]:
    path = FIXTURES / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def fixture_names(prefix: str = "") -> list[str]:
    """The fixtures replayable without traffic: traffic-* and daemon-* need
    the namespace lab (test_traffic_oracle.py, test_daemon_oracle.py)."""
    return sorted(p.name for p in FIXTURES.glob("*.jsonl") if p.name.startswith(prefix)
                  and not p.name.startswith(("traffic-", "daemon-")))


class _Capture:
    """A text stream with a ``.buffer``, as sys.stdout/sys.stdin have."""

    def __init__(self, data: bytes = b"") -> None:
        self.buffer = io.BytesIO(data)
        self.text = io.TextIOWrapper(self.buffer, encoding="utf-8", errors="surrogateescape",
                                     write_through=True)

    def value(self) -> str:
        self.text.flush()
        return self.buffer.getvalue().decode("utf-8", "surrogateescape")


def call(func, argv: list[str], stdin: str | bytes | None, prog: str) -> tuple[int, str, str]:
    """Run one entry point in-process; returns (status, stdout, stderr)."""
    out, err = _Capture(), _Capture()
    inp = _Capture(stdin if isinstance(stdin, bytes) else (stdin or "").encode())
    saved = sys.stdin, sys.stdout, sys.stderr, sys.argv
    sys.stdin, sys.stdout, sys.stderr, sys.argv = inp.text, out.text, err.text, [prog] + argv
    try:
        try:
            status = func(argv)
        except SystemExit as exc:  # an entry point must never do this
            status = f"SystemExit({exc.code})"
    finally:
        sys.stdin, sys.stdout, sys.stderr, sys.argv = saved
    return status, out.value(), err.value()


def _shell(record: dict) -> tuple | None:
    """The ``!`` lines a fixture may carry: our save/restore scripts, sleep,
    and ``printf ... | ipvsadm ARGS`` (exact bytes on stdin, made by bash)."""
    line = record["argv"][-1]
    producer, bar, consumer = line.rpartition("|")
    entry = {"ipvsadm": cli.main, "ipvsadm-restore": cli.restore_main, "ipvsadm-save": cli.save_main}
    if bar and consumer.split()[:1] and consumer.split()[0] in entry:
        data = subprocess.run(["bash", "-c", producer], capture_output=True, check=True).stdout
        words = shlex.split(consumer)
        return call(entry[words[0]], words[1:], data, words[0])
    words = shlex.split(line)
    if words and words[0] == "ipvsadm-save":
        return call(cli.save_main, words[1:], record["stdin"], "ipvsadm-save")
    if words and words[0] == "ipvsadm-restore":
        return call(cli.restore_main, words[1:], record["stdin"], "ipvsadm-restore")
    if words and words[0] == "sleep":
        return (0, "", "")
    return None


def replay(records: list[dict], state_dir: Path, backend: str = "none",
           after: Callable[[dict], None] | None = None) -> list[Outcome]:
    """Run the fixture's entries in order against a fresh state, with the
    store only (``none``) or the nftables back end (``nft``, in a namespace
    of the caller's); ``after(record)`` runs after each entry."""
    state = state_dir / "state.json"
    saved = {k: os.environ.get(k) for k in ("IPVS2NFT_STATE", "IPVS2NFT_BACKEND")}
    os.environ["IPVS2NFT_STATE"] = str(state)
    os.environ["IPVS2NFT_BACKEND"] = backend
    outcomes = []
    try:
        for rec in records:
            kind = rec["kind"]
            if kind == "ipvsadm":
                got = call(cli.main, rec["argv"], rec["stdin"], "ipvsadm")
            elif kind == "reset":
                for p in state_dir.glob("state.json*"):
                    p.unlink()
                got = (rec["rc"], rec["stdout"], rec["stderr"])
            elif kind == "sh":
                got = _shell(rec)
                if got is None:
                    continue
            else:
                continue
            outcomes.append(Outcome(rec, *got))
            if after is not None:
                after(rec)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return outcomes


def describe(o: Outcome) -> str:
    r = o.record
    lines = [f"n={r['n']} line={r['line']}: {r['cmd']}"]
    for label, exp, got in zip(("rc", "stdout", "stderr"), o.expected, o.got, strict=True):
        if exp != got:
            lines.append(f"  {label}: expected {exp!r}\n  {' ' * len(label)}       got {got!r}")
    return "\n".join(lines)


# ---------------------------------------------------------------- namespaces

_CLONE_NEWNET = 0x40000000
_CLONE_NEWNS = 0x00020000
_MS_REC, _MS_PRIVATE, _MS_BIND = 0x4000, 0x40000, 0x1000

# /etc/hosts of the oracle's VM (../shared/oracle/build-image.sh writes it);
# its /etc/services is the host's, as here.
VM_HOSTS = "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n"


@contextlib.contextmanager
def vm_like_netns(tmp_path=None):
    """Run the block where name lookups and interfaces are those of the
    oracle's VM: a fresh network namespace with only ``lo`` up (no DNS can
    answer), and a mount namespace where /etc/hosts is the VM's.  Then return
    to ours.  Needs root; yields False without."""
    if os.geteuid() != 0:
        yield False
        return
    libc = ctypes.CDLL(None, use_errno=True)
    home_net = os.open("/proc/self/ns/net", os.O_RDONLY)
    home_mnt = os.open("/proc/self/ns/mnt", os.O_RDONLY)
    hosts = Path(tmp_path or "/tmp") / "vm-hosts"
    hosts.write_text(VM_HOSTS)
    try:
        if libc.unshare(_CLONE_NEWNET | _CLONE_NEWNS) != 0:
            yield False
            return
        try:
            libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None)
            if libc.mount(str(hosts).encode(), b"/etc/hosts", None, _MS_BIND, None) != 0:
                raise OSError(ctypes.get_errno(), "bind mount of the VM's /etc/hosts failed")
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
            netaddr.addr_to_host.cache_clear()
            host.forget()
            yield True
        finally:
            sync.stop_all()  # a --start-daemon in the block left conntrackd running here
            netaddr.addr_to_host.cache_clear()
            host.forget()
            if libc.setns(home_net, _CLONE_NEWNET) != 0 or libc.setns(home_mnt, _CLONE_NEWNS) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the original namespaces failed")
    finally:
        os.close(home_net)
        os.close(home_mnt)
