"""What the data plane counted, read back from the kernel.

IPVS's numbers live in three places here, all of them kernel state that is
right whether or not the daemon runs:

* ``stat4/6`` and ``conn4/6`` (build.counting): per service mark and real
  server, packets and bytes per direction and new connections -- the
  counters of ``ipvsadm -L --stats``;
* conntrack, filtered by our mark bit: every connection, its state and its
  real server -- ActiveConn/InActConn and ``-L -c``;
* ``persist4/6``: one element per persistence template (client network .
  rid) -- PersistConn and the template rows of ``-L -c``.

Decoding is pure (``decode_*``); ``read_*`` ask the kernel over raw netlink
(libnftables takes over a second to list 80,000 counted elements).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ipvs2nft.netaddr import address
from ipvs2nft.nft.build import CT_MARK_OURS, sid_of_mark

TABLE_FAMILY, TABLE_NAME = "inet", "ipvs2nft"
_U32 = struct.Struct("=I").unpack_from  # marks and classids: host order
_PORT = struct.Struct(">H").unpack_from  # inet_service: network order
CONNS, INPKTS, OUTPKTS, INBYTES, OUTBYTES = range(5)

Key = tuple  # (sid, (af, address, port)) of one real server of one service


@dataclass
class KernelCounts:
    """Counters per (sid, real server): [conns, inpkts, outpkts, inbytes,
    outbytes], as monotonic as the kernel keeps them."""

    dests: dict = field(default_factory=dict)  # Key -> list[int]
    _by_sid: dict | None = None  # sid -> [(Dest.key, row)], built on first use

    def add(self, key: Key, index: int, value: int) -> None:
        row = self.dests.get(key)
        if row is None:
            row = self.dests[key] = [0, 0, 0, 0, 0]
            self._by_sid = None
        row[index] += value

    def _rows(self, sid: int) -> list:
        """The rows of one service: one pass over all of them, once (a
        listing or the estimator asks for every service of 10,000)."""
        if self._by_sid is None:
            index: dict = {}
            for (s, dkey), row in self.dests.items():
                index.setdefault(s, []).append((dkey, row))
            self._by_sid = index
        return self._by_sid.get(sid, [])

    def service(self, sid: int) -> list[int]:
        """A service's counters: the sum over every real server it ever
        sent connections to (IPVS's service stats keep counting what went to
        a server later removed)."""
        total = [0, 0, 0, 0, 0]
        for _, row in self._rows(sid):
            for i in range(5):
                total[i] += row[i]
        return total

    def dest(self, sid: int, key: tuple) -> list[int]:
        """One real server's counters; a server without a port (it keeps the
        packet's port) sums every port it was reached on."""
        if key[2]:
            return list(self.dests.get((sid, key), (0, 0, 0, 0, 0)))
        total = [0, 0, 0, 0, 0]
        for dkey, row in self._rows(sid):
            if dkey[:2] == key[:2]:
                for i in range(5):
                    total[i] += row[i]
        return total


def _addr(packed: bytes):
    return address(socket.inet_ntop(socket.AF_INET6 if len(packed) == 16 else socket.AF_INET, packed))


def _af(packed: bytes) -> int:
    return socket.AF_INET6 if len(packed) == 16 else socket.AF_INET


def decode_stat(elements: Iterable, v6: bool, counts: KernelCounts) -> None:
    """``stat4/6``: mark . ct_dir . address . port -> packets, bytes."""
    alen = 16 if v6 else 4
    for e in elements:
        key = e.key
        mark = _U32(key, 0)[0]
        sid = sid_of_mark(mark)
        if sid is None or e.packets is None:
            continue
        reply = key[4] == 1  # IP_CT_DIR_REPLY
        packed = key[8:8 + alen]
        port = _PORT(key, 8 + alen)[0]
        dkey = (sid, (_af(packed), _addr(packed), port))
        counts.add(dkey, OUTPKTS if reply else INPKTS, e.packets)
        counts.add(dkey, OUTBYTES if reply else INBYTES, e.bytes or 0)


def decode_conn(elements: Iterable, v6: bool, counts: KernelCounts) -> None:
    """``conn4/6``: mark . address . port -> new connections (packets)."""
    alen = 16 if v6 else 4
    for e in elements:
        key = e.key
        sid = sid_of_mark(_U32(key, 0)[0])
        if sid is None or e.packets is None:
            continue
        packed = key[4:4 + alen]
        port = _PORT(key, 4 + alen)[0]
        counts.add((sid, (_af(packed), _addr(packed), port)), CONNS, e.packets)


@dataclass(frozen=True)
class Template:
    """A persistence template: the client network, the real server (rid),
    and the milliseconds it has left."""

    client: object
    rid: int
    expires_ms: int


def decode_persist(elements: Iterable, v6: bool) -> list[Template]:
    """``persist4/6``: client-net . rid (the mark-typed half of the key)."""
    alen = 16 if v6 else 4
    out = []
    for e in elements:
        packed = e.key[:alen]
        rid = _U32(e.key, alen)[0]
        out.append(Template(_addr(packed), rid, e.expiration or 0))
    return out


# ---------------------------------------------------------------- kernel reads

def _nfnl():
    from ipvs2nft.nft.nfnetlink import Nfnetlink

    return Nfnetlink()


def _elements(nfnl, name: str, family: str = TABLE_FAMILY) -> list:
    from ipvs2nft.netlink import NetlinkError

    try:
        return nfnl.set_elements(family, TABLE_NAME, name)
    except NetlinkError:
        return []  # no table (yet): nothing counted


def read_counts(nfnl=None, table=None) -> KernelCounts:
    """Every counter of ``stat4/6`` and ``conn4/6``; with ``table``, also
    the direct-routed and tunnelled servers' ``dstat``/``dconn`` (kept per
    rid, which the table maps to its service)."""
    own = nfnl is None
    nfnl = nfnl or _nfnl()
    try:
        counts = KernelCounts()
        for fam, v6 in (("4", False), ("6", True)):
            decode_stat(_elements(nfnl, f"stat{fam}"), v6, counts)
            decode_conn(_elements(nfnl, f"conn{fam}"), v6, counts)
        if table is not None and _has_direct(table):
            rids = {d.rid: (s.sid, d.key) for s in table.services for d in s.dests}
            for family in ("ip", "ip6"):
                for name, pkts, byts in (("dstat", INPKTS, INBYTES), ("dconn", CONNS, None)):
                    for e in _elements(nfnl, name, family):
                        found = rids.get(_U32(e.key, 0)[0])
                        if found is not None and e.packets is not None:
                            counts.add(found, pkts, e.packets)
                            if byts is not None:
                                counts.add(found, byts, e.bytes or 0)
        return counts
    finally:
        if own:
            nfnl.close()


def _has_direct(table) -> bool:
    from ipvs2nft.model import Forward

    masq = Forward.MASQ
    return any(d.fwd is not masq for s in table.services for d in s.dests)  # direct.is_direct, in one loop


def _is_direct(svc) -> bool:
    from ipvs2nft.nft import direct

    return direct.is_direct(svc)


@dataclass(frozen=True)
class DirectFlow:
    """A flow of a direct-routed or tunnelled server (``flows`` of the
    ``ip``/``ip6 ipvs2nft`` tables; conntrack never sees these)."""

    client: object
    cport: int
    vaddr: object
    vport: int
    rid: int
    timeout_ms: int  # the timeout it was created with: tells TCP from UDP in a fwmark service
    expires_ms: int
    closing: bool = False  # the client sent FIN or RST (in ``fins``)


def decode_flows(elements: Iterable, v6: bool, closing: frozenset = frozenset()) -> list[DirectFlow]:
    """client . port . virtual address . port . rid."""
    alen = 16 if v6 else 4
    out = []
    for e in elements:
        k = e.key
        client, cport = k[:alen], _PORT(k, alen)[0]
        at = alen + 4
        vaddr, vport = k[at:at + alen], _PORT(k, at + alen)[0]
        rid = _U32(k, at + alen + 4)[0]
        out.append(DirectFlow(_addr(client), cport, _addr(vaddr), vport, rid, e.timeout or 0,
                              e.expiration or 0, k in closing))
    return out


def read_direct_flows(nfnl=None) -> list[DirectFlow]:
    own = nfnl is None
    nfnl = nfnl or _nfnl()
    try:
        out = []
        for family, v6 in (("ip", False), ("ip6", True)):
            closing = frozenset(e.key for e in _elements(nfnl, "fins", family))
            out += decode_flows(_elements(nfnl, "flows", family), v6, closing)
        return out
    finally:
        if own:
            nfnl.close()


def direct_counts(table, flows: Iterable[DirectFlow]) -> dict:
    """ServiceKey -> Dest.key -> (active, inactive) of direct flows.  IPVS
    sees only what the client sends (its INPUT-ONLY TCP states): active
    until the client's FIN or RST, which the flow's timeout tells
    (``--set`` tcp before, tcpfin after: direct.rs_rules); UDP never."""
    by_rid = {d.rid: (s, d) for s in table.services for d in s.dests}
    out: dict = {}
    for f in flows:
        found = by_rid.get(f.rid)
        if found is None:
            continue
        svc, dest = found
        pair = out.setdefault(svc.key, {}).setdefault(dest.key, [0, 0])
        pair[0 if _direct_tcp(svc, f, table) and not f.closing else 1] += 1
    return out


def _direct_tcp(svc, f: DirectFlow, table) -> bool:
    """Is the flow TCP?  A fwmark service's flows are told apart by the
    timeout they were created with (direct.rs_rules: udp for others)."""
    from ipvs2nft.model import Timeouts

    if not svc.fwmark:
        return svc.protocol == 6
    t = table.timeouts if table.timeouts.tcp else Timeouts()
    return f.timeout_ms != t.udp * 1000


def read_templates(nfnl=None) -> list[Template]:
    own = nfnl is None
    nfnl = nfnl or _nfnl()
    try:
        return [t for fam, v6 in (("4", False), ("6", True))
                for t in decode_persist(_elements(nfnl, f"persist{fam}"), v6)]
    finally:
        if own:
            nfnl.close()


def read_flows() -> list:
    """Every conntrack flow one of our services scheduled (kernel-filtered
    on the mark bit that says "ours")."""
    from ipvs2nft.conntrack import Conntrack

    with Conntrack() as ct:
        return ct.dump(CT_MARK_OURS, CT_MARK_OURS)


def zero(sids: set[int], nfnl=None, rids: set[int] = frozenset()) -> None:
    """``-Z``: the counters of these services start again from zero.

    Element counters cannot be reset on the 6.1 kernels Debian runs
    (NFT_MSG_GETSETELEM_RESET came with 6.6), so their elements are
    deleted: the next packet re-creates them with a zero counter."""
    from ipvs2nft.nft.nfnetlink import Batch

    own = nfnl is None
    nfnl = nfnl or _nfnl()
    try:
        for _ in range(3):  # a concurrent -Z may delete an element first: list again
            batch = Batch(TABLE_FAMILY, TABLE_NAME)
            for name in ("stat4", "stat6", "conn4", "conn6"):
                for e in _elements(nfnl, name):
                    if sid_of_mark(_U32(e.key, 0)[0]) in sids:
                        batch.delete(name, e.key)
            for family in ("ip", "ip6") if rids else ():
                for name in ("dstat", "dconn"):
                    for e in _elements(nfnl, name, family):
                        if _U32(e.key, 0)[0] in rids:
                            batch.delete(name, e.key, family=family)
            try:
                nfnl.commit(batch)
                return
            except OSError:
                continue
    finally:
        if own:
            nfnl.close()


# ---------------------------------------------------------------- what listings show

class _Zero:
    active = inactive = persistent = 0


_NO_CONNS = _Zero()  # a real server without connections or templates (listing.DestConns' fields)

# conntrack TCP state -> the state IPVS would show for the same connection
# (ip_vs_proto_tcp.c: the client's SYN makes it SYN_RECV; conntrack's
# closing states name the same steps, whichever side closed first)
TCP_STATE_NAMES = {0: "NONE", 1: "SYN_RECV", 2: "SYN_RECV", 3: "ESTABLISHED", 4: "FIN_WAIT",
                   5: "CLOSE_WAIT", 6: "LAST_ACK", 7: "TIME_WAIT", 8: "CLOSE", 9: "SYN_RECV"}
PROTO_NAMES = {6: "TCP", 17: "UDP", 132: "SCTP"}


class Measured:
    """listing.Counters over what the kernel (and the daemon) measured.

    ``conntable``: the connection table built from a conntrack dump
    (ActiveConn/InActConn); ``persist``: templates per rid (PersistConn);
    ``stats``: per service and real server the five counters and, when the
    daemon answered, the five rates (``daemon`` rows).  ``counts`` may be
    a function: it is called (once) when a listing first asks for them, as
    only ``--stats`` and ``--rate`` do."""

    def __init__(self, conntable, persist: dict[int, int], counts: KernelCounts | Callable[[], KernelCounts],
                 daemon: dict | None = None) -> None:
        self.conntable = conntable
        self.persist = persist
        self._counts = counts
        self.daemon = daemon
        # the loads of the services that have connections, by sid: a listing
        # asks for every real server, mostly of services with none
        self.loads = {svc.sid: conntable.counts(svc.key) for svc in conntable.services()}

    @property
    def counts(self) -> KernelCounts:
        if callable(self._counts):
            self._counts = self._counts()
        return self._counts

    def service(self, svc):
        from ipvs2nft.listing import Stats

        if self.daemon is not None:
            row = self.daemon["services"].get(str(svc.sid))
            return Stats(*row) if row else Stats()
        return Stats(*self.counts.service(svc.sid))

    def dest(self, svc, dest):
        from ipvs2nft.listing import Stats

        if self.daemon is not None:
            row = self.daemon["dests"].get(dest_tag(svc.sid, dest.key))
            return Stats(*row) if row else Stats()
        return Stats(*self.counts.dest(svc.sid, dest.key))

    def idle(self, svc):
        if self.loads.get(svc.sid):
            return False
        persist = self.persist
        return not persist or not any(d.rid in persist for d in svc.dests)

    def conns(self, svc, dest):
        from ipvs2nft.listing import DestConns

        loads = self.loads.get(svc.sid)
        load = loads.get(dest.key) if loads else None
        persistent = self.persist.get(dest.rid, 0) if self.persist else 0
        if load is None:
            return _NO_CONNS if not persistent else DestConns(0, 0, persistent)
        return DestConns(load.active, load.inactive, persistent)


def dest_tag(sid: int, key: tuple) -> str:
    """A JSON-safe name of one real server of one service."""
    return f"{sid}/{key[0]}/{key[1]}/{key[2]}"


def measured(table, daemon_stats: dict | None = None) -> Measured:
    """Everything the listings need, read from the kernel once.  The
    connection table is made of the services that have connections (their
    sids in the flows' marks), not of all of them."""
    import time

    from ipvs2nft.conntable import LiveTable

    flows = read_flows()
    direct = _has_direct(table)
    marked = {sid_of_mark(f.mark) for f in flows}
    busy = [s for s in table.services if s.sid in marked or (direct and _is_direct(s))]
    conntable = LiveTable(table.__class__(busy, table.timeouts, table.daemons, table.snat))
    conntable.resync(flows, time.monotonic())
    with _nfnl() as nfnl:
        if direct:
            conntable.set_direct(direct_counts(table, read_direct_flows(nfnl)))
        persist: dict[int, int] = {}
        for t in read_templates(nfnl):
            persist[t.rid] = persist.get(t.rid, 0) + 1
    counts = (lambda: read_counts(None, table)) if daemon_stats is None else KernelCounts()
    return Measured(conntable, persist, counts, daemon_stats)


def connection_rows(table) -> list:
    """``-L -c``: every connection of ours and every persistence template,
    in IPVS's terms."""
    from ipvs2nft.conntable import LiveTable
    from ipvs2nft.listing import ConnRow

    conntable = LiveTable(table)
    rows = []
    for flow in read_flows():
        svc = conntable.service_of(flow)
        if svc is None or flow.reply is None:
            continue
        proto = PROTO_NAMES.get(flow.proto, str(flow.proto))
        if flow.proto == 6:
            state = TCP_STATE_NAMES.get(flow.tcp_state or 0, "NONE")
        else:
            state = proto
        rows.append(ConnRow(proto, flow.timeout or 0, state,
                            (_addr(flow.orig.src), flow.orig.sport), (_addr(flow.orig.dst), flow.orig.dport),
                            (_addr(flow.reply.src), flow.reply.sport), flow.proto))
    by_rid = {d.rid: (svc, d) for svc in table.services for d in svc.dests}
    if _has_direct(table):
        rows += [direct_row(by_rid[f.rid][0], by_rid[f.rid][1], f, table)
                 for f in read_direct_flows() if f.rid in by_rid]
    for t in read_templates():
        found = by_rid.get(t.rid)
        if found is None:
            continue
        svc, dest = found
        rows.append(template_row(svc, dest, t))
    return rows


def direct_row(svc, dest, f: DirectFlow, table):
    """A direct-routed flow: TCP while the client has not closed it is
    ESTABLISHED, afterwards FIN_WAIT (IPVS's INPUT-ONLY table: the client's
    FIN moves ESTABLISHED to FIN_WAIT); UDP is UDP."""
    from ipvs2nft.listing import ConnRow

    tcp = _direct_tcp(svc, f, table)
    proto = 6 if tcp else 17
    state = ("FIN_WAIT" if f.closing else "ESTABLISHED") if tcp else "UDP"
    port = dest.port or f.vport
    return ConnRow(PROTO_NAMES[proto], (f.expires_ms + 999) // 1000, state, (f.client, f.cport),
                   (f.vaddr, f.vport), (dest.addr, port), proto)


def template_row(svc, dest, t: Template, assured: bool = True):
    """A persistence template as /proc/net/ip_vs_conn shows it
    (ip_vs_sched_persist, ip_vs_conn_seq_show): client port 0; a fwmark
    service's has protocol IP, the mark as its virtual address
    (``{ .ip = htonl(fwmark) }``) and ports 0; FTP and port-0 services
    have virtual port 0.  ASSURED once a connection it controls was
    established (NONE before)."""
    import ipaddress

    from ipvs2nft.listing import ConnRow

    expires = (t.expires_ms + 999) // 1000
    state = "ASSURED" if assured else "NONE"
    if svc.fwmark:
        vaddr = (ipaddress.IPv4Address(svc.fwmark) if svc.af == socket.AF_INET
                 else ipaddress.IPv6Address(svc.fwmark << 96))
        return ConnRow("IP", expires, state, (t.client, 0), (vaddr, 0), (dest.addr, 0), 0)
    vport = 0 if svc.port in (0, 21) else svc.port
    return ConnRow(PROTO_NAMES.get(svc.protocol, "TCP"), expires, state, (t.client, 0), (svc.addr, vport),
                   (dest.addr, dest.port), svc.protocol)
