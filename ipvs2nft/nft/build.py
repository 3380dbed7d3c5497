"""The model as an nftables ruleset: pure, deterministic, text out.

Everything lives in one table, ``inet ipvs2nft``, that nothing else touches
and that touches nothing else.  Two kernel costs shape it (measured here,
see ../shared/reference/nftables-at-scale.md and compat-matrix.md):

* every set the table holds is scanned for every set created or referenced,
  so the number of sets and maps is constant, whatever the number of
  services (one anonymous map per service makes a 10k-service load take
  tens of seconds);
* every element added to a map is checked against every rule that
  references the map (``nft_add_set_elem`` walks ``set->bindings``), so a
  map with many elements is referenced by a constant number of rules.  A
  map of 40,000 slots referenced from 10,000 service chains took 60 s to
  load; the shape below loads 10,000 services x 4 in about 0.5 s.

The shape:

* ``dispatch`` (jumped to from the nat prerouting and output hooks) does
  one verdict-map lookup, in IPVS's order: fwmark (``fwm4``/``fwm6`` on the
  packet mark), then address.protocol.port (``svc4``/``svc6``), then the
  port-0 services (``svc4p0``/``svc6p0``).  Each element jumps to the
  service's chain ``svc_<sid>``.
* ``svc_<sid>`` tries persistence, sets the connection timeouts, and picks a
  slot: ``numgen inc`` (rr, wrr and the approximated schedulers) or
  ``jhash`` (sh, dh, mh), written to ``meta priority`` -- a scratch register
  that leaves the packet mark alone (fwmark services and policy routing
  need the mark; IPv4 forwarding resets skb->priority anyway).  Service
  ``sid`` owns slots ``sid*65536 ...``.  Then it goes to ``pick4``/``pick6``.
* ``pick4``/``pick6`` (the only rules that reference the slot maps): plain
  masquerading slots are DNATed straight from the data maps ``nat4``
  (address . port) and ``nat4a`` (address only: port 0 keeps the packet's
  port); slots whose real server needs a chain go through ``slots`` to
  ``rs_<rid>``; a slot with no server ends in ``unreachable`` (ICMP port
  unreachable, what IPVS answers when no real server is available).
* ``rs_<rid>`` exists only where per-server work is needed: persistence
  learning, and forwarding methods other than masquerading.
* persistence: one dynamic set per family keyed ``client-net . rid``.  The
  lookup in ``svc_<sid>`` needs the rid as a constant inside the key, which
  nft 1.0.6 cannot type; ``meta mark & 0x0 | <rid>`` is a typed expression
  with that constant value (it reads the mark and discards it).
* ``gen`` holds the store's generation.  Every incremental transaction
  deletes the generation it expects and adds the new one, so a table that
  drifted (flushed, deleted, left behind by a crash) makes it fail as a
  whole, and the back end rebuilds from the store instead.

Names are generated (``svc_12``, ``rs_40``) and every value is an address,
number or name this program formatted itself, so no user text reaches nft.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass, field

from ipvs2nft import dynsched, sched
from ipvs2nft.model import Dest, Service, Table, Timeouts
from ipvs2nft.netaddr import AF_INET6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP
from ipvs2nft.nft import direct

TABLE = "inet ipvs2nft"
SLOT_BLOCK = 65536
NO_SLOT = SLOT_BLOCK - 1  # a slot no server ever has (dyn's "none available")
PERSIST_SIZE = 1048576
# IPVS works at LOCAL_IN, after prerouting NAT: a VIP that another table
# already DNATs never reaches it.  One past dstnat (-100) keeps that order;
# the name "dstnat" is not valid on the output hook, hence the number.
NAT_PRIORITY = "-99"
L4 = {IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp", IPPROTO_SCTP: "sctp"}
# With the SNAT option every connection this table DNATs carries this conntrack
# label bit, and postrouting source-NATs exactly those.
SNAT_LABEL = 127

# Every connection a service of ours schedules carries the service in the
# upper half of its conntrack mark: bit 31 says "ours" (a kernel-side dump
# filter needs one exact value under a mask), bits 16-30 the sid.  The lower
# half is left to whoever else marks connections (CONNMARK, multi-WAN
# routing...): ``ct mark set ct mark & 0xffff | ours``.
CT_MARK_MASK = 0xFFFF0000
CT_MARK_OURS = 0x80000000
MAX_SID = 0x7FFF  # what fits in bits 16-30

# Per real server, the kernel counts IPVS's statistics itself: packets and
# bytes per direction in ``stat4/6`` (service mark . direction . server
# address . server port) and connections in ``conn4/6``, element counters of
# dynamic sets that the data path updates; listings read them back.
STAT_SIZE = 1048576
# A managed service (live counts decide, dynsched.managed) walks its
# predicted choices with ``numgen inc`` through ``dyn`` (numgen value ->
# fixed slot of a server); lblc/lblcr remember destination addresses in
# ``lbl4/6`` (address . rid).  Both are written at run time (the daemon),
# hence "dynamic": the drift check does not compare their elements.
LBL_SIZE = 65536


def ct_mark(svc: Service) -> int:
    """The conntrack mark bits of a service's connections."""
    return CT_MARK_OURS | (svc.sid << 16)


def sid_of_mark(mark: int) -> int | None:
    """The sid a conntrack mark carries, or None if it is not ours."""
    if not mark & CT_MARK_OURS:
        return None
    return (mark >> 16) & MAX_SID


@dataclass
class Script:
    """An nft script being written, with the warnings met on the way."""

    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add(self, line: str) -> None:
        self.lines.append(line)

    def text(self) -> str:
        return "".join(line + "\n" for line in self.lines)


# ---------------------------------------------------------------- names

def svc_chain(svc: Service) -> str:
    return f"svc_{svc.sid}"


def rs_chain(dest: Dest) -> str:
    return f"rs_{dest.rid}"


def slot_base(svc: Service) -> int:
    return svc.sid * SLOT_BLOCK


def _v6(svc: Service) -> bool:
    return svc.af == AF_INET6


def _fam(svc: Service) -> str:
    """Client family of a service: "4" or "6"."""
    return "6" if _v6(svc) else "4"


def _ip(svc: Service) -> str:
    return "ip6" if _v6(svc) else "ip"


# ---------------------------------------------------------------- skeleton

def _label(snat: str) -> str:
    return f"ct label set {SNAT_LABEL} " if snat else ""


HOOKS = ("prerouting", "output")


def skeleton(script: Script, timeouts: Timeouts, generation: int, snat: str = "",
             hooks: tuple[str, ...] = HOOKS) -> None:
    """The table and its fixed objects."""
    s = script.add
    label = _label(snat)
    s(f"add table {TABLE}")
    s(f"add map {TABLE} svc4 {{ type ipv4_addr . inet_proto . inet_service : verdict; }}")
    s(f"add map {TABLE} svc6 {{ type ipv6_addr . inet_proto . inet_service : verdict; }}")
    s(f"add map {TABLE} svc4p0 {{ type ipv4_addr . inet_proto : verdict; }}")
    s(f"add map {TABLE} svc6p0 {{ type ipv6_addr . inet_proto : verdict; }}")
    s(f"add map {TABLE} fwm4 {{ type mark : verdict; }}")
    s(f"add map {TABLE} fwm6 {{ type mark : verdict; }}")
    # Slot numbers live in meta priority (type classid, a plain u32 here).
    s(f"add map {TABLE} nat4 {{ type classid : ipv4_addr . inet_service; }}")
    s(f"add map {TABLE} nat4a {{ type classid : ipv4_addr; }}")
    s(f"add map {TABLE} nat6 {{ type classid : ipv6_addr . inet_service; }}")
    s(f"add map {TABLE} nat6a {{ type classid : ipv6_addr; }}")
    s(f"add map {TABLE} slots {{ type classid : verdict; }}")
    for fam, addr in (("4", "ipv4_addr"), ("6", "ipv6_addr")):
        s(f"add set {TABLE} persist{fam} {{ type {addr} . mark; flags dynamic,timeout; "
          f"size {PERSIST_SIZE}; }}")
    s(f"add set {TABLE} gen {{ type mark; }}")
    s(f"add map {TABLE} dyn {{ type classid : classid; flags dynamic; }}")
    for fam, addr in (("4", "ipv4_addr"), ("6", "ipv6_addr")):
        s(f"add set {TABLE} lbl{fam} {{ type {addr} . mark; flags dynamic; size {LBL_SIZE}; }}")
        s(f"add set {TABLE} stat{fam} {{ type mark . ct_dir . {addr} . inet_service; flags dynamic; "
          f"counter; size {STAT_SIZE}; }}")
        s(f"add set {TABLE} conn{fam} {{ type mark . {addr} . inet_service; flags dynamic; counter; "
          f"size {STAT_SIZE}; }}")
    ct_timeouts(script, timeouts)
    s(f"add chain {TABLE} unreachable")
    s(f"add rule {TABLE} unreachable reject with icmpx type port-unreachable")
    for fam, ip in (("4", "ip"), ("6", "ip6")):
        chain = f"pick{fam}"
        s(f"add chain {TABLE} {chain}")
        s(f"add rule {TABLE} {chain} {label}dnat {ip} to meta priority map @nat{fam}a")
        for proto in ("tcp", "udp", "sctp"):
            s(f"add rule {TABLE} {chain} meta l4proto {proto} {label}dnat {ip} to meta priority "
              f"map @nat{fam}")
        s(f"add rule {TABLE} {chain} meta priority vmap @slots")
        s(f"add rule {TABLE} {chain} goto unreachable")
        # managed services' numgen value -> the fixed slot of the predicted
        # server.  Looked up here, by one rule per family, not in each
        # service's chain: every element added to a map is checked against
        # every rule that references it (nft_add_set_elem walks the set's
        # bindings), and 10,000 referencing rules made a restore take 20 s.
        s(f"add chain {TABLE} dyn{fam}")
        s(f"add rule {TABLE} dyn{fam} meta priority set meta priority map @dyn goto {chain}")
        s(f"add rule {TABLE} dyn{fam} goto unreachable")
    s(f"add chain {TABLE} dispatch")
    s(f"add rule {TABLE} dispatch meta nfproto ipv4 meta l4proto {{ tcp, udp, sctp }} meta mark vmap @fwm4")
    s(f"add rule {TABLE} dispatch meta nfproto ipv6 meta l4proto {{ tcp, udp, sctp }} meta mark vmap @fwm6")
    s(f"add rule {TABLE} dispatch ip daddr . meta l4proto . th dport vmap @svc4")
    s(f"add rule {TABLE} dispatch ip6 daddr . meta l4proto . th dport vmap @svc6")
    s(f"add rule {TABLE} dispatch ip daddr . meta l4proto vmap @svc4p0")
    s(f"add rule {TABLE} dispatch ip6 daddr . meta l4proto vmap @svc6p0")
    for hook in hooks:  # output: connections the director itself opens to a VIP
        s(f"add chain {TABLE} {hook} {{ type nat hook {hook} priority {NAT_PRIORITY}; policy accept; }}")
        s(f"add rule {TABLE} {hook} jump dispatch")
    counting(script, hooks)
    direct.skeleton(script, timeouts)
    if snat:
        s(f"add chain {TABLE} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}")
        for rule in _snat_rules(snat):
            s(f"add rule {TABLE} postrouting ct label {SNAT_LABEL} {rule}")
    s(f"add element {TABLE} gen {{ {generation} }}")


def counting(script: Script, hooks: tuple[str, ...] = HOOKS) -> None:
    """The chains that count IPVS's statistics in the kernel.

    Packets: after our nat chains (priority -50 > -99, so a connection's first
    packet already carries its mark) on prerouting and output -- every packet
    through the director passes exactly one of them, except that a packet
    looped back over ``lo`` would be seen twice, so prerouting skips
    loopback.  The server is the destination of an original-direction
    packet after DNAT and the source of a reply (un-NATed only at
    postrouting).  Connections: once each, in nat chains on postrouting and
    input, which the kernel runs for a connection's first packet only
    (nf_nat_inet_fn) and which see the server as the destination.
    """
    s = script.add
    ours = f"ct mark & {CT_MARK_OURS:#x} == {CT_MARK_OURS:#x}"
    key = f"ct mark & {CT_MARK_MASK:#x}"
    for hook in hooks:
        chain = f"count_{hook}"
        s(f"add chain {TABLE} {chain} {{ type filter hook {hook} priority -50; policy accept; }}")
        skip = "meta iiftype != loopback " if hook == "prerouting" else ""
        for fam, ip in (("4", "ip"), ("6", "ip6")):
            nf = f"meta nfproto ipv{fam[0]}"
            s(f"add rule {TABLE} {chain} {skip}{ours} {nf} ct direction original "
              f"update @stat{fam} {{ {key} . ct direction . {ip} daddr . th dport }}")
            s(f"add rule {TABLE} {chain} {skip}{ours} {nf} ct direction reply "
              f"update @stat{fam} {{ {key} . ct direction . {ip} saddr . th sport }}")
    for hook in ("postrouting", "input"):
        chain = f"count_new_{hook}"
        s(f"add chain {TABLE} {chain} {{ type nat hook {hook} priority 99; policy accept; }}")
        for fam, ip in (("4", "ip"), ("6", "ip6")):
            s(f"add rule {TABLE} {chain} {ours} meta nfproto ipv{fam[0]} ct direction original "
              f"update @conn{fam} {{ {key} . {ip} daddr . th dport }}")


def _snat_rules(snat: str) -> list[str]:
    """"masquerade", or one source address per family ("A[,B]")."""
    if snat == "masquerade":
        return ["masquerade"]
    rules = []
    for addr in snat.split(","):
        ip = ipaddress.ip_address(addr)
        rules.append(f"meta nfproto ipv{ip.version} snat ip{'' if ip.version == 4 else '6'} to {ip}")
    return rules


KERNEL_TIMEOUTS = Timeouts(0, 0, 0)  # keep conntrack's own (the iptables front end)


def ct_timeouts(script: Script, t: Timeouts) -> None:
    """``--set tcp tcpfin udp`` as conntrack timeout policies that only the
    connections of this table use (not host-wide sysctls)."""
    if t == KERNEL_TIMEOUTS:
        return
    for fam, l3 in (("4", "ip"), ("6", "ip6")):
        script.add(f"add ct timeout {TABLE} tcp{fam} {{ protocol tcp; l3proto {l3}; "
                   f"policy = {{ established: {t.tcp}, fin_wait: {t.tcpfin} }}; }}")
        script.add(f"add ct timeout {TABLE} udp{fam} {{ protocol udp; l3proto {l3}; "
                   f"policy = {{ unreplied: {t.udp}, replied: {t.udp} }}; }}")


# ---------------------------------------------------------------- per service

def _dispatch_key(svc: Service) -> tuple[str, str]:
    """(map name, element key) of the service in the dispatch maps."""
    fam = _fam(svc)
    if svc.fwmark:
        return f"fwm{fam}", f"{svc.fwmark:#010x}"
    addr = str(svc.addr)
    proto = L4[svc.protocol]
    if svc.port == 0:
        return f"svc{fam}p0", f"{addr} . {proto}"
    return f"svc{fam}", f"{addr} . {proto} . {svc.port}"


def _client_key(svc: Service) -> str:
    """The persistence granularity: the client address under -M."""
    if _v6(svc):
        mask = ipaddress.IPv6Network(f"::/{svc.netmask}").netmask
        return f"ip6 saddr & {mask}" if svc.netmask != 128 else "ip6 saddr"
    mask = ipaddress.IPv4Address(svc.netmask)
    return f"ip saddr & {mask}" if svc.netmask != 0xFFFFFFFF else "ip saddr"


def needs_chain(svc: Service, dest: Dest) -> bool:
    """Does this real server need its own chain (rs_<rid>)?  Plain
    masquerading to a server of the service's family is done by the shared
    pick chains; persistence learning and the other forwarding methods are
    per server."""
    return not direct.is_direct(svc) and own_chain(svc, dest)


def own_chain(svc: Service, dest: Dest) -> bool:
    """needs_chain of a service that is not direct (the caller knows)."""
    return svc.persistent or dest.af != svc.af or (bool(svc.fwmark) and dest.port != 0)


def _timeout_rules(svc: Service, timeouts: Timeouts | None = None) -> list[str]:
    if timeouts == KERNEL_TIMEOUTS:
        return []
    fam = _fam(svc)
    if svc.fwmark:
        return [f"meta l4proto tcp ct timeout set \"tcp{fam}\"",
                f"meta l4proto udp ct timeout set \"udp{fam}\""]
    if svc.protocol in (IPPROTO_TCP, IPPROTO_UDP):
        return [f"ct timeout set \"{L4[svc.protocol]}{fam}\""]
    return []


def _scheduler_rule(svc: Service, slots: sched.Slots) -> str:
    n, base, ip, fam = len(slots.table), slot_base(svc), _ip(svc), _fam(svc)
    if slots.dyn:
        pick = f"numgen inc mod {len(slots.dyn)} offset {base}"
    elif slots.random:
        pick = f"numgen random mod {n} offset {base}"
    elif slots.hash is None:
        pick = f"numgen inc mod {n} offset {base}"
    else:
        keys = {"saddr": f"{ip} saddr", "saddr+sport": f"{ip} saddr . th sport", "daddr": f"{ip} daddr"}
        pick = f"jhash {keys[slots.hash]} mod {n} seed {svc.sid:#x} offset {base}"
    # the counter counts scheduling decisions: the back end reads it to keep
    # rr/wrr state in step with the kernel (see NftBackend.observe)
    return f"counter meta priority set {pick} goto {'dyn' if slots.dyn else 'pick'}{fam}"


def service_chain(script: Script, svc: Service, slots: sched.Slots,
                  timeouts: Timeouts | None = None) -> None:
    """Rules of ``svc_<sid>`` (the chain itself must exist and be empty)."""
    chain = svc_chain(svc)
    if direct.is_direct(svc):
        # scheduled before conntrack in the direct table, which left the key
        # of a masquerading server in meta priority (direct.py)
        script.add(f"add rule {TABLE} {chain} {_mark_rule(svc)}")
        for rule in _timeout_rules(svc, timeouts):
            script.add(f"add rule {TABLE} {chain} {rule}")
        script.add(f"add rule {TABLE} {chain} goto pick{_fam(svc)}")
        return
    timeout_rules = _timeout_rules(svc, timeouts)
    mark = _mark_rule(svc)
    # one rule per service where possible: loading 10,000 services is
    # mostly a matter of the number of rules and chains
    locality = bool(slots.dyn) and svc.scheduler in dynsched.LOCALITY
    fold = len(timeout_rules) <= 1 and not svc.persistent and not locality and bool(slots.table)
    if not fold:
        script.add(f"add rule {TABLE} {chain} {' '.join([mark, *timeout_rules[:1]])}")
        for rule in timeout_rules[1:]:
            script.add(f"add rule {TABLE} {chain} {rule}")
    if svc.persistent:
        key, fam = _client_key(svc), _fam(svc)
        for d in svc.dests:  # kernel list order, newest first
            script.add(f"add rule {TABLE} {chain} {key} . meta mark & 0x0 | {d.rid:#010x} "
                       f"@persist{fam} goto {rs_chain(d)}")
    if locality:
        ip, fam, base = _ip(svc), _fam(svc), slot_base(svc)
        for i, d in enumerate(svc.dests):
            script.add(f"add rule {TABLE} {chain} {ip} daddr . meta mark & 0x0 | {d.rid:#010x} "
                       f"@lbl{fam} meta priority set {base + i} goto pick{fam}")
    if slots.table:
        prefix = " ".join([mark, *timeout_rules]) + " " if fold else ""
        script.add(f"add rule {TABLE} {chain} {prefix}{_scheduler_rule(svc, slots)}")
    else:
        script.add(f"add rule {TABLE} {chain} goto unreachable")


def _mark_rule(svc: Service) -> str:
    """Tag the connection as this service's (see CT_MARK_MASK)."""
    keep = ~CT_MARK_MASK & 0xFFFFFFFF
    return f"ct mark set ct mark & {keep:#010x} | {ct_mark(svc):#010x}"


def _placement(svc: Service, dest: Dest) -> tuple[str, str]:
    """(map, element value) that serves a slot of ``dest``."""
    if needs_chain(svc, dest):
        return "slots", f"goto {rs_chain(dest)}"
    fam = _fam(svc)
    addr = str(dest.addr)
    if dest.port:
        return f"nat{fam}", f"{addr} . {dest.port}"
    return f"nat{fam}a", addr


def slot_elements(svc: Service, slots: sched.Slots) -> dict[str, list[str]]:
    """Elements per map: ``{"nat4": ["65536 : 10.0.0.1 . 80", ...], ...}``."""
    base = slot_base(svc)
    out: dict[str, list[str]] = {}
    if direct.is_direct(svc):
        return direct.inet_elements(svc, lambda d: _placement(svc, d))
    for i, j in enumerate(slots.dyn):  # numgen value -> fixed slot (j < 0: none, unreachable)
        out.setdefault("dyn", []).append(f"{base + i} : {base + (j if j >= 0 else NO_SLOT)}")
    for i, d in enumerate(slots.table):
        if d is None:
            continue
        if d is sched.PASS:  # on un-NATed: pick4/6 try the nat maps, then @slots
            out.setdefault("slots", []).append(f"{base + i} : accept")
            continue
        name, value = _placement(svc, d)
        out.setdefault(name, []).append(f"{base + i} : {value}")
    return out


def _dnat(svc: Service, dest: Dest) -> list[str]:
    """Masquerading in a real-server chain (port 0 keeps the packet's port)."""
    fam = "ip6" if dest.af == AF_INET6 else "ip"
    addr = f"[{dest.addr}]" if fam == "ip6" and dest.port else str(dest.addr)
    if not dest.port:
        return [f"dnat {fam} to {addr}"]
    if svc.fwmark:  # any of the three protocols may carry the mark
        return [f"meta l4proto {p} dnat {fam} to {addr}:{dest.port}" for p in ("tcp", "udp", "sctp")]
    return [f"meta l4proto {L4[svc.protocol]} dnat {fam} to {addr}:{dest.port}"]


def rs_rules(svc: Service, dest: Dest, snat: str = "") -> list[str]:
    """Rule bodies of ``rs_<rid>``."""
    first = "counter"
    if svc.persistent:
        key, fam = _client_key(svc), _fam(svc)
        first = f"update @persist{fam} {{ {key} . {dest.rid:#010x} timeout {svc.timeout}s }} counter"
    if dest.af == svc.af:
        actions = [_label(snat) + a for a in _dnat(svc, dest)]
    else:  # another family is only for tunnels, which direct.py handles
        actions = ["goto unreachable"]
    return [f"{first} {actions[0]}"] + actions[1:]


def rs_chain_rules(script: Script, svc: Service, dest: Dest, snat: str = "") -> None:
    chain = rs_chain(dest)
    for body in rs_rules(svc, dest, snat):
        script.add(f"add rule {TABLE} {chain} {body}")


# ---------------------------------------------------------------- whole table

def service_slots(svc: Service, script: Script | None = None,
                  live: dynsched.LiveState | None = None) -> sched.Slots:
    """The slots of ``svc``; a managed service's prediction comes from
    ``live`` (no connections when None)."""
    if dynsched.managed(svc):
        if script is not None and live is None:
            script.warnings.append(f"{_describe(svc)}: {svc.scheduler} needs live connection counts; "
                                   "the script holds the choices for no connections, which "
                                   "`ipvs2nft daemon` keeps up to date once it runs")
        return dynsched.slots(svc, live)
    slots = sched.slots(svc, svc.sched)
    if script is not None and not slots.exact and slots.note:
        script.warnings.append(f"{_describe(svc)}: {slots.note}")
    return slots


def _describe(svc: Service) -> str:
    if svc.fwmark:
        return f"FWM {svc.fwmark}{' IPv6' if _v6(svc) else ''}"
    addr = f"[{svc.addr}]" if _v6(svc) else str(svc.addr)
    return f"{L4[svc.protocol].upper()} {addr}:{svc.port}"


def _add_elements(script: Script, elements: dict) -> None:
    """Keys are map names of our inet table, or (table, map) of another."""
    for name, items in elements.items():
        where = f"{name[0]} {name[1]}" if isinstance(name, tuple) else f"{TABLE} {name}"
        script.add(f"add element {where} {{ {', '.join(items)} }}")


def _delete_elements(script: Script, elements: dict[str, list[str]]) -> None:
    for name, items in elements.items():
        keys = ", ".join(e.split(" : ", 1)[0] for e in items)
        script.add(f"delete element {TABLE} {name} {{ {keys} }}")


def add_service(script: Script, svc: Service, elements: dict | None = None, snat: str = "",
                timeouts: Timeouts | None = None, absent: frozenset[str] = frozenset(),
                live: dynsched.LiveState | None = None) -> None:
    """Everything a service needs, into an existing table.  With
    ``elements`` the map elements are collected there instead of written."""
    own = elements is None
    elements = {} if own else elements
    timeouts = timeouts or Timeouts()
    slots = service_slots(svc, script, live)
    for d in svc.dests:
        if needs_chain(svc, d):
            script.add(f"add chain {TABLE} {rs_chain(d)}")
            rs_chain_rules(script, svc, d, snat)
    script.add(f"add chain {TABLE} {svc_chain(svc)}")
    service_chain(script, svc, slots, timeouts)
    for name, items in slot_elements(svc, slots).items():
        elements.setdefault(name, []).extend(items)
    name, key = _dispatch_key(svc)
    elements.setdefault(name, []).append(f"{key} : goto {svc_chain(svc)}")
    if direct.is_direct(svc):
        direct.add_service(script, svc, slots, _scheduler_rule(svc, slots) if slots.table else "",
                           slot_base(svc), timeouts, elements, absent)
    if own:
        _add_elements(script, elements)


def full(table: Table, generation: int, replace_existing: bool = True,
         hooks: tuple[str, ...] = HOOKS, absent: frozenset[str] = frozenset(),
         live: dynsched.LiveState | None = None) -> Script:
    """The whole table in one script.  With ``replace_existing`` it first
    removes our own table (``add`` then ``delete``, so it cannot fail when
    the table is absent); nothing outside it is named.  Elements go in one
    command per map, after the chains they refer to.  ``absent``: tunnel
    devices this kernel cannot make (their real servers forward nothing)."""
    script = Script()
    if replace_existing:
        for t in (TABLE, direct.table("4"), direct.table("6")):
            script.add(f"add table {t}")
            script.add(f"delete table {t}")
    skeleton(script, table.timeouts, generation, table.snat, hooks)
    elements: dict = {}
    for svc in table.services:
        add_service(script, svc, elements, table.snat, table.timeouts, absent, live)
    _add_elements(script, elements)
    return script


# The maps that hold services and their choices: emptied when every service
# is replaced.  The counters of the services go with them (IPVS frees a
# deleted service's statistics); what the data path learnt about clients and
# flows (persistence, direct-routed flows) stays, as IPVS keeps its
# connections and templates across -C and a restore (see direct.py).
SERVICE_MAPS = ("svc4", "svc6", "svc4p0", "svc6p0", "fwm4", "fwm6", "nat4", "nat4a", "nat6", "nat6a", "slots",
                "dyn")
SERVICE_SETS = ("lbl4", "lbl6", "stat4", "stat6", "conn4", "conn6")
SERVICE_CHAINS = ("svc_", "rs_")  # then direct.SERVICE_CHAINS in the direct tables


def replace_all(old_chains: dict[str, list[str]], new: Table, old_generation: int, generation: int,
                absent: frozenset[str] = frozenset(), live: dynsched.LiveState | None = None) -> Script:
    """A transaction that replaces every service (ipvsadm-restore, -C) in
    tables that already hold the right skeleton: the service maps emptied,
    the old service chains (``old_chains``: table -> chain names, as the
    kernel lists them) deleted, the new services added.  Unlike a rebuild it
    leaves the sets the data path fills -- direct-routed flows above all,
    so that a restore breaks no connection."""
    script = Script()
    script.add(f"delete element {TABLE} gen {{ {old_generation} }}")
    script.add(f"add element {TABLE} gen {{ {generation} }}")
    for where, maps, sets in ((TABLE, SERVICE_MAPS, SERVICE_SETS),
                              (direct.table("4"), direct.SERVICE_MAPS, direct.SERVICE_SETS),
                              (direct.table("6"), direct.SERVICE_MAPS, direct.SERVICE_SETS)):
        script.lines += [f"flush map {where} {name}" for name in maps]
        script.lines += [f"flush set {where} {name}" for name in sets]
    for where, prefixes in ((TABLE, SERVICE_CHAINS), (direct.table("4"), direct.SERVICE_CHAINS),
                            (direct.table("6"), direct.SERVICE_CHAINS)):
        for prefix in prefixes:  # the chains that jump first, then the ones they jump to
            for chain in old_chains.get(where, ()):
                if chain.startswith(prefix):
                    script.add(f"delete chain {where} {chain}")
    elements: dict = {}
    for svc in new.services:
        add_service(script, svc, elements, new.snat, new.timeouts, absent, live)
    _add_elements(script, elements)
    return script


def remove_service(script: Script, svc: Service) -> None:
    """Delete a service: dispatch element, slots, its chains."""
    if direct.is_direct(svc):
        direct.remove_service(script, svc, service_slots(svc), slot_base(svc))
    name, key = _dispatch_key(svc)
    script.add(f"delete element {TABLE} {name} {{ {key} }}")
    _delete_elements(script, slot_elements(svc, service_slots(svc)))
    script.add(f"delete chain {TABLE} {svc_chain(svc)}")
    for d in svc.dests:
        if needs_chain(svc, d):
            script.add(f"delete chain {TABLE} {rs_chain(d)}")


def change_service(script: Script, old: Service, new: Service, snat: str = "",
                   timeouts: Timeouts | None = None, live: dynsched.LiveState | None = None) -> None:
    """The smallest change from ``old`` to ``new`` (same identity, same sid)."""
    old_chains = {d.rid: d for d in old.dests if needs_chain(old, d)}
    new_chains = {d.rid: d for d in new.dests if needs_chain(new, d)}
    _delete_elements(script, slot_elements(old, service_slots(old)))
    script.add(f"flush chain {TABLE} {svc_chain(new)}")
    for rid, d in new_chains.items():
        if rid not in old_chains:
            script.add(f"add chain {TABLE} {rs_chain(d)}")
            rs_chain_rules(script, new, d, snat)
        elif rs_rules(old, old_chains[rid], snat) != rs_rules(new, d, snat):
            script.add(f"flush chain {TABLE} {rs_chain(d)}")
            rs_chain_rules(script, new, d, snat)
    slots = service_slots(new, script, live)
    service_chain(script, new, slots, timeouts)
    _add_elements(script, slot_elements(new, slots))
    for rid, d in old_chains.items():
        if rid not in new_chains:
            script.add(f"delete chain {TABLE} {rs_chain(d)}")


def incremental(old: Table, new: Table, old_generation: int, generation: int,
                absent: frozenset[str] = frozenset(),
                live: dynsched.LiveState | None = None) -> Script | None:
    """A transaction taking the kernel from table ``old`` to table ``new``.

    The tables may hold only the services one command touched; services in
    neither are left alone.  The generation swap makes the whole transaction
    fail if the kernel table is not the one the store describes.  None when
    only a full rebuild can do it: new timeouts (nft 1.0.6 keeps an existing
    ct timeout object as it is on ``add``, and chains refer to it) or a
    changed SNAT option (every DNAT rule changes).
    """
    if new.timeouts != old.timeouts or new.snat != old.snat:
        return None
    script = Script()
    script.add(f"delete element {TABLE} gen {{ {old_generation} }}")
    script.add(f"add element {TABLE} gen {{ {generation} }}")
    for step, before, svc in plan(old, new):
        if step == "remove":
            remove_service(script, before)
        elif step == "add":
            add_service(script, svc, snat=new.snat, timeouts=new.timeouts, absent=absent, live=live)
        else:
            change_service(script, before, svc, new.snat, new.timeouts, live)
    return script


def plan(old: Table, new: Table) -> Iterator[tuple[str, Service | None, Service | None]]:
    """The steps from ``old`` to ``new``: ("remove", old service, None),
    ("add", None, new service), ("change", old, new), services in neither
    or unchanged left out.  A direct service is removed and added whole."""
    old_by_key = {s.key: s for s in old.services}
    new_by_key = {s.key: s for s in new.services}
    for key, svc in old_by_key.items():
        if key not in new_by_key:
            yield "remove", svc, None
    for key, svc in new_by_key.items():
        before = old_by_key.get(key)
        if before is not None and before != svc and (direct.is_direct(before) or direct.is_direct(svc)):
            yield "remove", before, None
            before = None
        if before is None:
            yield "add", None, svc
        elif before != svc:
            yield "change", before, svc
