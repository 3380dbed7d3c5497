"""The conntrack table over ctnetlink: dumps, single flows, deletes, events.

What the daemon (issue 10) counts IPVS's ActiveConn/InActConn from, without
pyroute2 (~100 us per event) or libnetfilter_conntrack: a ``socket`` +
``struct`` parser (../shared/reference/daemon.md sections 0, 3, 5).  The facts
it is built around, from that file and the kernel sources:

* Events are hints.  The kernel drops them when the listener's buffer is
  full (``nfnetlink_send`` fails, the next ``recv`` gets ENOBUFS:
  net/netfilter/nf_conntrack_netlink.c ``ctnetlink_conntrack_event``), DESTROY
  comes when conntrack's garbage collector gets round to it (1-60 s late,
  net/netfilter/nf_conntrack_core.c ``gc_worker``), and a flow created while
  no ctnetlink listener existed never emits any event
  (nf_conntrack_ecache.c ``nf_ct_ecache_ext_add``, sysctl
  ``nf_conntrack_events=2``).  :class:`Events` therefore raises
  :class:`EventsLost` on ENOBUFS so the caller resynchronises.
* A dump filtered in the kernel by ``ct mark & mask`` (CTA_MARK +
  CTA_MARK_MASK, ``ctnetlink_alloc_filter``/``ctnetlink_filter_match``) is the
  reliable count: expired entries are skipped and reaped during the dump.
* The same filter drives a filtered flush (IPCTNL_MSG_CT_DELETE without a
  tuple, ``ctnetlink_flush_conntrack``).

Seen on 6.18 (tests/test_netlink_netns.py, bench/netlink.py):

* An UPDATE carries the state at delivery time, not a transition: when two
  packets of a flow race on two CPUs a state is skipped or sent twice (300
  short connections: 247 gave SYN_SENT, SYN_RECV, ESTABLISHED, FIN_WAIT,
  LAST_ACK, TIME_WAIT; 32 sent LAST_ACK twice; 18 had no FIN_WAIT).  Treat
  events as snapshots.  Events carry protoinfo and labels only when they
  changed; counters only in dumps and DESTROY.
* Mark filters apply across conntrack zones; a tuple lookup (get/delete)
  needs the flow's zone, and finds the flow by either direction's tuple.
* A flush honours its family only with nfgenmsg.version set (see
  :meth:`Conntrack.delete_marked`); it sends DESTROY events that carry the
  deleting socket's port id (``conntrack -E`` shows ``[USERSPACE]``).

Each :class:`Conntrack` / :class:`Events` owns its socket; close them (or use
``with``).  Attribute numbers are those of
<linux/netfilter/nfnetlink_conntrack.h>; all values are big-endian.
"""

from __future__ import annotations

import enum
import errno
import socket
import struct
from collections.abc import Iterable
from typing import NamedTuple

from ipvs2nft import netlink
from ipvs2nft.netlink import (
    EventsLost,
    NetlinkError,
    NetlinkSocket,
    Record,
    SocketOwner,
    attr,
    attr_be16,
    attr_be32,
    header_word,
    nested,
)

__all__ = ["Conntrack", "ConntrackUnavailable", "Event", "Events", "EventsLost", "Flow", "Tuple",
           "TcpState", "addr_text", "flow_tuple"]

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE = 0, 1, 2
IPCTNL_MSG_CT_GET_STATS = 5
NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_UPDATE, NFNLGRP_CONNTRACK_DESTROY = 1, 2, 3

# enum ctattr_type
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_PROTOINFO = 1, 2, 3, 4
CTA_TIMEOUT, CTA_MARK, CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY = 7, 8, 9, 10
CTA_USE, CTA_ID, CTA_ZONE, CTA_MARK_MASK, CTA_LABELS = 11, 12, 18, 21, 22
# enum ctattr_tuple, ctattr_ip, ctattr_l4proto
CTA_TUPLE_IP, CTA_TUPLE_PROTO, CTA_TUPLE_ZONE = 1, 2, 3
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
# enum ctattr_protoinfo, ctattr_protoinfo_tcp, ctattr_counters
CTA_PROTOINFO_TCP = 1
CTA_PROTOINFO_TCP_STATE, CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, CTA_PROTOINFO_TCP_FLAGS_REPLY = 1, 4, 5
IP_CT_TCP_FLAG_BE_LIBERAL = 0x08  # <linux/netfilter/nf_conntrack_tcp.h>
CTA_COUNTERS_PACKETS, CTA_COUNTERS_BYTES = 1, 2

# enum ip_conntrack_status (<linux/netfilter/nf_conntrack_common.h>)
IPS_SEEN_REPLY, IPS_ASSURED, IPS_CONFIRMED = 0x2, 0x4, 0x8
IPS_SRC_NAT, IPS_DST_NAT, IPS_DYING = 0x10, 0x20, 0x200


class TcpState(enum.IntEnum):
    """<linux/netfilter/nf_conntrack_tcp.h>; SYN_SENT2 is the number the
    header calls LISTEN (simultaneous open).  IPVS's active states map to
    SYN_SENT, SYN_RECV, ESTABLISHED, SYN_SENT2 (daemon.md section 1.1)."""

    NONE = 0
    SYN_SENT = 1
    SYN_RECV = 2
    ESTABLISHED = 3
    FIN_WAIT = 4
    CLOSE_WAIT = 5
    LAST_ACK = 6
    TIME_WAIT = 7
    CLOSE = 8
    SYN_SENT2 = 9


class Event(enum.IntEnum):
    """An event's kind; the values are the NFNLGRP_CONNTRACK_* groups that
    carry them (ctnetlink_conntrack_event: DESTROY is IPCTNL_MSG_CT_DELETE,
    NEW is IPCTNL_MSG_CT_NEW with NLM_F_CREATE|NLM_F_EXCL, UPDATE the same
    without)."""

    NEW = NFNLGRP_CONNTRACK_NEW
    UPDATE = NFNLGRP_CONNTRACK_UPDATE
    DESTROY = NFNLGRP_CONNTRACK_DESTROY


class ConntrackUnavailable(Exception):
    """This kernel or namespace has no ctnetlink to ask."""


class Tuple(NamedTuple):
    """One direction of a flow.  Addresses are packed (4 or 16 bytes);
    ports are 0 for protocols without ports (ICMP's id/type/code are not
    kept)."""

    proto: int
    src: bytes
    dst: bytes
    sport: int
    dport: int

    def __str__(self) -> str:
        return f"{self.proto} {addr_text(self.src)}:{self.sport} -> {addr_text(self.dst)}:{self.dport}"


def flow_tuple(proto: int | str, src: str | bytes, dst: str | bytes, sport: int, dport: int) -> Tuple:
    """A Tuple from text addresses (``"10.0.0.1"``, ``"2001:db8::1"``) and a
    protocol number or name (``"tcp"``)."""
    if isinstance(proto, str):
        proto = socket.getprotobyname(proto)
    return Tuple(proto, _packed(src), _packed(dst), sport, dport)


def _packed(address: str | bytes) -> bytes:
    if isinstance(address, bytes):
        return address
    return socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)


def addr_text(packed: bytes) -> str:
    """``"10.0.0.1"`` / ``"2001:db8::1"`` for a packed address."""
    return socket.inet_ntop(socket.AF_INET if len(packed) == 4 else socket.AF_INET6, packed)


class Flow(Record):
    """One conntrack entry (or event) as ctnetlink described it.

    ``timeout`` (seconds left), ``tcp_state``, ``labels`` and the counters
    are None when the message did not carry them: events carry protoinfo
    and labels only when they changed (the NEW event has both), counters
    need ``net.netfilter.nf_conntrack_acct=1`` and come in dumps and DESTROY
    events only (``ctnetlink_conntrack_event``; verified on 6.18).
    """

    __slots__ = ("id", "family", "orig", "reply", "mark", "timeout", "tcp_state", "status", "zone",
                 "labels", "orig_packets", "orig_bytes", "reply_packets", "reply_bytes")

    def __init__(self, id: int, family: int, orig: Tuple, reply: Tuple | None, mark: int,
                 timeout: int | None, tcp_state: int | None, status: int, zone: int,
                 labels: bytes | None, orig_packets: int | None = None, orig_bytes: int | None = None,
                 reply_packets: int | None = None, reply_bytes: int | None = None) -> None:
        self.id = id
        self.family = family
        self.orig = orig
        self.reply = reply
        self.mark = mark
        self.timeout = timeout
        self.tcp_state = tcp_state
        self.status = status
        self.zone = zone
        self.labels = labels
        self.orig_packets = orig_packets
        self.orig_bytes = orig_bytes
        self.reply_packets = reply_packets
        self.reply_bytes = reply_bytes

    @property
    def proto(self) -> int:
        return self.orig.proto

    def label(self, bit: int) -> bool:
        """Whether ct label ``bit`` is set (labels are a little-endian bit
        array, nf_conntrack_labels.c)."""
        labels = self.labels or b""
        return bit // 8 < len(labels) and bool(labels[bit // 8] >> (bit % 8) & 1)

    def __repr__(self) -> str:
        state = f" {TcpState(self.tcp_state).name}" if self.tcp_state is not None else ""
        return (f"<Flow id={self.id} {self.orig} reply {self.reply}{state} mark={self.mark:#x} "
                f"timeout={self.timeout} status={self.status:#x}>")


# ---------------------------------------------------------------- parsing

_NLA = struct.Struct("=HH").unpack_from
_BE16 = struct.Struct(">H").unpack_from
_BE32 = struct.Struct(">I").unpack_from
_BE64 = struct.Struct(">Q").unpack_from
_COUNTERS = struct.Struct(">xxxxQxxxxQ").unpack_from  # PACKETS then BYTES, as the kernel emits them


# The fast path: the kernel writes a tuple with ports as CTA_TUPLE_IP {SRC, DST}
# then CTA_TUPLE_PROTO {NUM, SRC_PORT, DST_PORT} (ctnetlink_dump_tuples), so an
# IPv4 tuple is 48 bytes and an IPv6 one 72 of known layout.  One big-endian
# unpack reads it whole; the nlattr headers in it must match or the general
# walk below takes over (ICMP, a zone in the tuple, another kernel's layout).
_V4 = struct.Struct(">I I4s I4s I IB3x IH2x IH2x").unpack_from
_V6 = struct.Struct(">I I16s I16s I IB3x IH2x IH2x").unpack_from


def _tuple_headers(addr: int) -> tuple[int, ...]:
    nested = netlink.NLA_F_NESTED
    return (header_word(4 + 2 * (4 + addr), CTA_TUPLE_IP | nested),
            header_word(4 + addr, CTA_IP_V4_SRC if addr == 4 else CTA_IP_V6_SRC),
            header_word(4 + addr, CTA_IP_V4_DST if addr == 4 else CTA_IP_V6_DST),
            header_word(28, CTA_TUPLE_PROTO | nested), header_word(5, CTA_PROTO_NUM),
            header_word(6, CTA_PROTO_SRC_PORT), header_word(6, CTA_PROTO_DST_PORT))


_V4_HEADERS, _V6_HEADERS = _tuple_headers(4), _tuple_headers(16)
_new = tuple.__new__  # Tuple(...) without NamedTuple's Python-level __new__


_FAST = {48: (_V4, _V4_HEADERS), 72: (_V6, _V6_HEADERS)}


def _tuple(data: bytes, pos: int, end: int) -> Tuple:
    """CTA_TUPLE_ORIG/REPLY: nested CTA_TUPLE_IP and CTA_TUPLE_PROTO."""
    fast = _FAST.get(end - pos)
    if fast is not None:
        h0, h1, src, h2, dst, h3, h4, proto, h5, sport, h6, dport = fast[0](data, pos)
        if (h0, h1, h2, h3, h4, h5, h6) == fast[1]:
            return _new(Tuple, (proto, src, dst, sport, dport))
    return _tuple_walk(data, pos, end)


def _tuple_walk(data: bytes, pos: int, end: int) -> Tuple:
    proto = sport = dport = 0
    src = dst = b""
    for kind, value in netlink.attrs(data, pos, end):
        for inner, field in netlink.attrs(value):
            if kind == CTA_TUPLE_IP:
                if inner in (CTA_IP_V4_SRC, CTA_IP_V6_SRC):
                    src = field
                elif inner in (CTA_IP_V4_DST, CTA_IP_V6_DST):
                    dst = field
            elif kind == CTA_TUPLE_PROTO:
                if inner == CTA_PROTO_NUM:
                    proto = field[0]
                elif inner == CTA_PROTO_SRC_PORT:
                    sport = _BE16(field)[0]
                elif inner == CTA_PROTO_DST_PORT:
                    dport = _BE16(field)[0]
    return Tuple(proto, src, dst, sport, dport)


def _counters(data: bytes, pos: int, end: int) -> tuple[int, int]:
    if end - pos == 24 and _NLA(data, pos)[1] & 0x3FFF == CTA_COUNTERS_PACKETS:
        return _COUNTERS(data, pos)
    packets = octets = 0
    while pos < end:
        length, kind = _NLA(data, pos)
        if length < 4:
            break
        kind &= 0x3FFF
        if kind == CTA_COUNTERS_PACKETS:
            packets = _BE64(data, pos + 4)[0]
        elif kind == CTA_COUNTERS_BYTES:
            octets = _BE64(data, pos + 4)[0]
        pos += (length + 3) & ~3
    return packets, octets


_PROTOINFO = struct.Struct("=HHHHB").unpack_from


def _tcp_state(data: bytes, pos: int, end: int) -> int | None:
    """CTA_PROTOINFO -> CTA_PROTOINFO_TCP -> CTA_PROTOINFO_TCP_STATE (the
    kernel writes the state first, ctnetlink_dump_protoinfo / tcp_to_nlattr)."""
    if end - pos >= 9:
        _, tcp, _, first, state = _PROTOINFO(data, pos)
        if tcp & 0x3FFF == CTA_PROTOINFO_TCP and first & 0x3FFF == CTA_PROTOINFO_TCP_STATE:
            return state
    for kind, value in netlink.attrs(data, pos, end):
        if kind == CTA_PROTOINFO_TCP:
            for inner, state in netlink.attrs(value):
                if inner == CTA_PROTOINFO_TCP_STATE and state:
                    return state[0]
    return None


def parse_flow(data: bytes, pos: int, end: int, family: int) -> Flow:
    """The Flow of one ctnetlink message whose attributes are
    ``data[pos:end]`` (after nlmsghdr and nfgenmsg).

    The hot loop of dumps and events: attribute numbers are literals here
    (a module constant costs a global lookup per comparison), in the order
    the kernel writes them (ctnetlink_fill_info, ctnetlink_conntrack_event)."""
    fid = mark = status = zone = 0
    timeout = state = labels = op = ob = rp = rb = None
    orig = reply = None
    nla, be32 = _NLA, _BE32
    while pos < end:
        length, kind = nla(data, pos)
        if length < 4:
            break
        kind &= 0x3FFF
        if kind == 1:  # CTA_TUPLE_ORIG
            orig = _tuple(data, pos + 4, pos + length)
        elif kind == 2:  # CTA_TUPLE_REPLY
            reply = _tuple(data, pos + 4, pos + length)
        elif kind == 3:  # CTA_STATUS
            status = be32(data, pos + 4)[0]
        elif kind == 8:  # CTA_MARK
            mark = be32(data, pos + 4)[0]
        elif kind == 12:  # CTA_ID
            fid = be32(data, pos + 4)[0]
        elif kind == 7:  # CTA_TIMEOUT
            timeout = be32(data, pos + 4)[0]
        elif kind == 4:  # CTA_PROTOINFO
            state = _tcp_state(data, pos + 4, pos + length)
        elif kind == 9:  # CTA_COUNTERS_ORIG
            op, ob = _counters(data, pos + 4, pos + length)
        elif kind == 10:  # CTA_COUNTERS_REPLY
            rp, rb = _counters(data, pos + 4, pos + length)
        elif kind == 18:  # CTA_ZONE
            zone = _BE16(data, pos + 4)[0]
        elif kind == 22:  # CTA_LABELS
            labels = data[pos + 4:pos + length]
        pos += (length + 3) & ~3
    if orig is None:
        orig = Tuple(0, b"", b"", 0, 0)
    return Flow(fid, family, orig, reply, mark, timeout, state, status, zone, labels, op, ob, rp, rb)


def _tuple_attr(kind: int, t: Tuple) -> bytes:
    v6 = len(t.src) == 16
    ip = nested(CTA_TUPLE_IP, attr(CTA_IP_V6_SRC if v6 else CTA_IP_V4_SRC, t.src),
                attr(CTA_IP_V6_DST if v6 else CTA_IP_V4_DST, t.dst))
    proto = nested(CTA_TUPLE_PROTO, attr(CTA_PROTO_NUM, bytes([t.proto])),
                   attr_be16(CTA_PROTO_SRC_PORT, t.sport), attr_be16(CTA_PROTO_DST_PORT, t.dport))
    return nested(kind, ip, proto)


def _family(t: Tuple) -> int:
    return socket.AF_INET6 if len(t.src) == 16 else socket.AF_INET


def _mark_filter(mark: int, mask: int) -> bytes:
    return attr_be32(CTA_MARK, mark & mask) + attr_be32(CTA_MARK_MASK, mask)


# ---------------------------------------------------------------- errors

_UNAVAILABLE = (
    "conntrack is not available here: the kernel has no ctnetlink "
    "(load nf_conntrack and nf_conntrack_netlink, CONFIG_NF_CT_NETLINK)")


def _open(groups: Iterable[int] = (), rcvbuf: int | None = None) -> NetlinkSocket:
    """A netfilter netlink socket that has answered a ctnetlink request.

    Without nf_conntrack_netlink nfnetlink answers EINVAL or EOPNOTSUPP
    (``nfnetlink_rcv_msg`` finds no subsystem); joining the event groups
    would succeed regardless (``nfnetlink_bind`` only requests the module),
    so the probe (IPCTNL_MSG_CT_GET_STATS, the global counters) comes first.
    """
    try:
        sock = NetlinkSocket(rcvbuf=rcvbuf)
    except OSError as exc:
        if exc.errno in (errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT):
            raise ConntrackUnavailable(f"{_UNAVAILABLE} (no nfnetlink: {exc.strerror})") from None
        raise
    try:
        list(sock.request((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET_STATS, 0, socket.AF_UNSPEC))
        for group in groups:
            sock.join(group)
    except NetlinkError as exc:
        sock.close()
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOENT):
            raise ConntrackUnavailable(f"{_UNAVAILABLE} ({exc.strerror})") from None
        if exc.errno == errno.EPERM:  # nfnetlink_rcv_msg: every ctnetlink request
            raise PermissionError(errno.EPERM, "reading conntrack needs CAP_NET_ADMIN") from None
        raise
    except BaseException:
        sock.close()
        raise
    return sock


# ---------------------------------------------------------------- requests

class Conntrack(SocketOwner):
    """Requests to the conntrack table of the caller's network namespace."""

    def __init__(self) -> None:
        self._nl = _open()

    def _request(self, msg: int, flags: int, family: int, body: bytes = b"", version: int = 0):
        return self._nl.request((NFNL_SUBSYS_CTNETLINK << 8) | msg, flags, family, body, version=version)

    def dump(self, mark: int | None = None, mask: int = 0xFFFFFFFF,
             family: int = socket.AF_UNSPEC) -> list[Flow]:
        """Every flow (of ``family``, if given) whose ``ct mark & mask ==
        mark``, filtered by the kernel (``ctnetlink_filter_match``).  With
        ``mark`` None: every flow."""
        body = b"" if mark is None else _mark_filter(mark, mask)
        flows = []
        append = flows.append
        with netlink.gc_paused():
            for _, _, _, data, pos, end in self._request(IPCTNL_MSG_CT_GET, netlink.NLM_F_DUMP, family, body):
                append(parse_flow(data, pos + 4, end, data[pos]))
        return flows

    def get(self, orig: Tuple, zone: int = 0) -> Flow | None:
        """The flow with tuple ``orig`` in conntrack zone ``zone``, or None.
        The kernel's hash holds both directions, so a reply tuple finds the
        flow too (nf_conntrack_find_get)."""
        body = _tuple_attr(CTA_TUPLE_ORIG, orig) + (attr_be16(CTA_ZONE, zone) if zone else b"")
        try:
            for _, _, _, data, pos, end in self._request(IPCTNL_MSG_CT_GET, 0, _family(orig), body):
                return parse_flow(data, pos + 4, end, data[pos])
        except NetlinkError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        return None

    def delete(self, orig: Tuple, zone: int = 0) -> bool:
        """Delete the flow with original tuple ``orig``; False if there was
        none.  Listeners get its DESTROY event."""
        body = _tuple_attr(CTA_TUPLE_ORIG, orig) + (attr_be16(CTA_ZONE, zone) if zone else b"")
        try:
            list(self._request(IPCTNL_MSG_CT_DELETE, netlink.NLM_F_ACK, _family(orig), body))
        except NetlinkError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    def be_liberal(self, orig: Tuple) -> bool:
        """Stop TCP window tracking on the flow with tuple ``orig`` (both
        directions' IP_CT_TCP_FLAG_BE_LIBERAL, what conntrackd sets on the
        states it injects); False if there is no such flow.  A flow whose
        packets went through another director for a while comes back with
        sequence numbers this table never saw, and window tracking would
        call them invalid."""
        flags = bytes([IP_CT_TCP_FLAG_BE_LIBERAL, IP_CT_TCP_FLAG_BE_LIBERAL])
        tcp = nested(CTA_PROTOINFO_TCP, attr(CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, flags),
                     attr(CTA_PROTOINFO_TCP_FLAGS_REPLY, flags))
        body = _tuple_attr(CTA_TUPLE_ORIG, orig) + nested(CTA_PROTOINFO, tcp)
        try:
            list(self._request(IPCTNL_MSG_CT_NEW, netlink.NLM_F_ACK, _family(orig), body))
        except NetlinkError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    def delete_marked(self, mark: int, mask: int = 0xFFFFFFFF, family: int = socket.AF_UNSPEC) -> None:
        """Delete every flow whose ``ct mark & mask == mark`` in one request
        (a filtered flush, ``ctnetlink_flush_conntrack``).  The kernel does
        not say how many; a dump with the same filter afterwards does.
        A zero ``mask`` would match every flow of the namespace: refused."""
        if not mask & 0xFFFFFFFF:
            raise ValueError("delete_marked with mask 0 would flush the whole conntrack table")
        # A flush ignores nfgen_family unless nfgenmsg.version is non-zero
        # (ctnetlink_del_conntrack: ``u3 = version || CTA_FILTER ? family :
        # AF_UNSPEC``); measured on 6.18: version 0 and AF_INET6 deleted IPv4 flows.
        version = 1 if family != socket.AF_UNSPEC else 0
        body = _mark_filter(mark, mask)
        list(self._request(IPCTNL_MSG_CT_DELETE, netlink.NLM_F_ACK, family, body, version))


# ---------------------------------------------------------------- events

_SKF_AD_NLATTR = -0x1000 + 12  # SKF_AD_OFF + SKF_AD_NLATTR, <linux/filter.h>


def mark_filter_program(mark: int, mask: int) -> list[tuple[int, int, int, int]]:
    """Classic BPF keeping only messages whose CTA_MARK & mask == mark.

    The kernel runs socket filters before queueing a notification
    (``do_one_broadcast`` in net/netlink/af_netlink.c), so rejected events
    neither reach Python nor take receive-buffer space.  SKF_AD_NLATTR finds
    a top-level attribute by type (``bpf_skb_get_nlattr``, net/core/filter.c),
    as conntrackd's BPF filters do; a message without CTA_MARK has mark 0
    (ctnetlink omits a zero mark)."""
    mark &= mask
    attrs_at = netlink.HEADER_LEN + netlink.NFGEN_LEN
    ld_imm, ldx_imm, ld_abs_w, ld_ind_w = 0x00, 0x01, 0x20, 0x40
    jeq_k, and_k, tax, ret_k = 0x15, 0x54, 0x07, 0x06
    keep, drop = 0xFFFFFFFF, 0
    return [
        (ld_imm, 0, 0, attrs_at),              # A = offset of the first attribute
        (ldx_imm, 0, 0, CTA_MARK),             # X = the attribute type to look for
        (ld_abs_w, 0, 0, _SKF_AD_NLATTR & 0xFFFFFFFF),  # A = offset of CTA_MARK, or 0
        (jeq_k, 4, 0, 0),                      # absent: mark 0
        (tax, 0, 0, 0),                        # X = A
        (ld_ind_w, 0, 0, 4),                   # A = the big-endian mark
        (and_k, 0, 0, mask),
        (jeq_k, 1, 2, mark),
        (ret_k, 0, 0, keep if mark == 0 else drop),  # reached only when CTA_MARK is absent
        (ret_k, 0, 0, keep),
        (ret_k, 0, 0, drop),
    ]


_SKF_AD_NLATTR_NEST = -0x1000 + 16  # SKF_AD_OFF + SKF_AD_NLATTR_NEST
CTA_PROTOINFO_TCP_ACTIVE = (TcpState.SYN_RECV, TcpState.ESTABLISHED)


def counting_filter_program(mark: int, mask: int) -> list[tuple[int, int, int, int]]:
    """What the daemon needs to count IPVS's connections, and no more:
    ``mark_filter_program``'s test, and of the UPDATE events only those that
    are not a TCP connection moving between two active states (SYN_SENT,
    its NEW event, to SYN_RECV to ESTABLISHED: IPVS counts it active all
    along).  Two of a short connection's five or six events never reach
    Python; NEW, DESTROY and every move to or between closing states do.

    The netlink header's type and flags are host order, which BPF's loads
    (network order) read byte-swapped; attributes are walked with
    SKF_AD_NLATTR / SKF_AD_NLATTR_NEST (net/core/filter.c)."""
    mark &= mask
    attrs_at = netlink.HEADER_LEN + netlink.NFGEN_LEN
    swap16 = lambda v: int.from_bytes(struct.pack("=H", v), "big")  # noqa: E731
    delete = swap16((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE)
    create = swap16(netlink.NLM_F_CREATE)
    nlattr, nest = _SKF_AD_NLATTR & 0xFFFFFFFF, _SKF_AD_NLATTR_NEST & 0xFFFFFFFF
    ld_imm, ldx_imm, ld_abs_w, ld_abs_h, ld_ind_w, ld_ind_b = 0x00, 0x01, 0x20, 0x28, 0x40, 0x50
    jeq_k, jset_k, and_k, tax, ret_k = 0x15, 0x45, 0x54, 0x07, 0x06
    code: list = [
        (ld_imm, 0, 0, attrs_at), (ldx_imm, 0, 0, CTA_MARK), (ld_abs_w, 0, 0, nlattr),
        (jeq_k, "drop", 0, 0),                 # no CTA_MARK: mark 0, not ours
        (tax, 0, 0, 0), (ld_ind_w, 0, 0, 4), (and_k, 0, 0, mask),
        (jeq_k, 0, "drop", mark),
        (ld_abs_h, 0, 0, 4), (jeq_k, "keep", 0, delete),       # DESTROY
        (ld_abs_h, 0, 0, 6), (jset_k, "keep", 0, create),      # NEW
        (ld_imm, 0, 0, attrs_at), (ldx_imm, 0, 0, CTA_PROTOINFO), (ld_abs_w, 0, 0, nlattr),
        (jeq_k, "keep", 0, 0),
        (ldx_imm, 0, 0, CTA_PROTOINFO_TCP), (ld_abs_w, 0, 0, nest), (jeq_k, "keep", 0, 0),
        (ldx_imm, 0, 0, CTA_PROTOINFO_TCP_STATE), (ld_abs_w, 0, 0, nest), (jeq_k, "keep", 0, 0),
        (tax, 0, 0, 0), (ld_ind_b, 0, 0, 4),
        *[(jeq_k, "drop", 0, int(state)) for state in CTA_PROTOINFO_TCP_ACTIVE],
        ("keep",), ("drop",),
    ]
    where = {ins[0]: i for i, ins in enumerate(code) if isinstance(ins[0], str)}
    out = []
    for i, ins in enumerate(code):
        if isinstance(ins[0], str):
            out.append((ret_k, 0, 0, 0xFFFFFFFF if ins[0] == "keep" else 0))
            continue
        op, jt, jf, k = ins
        jt = where[jt] - i - 1 if isinstance(jt, str) else jt
        jf = where[jf] - i - 1 if isinstance(jf, str) else jf
        out.append((op, jt, jf, k))
    return out


class Events(SocketOwner):
    """A ctnetlink event subscription, for a selectors/asyncio loop.

    ``kinds``: which of NEW, UPDATE, DESTROY (the kernel builds an event
    only for groups with listeners, ``ctnetlink_conntrack_event``).
    ``rcvbuf``: 8 MiB by default -- with the default ~208 KiB buffer a burst
    of short connections or a GC sweep of DESTROY events overflows it
    (daemon.md section 0.1).  ``mark``/``mask``: keep only events whose
    ``ct mark & mask == mark``, filtered in the kernel (classic BPF).

    The socket exists from construction on: flows created from then on get
    their event extension (``nf_conntrack_events=2``); flows made before
    never send an event, not even DESTROY -- dump at start-up.  Measured
    (bench/netlink.py, half the connections foreign): the BPF filter cut
    this reader's CPU per connection of all traffic by a fifth to a third.
    """

    # packets_only: leave out the events a netlink request caused (conntrackd
    # injecting a peer's state, a ``conntrack -U``): their nlmsg_pid is the
    # requester's port id, a packet's is 0 (ctnetlink_conntrack_event)
    packets_only = False

    def __init__(self, kinds: Iterable[Event] = (Event.NEW, Event.UPDATE, Event.DESTROY),
                 rcvbuf: int = netlink.DEFAULT_EVENT_RCVBUF, mark: int | None = None,
                 mask: int = 0xFFFFFFFF, program=None, packets_only: bool = False) -> None:
        self.packets_only = packets_only
        self._nl = _open([int(k) for k in kinds], rcvbuf)
        self._nl.setblocking(False)
        if mark is not None:
            try:
                self._nl.attach_filter((program or mark_filter_program)(mark, mask))
            except BaseException:
                self._nl.close()
                raise

    @property
    def rcvbuf(self) -> int:
        """The buffer granted (the kernel doubles what is asked, socket(7))."""
        return self._nl.rcvbuf

    def read(self, limit: int = 65536) -> list[tuple[Event, Flow]]:
        """Every event waiting (at most ``limit`` datagrams), oldest first,
        without blocking.  Raises EventsLost (carrying the events read) when
        the kernel dropped some since the last read."""
        datagrams, lost = self._nl.drain(limit)
        out: list[tuple[Event, Flow]] = []
        append = out.append
        unpack = netlink.HEADER.unpack_from
        new, update, destroy = Event.NEW, Event.UPDATE, Event.DESTROY
        for data in datagrams:
            pos, size = 0, len(data)
            while pos + 20 <= size:
                length, kind, flags, _, pid = unpack(data, pos)
                if length < 20:
                    break
                if kind >> 8 == NFNL_SUBSYS_CTNETLINK and not (pid and self.packets_only):
                    flow = parse_flow(data, pos + 20, pos + length, data[pos + 16])
                    if kind & 0xFF == IPCTNL_MSG_CT_DELETE:
                        append((destroy, flow))
                    else:
                        append((new if flags & netlink.NLM_F_CREATE else update, flow))
                pos += (length + 3) & ~3
        if lost:
            raise EventsLost(out)
        return out
