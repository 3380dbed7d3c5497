"""nf_tables expressions and objects as netlink attributes: our rules without libnftables.

libnftables parses, evaluates and caches before it sends anything: loading
10,000 services took ~0.45 s of user time in ``nft -f`` on top of the
kernel's own ~0.3 s, and every later command refills a cache of the whole
table (15-30 ms at 10,000 services).  The per-service part of our tables is
a handful of rule shapes (``build.py``, ``direct.py``), so ``netbuild.py``
writes them as the messages libnftables would send, from the pieces here.

Each function returns one attribute blob: an expression (``NFTA_LIST_ELEM``
holding ``NFTA_EXPR_NAME`` and ``NFTA_EXPR_DATA``), a rule body, an element
key.  Registers are used the way nft 1.0.6 uses them, so that ``nft list``
reads the rules back exactly as it reads the ones it loaded itself (the
tests compare both listings): a value starts in the 16-byte register 1 and
a concatenation continues in the 32-bit registers after it (``reg``).
Numbers are those of <linux/netfilter/nf_tables.h>; integers in registers
are host order except packet fields (addresses, ports: network order).
Pieces that do not depend on a service are made once (``functools.cache``):
a restore writes the same ``counter`` or ``goto pick4`` ten thousand times.
"""

from __future__ import annotations

import functools
import socket
import struct

from ipvs2nft.netlink import NLA_F_NESTED, attr, attr_be32, attr_be64, attr_str, nested

# nft_expr_attributes, nft_list_attributes
_EXPR_NAME, _EXPR_DATA, _LIST_ELEM = 1, 2, 1
# nft_data_attributes, nft_verdict_attributes
_DATA_VALUE, _DATA_VERDICT, _VERDICT_CODE, _VERDICT_CHAIN = 1, 2, 1, 2
NF_DROP, NF_ACCEPT, NFT_GOTO = 0, 1, -4

# meta keys (nft_meta_keys), ct keys (nft_ct_keys), cmp ops, payload bases
META_PRIORITY, META_MARK, META_NFPROTO, META_L4PROTO = 2, 3, 15, 16
CT_MARK, CT_LABELS = 3, 13
CMP_EQ, CMP_NEQ = 0, 1
BASE_NETWORK, BASE_TRANSPORT = 1, 2
DYNSET_UPDATE, DYNSET_DELETE = 1, 2
NFT_OBJECT_CT_TIMEOUT = 7
NFT_NAT_DNAT = 1
NF_NAT_RANGE_MAP_IPS, NF_NAT_RANGE_PROTO_SPECIFIED = 1, 2
NFT_LOOKUP_F_INV = 1
NFT_REJECT_ICMP_UNREACH = 0
NFPROTO = {"4": 2, "6": 10}  # NFPROTO_IPV4, NFPROTO_IPV6 (also the nfgenmsg families ip, ip6)

_U32 = struct.Struct("=I").pack  # host order: marks, priorities, numgen values
_PORT = struct.Struct(">H").pack


def reg(slot: int) -> int:
    """The register nft names for 32-bit slot ``slot`` of the register file:
    NFT_REG_1..4 (16 bytes each) at slots 0, 4, 8, 12, NFT_REG32_nn elsewhere."""
    return slot // 4 + 1 if slot % 4 == 0 else 8 + slot


def slots(length: int) -> int:
    """How many 32-bit slots a value of ``length`` bytes fills."""
    return (length + 3) // 4


# ---------------------------------------------------------------- data

def value(data: bytes) -> bytes:
    """nft_data holding a value (the inside of NFTA_*_DATA, NFTA_SET_ELEM_KEY...)."""
    return attr(_DATA_VALUE, data)


def verdict(code: int, chain: str | None = None) -> bytes:
    """nft_data holding a verdict."""
    inner = attr_be32(_VERDICT_CODE, code)
    if chain is not None:
        inner += attr_str(_VERDICT_CHAIN, chain)
    return nested(_DATA_VERDICT, inner)


def pad(data: bytes) -> bytes:
    """One field of a concatenated key, padded to its 32-bit slots."""
    return data + b"\0" * (-len(data) % 4)


# ---------------------------------------------------------------- expressions

def expr(name: str, *attrs: bytes) -> bytes:
    return nested(_LIST_ELEM, attr_str(_EXPR_NAME, name), nested(_EXPR_DATA, *attrs))


@functools.cache
def meta_load(key: int, dreg: int) -> bytes:
    return expr("meta", attr_be32(2, key), attr_be32(1, dreg))


@functools.cache
def meta_set(key: int, sreg: int) -> bytes:
    return expr("meta", attr_be32(2, key), attr_be32(3, sreg))


@functools.cache
def ct_load(key: int, dreg: int) -> bytes:
    return expr("ct", attr_be32(1, dreg), attr_be32(2, key))


@functools.cache
def ct_set(key: int, sreg: int) -> bytes:
    return expr("ct", attr_be32(2, key), attr_be32(4, sreg))


@functools.cache
def cmp(sreg: int, op: int, data: bytes) -> bytes:
    return expr("cmp", attr_be32(1, sreg), attr_be32(2, op), nested(3, value(data)))


@functools.cache
def payload(base: int, offset: int, length: int, dreg: int) -> bytes:
    return expr("payload", attr_be32(1, dreg), attr_be32(2, base), attr_be32(3, offset), attr_be32(4, length))


def bitwise(sreg: int, length: int, mask: bytes, xor: bytes) -> bytes:
    """``& mask ^ xor`` in place (sreg = dreg), as nft writes ``& m | x``:
    the part before ``xor`` made once per register, length and mask."""
    return _bitwise_head(sreg, length, mask) + nested(5, value(xor))


@functools.cache
def _bitwise_head(sreg: int, length: int, mask: bytes) -> bytes:
    whole = expr("bitwise", attr_be32(1, sreg), attr_be32(2, sreg), attr_be32(3, length),
                 nested(4, value(mask)), nested(5, value(bytes(length))))
    return whole[:len(whole) - len(nested(5, value(bytes(length))))]


@functools.cache
def lookup(set_name: str, sreg: int, dreg: int | None = None, invert: bool = False) -> bytes:
    parts = [attr_str(1, set_name), attr_be32(2, sreg)]
    if dreg is not None:
        parts.append(attr_be32(3, dreg))
    parts.append(attr_be32(5, NFT_LOOKUP_F_INV if invert else 0))
    return expr("lookup", *parts)


def immediate(dreg: int, data: bytes) -> bytes:
    return expr("immediate", attr_be32(1, dreg), nested(2, value(data)))


@functools.cache
def jump(code: int, chain: str | None = None) -> bytes:
    """A verdict: accept, drop, goto ``chain``."""
    return expr("immediate", attr_be32(1, 0), nested(2, verdict(code, chain)))


@functools.cache
def counter() -> bytes:
    return expr("counter", attr_be64(1, 0), attr_be64(2, 0))


def numgen(dreg: int, mod: int, random: bool, offset: int) -> bytes:
    # three big-endian u32 attributes in one native pack (htonl: their bytes in host order)
    return _numgen_head(dreg) + _THREE_U32.pack(8, 2, _htonl(mod), 8, 3, _htonl(1 if random else 0),
                                                8, 4, _htonl(offset))


_THREE_U32 = struct.Struct("=HHIHHIHHI")
_htonl = socket.htonl


@functools.cache
def _numgen_head(dreg: int) -> bytes:
    whole = expr("numgen", attr_be32(1, dreg), attr_be32(2, 0), attr_be32(3, 0), attr_be32(4, 0))
    return whole[:len(whole) - 24]


def jhash(sreg: int, dreg: int, length: int, mod: int, seed: int, offset: int) -> bytes:
    return expr("hash", attr_be32(1, sreg), attr_be32(2, dreg), attr_be32(3, length), attr_be32(4, mod),
                attr_be32(5, seed), attr_be32(6, offset), attr_be32(7, 0))


@functools.cache
def objref(kind: int, name: str) -> bytes:
    return expr("objref", attr_be32(1, kind), attr_str(2, name))


def dynset(set_name: str, op: int, sreg: int, timeout_ms: int | None = None) -> bytes:
    parts = [attr_str(1, set_name), attr_be32(3, op), attr_be32(4, sreg)]
    if timeout_ms is not None:
        parts.append(attr_be64(6, timeout_ms))
    parts.append(attr_be32(9, 0))
    return expr("dynset", *parts)


def dnat(family: int, addr_reg: int, port_reg: int | None) -> bytes:
    parts = [attr_be32(1, NFT_NAT_DNAT), attr_be32(2, family), attr_be32(3, addr_reg), attr_be32(4, addr_reg)]
    flags = NF_NAT_RANGE_MAP_IPS
    if port_reg is not None:
        parts += [attr_be32(5, port_reg), attr_be32(6, port_reg)]
        flags |= NF_NAT_RANGE_PROTO_SPECIFIED
    parts.append(attr_be32(7, flags))
    return expr("nat", *parts)


def dup(addr_reg: int, dev_reg: int | None = None) -> bytes:
    parts = [attr_be32(1, addr_reg)]
    if dev_reg is not None:
        parts.append(attr_be32(2, dev_reg))
    return expr("dup", *parts)


@functools.cache
def reject_unreachable(fam: str) -> bytes:
    """``reject with icmp(v6) type port-unreachable`` of an ip/ip6 table."""
    return expr("reject", attr_be32(1, NFT_REJECT_ICMP_UNREACH), attr(2, bytes([3 if fam == "4" else 4])))


# ---------------------------------------------------------------- statements (nft's words)

@functools.cache
def l4proto(proto: int, equal: bool = True) -> bytes:
    """``meta l4proto tcp`` / ``meta l4proto != tcp``."""
    return meta_load(META_L4PROTO, 1) + cmp(1, CMP_EQ if equal else CMP_NEQ, bytes([proto]))


@functools.cache
def nfproto(fam: str) -> bytes:
    """The ``meta nfproto ipv4`` that nft puts before an ``ip`` match in an inet table."""
    return meta_load(META_NFPROTO, 1) + cmp(1, CMP_EQ, bytes([NFPROTO[fam]]))


@functools.cache
def address(fam: str, source: bool, dreg: int) -> bytes:
    """``ip saddr`` ... ``ip6 daddr`` into ``dreg``."""
    if fam == "6":
        return payload(BASE_NETWORK, 8 if source else 24, 16, dreg)
    return payload(BASE_NETWORK, 12 if source else 16, 4, dreg)


@functools.cache
def port(source: bool, dreg: int) -> bytes:
    """``th sport`` / ``th dport``."""
    return payload(BASE_TRANSPORT, 0 if source else 2, 2, dreg)


def rid_constant(rid: int, dreg: int) -> bytes:
    """``meta mark & 0x0 | rid``: the rid as a mark-typed constant inside a
    key nft 1.0.6 could not type otherwise (build.py explains the trick)."""
    return meta_load(META_MARK, dreg) + bitwise(dreg, 4, _U32(0), _U32(rid))


@functools.cache
def tcp_flags(mask: int) -> bytes:
    """``tcp flags & mask != 0`` (with the ``meta l4proto tcp`` nft adds)."""
    return (l4proto(socket.IPPROTO_TCP) + payload(BASE_TRANSPORT, 13, 1, 1)
            + bitwise(1, 1, bytes([mask]), b"\0") + cmp(1, CMP_NEQ, b"\0"))


@functools.cache
def flow_key(fam: str, first: int = 0) -> tuple[bytes, int]:
    """``ip saddr . th sport . ip daddr . th dport`` loaded from slot
    ``first`` on; returns the expressions and the next free slot."""
    alen = slots(16 if fam == "6" else 4)
    at = first
    out = address(fam, True, reg(at))
    at += alen
    out += port(True, reg(at))
    at += 1
    out += address(fam, False, reg(at))
    at += alen
    out += port(False, reg(at))
    return out, at + 1


def ct_mark_set(keep: int, bits: int) -> bytes:
    """``ct mark set ct mark & keep | bits``."""
    return ct_load(CT_MARK, 1) + bitwise(1, 4, _U32(keep), _U32(bits)) + ct_set(CT_MARK, 1)


def priority_set(data: bytes) -> bytes:
    """``meta priority set <value in register 1>``."""
    return data + meta_set(META_PRIORITY, 1)


def u32(number: int) -> bytes:
    return _U32(number)


def port_bytes(number: int) -> bytes:
    return _PORT(number)


# ---------------------------------------------------------------- objects

# nft_chain_attributes, nft_rule_attributes
_CHAIN_TABLE, _CHAIN_NAME = 1, 3
_RULE_TABLE, _RULE_CHAIN, _RULE_EXPRESSIONS = 1, 2, 4


def chain_body(table: str, name: str) -> bytes:
    return attr_str(_CHAIN_TABLE, table) + attr_str(_CHAIN_NAME, name)


def rule_body(table: str, chain: str, exprs: bytes) -> bytes:
    return (attr_str(_RULE_TABLE, table) + attr_str(_RULE_CHAIN, chain)
            + attr(_RULE_EXPRESSIONS | NLA_F_NESTED, exprs))


def flush_body(table: str, chain: str) -> bytes:
    """DELRULE without a handle: every rule of the chain."""
    return attr_str(_RULE_TABLE, table) + attr_str(_RULE_CHAIN, chain)
