"""Direct routing (-g) and tunnelling (-i): the ``ip``/``ip6 ipvs2nft`` tables.

A direct-routed packet must reach the real server unchanged, with the VIP
still its destination.  nftables can do that with ``dup to <server>`` (the
clone goes to the server's link-layer address, or into a tunnel device)
and ``drop`` of the original -- but ``dup`` is refused in ``inet`` tables,
hence one table per family, owned by ipvs2nft like ``inet ipvs2nft``.

Measured here (../../notes or compat-matrix.md): doing this in a nat chain
breaks TCP teardown (the never-confirmed flows' FIN/RST are conntrack-invalid,
skip the nat chains and the director answers RST).  So dispatch runs in a
filter chain at priority ``raw``, before conntrack, for address services,
and at ``mangle + 1`` for fwmark services (after the rules that set the
mark).  Conntrack keeps no state for these flows, so a dynamic set
``flows`` (client address . port . virtual address . port . rid) sends every packet of a flow
to the server its first packet went to; its timeouts follow ``--set``
(tcpfin once a FIN or RST was seen).

IPVS keeps a connection whose real server was removed (``-d``, ``-D``,
``-C``) in its table: with ``expire_nodest_conn=0`` (the default) its
packets are dropped, not scheduled again, until it expires or the server is
added back (ip_vs_in: "the destination server is not available").  Here
``live`` (client . port . virtual address . port, the same timeouts as
``flows``) remembers every flow of a direct-routed or tunnelled server: a
packet of such a flow that no server's ``flows`` entry claims any more is
dropped -- in its service's chain after the servers' flow rules, or at the
end of the mangle chains once the service itself is gone.  (Masqueraded and
local servers' packets are accepted here and pass the mangle chains too:
theirs are left out, conntrack keeps those connections.)  A server
added back gets its old rid (store.py keeps removed servers' rids, IPVS's
"trash"), so its flows' ``flows`` entries match again and they go on.

A service with both masquerading and direct servers is scheduled here; when
the choice is a masquerading server the packet goes on with the slot number
in ``meta priority``, and the service's chain in ``inet ipvs2nft`` DNATs from
it (``build.py``).

A direct-routed or tunnelled real server that is this host (127.0.0.1, ::1,
any address of the director: ldirectord's ``fallback = 127.0.0.1:80 gate``,
ctdb's LVS leader, the LVS "localnode" set-up) must not be ``dup``-ed: the
clone to a local address comes back in through ``lo`` with the VIP still its
destination, is scheduled again and dup-ed again -- one datagram became
millions of packets.  IPVS asks the route of every packet and, for a local
one, lets the packet go on to the local stack unchanged
(``ip_vs_dr_xmit``/``ip_vs_tunnel_xmit`` -> ``ip_vs_send_or_cont(..., 1)``;
recorded: tests/fixtures/oracle/local-servers).  ``local_nodes`` turns such
servers into ``Forward.LOCAL`` when the table is written, and their chain
accepts the packet (with a key the inet table's ``slots`` map accepts too,
so its NAT leaves the connection alone).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from ipvs2nft import sched
from ipvs2nft.model import Dest, Forward, Service, Table, Timeouts
from ipvs2nft.netaddr import AF_INET6, IPAddress

FLOW_SIZE = 1048576
RID_KEY = 0x80000000  # meta priority key of one masquerading server (rid below 2^31)


# (hook, chain, what it leaves alone) of the dispatch chains; the fwmark
# dispatch of each hook runs at mangle + 1 (chain "mangle" / "omangle")
DISPATCH_HOOKS = (("prerouting", "raw", 'iif "lo" accept'), ("output", "oraw", "ct state untracked accept"))


# What build.replace_all empties and deletes here: the maps of services and
# their choices, and the counters; ``flows``, ``live``, ``fins`` and
# ``persist`` stay (connections outlive a restore, as in IPVS).
SERVICE_MAPS = ("dsvc", "dsvcp0", "dfwm", "dslots", "ddyn")
SERVICE_SETS = ("dstat", "dconn")
SERVICE_CHAINS = ("dsvc_", "drs_")


def table(fam: str) -> str:
    return f"ip{'' if fam == '4' else '6'} ipvs2nft"


def local_nodes(table: Table, is_local: Callable[[IPAddress], bool]) -> Table:
    """``table`` with every direct-routed or tunnelled real server whose
    address ``is_local`` (host.is_local: this namespace's routes) carried
    out as IPVS carries it out: delivered to the local stack (Forward.LOCAL).
    The kernel decides per packet; this is decided whenever the table is
    written (a drift check rewrites it when the expected script changes)."""
    services = []
    changed = False
    for svc in table.services:
        dests = tuple(replace(d, fwd=Forward.LOCAL) if d.fwd in (Forward.ROUTE, Forward.TUNNEL)
                      and is_local(d.addr) else d for d in svc.dests)
        changed |= dests != svc.dests
        services.append(svc if dests == svc.dests else replace(svc, dests=dests))
    return Table(services, table.timeouts, table.daemons, table.snat) if changed else table


def is_direct(svc: Service) -> bool:
    """Scheduled here: the service has a direct-routed, tunnelled or local server."""
    return any(d.fwd is not Forward.MASQ for d in svc.dests)


def _fam(svc: Service) -> str:
    return "6" if svc.af == AF_INET6 else "4"


def _ip(fam: str) -> str:
    return "ip6" if fam == "6" else "ip"


def chain(svc: Service) -> str:
    return f"dsvc_{svc.sid}"


def rs_chain(dest: Dest) -> str:
    return f"drs_{dest.rid}"


def tunnel_device(dest: Dest) -> str:
    return f"i2n{dest.rid}"


def rid_key(dest: Dest) -> int:
    return RID_KEY | dest.rid


def skeleton(script, timeouts: Timeouts) -> None:
    """The fixed part of both direct-routing tables."""
    for fam in ("4", "6"):
        t, ip = table(fam), _ip(fam)
        addr = "ipv6_addr" if fam == "6" else "ipv4_addr"
        s = script.add
        s(f"add table {t}")
        s(f"add map {t} dsvc {{ type {addr} . inet_proto . inet_service : verdict; }}")
        s(f"add map {t} dsvcp0 {{ type {addr} . inet_proto : verdict; }}")
        s(f"add map {t} dfwm {{ type mark : verdict; }}")
        s(f"add map {t} dslots {{ type classid : verdict; }}")
        # numgen value -> fixed slot, for services scheduled from live counts (build.py)
        s(f"add map {t} ddyn {{ type classid : classid; flags dynamic; }}")
        s(f"add set {t} flows {{ type {addr} . inet_service . {addr} . inet_service . mark; "
          f"flags dynamic,timeout; size {FLOW_SIZE}; }}")
        s(f"add set {t} live {{ type {addr} . inet_service . {addr} . inet_service; "
          f"flags dynamic,timeout; size {FLOW_SIZE}; }}")
        # IPVS's statistics of direct-routed and tunnelled servers, per rid:
        # packets and bytes in (the director never sees their replies) and
        # new connections; masqueraded and local ones are counted by
        # conntrack in the inet table
        s(f"add set {t} dstat {{ type mark; flags dynamic; counter; size {FLOW_SIZE}; }}")
        s(f"add set {t} dconn {{ type mark; flags dynamic; counter; size {FLOW_SIZE}; }}")
        s(f"add set {t} fins {{ type {addr} . inet_service . {addr} . inet_service . mark; "
          f"flags dynamic,timeout; size {FLOW_SIZE}; }}")
        s(f"add set {t} persist {{ type {addr} . mark; flags dynamic,timeout; size {FLOW_SIZE}; }}")
        s(f"add chain {t} unreachable")
        s(f"add rule {t} unreachable reject with icmp{'v6' if fam == '6' else ''} type port-unreachable")
        s(f"add chain {t} pick")
        s(f"add rule {t} pick meta priority vmap @dslots")
        s(f"add rule {t} pick goto unreachable")
        s(f"add chain {t} dyn")  # as build.py's dyn4/dyn6: one rule references the map
        s(f"add rule {t} dyn meta priority set meta priority map @ddyn goto pick")
        s(f"add rule {t} dyn goto unreachable")
        # The director's own connections are scheduled on their way out
        # (IPVS: ip_vs_local_request at LOCAL_OUT), and not again when they
        # come back in through lo (a local real server).  The clones ``dup``
        # sends pass the output hook too: conntrack-untracked (nf_dup_ipv4/6
        # marks them so), they are left alone.
        for hook, name, skip in DISPATCH_HOOKS:
            s(f"add chain {t} {name} {{ type filter hook {hook} priority raw; policy accept; }}")
            s(f"add rule {t} {name} {skip}")
            s(f"add rule {t} {name} {ip} daddr . meta l4proto . th dport vmap @dsvc")
            s(f"add rule {t} {name} {ip} daddr . meta l4proto vmap @dsvcp0")
            mangle = "mangle" if name == "raw" else "omangle"
            s(f"add chain {t} {mangle} {{ type filter hook {hook} priority mangle + 1; policy accept; }}")
            s(f"add rule {t} {mangle} {skip}")
            s(f"add rule {t} {mangle} meta l4proto {{ tcp, udp, sctp }} meta mark vmap @dfwm")
            # a flow of a service that is gone (-D, -C): dropped until it expires
            s(f"add rule {t} {mangle} meta l4proto {{ tcp, udp, sctp }} {_live_key(fam)} @live drop")


def _dispatch(svc: Service) -> tuple[str, str]:
    from ipvs2nft.nft.build import L4

    if svc.fwmark:
        return "dfwm", f"{svc.fwmark:#010x}"
    if svc.port == 0:
        return "dsvcp0", f"{svc.addr} . {L4[svc.protocol]}"
    return "dsvc", f"{svc.addr} . {L4[svc.protocol]} . {svc.port}"


def _client(svc: Service) -> str:
    from ipvs2nft.nft.build import _client_key

    return _client_key(svc)


def _flow_key(svc: Service, fam: str) -> str:
    """A flow: client address and port, and the address and port it was
    sent to (what ``-L -c`` shows as virtual; one fwmark service spans
    several)."""
    ip = _ip(fam)
    return f"{ip} saddr . th sport . {ip} daddr . th dport"


def _live_key(fam: str) -> str:
    """A flow without its server: the key of ``live``."""
    ip = _ip(fam)
    return f"{ip} saddr . th sport . {ip} daddr . th dport"


def _not_one_packet(svc: Service) -> str | None:
    """The match that limits flow memory to what -o leaves per-flow: None for
    a UDP service with -o (no flow memory), ``meta l4proto != udp`` for a
    fwmark service with -o (IPVS applies -o to UDP only), else nothing."""
    if not svc.onepacket:
        return ""
    return "meta l4proto != udp " if svc.fwmark else None


def service_rules(svc: Service, slots: sched.Slots, scheduler_rule: str) -> list[str]:
    """Rules of ``dsvc_<sid>``: flow memory, persistence, then a slot."""
    fam = _fam(svc)
    # One-packet scheduling (-o): no flow memory for UDP, every datagram is
    # scheduled (a fwmark service's TCP connections still keep theirs).
    only = _not_one_packet(svc)
    rules = [] if only is None else [
        f"{only}{_flow_key(svc, fam)} . meta mark & 0x0 | {d.rid:#010x} @flows goto {rs_chain(d)}"
        for d in svc.dests]
    if only is not None:  # a flow whose server was removed: dropped, not scheduled again
        rules.append(f"{only}{_live_key(fam)} @live drop")
    if svc.persistent:
        rules += [f"{_client(svc)} . meta mark & 0x0 | {d.rid:#010x} @persist goto {rs_chain(d)}"
                  for d in svc.dests]
    if slots.table:
        rule = scheduler_rule.replace(f"goto pick{fam}", "goto pick")
        rules.append(rule.replace(f"goto dyn{fam}", "goto dyn"))
    else:
        rules.append("goto unreachable")
    return rules


def rs_rules(svc: Service, dest: Dest, timeouts: Timeouts, absent: frozenset[str] = frozenset()) -> list[str]:
    """Rules of ``drs_<rid>``: remember the flow, then forward."""
    fam = _fam(svc)
    key = f"{_flow_key(svc, fam)} . {dest.rid:#010x}"
    if not timeouts.tcp:  # conntrack's own timeouts asked for: IPVS's defaults here
        timeouts = Timeouts()
    only = _not_one_packet(svc)
    # direct-routed and tunnelled flows are remembered in ``live`` too (see
    # the module text); masqueraded and local ones live on in conntrack
    live = f"{_live_key(fam)} timeout " if dest.fwd in (Forward.ROUTE, Forward.TUNNEL) else None

    def remember(seconds: int) -> str:
        also = f" update @live {{ {live}{seconds}s }}" if live else ""
        return f"update @flows {{ {key} timeout {seconds}s }}{also}"

    if only is None:
        rules = []
    elif svc.protocol == 17 and not svc.fwmark:
        rules = [remember(timeouts.udp)]
    else:
        # IPVS's INPUT-ONLY TCP states: the client's FIN or RST ends the
        # active part (tcpfin timeout) and the ACKs that follow do not bring
        # it back; a new SYN on the same ports does.  ``fins`` remembers the
        # closing flows for as long.
        looked = f"{_flow_key(svc, fam)} . meta mark & 0x0 | {dest.rid:#010x}"
        rules = [f"tcp flags & syn != 0 delete @fins {{ {key} }}",
                 f"tcp flags & (fin | rst) != 0 update @fins {{ {key} timeout {timeouts.tcpfin}s }}",
                 f"meta l4proto tcp {looked} @fins {remember(timeouts.tcpfin)}",
                 f"meta l4proto tcp {looked} != @fins {remember(timeouts.tcp)}",
                 f"meta l4proto != tcp {only}{remember(timeouts.udp)}"]
    if svc.persistent:
        rules.append(f"update @persist {{ {_client(svc)} . {dest.rid:#010x} timeout {svc.timeout}s }}")
    counted = ""
    if dest.fwd in (Forward.ROUTE, Forward.TUNNEL):
        rid = f"meta mark & 0x0 | {dest.rid:#010x}"
        # a new connection: its first packet, before the flow is remembered
        # (with -o every datagram is one, as IPVS counts them)
        rules.insert(0, f"update @dconn {{ {rid} }}" if only is None
                     else f"{_flow_key(svc, fam)} . {rid} != @flows update @dconn {{ {rid} }}")
        counted = f"update @dstat {{ {rid} }} "
    if dest.fwd in (Forward.MASQ, Forward.LOCAL):
        # handed on to inet ipvs2nft, which DNATs from this key (MASQ) or
        # lets the connection go on to the local stack (LOCAL, inet_elements)
        rules.append(f"counter meta priority set {rid_key(dest)} accept")
    elif dest.fwd is Forward.TUNNEL and tunnel_device(dest) in absent:
        rules.append("counter drop")  # no device on this kernel; the server is not scheduled
    elif dest.fwd is Forward.TUNNEL:
        device = tunnel_device(dest)
        rules.append(f"counter {counted}dup to {_tunnel_nexthop(svc, dest)} device \"{device}\" drop")
    else:
        rules.append(f"counter {counted}dup to {dest.addr} drop")
    return rules


def _tunnel_nexthop(svc: Service, dest: Dest) -> str:
    """``dup`` needs a next hop of the packet's family; the tunnel device, a
    point-to-point link to the real server, ignores it.  IPv4 over an IPv4
    tunnel uses the server's address; otherwise a link-local stand-in (an
    IPv6 tunnel sends nothing to a global next hop -- measured)."""
    if svc.af != AF_INET6 and dest.af != AF_INET6:
        return str(dest.addr)
    return "fe80::1" if svc.af == AF_INET6 else "169.254.0.1"


def inet_elements(svc: Service, placement: Callable[[Dest], tuple[str, str]]) -> dict[str, list[str]]:
    """Elements of ``inet ipvs2nft``'s maps for a service scheduled here:
    the key of each masquerading server -> its DNAT (``placement``), and of
    each local one -> accept (no NAT: the packet keeps the VIP, as IPVS
    hands it to the local stack)."""
    out: dict[str, list[str]] = {}
    for d in svc.dests:
        if d.fwd is Forward.MASQ:
            name, value = placement(d)
        elif d.fwd is Forward.LOCAL:
            name, value = "slots", "accept"
        else:
            continue
        out.setdefault(name, []).append(f"{rid_key(d)} : {value}")
    return out


def slot_elements(svc: Service, slots: sched.Slots, base: int) -> list[str]:
    return [f"{base + i} : goto {rs_chain(d)}" for i, d in enumerate(slots.table) if d is not None]


def dyn_elements(slots: sched.Slots, base: int) -> list[str]:
    """``ddyn``: numgen value -> fixed slot (as build.slot_elements' ``dyn``)."""
    from ipvs2nft.nft.build import NO_SLOT

    return [f"{base + i} : {base + (j if j >= 0 else NO_SLOT)}" for i, j in enumerate(slots.dyn)]


def add_service(script, svc: Service, slots: sched.Slots, scheduler_rule: str, base: int,
                timeouts: Timeouts, elements: dict, absent: frozenset[str] = frozenset()) -> None:
    t = table(_fam(svc))
    for d in svc.dests:
        script.add(f"add chain {t} {rs_chain(d)}")
        for rule in rs_rules(svc, d, timeouts, absent):
            script.add(f"add rule {t} {rs_chain(d)} {rule}")
    script.add(f"add chain {t} {chain(svc)}")
    for rule in service_rules(svc, slots, scheduler_rule):
        script.add(f"add rule {t} {chain(svc)} {rule}")
    items = slot_elements(svc, slots, base)
    if items:
        elements.setdefault((t, "dslots"), []).extend(items)
    if slots.dyn:
        elements.setdefault((t, "ddyn"), []).extend(dyn_elements(slots, base))
    name, key = _dispatch(svc)
    elements.setdefault((t, name), []).append(f"{key} : goto {chain(svc)}")


def remove_service(script, svc: Service, slots: sched.Slots, base: int) -> None:
    t = table(_fam(svc))
    name, key = _dispatch(svc)
    script.add(f"delete element {t} {name} {{ {key} }}")
    for name, items in (("dslots", slot_elements(svc, slots, base)), ("ddyn", dyn_elements(slots, base))):
        if items:
            keys = ", ".join(e.split(" : ", 1)[0] for e in items)
            script.add(f"delete element {t} {name} {{ {keys} }}")
    script.add(f"delete chain {t} {chain(svc)}")
    for d in svc.dests:
        script.add(f"delete chain {t} {rs_chain(d)}")


def tunnels(services) -> dict[str, Dest]:
    """Tunnel devices the table needs: name -> real server."""
    return {tunnel_device(d): d for s in services for d in s.dests if d.fwd is Forward.TUNNEL}
