"""The services of our tables as one nf_tables transaction over raw netlink.

``build.py`` and ``direct.py`` say what each service needs, as nft text;
this module writes the same chains, rules and map elements as the netlink
messages libnftables would send for that text (``wire.py``), into a
:class:`nfnetlink.Batch`.  The fixed skeleton (tables, sets, hook chains)
stays libnftables' job: it is loaded once, and again only when it changes
(new ``--set`` timeouts, the SNAT option) or is lost.

Function by function it mirrors ``build``: ``add_service``,
``remove_service``, ``change_service``, ``incremental``, ``replace_all``.
tests/test_netbuild.py loads tables both ways and compares ``nft list``.
Tables with the SNAT option (``ct label``) are left to the text path
(:class:`Unsupported`).
"""

from __future__ import annotations

import socket
import struct

from ipvs2nft import dynsched, sched
from ipvs2nft.model import Dest, Forward, Service, Table, Timeouts
from ipvs2nft.netaddr import AF_INET6, IPPROTO_TCP, IPPROTO_UDP
from ipvs2nft.nft import build, direct, wire
from ipvs2nft.nft.nfnetlink import (
    NFT_MSG_DELCHAIN,
    NFT_MSG_DELRULE,
    NFT_MSG_NEWCHAIN,
    NFT_MSG_NEWRULE,
    Batch,
    Verdict,
    element,
)
from ipvs2nft.nft.wire import DYNSET_DELETE, DYNSET_UPDATE, NF_ACCEPT, NF_DROP, NFT_GOTO

NLM_F_CREATE, NLM_F_APPEND = 0x400, 0x800
INET = ("inet", "ipvs2nft")
GOTO = NFT_GOTO


class Unsupported(Exception):
    """A table this module does not write; the caller uses the nft text."""


def _where(fam: str) -> tuple[str, str]:
    """(family, table) of the direct table of family "4" or "6"."""
    return ("ip" if fam == "4" else "ip6", "ipvs2nft")


class Writer:
    """A transaction being written: messages in order, map elements kept
    per map until ``elements`` puts them after the chains they name."""

    def __init__(self, batch: Batch | None = None) -> None:
        self.batch = batch if batch is not None else Batch(*INET)
        self.pending: dict[tuple[str, str, str], list[bytes]] = {}  # made elements per map
        # (family, table, chain) of every chain the transaction makes, deletes,
        # fills or adds a jump to (fingerprint.changed: whose use counts move)
        self.touched: set[tuple[str, str, str]] = set()

    def chain(self, where: tuple[str, str], name: str) -> None:
        self.touched.add((*where, name))
        self.batch.raw(NFT_MSG_NEWCHAIN, wire.chain_body(where[1], name), f"add chain {name}",
                       family=where[0], flags=NLM_F_CREATE)

    def rule(self, where: tuple[str, str], chain: str, exprs: bytes) -> None:
        self.touched.add((*where, chain))
        self.batch.raw(NFT_MSG_NEWRULE, wire.rule_body(where[1], chain, exprs), f"add rule {chain}",
                       family=where[0], flags=NLM_F_CREATE | NLM_F_APPEND)

    def delete_chain(self, where: tuple[str, str], name: str) -> None:
        self.touched.add((*where, name))
        self.batch.raw(NFT_MSG_DELCHAIN, wire.chain_body(where[1], name), f"delete chain {name}",
                       family=where[0])

    def flush_chain(self, where: tuple[str, str], name: str) -> None:
        self.touched.add((*where, name))
        self.batch.raw(NFT_MSG_DELRULE, wire.flush_body(where[1], name), f"flush chain {name}",
                       family=where[0])

    def element(self, where: tuple[str, str], set_name: str, key: bytes,
                data: bytes | Verdict | None) -> None:
        if type(data) is Verdict and data.chain is not None:
            self.touched.add((*where, data.chain))
        found = self.pending.get((where[0], where[1], set_name))
        if found is None:
            found = self.pending[(where[0], where[1], set_name)] = []
        found.append(element(key, data))

    def elements(self) -> None:
        """The collected elements, one run per map."""
        for (family, table, set_name), made in self.pending.items():
            self.batch.extend(set_name, made, family=family, table=table)
        self.pending = {}

    def delete_elements(self, where: tuple[str, str], set_name: str, keys: list[bytes]) -> None:
        for key in keys:
            self.batch.delete(set_name, key, family=where[0], table=where[1])


# ---------------------------------------------------------------- keys and values

def _fam(svc: Service) -> str:
    return "6" if svc.af == AF_INET6 else "4"


def _dispatch(svc: Service, direct_table: bool = False) -> tuple[str, bytes]:
    """(map, key) of the service in the dispatch maps (build._dispatch_key,
    direct._dispatch)."""
    fam = _fam(svc)
    if svc.fwmark:
        return ("dfwm" if direct_table else f"fwm{fam}"), wire.u32(svc.fwmark)
    key = wire.pad(svc.addr.packed) + wire.pad(bytes([svc.protocol]))
    if svc.port == 0:
        return ("dsvcp0" if direct_table else f"svc{fam}p0"), key
    return ("dsvc" if direct_table else f"svc{fam}"), key + wire.pad(wire.port_bytes(svc.port))


def _placement(svc: Service, dest: Dest, is_direct: bool) -> tuple[str, bytes | Verdict]:
    """(map, value) serving a slot of ``dest`` (build._placement)."""
    if not is_direct and build.own_chain(svc, dest):
        return "slots", Verdict(GOTO, build.rs_chain(dest))
    nat = _NAT6 if svc.af == AF_INET6 else _NAT4
    if dest.port:
        return nat[0], dest.addr.packed + _PORT_PADDED(dest.port)
    return nat[1], dest.addr.packed


_NAT4, _NAT6 = ("nat4", "nat4a"), ("nat6", "nat6a")
_PORT_PADDED = struct.Struct(">H2x").pack  # an inet_service field of a concatenation


def _slot_elements(w: Writer, svc: Service, slots: sched.Slots, is_direct: bool) -> None:
    """build.slot_elements, into the inet maps."""
    base = build.slot_base(svc)
    if is_direct:
        for d in svc.dests:  # direct.inet_elements
            if d.fwd is Forward.MASQ:
                name, data = _placement(svc, d, True)
            elif d.fwd is Forward.LOCAL:
                name, data = "slots", Verdict(NF_ACCEPT)
            else:
                continue
            w.element(INET, name, wire.u32(direct.rid_key(d)), data)
        return
    for i, j in enumerate(slots.dyn):
        w.element(INET, "dyn", wire.u32(base + i), wire.u32(base + (j if j >= 0 else build.NO_SLOT)))
    for i, d in enumerate(slots.table):
        if d is None:
            continue
        if d is sched.PASS:
            w.element(INET, "slots", wire.u32(base + i), Verdict(NF_ACCEPT))
            continue
        name, data = _placement(svc, d, False)
        w.element(INET, name, wire.u32(base + i), data)


class _Keys(Writer):
    """A writer that keeps the keys of the elements (to delete them)."""

    def element(self, where: tuple[str, str], set_name: str, key: bytes,
                data: bytes | Verdict | None) -> None:
        if type(data) is Verdict and data.chain is not None:
            self.touched.add((*where, data.chain))
        self.pending.setdefault((*where, set_name), []).append(key)


def _delete_slots(w: Writer, svc: Service, slots: sched.Slots) -> None:
    """Delete the elements _slot_elements wrote (the chains they jump to are touched)."""
    keys = _Keys()
    _slot_elements(keys, svc, slots, direct.is_direct(svc))
    w.touched |= keys.touched
    for (_, _, name), found in keys.pending.items():
        w.delete_elements(INET, name, found)


# ---------------------------------------------------------------- inet rules

def _mark(svc: Service) -> bytes:
    keep = ~build.CT_MARK_MASK & 0xFFFFFFFF
    return wire.ct_mark_set(keep, build.ct_mark(svc))


def _timeouts(svc: Service, timeouts: Timeouts | None) -> list[bytes]:
    """build._timeout_rules."""
    if timeouts == build.KERNEL_TIMEOUTS:
        return []
    fam = _fam(svc)
    if svc.fwmark:
        return [wire.l4proto(IPPROTO_TCP) + wire.objref(wire.NFT_OBJECT_CT_TIMEOUT, f"tcp{fam}"),
                wire.l4proto(IPPROTO_UDP) + wire.objref(wire.NFT_OBJECT_CT_TIMEOUT, f"udp{fam}")]
    if svc.protocol in (IPPROTO_TCP, IPPROTO_UDP):
        name = f"{build.L4[svc.protocol]}{fam}"
        return [wire.objref(wire.NFT_OBJECT_CT_TIMEOUT, name)]
    return []


def _scheduler(svc: Service, slots: sched.Slots, inet: bool) -> bytes:
    """build._scheduler_rule: ``counter meta priority set <pick> goto pick|dyn``
    (services scheduled from live counts go through the one chain that looks
    up the dyn map, ``dyn4``/``dyn6``, ``dyn`` in the direct tables)."""
    n, base, fam = len(slots.table), build.slot_base(svc), _fam(svc)
    suffix = fam if inet else ""
    goto = wire.jump(GOTO, f"{'dyn' if slots.dyn else 'pick'}{suffix}")
    if slots.dyn:
        pick = wire.numgen(1, len(slots.dyn), False, base)
    elif slots.random:
        pick = wire.numgen(1, n, True, base)
    elif slots.hash is None:
        pick = wire.numgen(1, n, False, base)
    else:
        dep = wire.nfproto(fam) if inet else b""
        alen = 16 if fam == "6" else 4
        key = wire.address(fam, slots.hash != "daddr", wire.reg(4))
        length = alen
        if slots.hash == "saddr+sport":
            key += wire.port(True, wire.reg(4 + wire.slots(alen)))
            length += 4
        pick = dep + key + wire.jhash(wire.reg(4), 1, length, n, svc.sid, base)
    return wire.counter() + wire.priority_set(pick) + goto


def _client(svc: Service, dreg: int, inet: bool) -> bytes:
    """build._client_key: the client address, masked by -M, into ``dreg``."""
    fam = _fam(svc)
    out = (wire.nfproto(fam) if inet else b"") + wire.address(fam, True, dreg)
    if fam == "6":
        if svc.netmask != 128:
            mask = (((1 << svc.netmask) - 1) << (128 - svc.netmask)).to_bytes(16, "big")
            out += wire.bitwise(dreg, 16, mask, bytes(16))
    elif svc.netmask != 0xFFFFFFFF:
        out += wire.bitwise(dreg, 4, svc.netmask.to_bytes(4, "big"), bytes(4))
    return out


def _persisted(svc: Service, dest: Dest, set_name: str, inet: bool) -> bytes:
    """``<client> . meta mark & 0x0 | rid @set``."""
    alen = 16 if svc.af == AF_INET6 else 4
    rid = wire.rid_constant(dest.rid, wire.reg(wire.slots(alen)))
    return _client(svc, 1, inet) + rid + wire.lookup(set_name, 1)


def service_chain(w: Writer, svc: Service, slots: sched.Slots, timeouts: Timeouts | None,
                  is_direct: bool) -> None:
    """build.service_chain."""
    chain, fam = build.svc_chain(svc), _fam(svc)
    pick = wire.jump(GOTO, f"pick{fam}")
    if is_direct:
        w.rule(INET, chain, _mark(svc))
        for rule in _timeouts(svc, timeouts):
            w.rule(INET, chain, rule)
        w.rule(INET, chain, pick)
        return
    timeout_rules = _timeouts(svc, timeouts)
    locality = bool(slots.dyn) and svc.scheduler in dynsched.LOCALITY
    fold = len(timeout_rules) <= 1 and not svc.persistent and not locality and bool(slots.table)
    if not fold:
        w.rule(INET, chain, _mark(svc) + b"".join(timeout_rules[:1]))
        for rule in timeout_rules[1:]:
            w.rule(INET, chain, rule)
    if svc.persistent:
        for d in svc.dests:
            w.rule(INET, chain,
                   _persisted(svc, d, f"persist{fam}", True) + wire.jump(GOTO, build.rs_chain(d)))
    if locality:
        alen, base = (16 if fam == "6" else 4), build.slot_base(svc)
        for i, d in enumerate(svc.dests):
            w.rule(INET, chain, wire.nfproto(fam) + wire.address(fam, False, 1)
                   + wire.rid_constant(d.rid, wire.reg(wire.slots(alen))) + wire.lookup(f"lbl{fam}", 1)
                   + wire.priority_set(wire.immediate(1, wire.u32(base + i))) + pick)
    if slots.table:
        prefix = _mark(svc) + b"".join(timeout_rules) if fold else b""
        w.rule(INET, chain, prefix + _scheduler(svc, slots, True))
    else:
        w.rule(INET, chain, wire.jump(GOTO, "unreachable"))


def _dnat(svc: Service, dest: Dest) -> list[bytes]:
    """build._dnat."""
    fam = "6" if dest.af == AF_INET6 else "4"
    to = wire.immediate(1, dest.addr.packed)
    family = wire.NFPROTO[fam]
    if not dest.port:
        return [to + wire.dnat(family, 1, None)]
    nat = to + wire.immediate(2, wire.port_bytes(dest.port)) + wire.dnat(family, 1, 2)
    protos = (IPPROTO_TCP, IPPROTO_UDP, socket.IPPROTO_SCTP) if svc.fwmark else (svc.protocol,)
    return [wire.l4proto(p) + nat for p in protos]


def rs_rules(svc: Service, dest: Dest, snat: str = "") -> list[bytes]:
    """build.rs_rules."""
    if snat:
        raise Unsupported("the SNAT option (ct label) is written by libnftables")
    first = wire.counter()
    if svc.persistent:
        alen = 16 if svc.af == AF_INET6 else 4
        first = (_client(svc, 1, True) + wire.immediate(wire.reg(wire.slots(alen)), wire.u32(dest.rid))
                 + wire.dynset(f"persist{_fam(svc)}", DYNSET_UPDATE, 1, svc.timeout * 1000) + wire.counter())
    actions = _dnat(svc, dest) if dest.af == svc.af else [wire.jump(GOTO, "unreachable")]
    return [first + actions[0]] + actions[1:]


# ---------------------------------------------------------------- direct rules

def _only(svc: Service) -> bytes | None:
    """direct._not_one_packet."""
    if not svc.onepacket:
        return b""
    return wire.l4proto(IPPROTO_UDP, equal=False) if svc.fwmark else None


def _flow_lookup(fam: str, rid: int, set_name: str, invert: bool = False) -> bytes:
    """``<flow key> . meta mark & 0x0 | rid [!=] @set``."""
    key, at = wire.flow_key(fam)
    return key + wire.rid_constant(rid, wire.reg(at)) + wire.lookup(set_name, 1, invert=invert)


def _flow_with_rid(fam: str, rid: int) -> bytes:
    """``<flow key> . 0xRID`` into registers (a dynset key)."""
    key, at = wire.flow_key(fam)
    return key + wire.immediate(wire.reg(at), wire.u32(rid))


def direct_service_rules(svc: Service, slots: sched.Slots) -> list[bytes]:
    """direct.service_rules."""
    fam = _fam(svc)
    only = _only(svc)
    rules = [] if only is None else [
        only + _flow_lookup(fam, d.rid, "flows") + wire.jump(GOTO, direct.rs_chain(d)) for d in svc.dests]
    if only is not None:
        rules.append(only + wire.flow_key(fam)[0] + wire.lookup("live", 1) + wire.jump(NF_DROP))
    if svc.persistent:
        rules += [_persisted(svc, d, "persist", False) + wire.jump(GOTO, direct.rs_chain(d))
                  for d in svc.dests]
    if slots.table:
        rules.append(_scheduler(svc, slots, False))
    else:
        rules.append(wire.jump(GOTO, "unreachable"))
    return rules


def _tunnel_nexthop(svc: Service, dest: Dest) -> bytes:
    """direct._tunnel_nexthop."""
    if svc.af != AF_INET6 and dest.af != AF_INET6:
        return dest.addr.packed
    if svc.af == AF_INET6:
        return socket.inet_pton(socket.AF_INET6, "fe80::1")
    return socket.inet_pton(socket.AF_INET, "169.254.0.1")


def direct_rs_rules(svc: Service, dest: Dest, timeouts: Timeouts,
                    absent: frozenset[str] = frozenset()) -> list[bytes]:
    """direct.rs_rules."""
    fam = _fam(svc)
    if not timeouts.tcp:
        timeouts = Timeouts()
    only = _only(svc)
    live = dest.fwd in (Forward.ROUTE, Forward.TUNNEL)

    def remember(seconds: int) -> bytes:
        out = _flow_with_rid(fam, dest.rid) + wire.dynset("flows", DYNSET_UPDATE, 1, seconds * 1000)
        if live:
            out += wire.flow_key(fam)[0] + wire.dynset("live", DYNSET_UPDATE, 1, seconds * 1000)
        return out

    if only is None:
        rules = []
    elif svc.protocol == IPPROTO_UDP and not svc.fwmark:
        rules = [remember(timeouts.udp)]
    else:
        rules = [wire.tcp_flags(0x02) + _flow_with_rid(fam, dest.rid) + wire.dynset("fins", DYNSET_DELETE, 1),
                 wire.tcp_flags(0x01 | 0x04) + _flow_with_rid(fam, dest.rid)
                 + wire.dynset("fins", DYNSET_UPDATE, 1, timeouts.tcpfin * 1000),
                 wire.l4proto(IPPROTO_TCP) + _flow_lookup(fam, dest.rid, "fins") + remember(timeouts.tcpfin),
                 wire.l4proto(IPPROTO_TCP) + _flow_lookup(fam, dest.rid, "fins", invert=True)
                 + remember(timeouts.tcp),
                 wire.l4proto(IPPROTO_TCP, equal=False) + only + remember(timeouts.udp)]
    if svc.persistent:
        alen = 16 if fam == "6" else 4
        rules.append(_client(svc, 1, False) + wire.immediate(wire.reg(wire.slots(alen)), wire.u32(dest.rid))
                     + wire.dynset("persist", DYNSET_UPDATE, 1, svc.timeout * 1000))
    counted = b""
    if dest.fwd in (Forward.ROUTE, Forward.TUNNEL):
        mine = wire.rid_constant(dest.rid, 1)
        new = mine + wire.dynset("dconn", DYNSET_UPDATE, 1)
        rules.insert(0, new if only is None else _flow_lookup(fam, dest.rid, "flows", invert=True) + new)
        counted = mine + wire.dynset("dstat", DYNSET_UPDATE, 1)
    if dest.fwd in (Forward.MASQ, Forward.LOCAL):
        rules.append(wire.counter() + wire.priority_set(wire.immediate(1, wire.u32(direct.rid_key(dest))))
                     + wire.jump(NF_ACCEPT))
    elif dest.fwd is Forward.TUNNEL and direct.tunnel_device(dest) in absent:
        rules.append(wire.counter() + wire.jump(NF_DROP))
    elif dest.fwd is Forward.TUNNEL:
        index = socket.if_nametoindex(direct.tunnel_device(dest))
        rules.append(wire.counter() + counted + wire.immediate(1, _tunnel_nexthop(svc, dest))
                     + wire.immediate(2, wire.u32(index)) + wire.dup(1, 2) + wire.jump(NF_DROP))
    else:
        rules.append(wire.counter() + counted + wire.immediate(1, dest.addr.packed) + wire.dup(1)
                     + wire.jump(NF_DROP))
    return rules


def _direct_add(w: Writer, svc: Service, slots: sched.Slots, timeouts: Timeouts,
                absent: frozenset[str]) -> None:
    """direct.add_service."""
    where = _where(_fam(svc))
    base = build.slot_base(svc)
    for d in svc.dests:
        w.chain(where, direct.rs_chain(d))
        for rule in direct_rs_rules(svc, d, timeouts, absent):
            w.rule(where, direct.rs_chain(d), rule)
    w.chain(where, direct.chain(svc))
    for rule in direct_service_rules(svc, slots):
        w.rule(where, direct.chain(svc), rule)
    for i, d in enumerate(slots.table):
        if d is not None:
            w.element(where, "dslots", wire.u32(base + i), Verdict(GOTO, direct.rs_chain(d)))
    for i, j in enumerate(slots.dyn):
        w.element(where, "ddyn", wire.u32(base + i), wire.u32(base + (j if j >= 0 else build.NO_SLOT)))
    name, key = _dispatch(svc, direct_table=True)
    w.element(where, name, key, Verdict(GOTO, direct.chain(svc)))


def _direct_remove(w: Writer, svc: Service, slots: sched.Slots) -> None:
    """direct.remove_service."""
    where = _where(_fam(svc))
    base = build.slot_base(svc)
    name, key = _dispatch(svc, direct_table=True)
    w.delete_elements(where, name, [key])
    keys = [wire.u32(base + i) for i, d in enumerate(slots.table) if d is not None]
    if keys:
        w.delete_elements(where, "dslots", keys)
    if slots.dyn:
        w.delete_elements(where, "ddyn", [wire.u32(base + i) for i in range(len(slots.dyn))])
    w.delete_chain(where, direct.chain(svc))
    for d in svc.dests:
        w.delete_chain(where, direct.rs_chain(d))


# ---------------------------------------------------------------- services

def add_service(w: Writer, svc: Service, snat: str = "", timeouts: Timeouts | None = None,
                absent: frozenset[str] = frozenset(), live: dynsched.LiveState | None = None) -> None:
    """build.add_service (elements collected in the writer)."""
    timeouts = timeouts or Timeouts()
    slots = build.service_slots(svc, None, live)
    is_direct = direct.is_direct(svc)
    for d in svc.dests:
        if not is_direct and build.own_chain(svc, d):
            w.chain(INET, build.rs_chain(d))
            for rule in rs_rules(svc, d, snat):
                w.rule(INET, build.rs_chain(d), rule)
    chain = build.svc_chain(svc)
    w.chain(INET, chain)
    service_chain(w, svc, slots, timeouts, is_direct)
    _slot_elements(w, svc, slots, is_direct)
    name, key = _dispatch(svc)
    w.element(INET, name, key, Verdict(GOTO, chain))
    if is_direct:
        _direct_add(w, svc, slots, timeouts, absent)


def remove_service(w: Writer, svc: Service) -> None:
    """build.remove_service."""
    slots = build.service_slots(svc)
    if direct.is_direct(svc):
        _direct_remove(w, svc, slots)
    name, key = _dispatch(svc)
    w.delete_elements(INET, name, [key])
    _delete_slots(w, svc, slots)
    w.delete_chain(INET, build.svc_chain(svc))
    for d in svc.dests:
        if build.needs_chain(svc, d):
            w.delete_chain(INET, build.rs_chain(d))


def change_service(w: Writer, old: Service, new: Service, snat: str = "", timeouts: Timeouts | None = None,
                   live: dynsched.LiveState | None = None) -> None:
    """build.change_service."""
    old_chains = {d.rid: d for d in old.dests if build.needs_chain(old, d)}
    new_chains = {d.rid: d for d in new.dests if build.needs_chain(new, d)}
    _delete_slots(w, old, build.service_slots(old))
    w.flush_chain(INET, build.svc_chain(new))
    for rid, d in new_chains.items():
        if rid not in old_chains:
            w.chain(INET, build.rs_chain(d))
            for rule in rs_rules(new, d, snat):
                w.rule(INET, build.rs_chain(d), rule)
        elif rs_rules(old, old_chains[rid], snat) != rs_rules(new, d, snat):
            w.flush_chain(INET, build.rs_chain(d))
            for rule in rs_rules(new, d, snat):
                w.rule(INET, build.rs_chain(d), rule)
    slots = build.service_slots(new, None, live)
    service_chain(w, new, slots, timeouts, False)
    _slot_elements(w, new, slots, False)
    w.elements()
    for rid, d in old_chains.items():
        if rid not in new_chains:
            w.delete_chain(INET, build.rs_chain(d))


def _generation(w: Writer, old_generation: int, generation: int) -> None:
    w.batch.delete("gen", wire.u32(old_generation))
    w.batch.add("gen", wire.u32(generation))


def incremental(old: Table, new: Table, old_generation: int, generation: int,
                absent: frozenset[str] = frozenset(), live: dynsched.LiveState | None = None) -> Batch | None:
    """build.incremental: None when only a full rebuild can do it."""
    if new.timeouts != old.timeouts or new.snat != old.snat:
        return None
    if new.snat:
        raise Unsupported("the SNAT option (ct label) is written by libnftables")
    w = Writer()
    _generation(w, old_generation, generation)
    for step, before, svc in build.plan(old, new):
        if step == "remove":
            remove_service(w, before)
        elif step == "add":
            add_service(w, svc, new.snat, new.timeouts, absent, live)
            w.elements()
        else:
            change_service(w, before, svc, new.snat, new.timeouts, live)
    w.batch.touched = w.touched
    return w.batch


def replace_all(old_chains: dict[str, list[str]], new: Table, old_generation: int, generation: int,
                absent: frozenset[str] = frozenset(), live: dynsched.LiveState | None = None) -> Batch:
    """build.replace_all."""
    if new.snat:
        raise Unsupported("the SNAT option (ct label) is written by libnftables")
    w = Writer()
    _generation(w, old_generation, generation)
    for where, maps, sets in ((INET, build.SERVICE_MAPS, build.SERVICE_SETS),
                              (_where("4"), direct.SERVICE_MAPS, direct.SERVICE_SETS),
                              (_where("6"), direct.SERVICE_MAPS, direct.SERVICE_SETS)):
        for name in (*maps, *sets):
            w.batch.flush(name, family=where[0], table=where[1])
    for text, prefixes in ((build.TABLE, build.SERVICE_CHAINS), (direct.table("4"), direct.SERVICE_CHAINS),
                           (direct.table("6"), direct.SERVICE_CHAINS)):
        where = tuple(text.split())
        for prefix in prefixes:
            for chain in old_chains.get(text, ()):
                if chain.startswith(prefix):
                    w.delete_chain(where, chain)
    for svc in new.services:
        add_service(w, svc, new.snat, new.timeouts, absent, live)
    w.elements()
    return w.batch

