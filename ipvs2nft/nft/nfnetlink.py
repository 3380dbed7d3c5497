"""nf_tables over raw nfnetlink: what libnftables does slowly or not at all.

* The ruleset generation id (NFT_MSG_GETGEN): every committed nftables
  transaction, from anyone, increments it; one round trip tells an ipvsadm
  command whether the ruleset changed since ipvs2nft last looked.
* One chain's rules with their expressions (NFT_MSG_GETRULE filtered by
  table and chain): ``nft list chain`` fills its cache with the whole table
  first -- 0.2 s at 10,000 services.
* A set's elements with their counters (NFT_MSG_GETSETELEM): libnftables
  takes ~1.3 s for 80,000 counted elements (../shared/reference/daemon.md
  section 4.1); the daemon reads them every 2 s for ``--stats``/``--rate``.
* Element-only transactions (:class:`Batch`): the daemon rewrites a few slot
  elements per connection event; one batch is one kernel transaction, all or
  nothing (``nfnetlink_rcv_batch`` aborts everything on any error).
* A monitor of nftables notifications (:class:`Monitor`), so the daemon
  notices a foreign ``nft flush ruleset`` within a second without polling.

Each :class:`Nfnetlink`, :class:`Monitor` owns its socket.  The module-level
functions (``ruleset_genid``, ``rules``) keep one socket per process (made
again after a fork) for ipvsadm's short runs.  Attribute numbers are those of
<linux/netfilter/nf_tables.h>; values are big-endian.
"""

from __future__ import annotations

import errno
import functools
import os
import socket
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ipvs2nft import netlink
from ipvs2nft.netlink import (
    EventsLost,
    NetlinkError,
    NetlinkSocket,
    Record,
    SocketOwner,
    attr_be32,
    attr_be64,
    attr_str,
    attrs,
    header_word,
    nested,
    text,
)

__all__ = ["ACCEPT", "DROP", "Batch", "Element", "EventsLost", "Monitor", "NetlinkError", "Nfnetlink",
           "NftEvent", "Transaction", "Verdict", "counter_packets", "join_key", "rules", "ruleset_genid",
           "set_elements", "split_key"]

NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 16, 17  # NLMSG_MIN_TYPE, NLMSG_MIN_TYPE + 1
NFNL_BATCH_GENID = 1
NFNLGRP_NFTABLES = 7

# enum nf_tables_msg_types
NFT_MSG_NEWTABLE, NFT_MSG_GETTABLE, NFT_MSG_DELTABLE = 0, 1, 2
NFT_MSG_NEWCHAIN, NFT_MSG_GETCHAIN, NFT_MSG_DELCHAIN = 3, 4, 5
NFT_MSG_NEWRULE, NFT_MSG_GETRULE, NFT_MSG_DELRULE = 6, 7, 8
NFT_MSG_NEWSET, NFT_MSG_GETSET, NFT_MSG_DELSET = 9, 10, 11
NFT_MSG_NEWSETELEM, NFT_MSG_GETSETELEM, NFT_MSG_DELSETELEM = 12, 13, 14
NFT_MSG_NEWGEN, NFT_MSG_GETGEN = 15, 16
NFT_MSG_NEWOBJ, NFT_MSG_GETOBJ, NFT_MSG_DELOBJ = 18, 19, 20
NFT_MSG_NEWFLOWTABLE, NFT_MSG_DELFLOWTABLE = 22, 24
NFT_MSG_DESTROYSETELEM = 30  # kernel >= 6.3: delete, no error if absent
NFT_MSG_GETSETELEM_RESET = 33  # kernel >= 6.6: dump and zero the element counters

MESSAGE_NAMES = {
    NFT_MSG_NEWTABLE: "NEWTABLE", NFT_MSG_DELTABLE: "DELTABLE",
    NFT_MSG_NEWCHAIN: "NEWCHAIN", NFT_MSG_DELCHAIN: "DELCHAIN",
    NFT_MSG_NEWRULE: "NEWRULE", NFT_MSG_DELRULE: "DELRULE",
    NFT_MSG_NEWSET: "NEWSET", NFT_MSG_DELSET: "DELSET",
    NFT_MSG_NEWSETELEM: "NEWSETELEM", NFT_MSG_DELSETELEM: "DELSETELEM",
    NFT_MSG_NEWGEN: "NEWGEN", NFT_MSG_DESTROYSETELEM: "DESTROYSETELEM",
    NFT_MSG_NEWOBJ: "NEWOBJ", NFT_MSG_DELOBJ: "DELOBJ",
    NFT_MSG_NEWFLOWTABLE: "NEWFLOWTABLE", NFT_MSG_DELFLOWTABLE: "DELFLOWTABLE",
}

NFTA_GEN_ID, NFTA_GEN_PROC_PID, NFTA_GEN_PROC_NAME = 1, 2, 3
NFTA_TABLE_NAME, NFTA_TABLE_USE, NFTA_TABLE_HANDLE = 1, 3, 4
NFTA_CHAIN_TABLE, NFTA_CHAIN_HANDLE, NFTA_CHAIN_NAME, NFTA_CHAIN_USE = 1, 2, 3, 6
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS = 1, 2, 4
NFTA_SET_TABLE, NFTA_SET_NAME, NFTA_SET_HANDLE, NFTA_SET_COUNT = 1, 2, 16, 20
NFTA_OBJ_NAME = 2
NFTA_LIST_ELEM = 1
NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 2
NFTA_COUNTER_BYTES, NFTA_COUNTER_PACKETS = 1, 2
# enum nft_set_elem_list_attributes, nft_set_elem_attributes
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_DATA, NFTA_SET_ELEM_FLAGS = 1, 2, 3
NFTA_SET_ELEM_TIMEOUT, NFTA_SET_ELEM_EXPIRATION = 4, 5
NFTA_SET_ELEM_EXPR, NFTA_SET_ELEM_OBJREF, NFTA_SET_ELEM_KEY_END, NFTA_SET_ELEM_EXPRESSIONS = 7, 9, 10, 11
# enum nft_data_attributes, nft_verdict_attributes, nft_verdicts
NFTA_DATA_VALUE, NFTA_DATA_VERDICT = 1, 2
NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN = 1, 2
NF_DROP, NF_ACCEPT = 0, 1
NFT_CONTINUE, NFT_BREAK, NFT_JUMP, NFT_GOTO, NFT_RETURN = -1, -2, -3, -4, -5

FAMILY = {"inet": 1, "ip": 2, "arp": 3, "netdev": 5, "bridge": 7, "ip6": 10}
FAMILY_NAME = {number: name for name, number in FAMILY.items()}

# The attributes that name an object's table and the object itself, per
# notification type (the first attribute of every nf_tables object is its
# table: NFTA_TABLE_NAME, NFTA_CHAIN_TABLE, NFTA_RULE_TABLE, NFTA_SET_TABLE,
# NFTA_SET_ELEM_LIST_TABLE, NFTA_OBJ_TABLE, NFTA_FLOWTABLE_TABLE are all 1).
_NAME_ATTR = {
    NFT_MSG_NEWTABLE: None, NFT_MSG_DELTABLE: None,
    NFT_MSG_NEWCHAIN: NFTA_CHAIN_NAME, NFT_MSG_DELCHAIN: NFTA_CHAIN_NAME,
    NFT_MSG_NEWRULE: NFTA_RULE_CHAIN, NFT_MSG_DELRULE: NFTA_RULE_CHAIN,
    NFT_MSG_NEWSET: NFTA_SET_NAME, NFT_MSG_DELSET: NFTA_SET_NAME,
    NFT_MSG_NEWSETELEM: NFTA_SET_ELEM_LIST_SET, NFT_MSG_DELSETELEM: NFTA_SET_ELEM_LIST_SET,
    NFT_MSG_NEWOBJ: NFTA_OBJ_NAME, NFT_MSG_DELOBJ: NFTA_OBJ_NAME,
    NFT_MSG_NEWFLOWTABLE: 2, NFT_MSG_DELFLOWTABLE: 2,
}

_NLA = struct.Struct("=HH").unpack_from
_BE32 = struct.Struct(">I").unpack_from
_BE32S = struct.Struct(">i").unpack_from
_BE64 = struct.Struct(">Q").unpack_from
_MAX_NEST = 0xFFFF - 64  # an nlattr's length is 16 bits: split bigger element lists


def _family(family: str | int) -> int:
    return FAMILY[family] if isinstance(family, str) else family


# ---------------------------------------------------------------- set elements

class Element(Record):
    """One set or map element as the kernel dumped it.

    ``key`` / ``key_end`` (intervals) and ``data`` are raw register bytes
    (concatenations: each field padded to 4 bytes, see :func:`split_key`);
    a verdict map's element has ``verdict`` (NF_ACCEPT, NFT_GOTO ...) and
    ``chain`` instead of ``data``.  ``timeout`` and ``expiration`` are in
    milliseconds; ``packets``/``bytes`` come from the element's ``counter``
    expression (sets declared with ``counter``), None without one.
    """

    __slots__ = ("key", "key_end", "data", "verdict", "chain", "flags", "timeout", "expiration",
                 "packets", "bytes", "objref")

    def __init__(self, key: bytes, data: bytes | None = None, verdict: int | None = None,
                 chain: str | None = None, flags: int = 0, timeout: int | None = None,
                 expiration: int | None = None, packets: int | None = None, bytes: int | None = None,
                 key_end: bytes | None = None, objref: str | None = None) -> None:
        self.key = key
        self.key_end = key_end
        self.data = data
        self.verdict = verdict
        self.chain = chain
        self.flags = flags
        self.timeout = timeout
        self.expiration = expiration
        self.packets = packets
        self.bytes = bytes
        self.objref = objref

    def __repr__(self) -> str:
        fields = (f"{n}={getattr(self, n)!r}" for n in self.__slots__ if getattr(self, n) is not None)
        return f"<Element {' '.join(fields)}>"


def split_key(key: bytes, lengths: Sequence[int]) -> list[bytes]:
    """The fields of a concatenated key or data value (``ipv4_addr .
    inet_proto . inet_service`` -> lengths 4, 1, 2): nft stores each field
    in its own 32-bit registers, so each starts on a 4-byte boundary
    (``nft_set_desc.field_len``, NFT_REG32_SIZE in nf_tables.h)."""
    fields, pos = [], 0
    for length in lengths:
        fields.append(key[pos:pos + length])
        pos += (length + 3) & ~3
    if pos != len(key):
        raise ValueError(f"a key of {len(key)} bytes is not fields of {list(lengths)} bytes")
    return fields


def join_key(*fields: bytes) -> bytes:
    """The inverse of :func:`split_key`: fields padded to 4 bytes each."""
    return b"".join(f + b"\0" * (-len(f) % 4) for f in fields)


def _data(data: bytes, pos: int, end: int) -> tuple[bytes | None, int | None, str | None]:
    """nft_data: NFTA_DATA_VALUE, or NFTA_DATA_VERDICT (code, chain)."""
    while pos < end:
        length, kind = _NLA(data, pos)
        if length < 4:
            break
        kind &= 0x3FFF
        if kind == NFTA_DATA_VALUE:
            return data[pos + 4:pos + length], None, None
        if kind == NFTA_DATA_VERDICT:
            code, chain = None, None
            for vkind, value in attrs(data, pos + 4, pos + length):
                if vkind == NFTA_VERDICT_CODE:
                    code = _BE32S(value)[0]
                elif vkind == NFTA_VERDICT_CHAIN:
                    chain = text(value)
            return None, code, chain
        pos += (length + 3) & ~3
    return None, None, None


def _counter(data: bytes, pos: int, end: int) -> tuple[int, int] | None:
    """The (packets, bytes) of one expression if it is a ``counter``."""
    name = b""
    packets = octets = 0
    for kind, value in attrs(data, pos, end):
        if kind == NFTA_EXPR_NAME:
            name = value
        elif kind == NFTA_EXPR_DATA:
            for ckind, cvalue in attrs(value):
                if ckind == NFTA_COUNTER_PACKETS:
                    packets = _BE64(cvalue)[0]
                elif ckind == NFTA_COUNTER_BYTES:
                    octets = _BE64(cvalue)[0]
    return (packets, octets) if name.rstrip(b"\0") == b"counter" else None


# The fast path for an element's counter: nft_expr_dump writes NFTA_EXPR_NAME
# "counter" and NFTA_EXPR_DATA {BYTES, PACKETS} (nft_counter_do_dump), 40
# bytes in all; one big-endian unpack reads it when the headers match.
_COUNTER = struct.Struct(">I8sIIQIQ").unpack_from
_COUNTER_HEADERS = (header_word(12, NFTA_EXPR_NAME), b"counter\0", header_word(28, NFTA_EXPR_DATA),
                    header_word(12, NFTA_COUNTER_BYTES), header_word(12, NFTA_COUNTER_PACKETS))
_NOT_NESTED = ~header_word(0, netlink.NLA_F_NESTED) & 0xFFFFFFFF  # with or without the flag


def _counter_fast(data: bytes, pos: int, end: int) -> tuple[int, int] | None:
    if end - pos == 40:
        h0, name, h1, h2, octets, h3, packets = _COUNTER(data, pos)
        if (h0, name, h1 & _NOT_NESTED, h2, h3) == _COUNTER_HEADERS:
            return packets, octets
    return _counter(data, pos, end)


def parse_element(data: bytes, pos: int, end: int) -> Element:
    """One NFTA_LIST_ELEM's attributes (``data[pos:end]``).  Attribute
    numbers are literals in this hot loop (nf_tables_fill_setelem order)."""
    key = b""
    value = verdict = chain = timeout = expiration = key_end = objref = None
    flags = 0
    counted = None
    nla = _NLA
    while pos < end:
        length, kind = nla(data, pos)
        if length < 4:
            break
        kind &= 0x3FFF
        inner, stop = pos + 4, pos + length
        if kind == 1:  # NFTA_SET_ELEM_KEY: nft_data, a single NFTA_DATA_VALUE
            vlen, vkind = nla(data, inner)
            if vkind & 0x3FFF == 1:
                key = data[inner + 4:inner + vlen]
            else:
                key = _data(data, inner, stop)[0] or b""
        elif kind == 2:  # NFTA_SET_ELEM_DATA
            value, verdict, chain = _data(data, inner, stop)
        elif kind == 7:  # NFTA_SET_ELEM_EXPR
            counted = _counter_fast(data, inner, stop) or counted
        elif kind == 11:  # NFTA_SET_ELEM_EXPRESSIONS
            while inner < stop:
                elen, _ = nla(data, inner)
                if elen < 4:
                    break
                counted = _counter_fast(data, inner + 4, inner + elen) or counted
                inner += (elen + 3) & ~3
        elif kind == 3:  # NFTA_SET_ELEM_FLAGS
            flags = _BE32(data, inner)[0]
        elif kind == 4:  # NFTA_SET_ELEM_TIMEOUT
            timeout = _BE64(data, inner)[0]
        elif kind == 5:  # NFTA_SET_ELEM_EXPIRATION
            expiration = _BE64(data, inner)[0]
        elif kind == 10:  # NFTA_SET_ELEM_KEY_END
            key_end = _data(data, inner, stop)[0]
        elif kind == 9:  # NFTA_SET_ELEM_OBJREF
            objref = text(data[inner:stop])
        pos += (length + 3) & ~3
    packets, octets = counted if counted else (None, None)
    return Element(key, value, verdict, chain, flags, timeout, expiration, packets, octets, key_end, objref)


def parse_elements(data: bytes, pos: int, end: int, out: list[Element]) -> None:
    """Append the elements of one NEWSETELEM message (attributes after the
    nfgenmsg) to ``out``."""
    while pos < end:
        length, kind = _NLA(data, pos)
        if length < 4:
            break
        if kind & 0x3FFF == NFTA_SET_ELEM_LIST_ELEMENTS:
            inner, stop = pos + 4, pos + length
            while inner < stop:
                elen, _ = _NLA(data, inner)
                if elen < 4:
                    break
                out.append(parse_element(data, inner + 4, inner + elen))
                inner += (elen + 3) & ~3
        pos += (length + 3) & ~3


# ---------------------------------------------------------------- transactions

@dataclass(frozen=True)
class Verdict:
    """A verdict map's value: ``Verdict.goto("rs_1")``, ``ACCEPT``."""

    code: int
    chain: str | None = None

    @staticmethod
    def goto(chain: str) -> Verdict:
        return Verdict(NFT_GOTO, chain)

    @staticmethod
    def jump(chain: str) -> Verdict:
        return Verdict(NFT_JUMP, chain)


ACCEPT = Verdict(NF_ACCEPT)
DROP = Verdict(NF_DROP)


_HEAD = struct.Struct("=HH").pack
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")  # by length % 4
_KEY = NFTA_SET_ELEM_KEY | netlink.NLA_F_NESTED
_DATA = NFTA_SET_ELEM_DATA | netlink.NLA_F_NESTED
_ELEM = NFTA_LIST_ELEM | netlink.NLA_F_NESTED


@functools.cache
def _verdict_data(data: Verdict) -> bytes:
    verdict = attr_be32(NFTA_VERDICT_CODE, data.code)
    if data.chain is not None:
        verdict += attr_str(NFTA_VERDICT_CHAIN, data.chain)
    return nested(NFTA_SET_ELEM_DATA, nested(NFTA_DATA_VERDICT, verdict))


def element(key: bytes, data: bytes | Verdict | None = None, timeout: int | None = None) -> bytes:
    """One NFTA_LIST_ELEM: key, value or verdict, timeout (ms).  Written
    out by hand: a restore makes ~50,000 of them."""
    k = len(key)
    pad = _PAD[k & 3]
    body = _HEAD(8 + k + len(pad), _KEY) + _HEAD(4 + k, NFTA_DATA_VALUE) + key + pad
    if type(data) is bytes:
        d = len(data)
        pad = _PAD[d & 3]
        body += _HEAD(8 + d + len(pad), _DATA) + _HEAD(4 + d, NFTA_DATA_VALUE) + data + pad
    elif data is not None:
        body += _verdict_data(data)
    if timeout is not None:
        body += attr_be64(NFTA_SET_ELEM_TIMEOUT, timeout)
    return _HEAD(4 + len(body), _ELEM) + body



class Batch:
    """Changes for one nf_tables transaction.

    ``add``/``delete`` queue elements of named sets and maps of table
    ``family``/``table`` (or another table per call); :meth:`Nfnetlink.commit`
    sends them as NFNL_MSG_BATCH_BEGIN, one NEWSETELEM/DELSETELEM message per
    run of same-kind changes to one set, NFNL_MSG_BATCH_END -- in order, so a
    delete followed by an add of the same key replaces a map value (an add
    alone fails with EEXIST when the key exists with other data).  ``raw``
    queues any other message (a chain, a rule, a flush: nft/wire.py makes
    them) in the same order.
    """

    def __init__(self, family: str | int = "inet", table: str = "ipvs2nft") -> None:
        self.family = _family(family)
        self.table = table
        # runs of (message type, family, table, set, [element attributes], flags);
        # a raw message is a run with table None, its set the description, its body the one element
        self._runs: list[tuple[int, int, str | None, str, list[bytes], int]] = []

    def __len__(self) -> int:
        return sum(len(run[4]) for run in self._runs)

    def _queue(self, msg: int, set_name: str, element: bytes, family: str | int | None,
               table: str | None) -> Batch:
        where = (msg, self.family if family is None else _family(family), table or self.table, set_name)
        if self._runs and self._runs[-1][:4] == where:
            self._runs[-1][4].append(element)
        else:
            self._runs.append((*where, [element], 0))
        return self

    def extend(self, set_name: str, elements: list[bytes], *, family: str | int | None = None,
               table: str | None = None) -> Batch:
        """Add elements made with :func:`element` (a restore's thousands)."""
        where = (NFT_MSG_NEWSETELEM, self.family if family is None else _family(family), table or self.table,
                 set_name)
        if self._runs and self._runs[-1][:4] == where:
            self._runs[-1][4].extend(elements)
        elif elements:
            self._runs.append((*where, list(elements), 0))
        return self

    def raw(self, msg: int, body: bytes, what: str, *, family: str | int | None = None,
            flags: int = 0) -> Batch:
        """Queue one prepared message (its attributes after the nfgenmsg);
        ``what`` names it in an error."""
        family = self.family if family is None else _family(family)
        self._runs.append((msg, family, None, what, [body], flags))
        return self

    def flush(self, set_name: str, *, family: str | int | None = None, table: str | None = None) -> Batch:
        """Remove every element of a set or map (DELSETELEM without a list)."""
        body = (attr_str(NFTA_SET_ELEM_LIST_TABLE, table or self.table)
                + attr_str(NFTA_SET_ELEM_LIST_SET, set_name))
        return self.raw(NFT_MSG_DELSETELEM, body, f"flush {set_name}", family=family)

    def add(self, set_name: str, key: bytes, data: bytes | Verdict | None = None,
            timeout: int | None = None, *, family: str | int | None = None,
            table: str | None = None) -> Batch:
        """Add an element (``timeout`` in ms, for sets with ``flags timeout``)."""
        return self._queue(NFT_MSG_NEWSETELEM, set_name, element(key, data, timeout), family, table)

    def delete(self, set_name: str, key: bytes, *, family: str | int | None = None,
               table: str | None = None) -> Batch:
        """Delete an element; the whole batch fails (ENOENT) if it is absent."""
        return self._queue(NFT_MSG_DELSETELEM, set_name, element(key), family, table)

    def discard(self, set_name: str, key: bytes, *, family: str | int | None = None,
                table: str | None = None) -> Batch:
        """Delete an element if present (NFT_MSG_DESTROYSETELEM, kernel 6.3+)."""
        return self._queue(NFT_MSG_DESTROYSETELEM, set_name, element(key), family, table)

    def _plan(self) -> Iterator[tuple[int, int, str, str, list[bytes]]]:
        """The messages: runs cut where an element list would outgrow an
        attribute's 16-bit length, and a first message of one element --
        the echo it carries (below) repeats each of its elements."""
        first = True
        for msg, family, table, set_name, elements, flags in self._runs:
            if table is None:
                yield msg, family, table, set_name, elements, flags
                first = False
                continue
            if first:
                yield msg, family, table, set_name, elements[:1], flags
                elements, first = elements[1:], False
            for chunk in _chunks(elements):
                yield msg, family, table, set_name, chunk, flags

    def message_count(self) -> int:
        return sum(1 for _ in self._plan())

    def messages(self, seq: int) -> tuple[bytes, list[tuple[int, str]]]:
        """The batch's messages (without BEGIN/END) as one buffer, numbered
        from ``seq + 1`` up, and per message its number and a description
        for errors.  NLM_F_ECHO on the first message asks the kernel to send
        this socket the NEWGEN of the commit: ``nf_tables_gen_notify`` tests
        ``nlmsg_report`` of the message that follows BATCH_BEGIN (verified on
        6.18: the flag on BATCH_BEGIN itself is ignored)."""
        out, described = [], []
        flags = netlink.NLM_F_ECHO
        message = netlink.message
        for msg, family, table, set_name, chunk, extra in self._plan():
            if table is None:
                body = chunk[0]
            else:
                extra = netlink.NLM_F_CREATE if msg == NFT_MSG_NEWSETELEM else 0
                body = (attr_str(NFTA_SET_ELEM_LIST_TABLE, table) + attr_str(NFTA_SET_ELEM_LIST_SET, set_name)
                        + nested(NFTA_SET_ELEM_LIST_ELEMENTS, *chunk))
            seq += 1
            out.append(message((NFNL_SUBSYS_NFTABLES << 8) | msg, netlink.NLM_F_REQUEST | extra | flags, seq,
                               family, body))
            if table is not None:
                kind, fam = MESSAGE_NAMES.get(msg, msg), FAMILY_NAME.get(family, family)
                set_name = f"{kind} {fam} {table} {set_name}"
            described.append((seq, set_name))
            flags = 0
        return b"".join(out), described


def _chunks(elements: list[bytes]) -> Iterator[list[bytes]]:
    chunk: list[bytes] = []
    size = 0
    for element in elements:
        if chunk and size + len(element) > _MAX_NEST:
            yield chunk
            chunk, size = [], 0
        chunk.append(element)
        size += len(element)
    if chunk:
        yield chunk


# ---------------------------------------------------------------- requests

class Nfnetlink(SocketOwner):
    """Requests to nf_tables in the caller's network namespace, one socket."""

    def __init__(self, timeout: float = 2.0) -> None:
        self._nl = NetlinkSocket(timeout=timeout)

    def _request(self, msg: int, flags: int, family: int, body: bytes = b"") -> Iterator[netlink.Message]:
        return self._nl.request((NFNL_SUBSYS_NFTABLES << 8) | msg, flags, family, body)

    def genid(self) -> int:
        """The current ruleset generation id."""
        for _, _, _, data, pos, end in self._request(NFT_MSG_GETGEN, 0, socket.AF_UNSPEC):
            for kind, value in attrs(data, pos + 4, end):
                if kind == NFTA_GEN_ID:
                    return _BE32(value)[0]
        raise NetlinkError(errno.EPROTO, what="no generation id in NFT_MSG_GETGEN's answer")

    def _one(self, msg: int, family: str | int, body: bytes) -> dict[int, bytes] | None:
        """The attributes of the one object a GET names, None if there is no such object."""
        try:
            for _, _, _, data, pos, end in self._request(msg, 0, _family(family), body):
                return dict(attrs(data, pos + 4, end))
        except NetlinkError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        return None

    def table_handle(self, family: str | int, table: str) -> int | None:
        """The handle of the table, None if there is no such table.  A table
        deleted and made again gets a new handle."""
        info = self.table_info(family, table)
        return None if info is None else info[0]

    def table_info(self, family: str | int, table: str) -> tuple[int, int] | None:
        """(handle, use) of the table -- ``use`` counts its chains, sets and
        objects -- or None if there is no such table."""
        got = self._one(NFT_MSG_GETTABLE, family, attr_str(NFTA_TABLE_NAME, table))
        return None if got is None else (_BE64(got[NFTA_TABLE_HANDLE])[0], _BE32(got[NFTA_TABLE_USE])[0])

    def sets(self, family: str | int, table: str) -> list[tuple[str, int, int | None]]:
        """(name, handle, element count) of every set and map of the table;
        the count is None on kernels that do not report it (NFTA_SET_COUNT:
        6.18 does, Debian 12's 6.1 does not)."""
        found = []
        try:
            answers = self._request(NFT_MSG_GETSET, netlink.NLM_F_DUMP, _family(family),
                                    attr_str(NFTA_SET_TABLE, table))
            for _, _, _, data, pos, end in answers:
                got = dict(attrs(data, pos + 4, end))
                count = got.get(NFTA_SET_COUNT)
                found.append((text(got.get(NFTA_SET_NAME, b"")), _BE64(got[NFTA_SET_HANDLE])[0],
                              None if count is None else _BE32(count)[0]))
        except NetlinkError as exc:
            if exc.errno != errno.ENOENT:
                raise
        return found

    def chain(self, family: str | int, table: str, name: str) -> tuple[int, int] | None:
        """(handle, use) of one chain, None if there is no such chain."""
        body = attr_str(NFTA_CHAIN_TABLE, table) + attr_str(NFTA_CHAIN_NAME, name)
        got = self._one(NFT_MSG_GETCHAIN, family, body)
        return None if got is None else (_BE64(got[NFTA_CHAIN_HANDLE])[0], _BE32(got[NFTA_CHAIN_USE])[0])

    def chains(self, family: str | int, table: str) -> list[tuple[str, int, int]]:
        """(name, handle, use) of every chain of the table; ``use`` counts
        the chain's rules and the rules and map elements that jump to it
        (nf_tables_newrule and nft_data_hold take a reference each).  An
        absent table has no chains.  (The kernel dumps the chains of every
        table of the family, whatever table the request names: they are
        sorted out here.)"""
        found = []
        mine = table.encode() + b"\0"
        try:
            answers = self._request(NFT_MSG_GETCHAIN, netlink.NLM_F_DUMP, _family(family),
                                    attr_str(NFTA_CHAIN_TABLE, table))
            for _, _, _, data, pos, end in answers:
                name, handle, use, where = "", 0, 0, None
                for kind, value in attrs(data, pos + 4, end):
                    if kind == NFTA_CHAIN_TABLE:
                        where = value
                    elif kind == NFTA_CHAIN_NAME:
                        name = text(value)
                    elif kind == NFTA_CHAIN_HANDLE:
                        handle = _BE64(value)[0]
                    elif kind == NFTA_CHAIN_USE:
                        use = _BE32(value)[0]
                if where == mine:
                    found.append((name, handle, use))
        except NetlinkError as exc:
            if exc.errno != errno.ENOENT:
                raise
        return found

    def rules(self, family: str | int, table: str, chain: str) -> list[list[tuple[str, bytes]]]:
        """Each rule of the chain as its expressions: (name, attributes)."""
        return [exprs for _, exprs in self._rules(family, table, chain)]

    def table_rules(self, family: str | int, table: str) -> list[tuple[str, list[tuple[str, bytes]]]]:
        """Every rule of the table: (its chain, its expressions), in one dump
        (the daemon reads 10,000 services' counters at start-up so)."""
        return self._rules(family, table, None)

    def _rules(self, family: str | int, table: str,
               chain: str | None) -> list[tuple[str, list[tuple[str, bytes]]]]:
        body = attr_str(NFTA_RULE_TABLE, table) + (attr_str(NFTA_RULE_CHAIN, chain) if chain else b"")
        found = []
        answers = self._request(NFT_MSG_GETRULE, netlink.NLM_F_DUMP, _family(family), body)
        for _, _, _, data, pos, end in answers:
            exprs: list[tuple[str, bytes]] = []
            where = chain or ""
            for kind, value in attrs(data, pos + 4, end):
                if kind == NFTA_RULE_CHAIN:
                    where = text(value)
                if kind != NFTA_RULE_EXPRESSIONS:
                    continue
                for elem_kind, elem in attrs(value):
                    if elem_kind != NFTA_LIST_ELEM:
                        continue
                    parts = dict(attrs(elem))
                    exprs.append((text(parts.get(NFTA_EXPR_NAME, b"")), parts.get(NFTA_EXPR_DATA, b"")))
            found.append((where, exprs))
        return found

    def set_elements(self, family: str | int, table: str, set_name: str, reset: bool = False,
                     retries: int = 3) -> list[Element]:
        """Every element of the named set or map.  ``reset``: also zero
        their counters in the same pass (NFT_MSG_GETSETELEM_RESET, kernel
        6.6+).  A dump the kernel flags as interrupted by a concurrent
        commit is asked again (up to ``retries`` times).

        The kernel's side grows faster than the set: each 32 KiB part of a
        dump walks the set from its start again, skipping what it already
        sent (``nf_tables_dump_set`` sets ``iter.skip``; nft_set_hash.c
        ``nft_rhash_walk``) -- measured ~7 ms at 10,000 counted elements,
        ~40 ms at 40,000, ~120-150 ms at 80,000."""
        body = attr_str(NFTA_SET_ELEM_LIST_TABLE, table) + attr_str(NFTA_SET_ELEM_LIST_SET, set_name)
        msg = NFT_MSG_GETSETELEM_RESET if reset else NFT_MSG_GETSETELEM
        for attempt in range(retries + 1):
            found: list[Element] = []
            try:
                answers = self._request(msg, netlink.NLM_F_DUMP, _family(family), body)
                with netlink.gc_paused():
                    for _, _, _, data, pos, end in answers:
                        parse_elements(data, pos + 4, end, found)
            except netlink.DumpInterrupted:
                if attempt == retries or reset:
                    raise
                continue
            return found
        return []  # not reached

    def commit(self, batch: Batch, genid: int | None = None) -> int | None:
        """Apply ``batch`` as one transaction; return the generation id it
        produced (from the NEWGEN the kernel echoes, see Batch.messages), or
        None when the kernel had nothing to commit (say, only discards of
        absent elements: ``nf_tables_commit`` returns early on an empty
        commit list) -- also for an empty batch, which sends nothing.

        ``genid``: commit only if the ruleset is still at that generation
        (NFNL_BATCH_GENID, ``nf_tables_valid_genid``), else NetlinkError
        ERESTART.  Any refused message aborts the whole batch: NetlinkError
        with the first refused message's errno, ``index`` and description.
        """
        if not len(batch):
            return None
        count = batch.message_count()
        begin_seq = self._nl.next_seq(count + 2)
        end_seq = begin_seq + count + 1
        payload, described = batch.messages(begin_seq)
        body = attr_be32(NFNL_BATCH_GENID, genid) if genid is not None else b""
        begin = netlink.message(NFNL_MSG_BATCH_BEGIN, netlink.NLM_F_REQUEST, begin_seq, socket.AF_UNSPEC,
                                body, res_id=NFNL_SUBSYS_NFTABLES)
        end = netlink.message(NFNL_MSG_BATCH_END, netlink.NLM_F_REQUEST, end_seq, socket.AF_UNSPEC,
                              res_id=NFNL_SUBSYS_NFTABLES)
        self._nl.send_all(begin + payload + end)
        return self._commit_answer(begin_seq, end_seq, described)

    def _commit_answer(self, begin_seq: int, end_seq: int, described: list[tuple[int, str]]) -> int | None:
        """Read the batch's answers: errors, or the NEWGEN echo.  They are
        all queued when ``send_all`` returns (nfnetlink processes the batch
        in the sender's context), so this drains without waiting."""
        datagrams, _ = self._nl.drain()
        index = {seq: i for i, (seq, _) in enumerate(described)}
        failure: NetlinkError | None = None
        generation = None
        for data in datagrams:
            for kind, _, seq, _, pos, end in netlink.split(data):
                if kind == netlink.NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, pos)[0]
                    if code and failure is None:
                        where = index.get(seq)
                        what = described[where][1] if where is not None else "batch"
                        failure = NetlinkError(code, where, what)
                elif kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN and begin_seq <= seq <= end_seq:
                    generation = parse_event(NFT_MSG_NEWGEN, 0, data, pos + 4, end).genid
        if failure is not None:
            raise failure
        return generation


# ---------------------------------------------------------------- monitor

class NftEvent(Record):
    """One nf_tables notification.  ``kind`` is the NFT_MSG_* number
    (``name``: "DELTABLE" ...); ``family``, ``table`` and ``name`` (chain,
    set, object; a rule's chain) for object events; ``genid``, ``pid`` and
    ``proc`` (the committing process, NFTA_GEN_PROC_PID/NAME) for NEWGEN,
    which closes each transaction (``nf_tables_commit`` sends the objects'
    notifications first, then ``nf_tables_gen_notify``)."""

    __slots__ = ("kind", "family", "table", "name", "genid", "pid", "proc")

    def __init__(self, kind: int, family: int, table: str | None = None, name: str | None = None,
                 genid: int | None = None, pid: int | None = None, proc: str | None = None) -> None:
        self.kind = kind
        self.family = family
        self.table = table
        self.name = name
        self.genid = genid
        self.pid = pid
        self.proc = proc

    @property
    def kind_name(self) -> str:
        return MESSAGE_NAMES.get(self.kind, str(self.kind))

    @property
    def family_name(self) -> str:
        return FAMILY_NAME.get(self.family, str(self.family))

    def __repr__(self) -> str:
        if self.kind == NFT_MSG_NEWGEN:
            return f"<NftEvent NEWGEN {self.genid} pid={self.pid} proc={self.proc!r}>"
        name = f" {self.name}" if self.name is not None else ""
        return f"<NftEvent {self.kind_name} {self.family_name} {self.table}{name}>"


def parse_event(kind: int, family: int, data: bytes, pos: int, end: int) -> NftEvent:
    """An NftEvent from one notification's attributes (after nfgenmsg)."""
    if kind == NFT_MSG_NEWGEN:
        genid = pid = proc = None
        for akind, value in attrs(data, pos, end):
            if akind == NFTA_GEN_ID:
                genid = _BE32(value)[0]
            elif akind == NFTA_GEN_PROC_PID:
                pid = _BE32(value)[0]
            elif akind == NFTA_GEN_PROC_NAME:
                proc = text(value)
        return NftEvent(kind, family, genid=genid, pid=pid, proc=proc)
    name_attr = _NAME_ATTR.get(kind)
    table = name = None
    while pos < end:  # table and name come first; element lists are not walked
        length, akind = _NLA(data, pos)
        if length < 4:
            break
        akind &= 0x3FFF
        if akind == 1:
            table = text(data[pos + 4:pos + length])
        elif akind == name_attr:
            name = text(data[pos + 4:pos + length])
        if table is not None and (name is not None or name_attr is None):
            break
        pos += (length + 3) & ~3
    return NftEvent(kind, family, table, name)


@dataclass
class Transaction:
    """One committed nf_tables transaction as the monitor saw it: its
    object events and the NEWGEN that closed it (generation id, committing
    process id and name -- ``ipvsadm``, ``nft``, the daemon's own)."""

    genid: int | None
    pid: int | None
    proc: str | None
    events: list[NftEvent]

    def touches(self, family: str | int, table: str) -> bool:
        """Whether any event of the transaction concerns this table."""
        number = _family(family)
        return any(e.family == number and e.table == table for e in self.events)


class Monitor(SocketOwner):
    """nf_tables notifications (NFNLGRP_NFTABLES) for a selectors/asyncio
    loop: every committed change by anyone in this namespace, object by
    object, each transaction closed by its NEWGEN.  ``rcvbuf`` defaults to
    8 MiB: ``nft flush ruleset`` on a big table sends a notification per
    rule, set and chain."""

    def __init__(self, rcvbuf: int = netlink.DEFAULT_EVENT_RCVBUF) -> None:
        self._nl = NetlinkSocket(groups=[NFNLGRP_NFTABLES], rcvbuf=rcvbuf)
        self._nl.setblocking(False)
        self._pending: list[NftEvent] = []

    def read(self, limit: int = 65536) -> list[NftEvent]:
        """Every notification waiting, oldest first, without blocking.
        Raises EventsLost (carrying what was read) if the kernel dropped
        some: the caller must then check the ruleset itself."""
        datagrams, lost = self._nl.drain(limit)
        out = []
        for data in datagrams:
            for kind, _, _, _, pos, end in netlink.split(data):
                if kind >> 8 == NFNL_SUBSYS_NFTABLES:
                    out.append(parse_event(kind & 0xFF, data[pos], data, pos + 4, end))
        if lost:
            raise EventsLost(out)
        return out

    def transactions(self, limit: int = 65536) -> list[Transaction]:
        """The transactions completed since the last call: notifications
        grouped up to each NEWGEN (a transaction whose NEWGEN has not
        arrived yet waits for the next call).  On EventsLost the grouping is
        dropped; the exception carries the transactions completed before."""
        try:
            events = self.read(limit)
        except EventsLost as lost:
            done = _group(self._pending + lost.events, [])
            self._pending = []
            raise EventsLost(done) from None
        pending = self._pending + events
        self._pending = []
        return _group(pending, self._pending)


def _group(events: list[NftEvent], rest: list[NftEvent]) -> list[Transaction]:
    """Cut ``events`` at each NEWGEN; what follows the last one goes to ``rest``."""
    done, current = [], []
    for event in events:
        if event.kind == NFT_MSG_NEWGEN:
            done.append(Transaction(event.genid, event.pid, event.proc, current))
            current = []
        else:
            current.append(event)
    rest.extend(current)
    return done


# ---------------------------------------------------------------- one per process

_default: tuple[tuple[int, int], Nfnetlink] | None = None


def _shared() -> Nfnetlink:
    """This process's socket for the module-level functions (a forked child
    gets its own: two processes reading one socket steal answers; so does a
    caller that moved to another network namespace, where the old socket
    would still talk to the first one)."""
    global _default
    try:
        where = (os.getpid(), os.stat("/proc/thread-self/ns/net").st_ino)
    except OSError:
        where = (os.getpid(), 0)
    if _default is None or _default[0] != where:
        if _default is not None and _default[0][0] == where[0]:
            _default[1].close()
        _default = (where, Nfnetlink())
    return _default[1]


def ruleset_genid() -> int | None:
    """The current generation id, or None if it cannot be read."""
    try:
        return _shared().genid()
    except OSError:
        return None


def rules(family: str, table: str, chain: str) -> list[list[tuple[str, bytes]]]:
    """Each rule of the chain as its expressions: (name, attributes)."""
    return _shared().rules(family, table, chain)


def set_elements(family: str | int, table: str, set_name: str, reset: bool = False) -> list[Element]:
    """Every element of the named set or map (see Nfnetlink.set_elements)."""
    return _shared().set_elements(family, table, set_name, reset)


def counter_packets(data: bytes) -> int:
    """The packet count of a ``counter`` expression's attributes."""
    for kind, value in attrs(data):
        if kind == NFTA_COUNTER_PACKETS and len(value) >= 8:
            return _BE64(value)[0]
    return 0
