"""A load-balancing lab of network namespaces on this machine.

Topology (one director, N real servers, one client)::

    client ns  198.51.100.2/24, 2001:db8:ffff::2/64 (+ extra client addresses)
        |  veth
    director ns  198.51.100.1 | br0 192.168.100.1/24, 2001:db8:100::1/64
        |  VIPs on lo (192.168.0.40, 2001:db8::40): IPVS needs local VIPs
        |  bridge br0
    rsN ns  192.168.100.(10+N)/24, 2001:db8:100::(10+N)/64, default via the director

Every name starts with a unique prefix, so parallel labs never collide, and
``close`` removes everything (also after a failure).  Traffic only ever goes
between these namespaces.  Used by ``make demo``, the traffic tests and
``bench/``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

VIP4 = "192.168.0.40"
VIP6 = "2001:db8::40"
CLIENT4 = "198.51.100.2"
CLIENT6 = "2001:db8:ffff::2"


def rs4(i: int) -> str:
    return f"192.168.100.{10 + i}"


def rs6(i: int) -> str:
    return f"2001:db8:100::{10 + i:x}"


def _run(cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


@dataclass
class Lab:
    """The namespaces, their processes, and helpers to drive them."""

    prefix: str
    servers: int = 3
    ports_tcp: tuple[int, ...] = (80, 443, 8080)
    ports_udp: tuple[int, ...] = (53,)
    ports_hold: tuple[int, ...] = (7777,)  # connections stay open (echo) on these
    clients: int = 4  # client addresses 198.51.100.2 .. (2+clients-1)
    vips: tuple[str, ...] = (VIP4, "192.168.0.41", "192.168.0.42")
    state_dir: Path | None = None
    # where ipvsadm and ipvs2nft are: beside the running Python (the venv's
    # bin/) unless named, e.g. /usr/sbin for the installed Debian package
    bin_dir: Path | None = None
    procs: list[subprocess.Popen] = field(default_factory=list)
    created: list[str] = field(default_factory=list)

    # ------------------------------------------------------------ names
    @property
    def director(self) -> str:
        return f"{self.prefix}-dir"

    @property
    def client(self) -> str:
        return f"{self.prefix}-cli"

    def rs(self, i: int) -> str:
        return f"{self.prefix}-rs{i}"

    def client_addresses(self) -> list[str]:
        return [f"198.51.100.{2 + i}" for i in range(self.clients)]

    def client_addresses6(self) -> list[str]:
        return [f"2001:db8:ffff::{2 + i:x}" for i in range(self.clients)]

    # ------------------------------------------------------------ building
    def ns(self, name: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run(["ip", "netns", "exec", name, *cmd], check=check)

    def sh(self, name: str, script: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.ns(name, "sh", "-ec", script, check=check)

    def _netns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self.created.append(name)
        self.sh(name, "ip link set lo up; sysctl -qw net.ipv6.conf.all.accept_dad=0 "
                      "net.ipv6.conf.default.accept_dad=0")

    def build(self) -> Lab:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        d, c = self.director, self.client
        for name in (d, c, *(self.rs(i) for i in range(self.servers))):
            self._netns(name)
        # client <-> director
        _run(["ip", "-n", d, "link", "add", "cli0", "type", "veth", "peer", "name", "eth0", "netns", c])
        caddrs = "".join(f"ip addr add {a}/24 dev eth0; " for a in self.client_addresses())
        caddrs += "".join(f"ip addr add {a}/64 dev eth0 nodad; " for a in self.client_addresses6()[1:])
        self.sh(c, f"ip addr add {CLIENT6}/64 dev eth0 nodad; {caddrs} ip link set eth0 up; "
                   f"ip route add default via 198.51.100.1 src {CLIENT4}; "
                   f"ip -6 route add default via 2001:db8:ffff::1")
        self.sh(d, "ip addr add 198.51.100.1/24 dev cli0; ip addr add 2001:db8:ffff::1/64 dev cli0 nodad; "
                   "ip link set cli0 up; ip link add br0 type bridge; "
                   "ip addr add 192.168.100.1/24 dev br0; ip addr add 2001:db8:100::1/64 dev br0 nodad; "
                   "ip link set br0 up; "
                   + "".join(f"ip addr add {v}/32 dev lo; " for v in self.vips) +
                   f"ip addr add {VIP6}/128 dev lo; "
                   "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1")
        for i in range(self.servers):
            r = self.rs(i)
            _run(["ip", "-n", d, "link", "add", f"rs{i}", "type", "veth", "peer", "name", "eth0", "netns", r])
            self.sh(d, f"ip link set rs{i} master br0; ip link set rs{i} up")
            self.sh(r, f"ip addr add {rs4(i)}/24 dev eth0; ip addr add {rs6(i)}/64 dev eth0 nodad; "
                       "ip link set eth0 up; ip route add default via 192.168.100.1; "
                       "ip -6 route add default via 2001:db8:100::1")
            self.start_server(i)
        self._wait_ready()

    def start_server(self, i: int) -> None:
        self._serve(self.rs(i), rs4(i))

    def _serve(self, ns: str, name: str, extra: tuple[str, ...] = ()) -> subprocess.Popen:
        tcp = ",".join(map(str, self.ports_tcp))
        udp = ",".join(map(str, self.ports_udp))
        hold = ",".join(map(str, self.ports_hold))
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "ipvs2nft.labnode", "serve",
               "--name", name, "--tcp", tcp, "--udp", udp, "--hold", hold, *extra]
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        self.procs.append(p)
        return p

    @contextlib.contextmanager
    def serving_on_director(self, name: str = "director", tcp: str = "") -> Iterator[None]:
        """A real server on the director itself (the lab's ports, every
        address of the director, both families) for the block: the set-ups
        where the director is one of its own real servers.  With ``tcp``
        ("PORT,..."): only those TCP ports, on 127.0.0.1 only."""
        extra = ("--tcp", tcp, "--udp", "", "--hold", "", "--loopback") if tcp else ()
        p = self._serve(self.director, name, extra)
        try:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("the director's server did not start")
            yield
        finally:
            p.kill()
            p.wait()
            self.procs.remove(p)

    def _wait_ready(self) -> None:
        for p in self.procs:
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError("a lab server did not start")

    def close(self) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()
        for name in reversed(self.created):
            _run(["ip", "netns", "del", name], check=False)
        self.created.clear()

    def __enter__(self) -> Lab:
        return self.build()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ driving
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.state_dir is not None:
            env["IPVS2NFT_STATE"] = str(self.state_dir / "state.json")
        env["IPVS2NFT_BACKEND"] = "nft"
        return env

    def command(self, prog: str) -> str:
        """The path of one of our commands (ipvsadm, ipvsadm-restore, ipvs2nft...)."""
        where = Path(self.bin_dir) if self.bin_dir is not None else Path(sys.executable).parent
        path = where / prog
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist (Lab.bin_dir names where our commands are)")
        return str(path)

    def ipvsadm(self, args: str | list[str], stdin: str | None = None, check: bool = True,
                prog: str = "ipvsadm") -> subprocess.CompletedProcess:
        """Run our ipvsadm inside the director namespace."""
        argv = shlex.split(args) if isinstance(args, str) else list(args)
        p = subprocess.run(["ip", "netns", "exec", self.director, self.command(prog), *argv], input=stdin,
                           text=True, capture_output=True, env=self.env())
        if check and p.returncode != 0:
            raise AssertionError(f"ipvsadm {args} failed ({p.returncode}): {p.stderr}")
        return p

    def connect(self, host: str, port: int, count: int, proto: str = "tcp", sources: list[str] = (),
                timeout: float = 2.0, sport: int | None = None, ns: str | None = None) -> list[dict]:
        """Sequential connections from the client namespace; one dict each."""
        cmd = [sys.executable, "-m", "ipvs2nft.labnode", "connect", host, str(port), str(count),
               "--proto", proto, "--timeout", str(timeout), "--from", ",".join(sources)]
        if sport:
            cmd += ["--sport", str(sport)]
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
        p = subprocess.run(["ip", "netns", "exec", ns or self.client, *cmd], capture_output=True,
                           text=True, env=env, timeout=count * (timeout + 1) + 10)
        return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]

    def backends(self, host: str, port: int, count: int, **kw) -> list[str | None]:
        return [r["backend"] for r in self.connect(host, port, count, **kw)]

    def direct_routing(self) -> None:
        """Prepare the real servers for -g: the VIPs on their loopback, not
        answered in ARP (what LVS-DR requires).  Their replies go back
        through the director here (one machine), so the director must accept
        packets from its own VIP (accept_local), a lab artefact only."""
        vips = "".join(f"ip addr add {v}/32 dev lo; " for v in self.vips) + f"ip addr add {VIP6}/128 dev lo; "
        for i in range(self.servers):
            self.sh(self.rs(i), vips + "sysctl -qw net.ipv4.conf.all.arp_ignore=1 "
                                        "net.ipv4.conf.all.arp_announce=2 net.ipv4.conf.eth0.arp_ignore=1 "
                                        "net.ipv4.conf.eth0.arp_announce=2")
        self.sh(self.director, "sysctl -qw net.ipv4.conf.all.accept_local=1 net.ipv4.conf.br0.accept_local=1 "
                               "net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.br0.rp_filter=0 "
                               "net.ipv4.conf.default.rp_filter=0")

    def session(self, host: str, port: int, timeout: float = 5.0) -> LabSession:
        """A long-lived connection from the client (see labnode.session);
        ``timeout``: how long an echo is waited for."""
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
        p = subprocess.Popen(["ip", "netns", "exec", self.client, sys.executable, "-m", "ipvs2nft.labnode",
                              "session", host, str(port), "--timeout", str(timeout)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)
        self.procs.append(p)
        return LabSession(p, json.loads(p.stdout.readline())["backend"])

    def nft(self, *args: str) -> str:
        return self.ns(self.director, "nft", *args).stdout

    def daemon(self, *args: str, timeout: float = 20.0) -> LabDaemon:
        """``ipvs2nft daemon`` in the director, started as systemd would
        (NOTIFY_SOCKET); returns once it said READY=1."""
        import socket
        import tempfile

        where = Path(tempfile.mkdtemp(prefix="i2n-notify-"))
        path = str(where / "notify")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        listener.bind(path)
        listener.settimeout(timeout)
        env = self.env()
        env["NOTIFY_SOCKET"] = path
        cmd = ["ip", "netns", "exec", self.director, self.command("ipvs2nft"), "daemon", *args]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        messages = []
        try:
            while not any(m.startswith("READY=1") for m in messages):
                messages.append(listener.recv(4096).decode())
        except OSError:
            proc.kill()
            _, err = proc.communicate(timeout=5)
            raise RuntimeError(f"the daemon did not get ready: {err.strip()}") from None
        finally:
            listener.close()
            for leftover in where.iterdir():
                leftover.unlink()
            where.rmdir()
        return LabDaemon(proc, messages)


@dataclass
class LabDaemon:
    proc: subprocess.Popen
    notices: list[str]

    def stop(self, timeout: float = 5.0) -> float:
        """SIGTERM; returns how long it took to exit."""
        started = time.monotonic()
        self.proc.terminate()
        self.proc.wait(timeout=timeout)
        return time.monotonic() - started

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=5)


@dataclass
class LabSession:
    proc: subprocess.Popen
    backend: str

    error: str | None = None  # why the last echo did not come ("timed out": dropped; a reset...)

    def echo(self, text: str = "ping") -> str | None:
        return self._ask(text)

    def wait(self, seconds: float) -> str | None:
        """The echo still owed for a line sent earlier, waited for up to
        ``seconds`` (TCP sends a dropped segment again)."""
        return self._ask(f"!wait {seconds}")

    def _ask(self, line: str) -> str | None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        self.error = answer.get("error")
        return answer.get("echo")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


def unique_prefix(tag: str = "i2n") -> str:
    """Short (interface and namespace names are limited) and unique per run."""
    return f"{tag}{os.getpid() % 100000}{int(time.monotonic() * 1000) % 10000}"


_CLONE_NEWNET = 0x40000000  # <linux/sched.h>


@contextlib.contextmanager
def inside(namespace: str) -> Iterator[None]:
    """Run the calling thread in network namespace ``namespace`` (an
    ``ip netns`` name) until the block ends: sockets opened inside stay in
    that namespace afterwards.  setns(2) through libc, since os.setns
    arrived only in Python 3.12."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(f"/run/netns/{namespace}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.setns(target, _CLONE_NEWNET) != 0:
                code = ctypes.get_errno()
                raise OSError(code, f"setns {namespace}: {os.strerror(code)}")
        finally:
            os.close(target)
        try:
            yield
        finally:
            if libc.setns(own, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "cannot return to the original network namespace")
    finally:
        os.close(own)
