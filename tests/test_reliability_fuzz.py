"""Bad input, fuzzed with hypothesis (issue 5).

Generated ipvsadm argument vectors (real options and values mixed with
garbage, unicode, undecodable bytes, empty and very long strings), ``-R`` /
``ipvsadm-restore`` streams (command lines and random bytes), corrupted
state files (truncated, flipped bytes, wrong schema, valid JSON of the wrong
shape, symlinks) and ``ipvs2nft translate`` input (ipvsadm and iptables
lines).  Every case runs in-process through the console-script entry point:

* it returns an int, never raises, and prints no traceback;
* the status is one ipvsadm uses (0, 1, 2, 255) or the lock's 4;
* a failing command leaves the state file byte-identical and, with the nft
  back end, the kernel table unchanged.

When root, everything runs in a throw-away network namespace (``lo`` only,
the oracle VM's /etc/hosts: no DNS can slow a case down) with the nftables
back end, so the kernel side is fuzzed too; otherwise with the store only.

Size: ``IPVS2NFT_FUZZ_EXAMPLES=N`` runs N cases per test (CI default: a few
hundred each, about a minute in all); ``IPVS2NFT_FUZZ_REPORT=path`` appends
how many cases each test ran and how long it took; ``IPVS2NFT_FUZZ_COLLECT=1``
records every violated property instead of stopping at the first (a long run
then reports all its findings in the report file, and the module fails at
its end if there were any).

``ipvs2nft translate`` output that comes with status 0 must load: it is
checked by libnftables in dry-run mode in the fuzzing namespace (not by
translate's own ``nft -c``).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ipvs2nft.cli import ipvs2nft as i2n_cli  # noqa: E402
from ipvs2nft.cli import ipvsadm as cli  # noqa: E402
from ipvs2nft.store import Store  # noqa: E402
from tests import oracle  # noqa: E402
from tests.reliability_helpers import ALLOWED_STATUS, SCHEMA, private_netns, shape  # noqa: E402

SCALE = int(os.environ.get("IPVS2NFT_FUZZ_EXAMPLES", "0") or 0)
# IPVS2NFT_FUZZ_COLLECT=1: record every violated property (with its first
# example) in that file instead of stopping at the first: for long runs.
COLLECT = os.environ.get("IPVS2NFT_FUZZ_COLLECT")


def fuzz_settings(default: int, shrink: bool = True):
    phases = list(Phase) if shrink else [Phase.explicit, Phase.reuse, Phase.generate]
    return settings(max_examples=SCALE or default, deadline=None, database=None, phases=phases,
                    derandomize=not SCALE, suppress_health_check=list(HealthCheck))


BASE = """\
-A -t 10.0.0.1:80 -s rr
-a -t 10.0.0.1:80 -r 192.168.100.10:80 -m
-a -t 10.0.0.1:80 -r 192.168.100.11:80 -m -w 3
-A -u 10.0.0.1:53 -s wrr
-a -u 10.0.0.1:53 -r 192.168.100.12:53 -m
-A -f 1 -s sh -b sh-port
-a -f 1 -r 192.168.100.13:0 -m
-A -t [2001:db8::1]:443 -s rr -p 300
-a -t [2001:db8::1]:443 -r [2001:db8:100::10]:443 -m
-A -t 10.0.0.2:80 -s mh -b mh-fallback
-a -t 10.0.0.2:80 -r 192.168.100.14:80 -g
"""


# ---------------------------------------------------------------- the world the cases run in

class World:
    """The state file, the kernel (when root) and the per-test counters."""

    def __init__(self, directory: Path, kernel: bool) -> None:
        self.dir = directory
        self.state = directory / "state.json"
        self.kernel = kernel
        self.nft = None
        self.counts: dict[str, int] = {}
        self.findings: dict[str, dict] = {}
        self.current = ""
        if kernel:
            import nftables

            self.nft = nftables.Nftables()
            self.nft.set_json_output(True)
        status, _, err = oracle.call(cli.restore_main, [], BASE, "ipvsadm-restore")
        assert status == 0, err
        self.base = self.state.read_bytes()
        self.dirty = False

    def table(self):
        if not self.kernel:
            return None
        rc, out, _ = self.nft.cmd("list table inet ipvs2nft")
        return shape(json.loads(out)) if rc == 0 and out else None

    def generation(self):
        """(kernel's gen set, the state file's generation)."""
        table = self.table() or {}
        kernel = [json.loads(e) for e in table.get("set gen", {}).get("elem", [])]
        head = self.state.read_bytes().split(b"\n")[0].removesuffix(b',"services":[') + b"}"
        return kernel, [json.loads(head)["generation"]]

    def reset(self) -> None:
        """Back to BASE: the state file's bytes and, if it may differ, the kernel.
        The store's own side files (``state.json.*``: lock, seen ruleset id)
        stay, so an untouched store is not re-verified for every case."""
        intact = self.state.is_file() and not self.state.is_symlink() and self.state.read_bytes() == self.base
        for p in self.dir.iterdir():
            if p.name.startswith("state.json.") or (intact and p.name == "state.json"):
                continue
            if p.is_dir() and not p.is_symlink():
                p.rmdir()
            else:
                p.unlink()
        if not intact:
            self.state.write_bytes(self.base)
        if self.dirty and self.kernel:
            # any mutation repairs the kernel from the store: -C then restore
            self.run(cli.restore_main, [], BASE, "ipvsadm-restore")
            self.base = self.state.read_bytes()
        self.dirty = False

    def run(self, func, argv, stdin, prog):
        try:
            return oracle.call(func, argv, stdin, prog)
        except BaseException as exc:  # noqa: BLE001 - that is the finding
            import traceback

            return f"raised {type(exc).__name__}", "", "Traceback\n" + traceback.format_exc()

    def count(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1
        self.current = name

    def check(self, ok: bool, what: str, detail: str = "") -> None:
        """Assert, or in collecting mode note the violation and go on."""
        if ok:
            return
        if not COLLECT:
            raise AssertionError(f"{what}: {detail}")
        key = f"{self.current}: {what}: {_signature(detail)}"
        seen = self.findings.setdefault(key, {"count": 0, "example": detail[-1500:]})
        seen["count"] += 1


def _signature(detail: str) -> str:
    """The last line of a traceback (exception type and message, digits out)."""
    lines = [line for line in detail.strip().splitlines() if line.strip() and not line.startswith("[")]
    last = lines[-1] if lines else ""
    where = [line.strip() for line in lines if line.strip().startswith('File "/work')][-1:]
    return re.sub(r"\d+", "N", last)[:160] + (f" at {where[0]}" if where else "")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz")
    started = time.monotonic()
    w = None
    try:
        with private_netns(directory) as kernel:
            w = World(directory, kernel)
            yield w
    finally:
        report = os.environ.get("IPVS2NFT_FUZZ_REPORT")
        if report and w is not None:
            with open(report, "a") as f:
                f.write(json.dumps({"counts": w.counts, "seconds": round(time.monotonic() - started, 1),
                                    "kernel": w.kernel, "findings": w.findings}, indent=1) + "\n")
    # collecting mode records instead of failing: the module fails here
    assert w is None or not w.findings, json.dumps(w.findings, indent=1)[:6000]


def check_outcome(world: World, status, out: str, err: str, allowed=ALLOWED_STATUS) -> bool:
    """The entry point returned an allowed int and printed no traceback."""
    ok = isinstance(status, int)
    world.check(ok, "not an int status", f"{status!r}: {err[-3000:]}")
    clean = "Traceback" not in err and "Traceback" not in out
    world.check(clean, "traceback", err[-3000:])
    world.check("internal error" not in err, "internal error", err[-1000:])
    world.check(not ok or status in allowed, f"status {status}", err[-500:])
    return ok and clean


# ---------------------------------------------------------------- strategies

COMMANDS = ["-A", "-E", "-D", "-C", "-R", "-S", "-a", "-e", "-d", "-L", "-l", "-Z", "--set",
            "--start-daemon", "--stop-daemon", "-h", "-v", "--add-service", "--edit-service",
            "--delete-service", "--clear", "--restore", "--save", "--add-server", "--edit-server",
            "--delete-server", "--list", "--zero", "--version", "--help"]
OPTIONS = ["-t", "-u", "--sctp-service", "-f", "-s", "-p", "-M", "-b", "--pe", "-r", "-g", "-i", "-m", "-w",
           "-x", "-y", "--tun-type", "--tun-port", "--tun-nocsum", "--tun-csum", "--tun-remcsum", "-c",
           "--timeout", "--daemon", "--stats", "--rate", "--thresholds", "--persistent-conn", "--nosort",
           "--sort", "-o", "--exact", "-n", "-6", "--mcast-interface", "--syncid", "--mcast-group",
           "--mcast-port", "--mcast-ttl", "--sync-maxlen", "--tcp-service", "--udp-service",
           "--fwmark-service", "--scheduler", "--persistent", "--netmask", "--real-server", "--weight",
           "--masquerading", "--gatewaying", "--ipip", "--numeric", "--connection", "--ops",
           "--sched-flags", "--u-threshold", "--l-threshold", "-T", "-O", "-W", "-X", "-Y", "--", "-",
           "-tu", "-Ln", "-At"]
SERVICES = ["10.0.0.1:80", "10.0.0.1:53", "10.0.0.2:80", "10.0.0.3:80", "[2001:db8::1]:443", "10.0.0.1",
            "10.0.0.1:0", "1", "0", "0x10", "4294967295", "4294967296", "localhost:http", "[::1]:80",
            "10.0.0.1:65535", "10.0.0.1:65536", "10.0.0.1:-1", "10.0.0.1:http", "255.255.255.255:80",
            "0.0.0.0:80", "[2001:db8::1]", "2001:db8::1:80", "[::ffff:10.0.0.1]:80", "224.0.0.1:80"]
VALUES = ["rr", "wrr", "lc", "wlc", "sh", "dh", "mh", "fo", "ovf", "lblc", "lblcr", "sed", "nq", "none",
          "twos", "sh-port", "sh-fallback", "mh-port,mh-fallback", "flag-1,flag-2,flag-3", ",", "sip",
          "192.168.100.10:80", "192.168.100.15", "192.168.100.10:0", "[2001:db8:100::10]:443", "lo", "eth0",
          "master", "backup", "ipip", "gue", "gre", "1", "0", "-1", "65535", "65536", "2147483647",
          "4294967296", "300", "255.255.255.0", "128", "64", "0x7f", "1e3", "  1", "1 ", "224.0.0.81",
          "900", "120", "10.0.0.1:80"]


def _long(ch: str, n: int) -> str:
    return ch * n


garbage = st.one_of(
    st.just(""),
    st.text(max_size=20),
    st.text(alphabet=st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=8),
    st.binary(max_size=12).map(lambda b: b.decode("utf-8", "surrogateescape")),
    st.builds(_long, st.sampled_from(["A", "1", ":", "é", "-", "[", "\x00"]), st.integers(100, 5000)),
    st.sampled_from(["--", "-", "=", ";", "}", "\"", "\n", "$x", "@svc4", "flush ruleset", "%s%n",
                     "include \"/etc/passwd\"", "\u202e", "ﬀ", "١٢٣", "𝟏𝟎.0.0.1:80"]),
)
word = st.one_of(st.sampled_from(COMMANDS), st.sampled_from(OPTIONS), st.sampled_from(SERVICES),
                 st.sampled_from(VALUES), garbage,
                 st.builds(lambda o, v: f"{o}={v}",
                           st.sampled_from([o for o in OPTIONS if o.startswith("--")]),
                           st.sampled_from(VALUES + SERVICES)))
free_argv = st.lists(word, max_size=12)


@st.composite
def command_argv(draw) -> list[str]:
    """Mostly well-formed ipvsadm commands with one or two bent parts."""
    cmd = draw(st.sampled_from(["-A", "-E", "-D", "-a", "-e", "-d", "-L", "-Z", "-S", "-C", "--set",
                                "--start-daemon", "--stop-daemon"]))
    argv = [cmd]
    if cmd in ("--set",):
        argv += draw(st.lists(st.sampled_from(VALUES + ["0", "5", "abc"]), min_size=0, max_size=4))
    elif cmd in ("--start-daemon", "--stop-daemon"):
        argv.append(draw(st.sampled_from(["master", "backup", "both", ""])))
        argv += draw(st.lists(st.one_of(
            st.sampled_from(["--mcast-interface", "lo", "--syncid", "5", "--mcast-group", "224.0.0.81",
                             "--mcast-port", "8848", "--mcast-ttl", "2", "--sync-maxlen", "1500"]),
            st.tuples(st.sampled_from(["--mcast-interface", "--syncid", "--mcast-group", "--mcast-port",
                                       "--mcast-ttl", "--sync-maxlen"]), garbage).map(" ".join)),
            max_size=6).map(lambda ws: [x for w in ws for x in w.split(" ", 1)]))
    elif cmd != "-C":
        argv += [draw(st.sampled_from(["-t", "-u", "-f", "--sctp-service", "-t", "-t"])),
                 draw(st.one_of(st.sampled_from(SERVICES), garbage))]
        if cmd in ("-a", "-e", "-d"):
            argv += ["-r", draw(st.one_of(st.sampled_from(VALUES[21:26]), garbage))]
        extra = st.one_of(
            st.tuples(st.sampled_from(["-s", "-b", "--pe", "-p", "-M", "-w", "-x", "-y", "--tun-type",
                                       "--tun-port"]), st.one_of(st.sampled_from(VALUES), garbage)),
            st.tuples(st.sampled_from(["-m", "-g", "-i", "-n", "-6", "--tun-csum", "--stats", "-c",
                                       "--exact", "-o"])))
        for t in draw(st.lists(extra, max_size=4)):
            argv += list(t)
    return argv


argv_strategy = st.one_of(command_argv(), free_argv)


def _line(words: list[str]) -> bytes:
    return " ".join(words).encode("utf-8", "surrogateescape")


stream_line = st.one_of(
    command_argv().map(_line),
    free_argv.map(_line),
    st.binary(max_size=60),
    st.sampled_from([b"", b"#", b"# comment", b"ipvsadm", b"ipvsadm -C", b"-R", b"\r",
                     b"\t-A\t-t\t1.2.3.4:80", b"-A -t 10.0.0.9:80 -s rr  ", b"\xff\xfe", b"\x00"]),
)
stream = st.builds(lambda lines, sep, end: sep.join(lines) + end, st.lists(stream_line, max_size=12),
                   st.sampled_from([b"\n", b"\r\n", b"\n\n", b" \n"]), st.sampled_from([b"", b"\n", b"  "]))


# ---------------------------------------------------------------- argv

def _check_failure_left_nothing(world: World, status, before_table, what) -> None:
    if status != 0:
        world.check(world.state.read_bytes() == world.base, "a failing command changed the state file",
                    repr(what))
        if world.kernel:
            world.check(world.table() == before_table, "a failing command changed the kernel table",
                        repr(what))
    if world.state.read_bytes() != world.base:
        world.dirty = True


@fuzz_settings(400)
@given(argv=argv_strategy)
def test_fuzz_ipvsadm_argv(world, argv):
    world.reset()
    world.count("argv")
    before = world.table()
    status, out, err = world.run(cli.main, argv, b"", "ipvsadm")
    if check_outcome(world, status, out, err):
        _check_failure_left_nothing(world, status, before, argv)
    if world.kernel and status == 0:
        kernel, store = world.generation()
        world.check(kernel == store, "the kernel does not follow the store", repr(argv))


@fuzz_settings(60)
@given(args=st.lists(st.one_of(st.just("-n"), garbage, st.sampled_from(OPTIONS)), max_size=3))
def test_fuzz_ipvsadm_save_argv(world, args):
    world.reset()
    world.count("save-argv")
    status, out, err = world.run(cli.save_main, args, b"", "ipvsadm-save")
    check_outcome(world, status, out, err)
    world.check(world.state.read_bytes() == world.base, "ipvsadm-save changed the state file", repr(args))


# ---------------------------------------------------------------- -R and ipvsadm-restore

def _valid_store(world: World, what) -> None:
    try:
        doc = json.loads(world.state.read_bytes())
        assert doc["schema"] == SCHEMA and doc["services"][-1] is None
        Store(str(world.state)).read()
    except Exception as exc:  # noqa: BLE001
        world.check(False, "the state file is invalid afterwards", f"{what!r}: {exc}")


@fuzz_settings(120)
@given(data=stream, restore=st.booleans())
def test_fuzz_restore_streams(world, data, restore):
    world.reset()
    world.count("restore-stream")
    before = world.table()
    if restore:
        status, out, err = world.run(cli.restore_main, [], data, "ipvsadm-restore")
    else:
        status, out, err = world.run(cli.main, ["-R"], data, "ipvsadm")
    check_outcome(world, status, out, err)
    _valid_store(world, data)
    if world.state.read_bytes() == world.base:
        if world.kernel:
            world.check(world.table() == before, "the kernel changed, the store did not", repr(data))
    else:
        world.dirty = True
        if world.kernel:  # the kernel follows the store
            kernel, store = world.generation()
            world.check(kernel == store, "the kernel does not follow the store", repr(data))


# ---------------------------------------------------------------- corrupted state files

def _flip(raw: bytes, positions: list[int], values: list[int]) -> bytes:
    b = bytearray(raw)
    for p, v in zip(positions, values, strict=False):
        if b:
            b[p % len(b)] = v
    return bytes(b)


def _header_field(raw: bytes, key: str, value) -> bytes:
    head, rest = raw.split(b"\n", 1)
    doc = json.loads(head.removesuffix(b',"services":[') + b"}")
    doc[key] = value
    return json.dumps(doc, separators=(",", ":"))[:-1].encode() + b',"services":[\n' + rest


def _service_row(raw: bytes, index: int, value) -> bytes:
    lines = raw.split(b"\n")
    rows = [i for i, line in enumerate(lines) if line.startswith(b"[")]
    i = rows[index % len(rows)]
    row = json.loads(lines[i].rstrip(b","))
    if isinstance(value, tuple):  # (position, new value) inside the row
        pos, new = value
        row[pos % len(row)] = new
        lines[i] = json.dumps(row, separators=(",", ":")).encode() + b","
    else:
        lines[i] = json.dumps(value).encode() + b","
    return b"\n".join(lines)


json_junk = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
              st.text(max_size=10)),
    lambda inner: st.one_of(st.lists(inner, max_size=5),
                            st.dictionaries(st.text(max_size=5), inner, max_size=4)),
    max_leaves=12)


BYTE_KINDS = ["truncate", "flip", "insert", "row", "whole-json", "schema", "symlink", "empty"]
TYPED_KINDS = ["header", "row-field"]  # right schema, right shape, a field of the wrong type


@st.composite
def corruption(draw, kinds=tuple(BYTE_KINDS)):
    """(kind, what to plant): see _plant."""
    kind = draw(st.sampled_from(kinds))
    return kind, draw({
        "truncate": st.integers(0, 4000),
        "flip": st.tuples(st.lists(st.integers(0, 10**6), min_size=1, max_size=4),
                          st.lists(st.integers(0, 255), min_size=4, max_size=4)),
        "insert": st.tuples(st.integers(0, 4000), st.binary(min_size=1, max_size=8)),
        "header": st.tuples(st.sampled_from(["generation", "next_rid", "timeouts", "daemons", "snat",
                                             "schema", "services"]), json_junk),
        "row": st.tuples(st.integers(0, 10), json_junk),
        "row-field": st.tuples(st.integers(0, 10), st.integers(0, 13), json_junk),
        "whole-json": json_junk,
        "schema": st.sampled_from(["ipvs2nft-state/0", "ipvs2nft-state/2", "", "IPVS2NFT-STATE/1"]),
        "symlink": st.sampled_from(["valid-elsewhere", "dangling", "dir", "dev-zero", "loop"]),
        "empty": st.just(None),
    }[kind])


def _plant(world: World, kind: str, arg) -> None:
    raw = world.base
    if kind == "symlink":
        world.state.unlink()
        target = {"valid-elsewhere": world.dir / "elsewhere.json", "dangling": world.dir / "nothing",
                  "dir": world.dir, "dev-zero": Path("/dev/zero"), "loop": world.state}[arg]
        if arg == "valid-elsewhere":
            target.write_bytes(raw)
        world.state.symlink_to(target)
        return
    data = {
        "truncate": lambda: raw[:arg % (len(raw) + 1)],
        "flip": lambda: _flip(raw, *arg),
        "insert": lambda: raw[:arg[0] % (len(raw) + 1)] + arg[1] + raw[arg[0] % (len(raw) + 1):],
        "header": lambda: _header_field(raw, *arg),
        "row": lambda: _service_row(raw, *arg),
        "row-field": lambda: _service_row(raw, arg[0], (arg[1], arg[2])),
        "whole-json": lambda: json.dumps(arg).encode(),
        "schema": lambda: _header_field(raw, "schema", arg),
        "empty": lambda: b"",
    }[kind]()
    world.state.write_bytes(data)


CORRUPT_COMMANDS = [
    ("ipvsadm", ["-L", "-n"]), ("ipvsadm", ["-L", "-n", "--stats"]), ("ipvsadm", ["-S", "-n"]),
    ("ipvsadm", []), ("ipvsadm", ["-L", "-n", "-t", "10.0.0.1:80"]), ("ipvsadm", ["-L", "--timeout"]),
    ("ipvsadm", ["-L", "--daemon"]), ("ipvsadm", ["-Z"]), ("ipvsadm", ["-L", "-c", "-n"]),
    ("ipvsadm", ["-a", "-t", "10.0.0.1:80", "-r", "192.168.100.20:80", "-m"]),
    ("ipvsadm", ["-e", "-t", "10.0.0.1:80", "-r", "192.168.100.10:80", "-m", "-w", "5"]),
    ("ipvsadm", ["-d", "-t", "10.0.0.1:80", "-r", "192.168.100.10:80"]),
    ("ipvsadm", ["-A", "-t", "10.0.0.7:80", "-s", "rr"]),
    ("ipvsadm", ["-E", "-t", "10.0.0.1:80", "-s", "wrr"]),
    ("ipvsadm", ["-D", "-t", "10.0.0.1:80"]), ("ipvsadm", ["-C"]), ("ipvsadm", ["--set", "1", "2", "3"]),
    ("ipvsadm", ["--start-daemon", "master", "--mcast-interface", "lo"]),
    ("ipvsadm", ["--stop-daemon", "master"]), ("ipvsadm", ["-R"]), ("ipvsadm-restore", []),
    ("ipvsadm-save", ["-n"]),
]
ENTRY = {"ipvsadm": cli.main, "ipvsadm-restore": cli.restore_main, "ipvsadm-save": cli.save_main}


def _corrupted_case(world: World, bad, which, name: str) -> None:
    world.reset()
    world.count(name)
    _plant(world, *bad)
    link = os.readlink(world.state) if world.state.is_symlink() else None
    before_bytes = None if link is not None else world.state.read_bytes()
    elsewhere = world.dir / "elsewhere.json"
    before_elsewhere = elsewhere.read_bytes() if elsewhere.exists() else None
    before_table = world.table()
    prog, argv = CORRUPT_COMMANDS[which]
    stdin = b"-A -t 10.0.0.8:80 -s rr\n" if prog == "ipvsadm-restore" or argv == ["-R"] else b""
    status, out, err = world.run(ENTRY[prog], argv, stdin, prog)
    what = f"{bad!r} then {prog} {argv}"
    check_outcome(world, status, out, err + f"\n[{what}]")
    if status != 0:
        now_link = os.readlink(world.state) if world.state.is_symlink() else None
        world.check(now_link == link, "a failing command replaced the symlink", what)
        if link is None:
            world.check(world.state.read_bytes() == before_bytes, "a failing command changed the state file",
                        what)
        if world.kernel:
            world.check(world.table() == before_table, "a failing command changed the kernel table", what)
    if before_elsewhere is not None:
        world.check(elsewhere.read_bytes() == before_elsewhere, "written through a symlink", what)
    world.dirty = True


# ---------------------------------------------------------------- ipvs2nft translate

# every line of a translation names one of our tables (other families: old layouts it removes)
OUR_LINE = re.compile(r"^(add|delete|flush) (table|chain|rule|map|set|element|ct timeout) (inet|ip|ip6) "
                      r"ipvs2nft( |$)")


@fuzz_settings(200)
@given(data=stream)
def test_fuzz_translate_ipvsadm_input(world, data):
    world.count("translate-ipvsadm")
    status, out, err = world.run(i2n_cli.main, ["translate", "-"], data, "ipvs2nft")
    check_outcome(world, status, out, err, allowed={0, 2, 3})
    if status == 0:
        bad = [line for line in out.splitlines() if not OUR_LINE.match(line)]
        world.check(not bad, "a line outside our table", f"{data!r}: {bad[:3]}")
        _check_loads(world, out, data)


IPT_WORDS = ["iptables", "-t", "nat", "mangle", "filter", "-A", "-I", "-D", "-N", "-P", "-F", "PREROUTING",
             "OUTPUT", "POSTROUTING", "FORWARD", "INPUT", "WEB", "-d", "192.168.0.40", "192.168.0.40/32",
             "-s",
             "10.0.0.0/8", "-p", "tcp", "udp", "--dport", "80", "443", "80:90", "-m", "statistic", "--mode",
             "nth", "random", "--every", "3", "2", "--packet", "0", "--probability", "0.5", "0.33333",
             "-j", "DNAT", "MARK", "ACCEPT", "DROP", "RETURN", "MASQUERADE", "--to-destination",
             "192.168.100.10:80", "192.168.100.11", "--set-mark", "1", "0x1/0xff", "multiport", "--dports",
             "80,443", "comment", "--comment", "\"x y\"", "recent", "--set", "--name", "lb", "--rcheck",
             "--seconds", "60", "-o", "eth0", "!", "*nat", ":PREROUTING", "ACCEPT", "[0:0]", "COMMIT",
             "ip6tables", "[2001:db8::10]:80", "-i", "lo", "conntrack", "--ctstate", "NEW"]
ipt_line = st.one_of(
    st.lists(st.one_of(st.sampled_from(IPT_WORDS), garbage), max_size=16).map(_line),
    st.binary(max_size=40),
)
ipt_stream = st.lists(ipt_line, max_size=8).map(lambda ls: b"\n".join(ls) + b"\n")


@fuzz_settings(150)
@given(data=ipt_stream)
def test_fuzz_translate_iptables_input(world, data):
    world.count("translate-iptables")
    status, out, err = world.run(i2n_cli.main, ["translate", "--from", "iptables", "-"], data, "ipvs2nft")
    check_outcome(world, status, out, err + f"\n[{data!r}]", allowed={0, 2, 3})
    if status == 0:
        _check_loads(world, out, data)
    else:
        named = re.search(r"^ipvs2nft: (line \d+: |--strict)", err, re.M)
        world.check(bool(named), "an error naming no line", f"{data!r}: {err[-500:]}")


def _check_loads(world: World, script: str, data: bytes) -> None:
    """A translation printed with status 0 loads (libnftables dry run in the
    fuzzing namespace; tunnel devices it names get veth stand-ins)."""
    if not world.kernel:
        return
    import subprocess

    devices = sorted(set(re.findall(r'device "(i2n\d+)"', script)))
    for n, device in enumerate(devices):
        subprocess.run(["ip", "link", "add", device, "type", "veth", "peer", "name", f"fz{n}"],
                       capture_output=True)
    world.nft.set_dry_run(True)
    try:
        rc, _, err = world.nft.cmd(script)
    finally:
        world.nft.set_dry_run(False)
        for device in devices:
            subprocess.run(["ip", "link", "del", device], capture_output=True)
    world.check(rc == 0, "a printed translation nft refuses", f"{data!r}: {err[-800:]}")


@fuzz_settings(150)
@given(bad=corruption(), which=st.integers(0, len(CORRUPT_COMMANDS) - 1))
def test_fuzz_corrupted_state_file(world, bad, which):
    """Truncated, flipped, inserted bytes, wrong schema, JSON of the wrong
    shape, a garbage service line, symlinks, an empty file."""
    _corrupted_case(world, bad, which, "corrupt-state")


@fuzz_settings(80, shrink=False)
@given(bad=corruption(kinds=tuple(TYPED_KINDS)), which=st.integers(0, len(CORRUPT_COMMANDS) - 1))
def test_fuzz_state_file_with_wrongly_typed_fields(world, bad, which):
    _corrupted_case(world, bad, which, "typed-state")


# ---------------------------------------------------------------- what the fuzzer found, as plain cases

@pytest.mark.parametrize("line", [b"iptables -F nosuchchain\n", b"iptables -t nat -F nosuchchain\n"])
def test_translate_iptables_flush_of_unknown_chain(line):
    status, out, err = oracle.call(i2n_cli.main, ["translate", "--from", "iptables", "-"], line, "ipvs2nft")
    assert status == 2 and "No chain/target/match by that name" in err, (status, err)


HUGE = "1" * 5000  # more digits than Python's int() takes from a string (4300)


@pytest.mark.parametrize("argv,message", [
    (["-A", "-t", "10.0.0.1:80", "-p", HUGE], f"invalid timeout value `{HUGE}' specified\n"),
    (["-A", "-t", f"10.0.0.1:{HUGE}"], "illegal virtual server address[:port] specified\n"),
], ids=["timeout", "port"])
def test_huge_number_words(state, argv, message):
    assert oracle.call(cli.main, argv, None, "ipvsadm") == (2, "", message)
    status, _, err = oracle.call(i2n_cli.main, ["translate", "-"], " ".join(argv).encode() + b"\n",
                                 "ipvs2nft")
    assert status == 2 and "Traceback" not in err, err[-300:]
