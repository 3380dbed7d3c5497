"""Replay an ipvs-oracle transcript in a namespace lab built like the oracle's.

The oracle (../shared/oracle) runs ipvsadm scripts against real IPVS in a VM
whose traffic lab is built by ``guest/oracle-traffic``.  This module builds
the same lab out of network namespaces on this machine and replays the same
script against **our** ipvsadm, so a transcript recorded on real IPVS can be
compared step by step with ipvs2nft, also with ``ipvs2nft daemon`` running:

* a director namespace: our ``ipvsadm`` runs there (``ip netns exec``), with
  a private state file and the nft back end; it sees the VM's /etc/hosts and
  no DNS, as ipvsadm does in the VM;
* one namespace per real server, made when ``@connect`` runs, from
  ``ipvsadm -S -n`` (the oracle's rule): its address on eth0, the VIP on its
  lo, and busybox ``httpd`` (the VM's binary and version) answering ``GET /``
  with the server's address and ``/cgi-bin/hold`` with the address and then
  keeping the connection open; a stdlib Python stand-in answers the same way
  where busybox is missing (byte counts then differ a little);
* one client namespace holding every ``from=`` address, and bash's
  ``/dev/tcp`` as the client, exactly the oracle's loops: sequential
  connections, each closed before the next opens (or held with ``hold``),
  plus a small gap between them (30 ms by default) so a daemon that follows
  conntrack can see each one before the next arrives;
* ``fwmark=M`` marks packets to VIP:PORT in table ``inet oracle_traffic`` at
  prerouting priority -150, before ipvs2nft's nat chain (-99), as in the VM.

Addressing copies the VM's: the director side of every veth carries
169.254.1.1/32 and fe80::1, every namespace routes by default through it, and
the director has a host route to each namespace address.

``replay`` runs records (from a ``.jsonl`` fixture or a ``.txt`` script) and
returns one ``Step`` per record; ``differences`` compares a step with the
record the oracle printed.  ``@reset`` rebuilds the whole lab and the state
file (and restarts the daemon), which is what a fresh IPVS module is to us.

Run one fixture by hand (root)::

    .venv/bin/python -m tests.oracle_lab tests/fixtures/oracle/traffic-rr.jsonl --static
    .venv/bin/python -m tests.oracle_lab tests/fixtures/oracle/daemon-lc-wlc.jsonl --daemon
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ipvs2nft.lab import unique_prefix

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin: ipvsadm, ipvs2nft

GW4 = "169.254.1.1"
GW6 = "fe80::1"
DEF_CLIENT4 = "198.51.100.2"
DEF_CLIENT6 = "2001:db8:ffff::2"
DEFAULT_GAP = 0.03  # seconds between two connections (after one finished)

# /etc/hosts of the oracle's VM (build-image.sh); no resolv.conf there.  Ours
# names a resolver nobody answers in the director, so a lookup fails at once.
VM_HOSTS = "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n"
NO_DNS = "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"

# The client loops of ../shared/oracle/guest/oracle-traffic, unchanged but for
# the gap: bash's /dev/tcp, one connection after another, source address by
# the default route's "src".  Each prints "conn <i> <client> <backend>" or
# "conn <i> <client> - <error>".
_PICK_SOURCE = r'''
    if [ "$c" != "$prev" ]; then
        if [[ $c == *:* ]]; then
            ip route replace default via fe80::1 dev eth0 src "$c"
        else
            ip route replace default via 169.254.1.1 dev eth0 src "$c"
        fi
        prev=$c
    fi
    [ "$k" -gt 1 ] && [ "$gap" != 0 ] && sleep "$gap"
'''
CLIENT_LOOP = r'''
tmo=$1 gap=$2 addr=$3 port=$4; shift 4
k=0 prev=""
for c in "$@"; do
    k=$((k + 1))
''' + _PICK_SOURCE + r'''
    last="" err=""
    if { exec 5<>"/dev/tcp/$addr/$port"; } 2>"$TMPD/.connect.err"; then
        printf "GET / HTTP/1.0\r\n\r\n" >&5
        while IFS= read -r -t "$tmo" -u 5 l; do
            l=${l%$'\r'}
            [ -n "$l" ] && last=$l
        done
        exec 5<&-
        [ -n "$last" ] || err="no answer"
    else
        err=$(grep -o "connect: .*" "$TMPD/.connect.err" | head -1)
        [ -n "$err" ] || err="connect failed"
    fi
    if [ -n "$last" ]; then echo "conn $k $c $last"; else echo "conn $k $c - $err"; fi
done
'''
HOLD_LOOP = r'''
tmo=$1 gap=$2 addr=$3 port=$4 out=$5; shift 5
k=0 prev=""
fds=()
for c in "$@"; do
    k=$((k + 1))
''' + _PICK_SOURCE + r'''
    last="" err="" body=""
    if { exec {fd}<>"/dev/tcp/$addr/$port"; } 2>"$TMPD/.connect.err"; then
        fds+=("$fd")
        printf "GET /cgi-bin/hold HTTP/1.0\r\n\r\n" >&"$fd"
        while IFS= read -r -t "$tmo" -u "$fd" l; do
            l=${l%$'\r'}
            if [ -n "$body" ] && [ -n "$l" ]; then last=$l; break; fi
            [ -z "$l" ] && body=1
        done
        [ -n "$last" ] || err="no answer"
    else
        err=$(grep -o "connect: .*" "$TMPD/.connect.err" | head -1)
        [ -n "$err" ] || err="connect failed"
    fi
    if [ -n "$last" ]; then echo "conn $k $c $last"; else echo "conn $k $c - $err"; fi >> "$out"
done
echo done >> "$out"
exec sleep 3600
'''
# busybox httpd's CGI, as the oracle writes it: the address, then 900 s open
HOLD_CGI = '#!/bin/sh\nprintf "Content-Type: text/plain\\r\\n\\r\\n%s\\n"\nexec sleep 900\n'


class LabError(RuntimeError):
    """The lab itself failed (not ipvs2nft): a namespace, a server, the client."""


def _run(cmd: Sequence[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise LabError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


def is_v6(addr: str) -> bool:
    return ":" in addr


def split_target(target: str) -> tuple[str, int]:
    """``VIP:PORT`` or ``[V6VIP]:PORT``, as oracle-traffic accepts them."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([0-9.]+):(\d+)", target)
    if not m:
        raise LabError(f"bad target {target!r} (want VIP:PORT or [V6VIP]:PORT)")
    return (m.group(1), int(m.group(2))) if m.group(1) else (m.group(3), int(m.group(4)))


def busybox_httpd() -> str | None:
    """The busybox binary if it has httpd (the oracle's server), else None."""
    exe = shutil.which("busybox")
    if exe is None:
        return None
    applets = _run([exe, "--list"], check=False).stdout.split()
    return exe if "httpd" in applets else None


# ---------------------------------------------------------------- the lab

@dataclass
class OracleLab:
    """The oracle's traffic lab in namespaces; ``close`` removes all of it."""

    workdir: Path
    gap: float = DEFAULT_GAP
    prefix: str = field(default_factory=lambda: unique_prefix("odl"))
    namespaces: list[str] = field(default_factory=list)
    backends: dict[str, int] = field(default_factory=dict)  # real server address -> N
    listeners: set[tuple[str, int]] = field(default_factory=set)
    holders: list[subprocess.Popen] = field(default_factory=list)
    servers: list[subprocess.Popen] = field(default_factory=list)
    marked: bool = False
    server: str | None = field(default_factory=busybox_httpd)

    # ------------------------------------------------------------ names
    @property
    def director(self) -> str:
        return f"{self.prefix}-d"

    @property
    def client(self) -> str:
        return f"{self.prefix}-c"

    @property
    def state_file(self) -> Path:
        return self.workdir / "state.json"

    def backend_ns(self, n: int) -> str:
        return f"{self.prefix}-b{n}"

    # ------------------------------------------------------------ building
    def build(self) -> OracleLab:
        """The director: an empty IPVS table, as after the VM's boot."""
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            (self.workdir / "www").mkdir(exist_ok=True)
            etc = Path("/etc/netns") / self.director
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(VM_HOSTS)
            (etc / "resolv.conf").write_text(NO_DNS)
            self._netns(self.director)
            self.sh(self.director, "ip link set lo up; "
                    "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 "
                    "net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 "
                    "net.ipv4.conf.all.accept_local=1 net.ipv4.conf.default.accept_local=1 "
                    "net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0")
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self) -> OracleLab:
        return self.build()

    def __exit__(self, *exc) -> None:
        self.close()

    def sh(self, ns: str, script: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run(["ip", "netns", "exec", ns, "sh", "-ec", script], check=check)

    def _netns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self.namespaces.append(name)

    def _ensure_ns(self, ns: str, hif: str) -> None:
        """A namespace joined to the director by veth ``hif`` <-> eth0 (oracle's ensure_ns)."""
        if ns in self.namespaces:
            return
        self._netns(ns)
        self.sh(ns, "for f in all default; do "
                    "echo 0 > /proc/sys/net/ipv6/conf/$f/accept_dad; "
                    "echo 0 > /proc/sys/net/ipv4/conf/$f/rp_filter; done; "
                    "echo 1 > /proc/sys/net/ipv4/tcp_syn_retries")
        d = self.director
        _run(["ip", "-n", d, "link", "add", hif, "type", "veth", "peer", "name", "eth0", "netns", ns])
        self.sh(d, f"ip link set {hif} up; ip addr add {GW4}/32 dev {hif} scope link; "
                   f"ip addr add {GW6}/64 dev {hif} nodad; "
                   f"echo 0 > /proc/sys/net/ipv4/conf/{hif}/rp_filter; "
                   f"echo 1 > /proc/sys/net/ipv4/conf/{hif}/accept_local")
        self.sh(ns, f"ip link set lo up; ip link set eth0 up; ip route add {GW4} dev eth0; "
                    f"ip route add default via {GW4} dev eth0; ip -6 route add default via {GW6} dev eth0")

    def _ns_addr(self, ns: str, hif: str, addr: str) -> None:
        plen = 128 if is_v6(addr) else 32
        extra = " nodad" if is_v6(addr) else ""
        _run(["ip", "-n", ns, "addr", "replace", f"{addr}/{plen}", "dev", "eth0", *extra.split()])
        _run(["ip", "-n", self.director, "route", "replace", f"{addr}/{plen}", "dev", hif])

    def _ensure_backend(self, rip: str, port: int, vip: str) -> None:
        """Namespace, address, VIP on lo and a server on ``port`` (oracle's ensure_backend)."""
        if rip not in self.backends:
            n = len(self.backends) + 1
            ns, hif = self.backend_ns(n), f"vb{n}"
            self._ensure_ns(ns, hif)
            self.backends[rip] = n
            self._ns_addr(ns, hif, rip)
            self.sh(ns, "echo 1 > /proc/sys/net/ipv4/conf/all/arp_ignore; "
                        "echo 2 > /proc/sys/net/ipv4/conf/all/arp_announce; "
                        "ip link set tunl0 up 2>/dev/null || true; "
                        "ip link set ip6tnl0 up 2>/dev/null || true")
            www = self.workdir / "www" / rip
            (www / "cgi-bin").mkdir(parents=True, exist_ok=True)
            (www / "index.html").write_text(rip + "\n")
            (www / "cgi-bin" / "hold").write_text(HOLD_CGI % rip)
            (www / "cgi-bin" / "hold").chmod(0o755)
        ns = self.backend_ns(self.backends[rip])
        plen = 128 if is_v6(vip) else 32
        _run(["ip", "-n", ns, "addr", "replace", f"{vip}/{plen}", "dev", "lo"], check=False)
        if (ns, port) not in self.listeners:
            self._start_server(ns, rip, port)
            self.listeners.add((ns, port))

    def _start_server(self, ns: str, rip: str, port: int) -> None:
        www = self.workdir / "www" / rip
        if self.server:
            cmd = [self.server, "httpd", "-f", "-p", str(port), "-h", str(www)]
        else:
            cmd = [sys.executable, "-m", "tests.oracle_lab", "serve", rip, str(port)]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.servers.append(subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdin=subprocess.DEVNULL,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            out = _run(["ip", "netns", "exec", ns, "ss", "-Hltn", f"sport = :{port}"], check=False).stdout
            if out.strip():
                return
            time.sleep(0.02)
        raise LabError(f"server {rip}:{port} did not start")

    def _ensure_vip_local(self, vip: str) -> None:
        got = _run(["ip", "-n", self.director, "route", "get", vip], check=False).stdout
        if not got.startswith("local "):
            plen = 128 if is_v6(vip) else 32
            _run(["ip", "-n", self.director, "addr", "add", f"{vip}/{plen}", "dev", "lo"])

    def _mark(self, vip: str, port: int, mark: str) -> None:
        """fwmark=M: oracle-traffic's rule, in the director (not ipvs2nft's table)."""
        nft = ["ip", "netns", "exec", self.director, "nft"]
        if not self.marked:
            _run([*nft, "add table inet oracle_traffic"])
            _run([*nft, "add chain inet oracle_traffic pre { type filter hook prerouting priority -150; "
                        "policy accept; }"])
            self.marked = True
        fam = "ip6" if is_v6(vip) else "ip"
        _run([*nft, f"add rule inet oracle_traffic pre {fam} daddr {vip} tcp dport {port} "
                    f"meta mark set {mark}"])

    # ------------------------------------------------------------ driving
    def env(self) -> dict[str, str]:
        env = dict(os.environ, IPVS2NFT_STATE=str(self.state_file), IPVS2NFT_BACKEND="nft", LC_ALL="C")
        return env

    def ipvsadm(self, argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess:
        """Our ipvsadm in the director, as the oracle runs the real one."""
        return subprocess.run(["ip", "netns", "exec", self.director, str(BIN / "ipvsadm"), *argv],
                              input=stdin or "", capture_output=True, text=True, env=self.env(),
                              timeout=120)

    def real_servers(self) -> list[tuple[str, int]]:
        """(address, port) of every real server, from ``ipvsadm -S -n`` (the oracle's source)."""
        p = self.ipvsadm(["-S", "-n"])
        found = []
        for line in p.stdout.splitlines():
            words = line.split()
            if "-r" in words[:-1]:
                w = words[words.index("-r") + 1]
                m = re.fullmatch(r"\[(.+)\]:(\d+)|([0-9.]+):(\d+)", w)
                if m:
                    addr, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
                    found.append((addr, int(port)))
        return found

    def connect(self, target: str, count: int = 1, sources: Sequence[str] = (), fwmark: str | None = None,
                timeout: int = 3, hold: bool = False) -> str:
        """``@connect``: returns the text oracle-traffic prints (conn lines and summary)."""
        vip, port = split_target(target)
        for rip, rport in self.real_servers():
            rport = rport or port
            self._ensure_backend(rip, rport, vip)
            if rport != port:
                self._ensure_backend(rip, port, vip)
        self._ensure_vip_local(vip)
        if fwmark:
            self._mark(vip, port, fwmark)
        clients = list(sources) or [DEF_CLIENT6 if is_v6(vip) else DEF_CLIENT4]
        self._ensure_ns(self.client, "vc0")
        for c in clients:
            self._ns_addr(self.client, "vc0", c)
        seq = [clients[k % len(clients)] for k in range(count)]
        if count <= 0:
            return "summary\n"
        args = [str(timeout), f"{self.gap:g}", vip, str(port)]
        env = dict(os.environ, TMPD=str(self.workdir))
        if hold:
            out = self.workdir / "conns"
            out.write_text("")
            p = subprocess.Popen(["ip", "netns", "exec", self.client, "bash", "-c", HOLD_LOOP, "_", *args,
                                  str(out), *seq], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, env=env)
            self.holders.append(p)
            deadline = time.monotonic() + count * (timeout + 2) + 5
            while "done\n" not in out.read_text():
                if time.monotonic() > deadline or p.poll() is not None:
                    raise LabError(f"held connections to {target} did not finish")
                time.sleep(0.01)
            lines = [x for x in out.read_text().splitlines() if x != "done"]
        else:
            p = _run(["ip", "netns", "exec", self.client, "bash", "-c", CLIENT_LOOP, "_", *args, *seq],
                     env=env, timeout=count * (timeout + 5) + 10)
            lines = p.stdout.splitlines()
        return "".join(x + "\n" for x in lines) + summary(lines) + "\n"

    def release(self) -> None:
        """``@release``: the holders die, their sockets close (FIN from the client)."""
        for p in self.holders:
            p.kill()
        for p in self.holders:
            p.wait()
        self.holders.clear()
        time.sleep(0.2)  # what oracle-traffic waits after killing them

    def close(self) -> None:
        """Everything goes, also after a failure: processes in our namespaces, the namespaces."""
        for p in self.holders:
            p.kill()
        for p in self.holders:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        self.holders.clear()
        for ns in reversed(self.namespaces):
            pids = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        for p in self.servers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        self.servers.clear()
        for ns in reversed(self.namespaces):
            _run(["ip", "netns", "del", ns], check=False)
        self.namespaces.clear()
        shutil.rmtree(Path("/etc/netns") / self.director, ignore_errors=True)
        with contextlib.suppress(OSError):
            Path("/etc/netns").rmdir()  # only when empty: others' entries stay
        self.backends.clear()
        self.listeners.clear()
        self.marked = False


def summary(lines: Iterable[str]) -> str:
    """oracle-traffic's last line: ``summary <backend>=<count> ... [failed=N]``."""
    ok, failed = Counter(), 0
    for line in lines:
        w = line.split()
        if len(w) >= 4 and w[0] == "conn":
            if w[3] == "-":
                failed += 1
            else:
                ok[w[3]] += 1
    text = "summary" + "".join(f" {b}={n}" for b, n in sorted(ok.items()))
    return text + (f" failed={failed}" if failed else "")


def parse_conns(stdout: str) -> list[dict]:
    """The ``conns`` key of a connect record, from its text."""
    conns = []
    for line in stdout.splitlines():
        w = line.split()
        if len(w) >= 4 and w[0] == "conn":
            conns.append({"i": int(w[1]), "client": w[2], "backend": None if w[3] == "-" else w[3]})
    return conns


# ---------------------------------------------------------------- the daemon

def daemon_available(argv: Sequence[str] | None = None) -> str | None:
    """Why ``ipvs2nft daemon`` cannot be used here, or None."""
    cmd = list(argv or daemon_argv()) + ["--help"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{' '.join(cmd)}: {exc}"
    return None if p.returncode == 0 else f"`{' '.join(cmd)}` exits {p.returncode}: no daemon yet"


def daemon_argv() -> list[str]:
    """The daemon command: ``IPVS2NFT_DAEMON`` (shell words) or the venv's ``ipvs2nft daemon``."""
    text = os.environ.get("IPVS2NFT_DAEMON")
    return shlex.split(text) if text else [str(BIN / "ipvs2nft"), "daemon"]


class DaemonError(RuntimeError):
    """The daemon did not get ready, died, or did not stop on SIGTERM."""


class Daemon:
    """``ipvs2nft daemon`` in the director, started and stopped the systemd way.

    ``start`` creates a unix datagram socket, passes it as ``NOTIFY_SOCKET``
    and waits for ``READY=1``; ``stop`` sends SIGTERM and waits.  Its stdout
    and stderr go to ``daemon.log`` in the lab's directory (shown on errors).
    """

    def __init__(self, argv: Sequence[str] | None = None, ready_timeout: float = 30.0,
                 stop_timeout: float = 10.0) -> None:
        self.argv = list(argv or daemon_argv())
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen | None = None
        self.log: Path | None = None
        self.notifications: list[str] = []
        self._sockdir: str | None = None

    def start(self, lab: OracleLab) -> None:
        # a short path: sun_path holds 108 bytes, pytest's tmp_path may not fit
        self._sockdir = tempfile.mkdtemp(prefix="i2n-notify-")
        path = os.path.join(self._sockdir, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        self.log = lab.workdir / "daemon.log"
        env = dict(lab.env(), NOTIFY_SOCKET=path)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["ip", "netns", "exec", lab.director, *self.argv],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        try:
            self._wait_ready(sock)
        except BaseException:
            self.kill()
            raise
        finally:
            sock.close()

    def _wait_ready(self, sock: socket.socket) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DaemonError(f"no READY=1 within {self.ready_timeout:g} s\n{self.log_text()}")
            if self.proc.poll() is not None:
                raise DaemonError(f"daemon exited ({self.proc.returncode}) before READY=1\n{self.log_text()}")
            ready, _, _ = select.select([sock], [], [], min(left, 0.1))
            if ready:
                msg = sock.recv(4096).decode(errors="replace")
                self.notifications.append(msg)
                if "READY=1" in msg.split("\n"):
                    return

    def check(self) -> None:
        """Raise if the daemon died since it got ready."""
        if self.proc is not None and self.proc.poll() is not None:
            raise DaemonError(f"daemon exited ({self.proc.returncode})\n{self.log_text()}")

    def stop(self) -> None:
        """SIGTERM; the issue asks for an exit within a second or two (10 s allowed here)."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=self.stop_timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    raise DaemonError(f"daemon ignored SIGTERM for {self.stop_timeout:g} s\n"
                                      f"{self.log_text()}") from None
        finally:
            self._cleanup()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        self._cleanup()

    def _cleanup(self) -> None:
        if self._sockdir:
            shutil.rmtree(self._sockdir, ignore_errors=True)
            self._sockdir = None

    def log_text(self, tail: int = 4000) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "daemon log (tail):\n" + self.log.read_text(errors="replace")[-tail:]


# ---------------------------------------------------------------- transcripts

HEREDOC_RE = re.compile(r"""\s*<<-?\s*(['"]?)([A-Za-z_][A-Za-z0-9_]*)\1\s*$""")


def parse_script(text: str) -> list[dict]:
    """An oracle script as records without results (ipvs-oracle's parse_script)."""
    entries: list[dict] = []
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    i = 0
    while i < len(lines):
        raw, lineno = lines[i].rstrip("\r"), i + 1
        i += 1
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        stdin = None
        m = HEREDOC_RE.search(s)
        if m:
            s = s[: m.start()].rstrip()
            body = []
            while i < len(lines) and lines[i].rstrip("\r") != m.group(2):
                body.append(lines[i].rstrip("\r"))
                i += 1
            i += 1
            stdin = "".join(b + "\n" for b in body)
        e = {"n": len(entries), "line": lineno, "kind": "ipvsadm", "cmd": raw.strip(), "argv": None,
             "stdin": stdin}
        if s.startswith("!"):
            e["kind"], e["argv"] = "sh", ["bash", "-c", s[1:].strip()]
        elif s.startswith("@"):
            words = shlex.split(s[1:])
            e["kind"] = words[0]
            e["argv"] = ["oracle-traffic", *words] if words[0] in ("connect", "release") else ["oracle-reset"]
        else:
            words = shlex.split(s)
            e["argv"] = words[1:] if words[:1] == ["ipvsadm"] else words
        entries.append(e)
    return entries


def load(path: str | Path) -> list[dict]:
    """Records of a ``.jsonl`` fixture (with the oracle's results) or a ``.txt`` script."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".txt":
        return parse_script(text)
    return [r for r in (json.loads(x) for x in text.splitlines() if x.strip()) if "meta" not in r]


def blocks(records: list[dict]) -> list[list[dict]]:
    """The records between two ``@reset`` lines: each starts from a fresh IPVS."""
    out: list[list[dict]] = [[]]
    for r in records:
        if r["kind"] == "reset":
            if out[-1]:
                out.append([])
        else:
            out[-1].append(r)
    return [b for b in out if b]


def sleep_seconds(records: Iterable[dict]) -> float:
    """How long the ``!sleep`` lines of these records wait."""
    total = 0.0
    for r in records:
        m = r["kind"] == "sh" and re.fullmatch(r"sleep\s+([0-9.]+)", r["argv"][-1].strip())
        if m:
            total += float(m.group(1))
    return total


# ---------------------------------------------------------------- replay

@dataclass
class Step:
    """What our side did for one record; ``skipped`` says why nothing ran."""

    record: dict
    rc: int | None = None
    stdout: str = ""
    stderr: str = ""
    skipped: str | None = None

    @property
    def conns(self) -> list[dict]:
        return parse_conns(self.stdout)


def _connect_args(argv: list[str]) -> dict:
    """``oracle-traffic connect TARGET [N] [from=..] [fwmark=M] [timeout=S] [hold]``."""
    kw: dict = {"target": argv[2], "count": 1, "sources": (), "fwmark": None, "timeout": 3, "hold": False}
    for a in argv[3:]:
        if a == "hold":
            kw["hold"] = True
        elif a.startswith("from="):
            kw["sources"] = tuple(x for x in a[5:].split(",") if x)
        elif a.startswith("fwmark="):
            kw["fwmark"] = a[7:]
        elif a.startswith("timeout="):
            kw["timeout"] = int(a[8:])
        else:
            kw["count"] = int(a)
    return kw


def shell_step(rec: dict) -> Step:
    """``!`` lines: ``sleep`` runs (counters and timers must move on); the rest
    look inside the VM (/proc/net/ip_vs*, its lab's files, sysctls of IPVS)
    and have no meaning here, so they are skipped and said so."""
    line = rec["argv"][-1].strip()
    m = re.fullmatch(r"sleep\s+([0-9.]+)", line)
    if m:
        time.sleep(float(m.group(1)))
        return Step(rec, 0, "", "")
    return Step(rec, skipped="shell line of the VM, not replayed")


def replay(records: list[dict], workdir: Path, daemon: Daemon | None = None,
           gap: float = DEFAULT_GAP, on_step=None) -> list[Step]:
    """Run the records in a fresh lab (rebuilt at each ``@reset``); one Step each.

    ``daemon`` (optional) is started once the director exists and restarted
    with it at each ``@reset``; it is checked after every step.  ``on_step``
    is called with each Step as it completes (for progress output).
    """
    steps: list[Step] = []
    generation = 0

    def fresh() -> OracleLab:
        nonlocal generation
        generation += 1
        new = OracleLab(workdir / f"lab{generation}", gap=gap).build()
        if daemon is not None:
            try:
                daemon.start(new)
            except BaseException:
                new.close()
                raise
        return new

    lab = fresh()
    try:
        for rec in records:
            kind = rec["kind"]
            if kind == "reset":
                if daemon is not None:
                    daemon.stop()
                lab.close()
                lab = fresh()
                step = Step(rec, 0, "", "")
            elif kind == "ipvsadm":
                p = lab.ipvsadm(rec["argv"], rec.get("stdin"))
                step = Step(rec, p.returncode, p.stdout, p.stderr)
            elif kind == "connect":
                step = Step(rec, 0, lab.connect(**_connect_args(rec["argv"])), "")
            elif kind == "release":
                lab.release()
                step = Step(rec, 0, "", "")
            elif kind == "sh":
                step = shell_step(rec)
            else:
                raise LabError(f"line {rec['line']}: unknown kind {kind!r}")
            if daemon is not None:
                daemon.check()
            steps.append(step)
            if on_step is not None:
                on_step(step)
    finally:
        try:
            if daemon is not None:
                daemon.stop()
        finally:
            lab.close()
    return steps


# ---------------------------------------------------------------- comparison

# Timing-dependent values and how far ours may be from IPVS's (DAEMON.md):
# packets: the same busybox httpd and bash client exchange the same segments,
# but TCP's delayed ACKs depend on timing; 1 per connection either way.
# bytes: those segments are 52-80 bytes; 10 % covers one extra ACK per
# connection and the few bytes a Date or ETag header may differ by.
# rates: the estimator's 2 s tick falls at a different phase in the VM and
# here, so the same traffic may be counted one tick earlier or later (factor
# 4/3 per tick of decay, 4 on the first tick): a factor 2 either way, or 1.
PKT_SLACK_PER_CONN = 1
BYTE_SLACK = 0.10
RATE_FACTOR = 2.0


def _expand(argv: Sequence[str]) -> set[str]:
    """Option letters and long names of an ipvsadm argv (``-Ln`` -> L, n)."""
    opts: set[str] = set()
    for a in argv:
        if a.startswith("--"):
            opts.add(a.split("=", 1)[0])
        elif a.startswith("-") and len(a) > 1:
            opts.update(a[1:] if set(a[1:]) <= set("LlncZ") else a[1:2])
    return opts


def listing_kind(argv: Sequence[str]) -> str | None:
    """Which listing an ipvsadm command prints: conn, stats, rate, thresholds,
    persistent, plain -- or None for anything else."""
    o = _expand(argv)
    if not (o & {"L", "l", "--list"}):
        return None
    if o & {"c", "--connection"}:
        return "conn"
    for flag, kind in (("--stats", "stats"), ("--rate", "rate"), ("--thresholds", "thresholds"),
                       ("--persistent-conn", "persistent")):
        if flag in o:
            return kind
    return "plain"


_NUM = re.compile(r"^(\d+)([KMGT]?)$")
_SCALE = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def _number(word: str) -> int | None:
    m = _NUM.match(word)
    return int(m.group(1)) * _SCALE[m.group(2)] if m else None


def _split_counts(line: str) -> tuple[str, list[str]]:
    """A --stats/--rate line: its 33-column label and the five numbers."""
    return line[:33], line[33:].split()


def _close(ours: int, theirs: int, kind: str, column: int, conns: int) -> bool:
    if kind == "rate":
        if theirs == ours or abs(ours - theirs) <= 1:
            return True
        low, high = sorted((ours, theirs))
        return low > 0 and high <= low * RATE_FACTOR
    if column == 0:  # Conns: counted once per scheduled connection, exact
        return ours == theirs
    if column in (1, 2):
        return abs(ours - theirs) <= PKT_SLACK_PER_CONN * max(conns, 1)
    return abs(ours - theirs) <= BYTE_SLACK * max(ours, theirs) + 1


def _compare_counts(theirs: str, ours: str, kind: str, live: bool) -> list[str]:
    t_lines, o_lines = theirs.splitlines(), ours.splitlines()
    if len(t_lines) != len(o_lines):
        return [f"{len(o_lines)} lines instead of {len(t_lines)}\n{_diff(theirs, ours)}"]
    bad = []
    for t, o in zip(t_lines, o_lines, strict=True):
        t_label, t_nums = _split_counts(t)
        o_label, o_nums = _split_counts(o)
        values = [_number(w) for w in t_nums]
        if len(t_nums) != 5 or None in values:  # a title line: exact
            if t != o:
                bad.append(f"line differs:\n    ipvs: {t!r}\n    ours: {o!r}")
            continue
        ours_values = [_number(w) for w in o_nums]
        if t_label != o_label or len(o_nums) != 5 or None in ours_values:
            bad.append(f"row differs:\n    ipvs: {t!r}\n    ours: {o!r}")
            continue
        if not live:
            continue
        conns = values[0]
        wrong = [i for i in range(5) if not _close(ours_values[i], values[i], kind, i, conns)]
        if wrong or _layout(o) != o:
            bad.append(f"values out of tolerance (columns {wrong}):\n    ipvs: {t!r}\n    ours: {o!r}")
    return bad


def _layout(line: str) -> str:
    """The line re-printed from its values (``%9llu`` each): catches padding errors."""
    return line[:33] + "".join(f" {w:>8}" for w in line[33:].split())


def _conn_rows(text: str, live: bool) -> tuple[list[str], Counter]:
    """-c output: its header lines, and its rows with the timing-dependent
    parts masked (expire; the client's random source port unless it is a
    template's 0).  Rows come in the kernel's hash order: a multiset."""
    head, rows = [], Counter()
    for line in text.splitlines():
        w = line.split()
        if line.startswith(("IPVS connection entries", "pro expire")) or len(w) < 6:
            head.append(line)
            continue
        if not live:
            continue
        src = w[3]
        host, _, port = src.rpartition(":")
        if port != "0":
            src = f"{host}:*"
        rest = " ".join(w[5:])
        layout_ok = line == f"{w[0]:<3} {w[1]:<6} {w[2]:<11} {w[3]:<18} {w[4]:<18} {rest}"
        rows[(w[0], w[2], src, w[4], " ".join(w[5:]), "" if layout_ok else "BAD LAYOUT")] += 1
    return head, rows


def _mask_conn_columns(text: str, kind: str) -> str:
    """The listing with the live columns (ActiveConn, InActConn, PersistConn) starred."""
    n = {"plain": 2, "thresholds": 2, "persistent": 3}[kind]
    out = []
    for line in text.splitlines():
        if line.startswith("  -> ") and not line.startswith("  -> RemoteAddress"):
            words = line.split()
            line = " ".join(words[:-n] + ["*"] * n)
        out.append(line)
    return "\n".join(out)


def differences(step: Step, live: bool = True) -> list[str]:
    """How our step differs from the oracle's record; empty when it matches.

    ``live`` compares what only a daemon can know (ActiveConn/InActConn,
    PersistConn, --stats, --rate, -c rows); without it those are masked and
    only the decisions and the static parts of listings are compared.
    """
    rec = step.record
    if step.skipped or "rc" not in rec:  # a .txt script: nothing to compare with
        return []
    if rec["kind"] == "connect":
        if step.stdout == rec["stdout"]:
            return []
        ipvs = [c["backend"] for c in parse_conns(rec["stdout"])]
        ours = [c["backend"] for c in step.conns]
        return [f"connections differ:\n    ipvs: {ipvs}\n    ours: {ours}\n"
                f"    ipvs text: {rec['stdout']!r}\n    ours text: {step.stdout!r}"]
    if rec["kind"] != "ipvsadm":
        return [] if (step.rc, step.stdout) == (rec["rc"], rec["stdout"]) else [f"rc/stdout {step.rc}"]
    bad = []
    if step.rc != rec["rc"]:
        bad.append(f"rc {step.rc} instead of {rec['rc']}")
    if step.stderr != rec["stderr"]:
        bad.append(f"stderr:\n    ipvs: {rec['stderr']!r}\n    ours: {step.stderr!r}")
    kind = listing_kind(rec["argv"]) if rec["rc"] == 0 else None
    if kind in ("stats", "rate"):
        bad += _compare_counts(rec["stdout"], step.stdout, kind, live)
    elif kind == "conn":
        t_head, t_rows = _conn_rows(rec["stdout"], live)
        o_head, o_rows = _conn_rows(step.stdout, live)
        if t_head != o_head:
            bad.append(f"header:\n    ipvs: {t_head}\n    ours: {o_head}")
        if t_rows != o_rows:
            missing, extra = t_rows - o_rows, o_rows - t_rows
            bad.append("rows (expire and client port masked):\n"
                       + "".join(f"    missing: {r} x{n}\n" for r, n in sorted(missing.items()))
                       + "".join(f"    extra:   {r} x{n}\n" for r, n in sorted(extra.items())))
    elif kind is not None and not live:
        if _mask_conn_columns(rec["stdout"], kind) != _mask_conn_columns(step.stdout, kind):
            bad.append(_diff(rec["stdout"], step.stdout))
    elif step.stdout != rec["stdout"]:
        bad.append(_diff(rec["stdout"], step.stdout))
    return bad


def _diff(theirs: str, ours: str) -> str:
    import difflib

    lines = difflib.unified_diff(theirs.splitlines(), ours.splitlines(), "ipvs", "ours", lineterm="", n=1)
    return "stdout:\n" + "\n".join("    " + x for x in lines)


def report(steps: Iterable[Step], live: bool = True) -> list[str]:
    """One text per differing step, naming the script line."""
    out = []
    for s in steps:
        bad = differences(s, live)
        if bad:
            out.append(f"line {s.record['line']}: {s.record['cmd']}\n  " + "\n  ".join(bad))
    return out


# ---------------------------------------------------------------- stand-in server

def serve(name: str, port: int) -> None:
    """busybox httpd's answers where busybox is missing: ``GET /`` gets the
    name and the connection closes; ``/cgi-bin/hold`` gets the name and the
    connection stays open, unread, as the oracle's CGI (``sleep 900``) does."""
    import socketserver

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            request = self.rfile.readline().decode(errors="replace").split()
            while self.rfile.readline().strip():
                pass
            body = name + "\n"
            if len(request) > 1 and request[1] == "/cgi-bin/hold":
                self.wfile.write(f"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n{body}".encode())
                self.wfile.flush()
                threading.Event().wait(900)
                return
            self.wfile.write(f"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\nContent-Length: {len(body)}"
                             f"\r\nConnection: close\r\n\r\n{body}".encode())

    class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
        allow_reuse_address = True
        daemon_threads = True
        address_family = socket.AF_INET6

        def server_bind(self) -> None:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()

    Server(("::", port), Handler).serve_forever()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.oracle_lab",
                                 description="Replay an oracle transcript in a namespace lab (root).")
    ap.add_argument("fixture", help="a .jsonl fixture (compared) or .txt script (only run); "
                                    "'serve NAME PORT' runs the stand-in server")
    ap.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--daemon", action="store_true", help="run `ipvs2nft daemon` (or $IPVS2NFT_DAEMON)")
    ap.add_argument("--static", action="store_true", help="mask live counters (no daemon)")
    ap.add_argument("--gap", type=float, default=DEFAULT_GAP, help="seconds between connections")
    ap.add_argument("--block", type=int, action="append", help="only these @reset blocks (from 1)")
    args = ap.parse_args(argv)
    if args.fixture == "serve":
        serve(args.rest[0], int(args.rest[1]))
        return 0
    records = load(args.fixture)
    chosen = blocks(records)
    if args.block:
        chosen = [chosen[i - 1] for i in args.block]
    failed = 0
    with tempfile.TemporaryDirectory(prefix="oracle-lab-") as tmp:
        for k, block in enumerate(chosen, 1):
            daemon = Daemon() if args.daemon else None
            steps = replay(block, Path(tmp) / f"block{k}", daemon=daemon, gap=args.gap,
                           on_step=lambda s: print(f"{s.record['line']:4} {s.record['cmd']}"
                                                   + (f"  [{s.skipped}]" if s.skipped else ""), flush=True))
            for s in steps:
                if s.record["kind"] == "connect":
                    print("     " + " ".join((c["backend"] or "-").rsplit(".", 1)[-1] for c in s.conns))
            bad = report(steps, live=not args.static) if "rc" in block[0] else []
            failed += len(bad)
            print("\n".join(bad))
    print(f"{failed} differing steps")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
