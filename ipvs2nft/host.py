"""Facts about this host's network namespace that IPVS checks consult.

The kernel refuses some real-server addresses by looking at its routing
tables, and starts sync daemons by opening sockets on an interface.  These
probes ask the same questions of the namespace ipvsadm runs in, through
ioctls, /proc/net (both follow the caller's namespace, unlike /sys) and
real sockets set up the way net/netfilter/ipvs/ip_vs_sync.c sets them up.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import ipaddress
import os
import socket
import struct

SIOCGIFMTU = 0x8921
SIOCGIFADDR = 0x8915
IFNAMSIZ = 16


def _ifreq(name: str) -> bytes:
    return struct.pack("16s16x", os.fsencode(name)[: IFNAMSIZ - 1])


def interface_mtu(name: str) -> int | None:
    """MTU of an interface of this namespace, or None if there is none."""
    if not name or len(os.fsencode(name)) >= IFNAMSIZ or "/" in name:
        return None
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            res = fcntl.ioctl(s, SIOCGIFMTU, _ifreq(name))
    except OSError:
        return None
    return struct.unpack_from("i", res, 16)[0]


def _interface_ipv4(name: str) -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            res = fcntl.ioctl(s, SIOCGIFADDR, _ifreq(name))
    except OSError:
        return None
    return socket.inet_ntoa(res[20:24])


@functools.lru_cache(maxsize=1)
def _fib_trie() -> tuple[tuple[str, int, str], ...]:
    """(address, prefix length, type) of every route /proc/net/fib_trie
    lists (``|-- 127.0.0.0`` then ``/8 host LOCAL``), read once per process:
    a -R of 40,000 real servers asks 40,000 times."""
    found: list[tuple[str, int, str]] = []
    try:
        with open("/proc/net/fib_trie", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return ()
    last = None
    for line in lines:
        text = line.strip()
        if text.startswith(("|--", "+--")):
            last = text[3:].split()[0]
        elif text.startswith("/") and last:
            words = text.split()
            if words[0][1:].isdigit():
                found.append((last, int(words[0][1:]), words[-1]))
    return tuple(found)


@functools.lru_cache(maxsize=1)
def local_broadcasts() -> frozenset[str]:
    """Broadcast entries of the local routing table (/32 BROADCAST), once
    per process like the table they come from."""
    return frozenset(addr for addr, plen, kind in _fib_trie() if plen == 32 and kind == "BROADCAST")


def forget() -> None:
    """Read the routing table afresh next time (after changing namespace)."""
    _fib_trie.cache_clear()
    local_broadcasts.cache_clear()


def is_local(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Would the kernel deliver a packet for ``addr`` to this host?

    IPVS asks the route of each packet it forwards (``__ip_vs_get_out_rt``:
    RTCF_LOCAL; for IPv6 a route through the loopback device) and hands a
    direct-routed or tunnelled connection whose real server is local to the
    local stack instead (``ip_vs_send_or_cont(..., local=1)``).  IPv4: a
    LOCAL route of the local table (all of 127.0.0.0/8, every address
    configured here); IPv6: an address configured on an interface (``::1``
    on a ``lo`` that is up)."""
    if addr.version == 6:
        return is_local_v6(addr)
    number = int(addr)
    for net, plen, kind in _fib_trie():
        if kind == "LOCAL" and number >> (32 - plen) == int(ipaddress.IPv4Address(net)) >> (32 - plen):
            return True
    return False


def is_local_v6(addr: ipaddress.IPv6Address) -> bool:
    """True if the address is configured on an interface of this namespace."""
    try:
        with open("/proc/net/if_inet6", encoding="ascii") as f:
            return any(line.split()[0] == addr.exploded.replace(":", "") for line in f)
    except OSError:
        return False


def sync_socket_error(state: str, ifname: str, af: int, group: str, port: int, ttl: int) -> int | None:
    """errno the kernel would meet opening a sync daemon's socket, or None.

    master: make_send_sock() -- multicast interface, bind to the interface's
    IPv4 address, connect to the group.  backup: make_receive_sock() -- bind
    to the group port on the device and join the group.
    """
    try:
        index = socket.if_nametoindex(os.fsencode(ifname))
    except OSError:
        return errno.ENODEV
    try:
        with socket.socket(af, socket.SOCK_DGRAM, socket.IPPROTO_UDP) as s:
            if state == "master":
                _master_socket(s, af, ifname, index, group, port, ttl)
            else:
                _backup_socket(s, af, ifname, index, group, port)
    except OSError as exc:
        return exc.errno or errno.EINVAL
    return None


def _master_socket(s: socket.socket, af: int, ifname: str, index: int, group: str, port: int,
                   ttl: int) -> None:
    if af == socket.AF_INET:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                     struct.pack("4s4si", b"\0" * 4, b"\0" * 4, index))
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, ttl)
        addr = _interface_ipv4(ifname)
        if addr is None:
            raise OSError(errno.EADDRNOTAVAIL, "no IPv4 address on the interface")
        s.bind((addr, 0))
        s.connect((group, port))
    else:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, ttl)
        s.connect((group, port, 0, 0))


def _backup_socket(s: socket.socket, af: int, ifname: str, index: int, group: str, port: int) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, os.fsencode(ifname))
    if af == socket.AF_INET:
        s.bind((group, port))
        mreq = struct.pack("4s4si", socket.inet_aton(group), b"\0" * 4, index)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    else:
        s.bind((group, port, 0, index))
        mreq = socket.inet_pton(socket.AF_INET6, group) + struct.pack("I", index)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
