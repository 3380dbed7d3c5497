"""Two directors in front of the same real servers: the failover lab.

Topology (every link a veth into a bridge of the switch namespace)::

    client ns   198.51.100.2.. /24 on the client LAN
    director A  198.51.100.11 | 192.168.100.2 | sync 10.0.0.1
    director B  198.51.100.12 | 192.168.100.3 | sync 10.0.0.2
    rsN ns      192.168.100.(10+N)/24, default via 192.168.100.1

Two floating addresses move between the directors as VRRP moves them
(keepalived's ``virtual_ipaddress``): the VIP 198.51.100.40 on the client
LAN and the real servers' gateway 192.168.100.1 on their LAN.  ``move_to``
deletes them on one director, adds them on the other and sends gratuitous
ARP for both, which is all VRRP does to the data path; ``cut_off`` takes a
director's client and server links down (its sync link stays up).  Each
director has its own state file, like two machines.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ipvs2nft.lab import _run, inside

VIP = "198.51.100.40"
GATEWAY = "192.168.100.1"
CLIENT = "198.51.100.2"
DIRECTORS = {"a": ("198.51.100.11", "192.168.100.2", "10.0.0.1"),
             "b": ("198.51.100.12", "192.168.100.3", "10.0.0.2")}
SYNC_IF = "sync0"


def rs(i: int) -> str:
    return f"192.168.100.{10 + i}"


@dataclass
class TwinLab:
    prefix: str
    state_dir: Path
    servers: int = 3
    clients: int = 2
    created: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)
    active: str = ""

    # ------------------------------------------------------------ names
    def director(self, which: str) -> str:
        return f"{self.prefix}-{which}"

    @property
    def switch(self) -> str:
        return f"{self.prefix}-sw"

    @property
    def client(self) -> str:
        return f"{self.prefix}-cli"

    def server(self, i: int) -> str:
        return f"{self.prefix}-rs{i}"

    def client_addresses(self) -> list[str]:
        return [f"198.51.100.{2 + i}" for i in range(self.clients)]

    # ------------------------------------------------------------ building
    def sh(self, ns: str, script: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run(["ip", "netns", "exec", ns, "sh", "-ec", script], check=check)

    def _netns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self.created.append(name)
        self.sh(name, "ip link set lo up")

    def _plug(self, ns: str, ifname: str, bridge: str) -> None:
        """A veth from ``ns`` (named ``ifname`` there) into ``bridge``."""
        port = f"p{len(self.created)}{ifname}"[:15]
        _run(["ip", "-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", ifname,
              "netns", ns])
        self.sh(self.switch, f"ip link set {port} master {bridge}; ip link set {port} up")

    def build(self) -> TwinLab:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        self._netns(self.switch)
        self.sh(self.switch, "".join(f"ip link add {b} type bridge mcast_snooping 0; ip link set {b} up; "
                                     for b in ("lan", "rsn", "syn")))
        self._netns(self.client)
        self._plug(self.client, "eth0", "lan")
        addrs = "".join(f"ip addr add {a}/24 dev eth0; " for a in self.client_addresses())
        self.sh(self.client, f"{addrs}ip link set eth0 up")
        for which, (lan, rsn, syn) in DIRECTORS.items():
            d = self.director(which)
            self._netns(d)
            for ifname, bridge in (("lan0", "lan"), ("rsn0", "rsn"), (SYNC_IF, "syn")):
                self._plug(d, ifname, bridge)
            self.sh(d, f"ip addr add {lan}/24 dev lan0; ip addr add {rsn}/24 dev rsn0; "
                       f"ip addr add {syn}/24 dev {SYNC_IF}; "
                       f"ip link set lan0 up; ip link set rsn0 up; ip link set {SYNC_IF} up; "
                       "sysctl -qw net.ipv4.ip_forward=1 net.netfilter.nf_conntrack_tcp_loose=0 "
                       "net.ipv4.conf.all.accept_local=1 net.ipv4.conf.all.rp_filter=0 "
                       "net.ipv4.conf.default.rp_filter=0 net.ipv4.conf.rsn0.rp_filter=0 "
                       "net.ipv4.conf.rsn0.accept_local=1")
        for i in range(self.servers):
            s = self.server(i)
            self._netns(s)
            self._plug(s, "eth0", "rsn")
            self.sh(s, f"ip addr add {rs(i)}/24 dev eth0; ip link set eth0 up; "
                       f"ip route add default via {GATEWAY}; "
                       f"ip addr add {VIP}/32 dev lo; sysctl -qw net.ipv4.conf.all.arp_ignore=1 "
                       "net.ipv4.conf.all.arp_announce=2 net.ipv4.conf.eth0.arp_ignore=1 "
                       "net.ipv4.conf.eth0.arp_announce=2")
            self._serve(s, rs(i))
        for p in self.procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("a lab server did not start")
        self.move_to("a")

    def _serve(self, ns: str, name: str) -> None:
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "ipvs2nft.labnode", "serve", "--name", name,
               "--tcp", "80", "--udp", "53", "--hold", "7777"]
        self.procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                           env=_env()))

    # ------------------------------------------------------------ VRRP
    def move_to(self, which: str) -> None:
        """The floating addresses leave the other director and come up on
        ``which``, announced by gratuitous ARP."""
        for other in DIRECTORS:
            if other != which:
                self.sh(self.director(other), f"ip addr del {VIP}/24 dev lan0 2>/dev/null || true; "
                                              f"ip addr del {GATEWAY}/24 dev rsn0 2>/dev/null || true")
        d = self.director(which)
        self.sh(d, f"ip addr replace {VIP}/24 dev lan0; ip addr replace {GATEWAY}/24 dev rsn0")
        with inside(d):
            gratuitous_arp("lan0", VIP)
            gratuitous_arp("rsn0", GATEWAY)
        self.active = which

    def cut_off(self, which: str) -> None:
        self.sh(self.director(which), "ip link set lan0 down; ip link set rsn0 down")

    def reconnect(self, which: str) -> None:
        self.sh(self.director(which), "ip link set lan0 up; ip link set rsn0 up")

    # ------------------------------------------------------------ driving
    def env(self, which: str) -> dict[str, str]:
        env = _env()
        env["IPVS2NFT_STATE"] = str(self.state_dir / which / "state.json")
        env["IPVS2NFT_BACKEND"] = "nft"
        return env

    def ipvsadm(self, which: str, args: str, check: bool = True) -> subprocess.CompletedProcess:
        (self.state_dir / which).mkdir(parents=True, exist_ok=True)
        exe = str(Path(sys.executable).parent / "ipvsadm")
        p = subprocess.run(["ip", "netns", "exec", self.director(which), exe, *shlex.split(args)],
                           capture_output=True, text=True, env=self.env(which))
        if check and p.returncode != 0:
            raise AssertionError(f"ipvsadm {args} on {which} failed ({p.returncode}): {p.stderr}")
        return p

    def both(self, *commands: str) -> None:
        for which in DIRECTORS:
            for c in commands:
                self.ipvsadm(which, c)

    def connect(self, port: int, count: int, proto: str = "tcp", sport: int | None = None,
                source: str = "", timeout: float = 2.0) -> list[dict]:
        import json

        cmd = [sys.executable, "-m", "ipvs2nft.labnode", "connect", VIP, str(port), str(count),
               "--proto", proto, "--timeout", str(timeout), "--from", source]
        if sport:
            cmd += ["--sport", str(sport)]
        p = subprocess.run(["ip", "netns", "exec", self.client, *cmd], capture_output=True, text=True,
                           env=_env(), timeout=count * (timeout + 1) + 10)
        return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]

    def backends(self, port: int, count: int, **kw) -> list[str | None]:
        return [r["backend"] for r in self.connect(port, count, **kw)]

    def session(self, port: int = 7777):
        import json

        from ipvs2nft.lab import LabSession

        p = subprocess.Popen(["ip", "netns", "exec", self.client, sys.executable, "-m", "ipvs2nft.labnode",
                              "session", VIP, str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env=_env())
        self.procs.append(p)
        return LabSession(p, json.loads(p.stdout.readline())["backend"])

    def conntrack(self, which: str, *args: str) -> str:
        return _run(["ip", "netns", "exec", self.director(which), "conntrack", *args], check=False).stdout

    # ------------------------------------------------------------ teardown
    def close(self) -> None:
        for which in DIRECTORS:
            if self.director(which) in self.created:
                for state in ("master", "backup"):
                    with contextlib.suppress(Exception):
                        self.ipvsadm(which, f"--stop-daemon {state}", check=False)
        for p in self.procs:
            p.kill()
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        self.procs.clear()
        for name in reversed(self.created):
            kill_namespace_processes(name)
            _run(["ip", "netns", "del", name], check=False)
        self.created.clear()

    def __enter__(self) -> TwinLab:
        return self.build()

    def __exit__(self, *exc) -> None:
        self.close()


def kill_namespace_processes(name: str) -> None:
    """Whatever still runs in a namespace this lab created (a sync daemon a
    failed test left behind), by pid."""
    pids = _run(["ip", "netns", "pids", name], check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)


def gratuitous_arp(ifname: str, address: str) -> None:
    """One gratuitous ARP request (sender = target = ``address``) from
    ``ifname``, as VRRP sends when it takes an address over."""
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((ifname, 0))
        mac = s.getsockname()[4]
        ip = socket.inet_aton(address)
        arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + ip + b"\0" * 6 + ip
        s.send(b"\xff" * 6 + mac + struct.pack("!H", 0x0806) + arp)


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
