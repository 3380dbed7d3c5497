"""Raw nfnetlink sockets: the plumbing ``conntrack.py`` and ``nft/nfnetlink.py`` share.

Why not pyroute2 or libnftables: the daemon reads tens of thousands of
conntrack events a second and dumps tables of 10,000+ flows or 80,000 set
elements; pyroute2 costs ~100 us per event where a ``socket`` + ``struct``
parser costs ~6 us, and libnftables takes ~1.3 s to list 80,000 counters
(../shared/reference/daemon.md sections 0.6, 0.9, 5).  Standard library only.

One :class:`NetlinkSocket` is one ``NETLINK_NETFILTER`` socket with its own
sequence numbers; nothing here is module-level state, so a long-running
process never holds a socket that went stale (after a fork, say).

Wire format (<linux/netlink.h>, <linux/netfilter/nfnetlink.h>): every message
is a 16-byte ``struct nlmsghdr`` (length, type, flags, seq, portid; host byte
order), then for nfnetlink a 4-byte ``struct nfgenmsg`` (family, version,
res_id in network order), then attributes: 4-byte ``struct nlattr`` (length,
type) and the value, each padded to 4 bytes.  Multi-byte attribute values of
nfnetlink are big-endian.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import socket
import struct

if False:  # typing.TYPE_CHECKING without importing typing (every ipvsadm change comes here)
    from collections.abc import Iterable, Iterator
    from typing import Self

NETLINK_NETFILTER = 12  # <linux/netlink.h>
SOL_NETLINK = 270  # <linux/socket.h>
NETLINK_ADD_MEMBERSHIP = 1  # <linux/netlink.h>
NETLINK_CAP_ACK = 10  # errors without a copy of the refused request
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # <asm-generic/socket.h>; Python 3.11 lacks the names
SO_ATTACH_FILTER = 26  # <asm-generic/socket.h>

NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE = 1, 2, 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_ECHO = 0x8
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF
NFNETLINK_V0 = 0

HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
HEADER_LEN = HEADER.size
NFGEN_LEN = 4  # struct nfgenmsg
_NLATTR = struct.Struct("=HH")
_ERRNO = struct.Struct("=i")
_BPF = struct.Struct("=HBBI")  # struct sock_filter, <linux/filter.h>

# A dump's skbs are at most 32 KiB (netlink_dump caps max_recvmsg_len,
# net/netlink/af_netlink.c); one datagram never spans two recv calls.
RECV_SIZE = 1 << 16
DEFAULT_EVENT_RCVBUF = 8 << 20


class NetlinkError(OSError):
    """The kernel answered a request with an error (``NLMSG_ERROR``).

    ``index`` is the position of the refused message within a batch (None
    for single requests).
    """

    def __init__(self, code: int, index: int | None = None, what: str = "") -> None:
        text = os.strerror(code) + (f" ({what})" if what else "")
        super().__init__(code, text)
        self.index = index


class EventsLost(Exception):
    """The kernel dropped notifications: the socket's receive buffer was
    full (``recv`` returned ENOBUFS; ``netlink_overrun`` in
    net/netlink/af_netlink.c).  Counts built from events are now wrong until
    the caller resynchronises from a dump.  ``events`` holds what was read
    intact in the same call."""

    def __init__(self, events: list) -> None:
        super().__init__("netlink notifications were lost (ENOBUFS): resynchronise with a dump")
        self.events = events


class DumpInterrupted(NetlinkError):
    """The dumped object changed while it was being dumped (the kernel set
    ``NLM_F_DUMP_INTR``): the answer may be inconsistent, ask again."""

    def __init__(self) -> None:
        super().__init__(errno.EINTR, what="dump interrupted by a concurrent change")


# ---------------------------------------------------------------- attributes

def attr(kind: int, value: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    return _NLATTR.pack(4 + len(value), kind) + value + b"\0" * (-len(value) % 4)


def attr_str(kind: int, text: str) -> bytes:
    """A NUL-terminated string attribute (NLA_STRING / NLA_NUL_STRING)."""
    return attr(kind, text.encode() + b"\0")


def attr_be16(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack(">H", value))


def attr_be32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack(">I", value & 0xFFFFFFFF))


def attr_be64(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack(">Q", value))


def nested(kind: int, *parts: bytes) -> bytes:
    """A nested attribute holding ``parts`` (flagged NLA_F_NESTED, as
    libmnl does; the kernel's strict policies want the flag)."""
    return attr(kind | NLA_F_NESTED, b"".join(parts))


def attrs(data: bytes, pos: int = 0, end: int | None = None) -> Iterator[tuple[int, bytes]]:
    """(type, value) of each attribute in ``data[pos:end]``; the nested
    flag is masked off.  For code off the hot paths."""
    end = len(data) if end is None else end
    while pos + 4 <= end:
        length, kind = _NLATTR.unpack_from(data, pos)
        if length < 4:
            return
        yield kind & NLA_TYPE_MASK, data[pos + 4:pos + length]
        pos += (length + 3) & ~3


def header_word(length: int, kind: int) -> int:
    """An nlattr header (host order) read as a big-endian u32: the parsers'
    fast paths unpack a known layout big-endian in one call and compare its
    headers with these."""
    return int.from_bytes(_NLATTR.pack(length, kind), "big")


def text(value: bytes) -> str:
    """A string attribute's value without its NUL."""
    return value.split(b"\0", 1)[0].decode(errors="replace")


def message(kind: int, flags: int, seq: int, family: int, body: bytes = b"", res_id: int = 0,
            version: int = NFNETLINK_V0) -> bytes:
    """One nfnetlink message: nlmsghdr + nfgenmsg + attributes."""
    return (HEADER.pack(HEADER_LEN + NFGEN_LEN + len(body), kind, flags, seq, 0)
            + struct.pack("=BBH", family, version, socket.htons(res_id)) + body)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a big dump is parsed: every record
    allocated would count towards the collector's thresholds and each full
    pass walks all of them again, although records hold no cycles.
    Measured: an 80,000-element set dump parsed in ~250 ms instead of ~350."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


# ---------------------------------------------------------------- the socket

# One parsed message: (nlmsg type, nlmsg flags, nlmsg seq, the datagram,
# offset of the payload (the nfgenmsg), end of the message).  Parsers read
# the datagram in place instead of copying slices.
Message = tuple[int, int, int, bytes, int, int]


class NetlinkSocket:
    """A ``NETLINK_NETFILTER`` socket in the caller's network namespace.

    ``groups``: multicast groups to join (NFNLGRP_*, <linux/netfilter/nfnetlink.h>)
    with NETLINK_ADD_MEMBERSHIP.  ``rcvbuf``: receive buffer in bytes,
    forced past ``net.core.rmem_max`` with SO_RCVBUFFORCE (needs
    CAP_NET_ADMIN), else as much as SO_RCVBUF allows.  ``timeout`` bounds
    the wait for a request's answer; event sockets are non-blocking.
    """

    def __init__(self, groups: Iterable[int] = (), rcvbuf: int | None = None,
                 timeout: float | None = 2.0) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                   NETLINK_NETFILTER)
        try:
            self._sock.bind((0, 0))  # the kernel picks a unique port id
            # An error answer would otherwise carry the whole refused message back:
            # up to 64 KiB for a batch message full of elements (netlink_ack).
            self._sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            if rcvbuf:
                self._set_rcvbuf(rcvbuf)
            for group in groups:
                self.join(group)
            self._sock.settimeout(timeout)
        except BaseException:
            self._sock.close()
            raise
        self._seq = 0

    def _set_rcvbuf(self, size: int) -> None:
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
        except PermissionError:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)

    def join(self, group: int) -> None:
        """Receive the notifications of multicast ``group``."""
        self._sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)

    def attach_filter(self, program: list[tuple[int, int, int, int]]) -> None:
        """Attach a classic BPF program (``struct sock_filter`` tuples: code,
        jt, jf, k); the kernel copies it (SO_ATTACH_FILTER, socket(7))."""
        import ctypes

        code = b"".join(_BPF.pack(*insn) for insn in program)
        buf = ctypes.create_string_buffer(code, len(code))
        fprog = struct.pack("@HP", len(program), ctypes.addressof(buf))  # struct sock_fprog
        self._sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)

    @property
    def rcvbuf(self) -> int:
        """The receive buffer the kernel granted (it doubles the request)."""
        return self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    @property
    def portid(self) -> int:
        return self._sock.getsockname()[0]

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def next_seq(self, count: int = 1) -> int:
        """The first of ``count`` fresh sequence numbers."""
        if self._seq + count > 0xFFFFFFFF:
            self._seq = 0
        first = self._seq + 1
        self._seq += count
        return first

    # ------------------------------------------------------------ requests
    def request(self, kind: int, flags: int, family: int, body: bytes = b"",
                res_id: int = 0, version: int = NFNETLINK_V0) -> Iterator[Message]:
        """Send one request; yield each answer message.  A dump
        (NLM_F_DUMP) ends at NLMSG_DONE, anything else after its first
        answer or its acknowledgement.  Raises NetlinkError for an error
        answer, DumpInterrupted when the kernel flags an inconsistent dump."""
        seq = self.next_seq()
        self._sock.send(message(kind, NLM_F_REQUEST | flags, seq, family, body, res_id, version))
        dump = flags & NLM_F_DUMP == NLM_F_DUMP
        interrupted = False
        while True:
            data = self._sock.recv(RECV_SIZE)
            for msg in split(data):
                mkind, mflags, mseq = msg[0], msg[1], msg[2]
                if mseq != seq:
                    continue  # a late answer to an earlier, abandoned request
                if mflags & NLM_F_DUMP_INTR:
                    interrupted = True
                if mkind == NLMSG_DONE:
                    if interrupted:
                        raise DumpInterrupted()
                    code = error_code(msg) if msg[5] - msg[4] >= 4 else 0
                    if code > 0:  # a dump that failed part-way says so here (netlink_dump_done)
                        raise NetlinkError(code)
                    return
                if mkind == NLMSG_ERROR:
                    code = error_code(msg)
                    if code:
                        raise NetlinkError(code)
                    return
                yield msg
                if not dump:
                    return

    def send_all(self, payload: bytes) -> None:
        """Send prepared messages in one ``sendmsg``: the kernel processes
        them synchronously (netlink_unicast_kernel), so every answer is
        queued on this socket when this returns.  A message bigger than the
        send buffer is refused (``netlink_sendmsg``: len > sk_sndbuf - 32),
        so the buffer grows first, as libnftables does (SO_SNDBUFFORCE)."""
        need = len(payload) + 4096
        if self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < need:
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, need)
            except PermissionError:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, need)
        self._sock.send(payload)

    def drain(self, limit: int = 1 << 30) -> tuple[list[bytes], bool]:
        """Every datagram waiting on the socket, without blocking (at most
        ``limit``), and whether the kernel reported lost notifications."""
        out: list[bytes] = []
        lost = False
        recv = self._sock.recv
        timeout = self._sock.gettimeout()
        if timeout is not None:  # Python polls first on a socket with a timeout
            self._sock.setblocking(False)
        try:
            while len(out) < limit:
                try:
                    out.append(recv(RECV_SIZE))
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    lost = True
        finally:
            if timeout is not None:
                self._sock.settimeout(timeout)
        return out, lost


class Record:
    """Equality field by field for the parsers' ``__slots__`` records
    (slots keep them small and quick to make: the hot loops make one per
    flow, element or event)."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        same = type(other) is type(self)
        return same and all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    __hash__ = None  # type: ignore[assignment]


class SocketOwner:
    """``fileno``, ``close`` and ``with`` for the clients that each own one
    NetlinkSocket (as ``_nl``)."""

    _nl: NetlinkSocket

    def fileno(self) -> int:
        return self._nl.fileno()

    def close(self) -> None:
        self._nl.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def split(data: bytes) -> Iterator[Message]:
    """The messages of one datagram."""
    pos, size = 0, len(data)
    unpack = HEADER.unpack_from
    while pos + HEADER_LEN <= size:
        length, kind, flags, seq, _ = unpack(data, pos)
        if length < HEADER_LEN:
            return
        yield kind, flags, seq, data, pos + HEADER_LEN, pos + length
        pos += (length + 3) & ~3


def error_code(msg: Message) -> int:
    """The positive errno of an NLMSG_ERROR message (0 for an ack)."""
    return -_ERRNO.unpack_from(msg[3], msg[4])[0]


def error_seq(msg: Message) -> int:
    """The sequence number of the request an NLMSG_ERROR answers (the
    original header follows the errno, <linux/netlink.h> nlmsgerr)."""
    return HEADER.unpack_from(msg[3], msg[4] + 4)[3]
