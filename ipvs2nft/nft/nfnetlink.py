"""Two questions libnftables answers slowly, asked over raw nfnetlink.

* The ruleset generation id: every committed nftables transaction, from
  anyone, increments it.  One round trip (NFT_MSG_GETGEN) tells each ipvsadm
  command whether the ruleset changed at all since ipvs2nft last looked.
* The counters of one chain's rules: how many connections a service's
  scheduling rule has sent (rr/wrr state).  ``nft list chain`` fills its
  cache with the whole table first -- 0.2 s at 10,000 services -- while a
  rule dump filtered by table and chain (NFT_MSG_GETRULE) costs one round
  trip.

One socket per process, opened on first use.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWRULE = 6
NFT_MSG_GETRULE = 7
NFT_MSG_GETGEN = 16
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLA_TYPE_MASK = 0x3FFF
NFTA_GEN_ID = 1
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS = 1, 2, 4
NFTA_LIST_ELEM = 1
NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 2
NFTA_COUNTER_PACKETS = 2
FAMILY = {"inet": 1, "ip": 2, "ip6": 10}

_socket: socket.socket | None = None
_seq = 0


def _request(msg: int, flags: int, family: int, attrs: bytes = b"") -> Iterator[bytes]:
    """Send one nftables request; yield the payload of each reply message
    (after nlmsghdr and nfgenmsg).  Raises OSError on a netlink error."""
    global _socket, _seq
    if _socket is None:
        _socket = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        _socket.settimeout(2)
    _seq += 1
    body = struct.pack("=BBH", family, 0, 0) + attrs  # struct nfgenmsg
    kind = (NFNL_SUBSYS_NFTABLES << 8) | msg
    _socket.send(struct.pack("=IHHII", 16 + len(body), kind, NLM_F_REQUEST | flags, _seq, os.getpid()) + body)
    while True:
        data = _socket.recv(1 << 20)
        pos = 0
        while pos + 16 <= len(data):
            length, kind, _, seq, _ = struct.unpack_from("=IHHII", data, pos)
            if length < 16:
                return
            if seq == _seq:
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    error = struct.unpack_from("=i", data, pos + 16)[0]
                    if error:
                        raise OSError(-error, os.strerror(-error))
                    return
                yield data[pos + 20:pos + length]
                if not flags & NLM_F_DUMP:
                    return
            pos += (length + 3) & ~3


def _attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    pos = 0
    while pos + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, pos)
        if length < 4:
            return
        yield kind & NLA_TYPE_MASK, data[pos + 4:pos + length]
        pos += (length + 3) & ~3


def _attr(kind: int, text: str) -> bytes:
    """A NUL-terminated string attribute, padded to 4 bytes."""
    value = text.encode() + b"\0"
    return struct.pack("=HH", 4 + len(value), kind) + value + b"\0" * (-len(value) % 4)


def ruleset_genid() -> int | None:
    """The current generation id, or None if it cannot be read."""
    try:
        for payload in _request(NFT_MSG_GETGEN, 0, socket.AF_UNSPEC):
            for kind, value in _attrs(payload):
                if kind == NFTA_GEN_ID and len(value) >= 4:
                    return struct.unpack_from(">I", value)[0]
    except OSError:
        return None
    return None


def rules(family: str, table: str, chain: str) -> list[list[tuple[str, bytes]]]:
    """Each rule of the chain as its expressions: (name, attributes)."""
    attrs = _attr(NFTA_RULE_TABLE, table) + _attr(NFTA_RULE_CHAIN, chain)
    found = []
    for payload in _request(NFT_MSG_GETRULE, NLM_F_DUMP, FAMILY[family], attrs):
        exprs: list[tuple[str, bytes]] = []
        for kind, value in _attrs(payload):
            if kind != NFTA_RULE_EXPRESSIONS:
                continue
            for elem_kind, elem in _attrs(value):
                if elem_kind != NFTA_LIST_ELEM:
                    continue
                parts = dict(_attrs(elem))
                exprs.append((parts.get(NFTA_EXPR_NAME, b"").rstrip(b"\0").decode(),
                              parts.get(NFTA_EXPR_DATA, b"")))
        found.append(exprs)
    return found


def counter_packets(data: bytes) -> int:
    """The packet count of a ``counter`` expression's attributes."""
    for kind, value in _attrs(data):
        if kind == NFTA_COUNTER_PACKETS and len(value) >= 8:
            return struct.unpack_from(">Q", value)[0]
    return 0
