"""The connection table: IPVS's per-server counters, kept from conntrack.

Every connection a service of ours scheduled carries the service in its
conntrack mark (``build.ct_mark``); its real server is the source of its
reply tuple (where DNAT sent it).  From conntrack's events and dumps this
table keeps, per service and real server, what ``struct ip_vs_dest`` keeps:
active and inactive connections, the OVERLOAD flag of the thresholds, and
lblc/lblcr's locality table -- updated the way ip_vs_conn.c updates them
(bind on a new connection, a state change between active and inactive,
unbind when the connection expires), so that ``dynsched`` decides as the
kernel would.

Events are hints (daemon.md §0): ``resync`` takes a dump as the truth and
``expire`` removes a connection at conntrack's own timeout instead of when
its DESTROY event finally arrives (conntrack's garbage collector runs up to
a minute late; IPVS unbinds at the timer).  Pure bookkeeping: no I/O here.
"""

from __future__ import annotations

import heapq
import ipaddress
import socket
from dataclasses import dataclass

from ipvs2nft import dynsched
from ipvs2nft.model import Service, ServiceKey, Table
from ipvs2nft.netaddr import IPPROTO_SCTP, IPPROTO_TCP
from ipvs2nft.nft.build import sid_of_mark

# conntrack's TCP states that IPVS counts as active (daemon.md §1.1):
# SYN_SENT, SYN_RECV, ESTABLISHED, SYN_SENT2
TCP_ACTIVE = frozenset({1, 2, 3, 9})
SCTP_ESTABLISHED = 3  # enum sctp_conntrack


@dataclass(slots=True)
class Conn:
    """One of our connections as the table last saw it."""

    svc: ServiceKey
    dest: tuple  # Dest.key it is bound to (possibly no longer in the service)
    active: bool
    daddr: object  # the address the client connected to (lblc/lblcr's key)
    deadline: float  # when conntrack will expire it unless a packet comes
    state: int | None
    orig: object = None  # the flow's original tuple, to ask conntrack about it


def is_active(proto: int, state: int | None) -> bool:
    """IPVS's activity: TCP from the first SYN to the first FIN; SCTP while
    established; UDP never."""
    if proto == IPPROTO_TCP:
        return state in TCP_ACTIVE
    if proto == IPPROTO_SCTP:
        return state == SCTP_ESTABLISHED
    return False


class LiveTable:
    """Loads per service, from the connections conntrack reports."""

    def __init__(self, table: Table | None = None) -> None:
        self.conns: dict[int, Conn] = {}
        self.state = dynsched.LiveState()
        self._by_sid: dict[int, Service] = {}
        self._by_key: dict[ServiceKey, Service] = {}
        self._expiry: list[tuple[float, int]] = []  # (deadline, ct id), lazily pruned
        self.created: dict[ServiceKey, int] = {}  # new connections seen, per service, since taken
        self.drift = 0  # how far the counts were off when the last dump came (lost or late events)
        self._addresses: dict = {}
        self._info: dict = {}
        self.set_table(table or Table())

    # ------------------------------------------------------------ the model
    def set_table(self, table: Table) -> set[ServiceKey]:
        """Follow a new model.  Returns the services whose counts may read
        differently now (new ones, changed real servers or thresholds)."""
        old = self._by_sid
        self._by_sid = {s.sid: s for s in table.services if s.sid}
        self._by_key = {s.key: s for s in self._by_sid.values()}
        # per sid: (service, its key, VIP packed or None for fwmark, port, Dest.key -> Dest)
        self._info = {sid: (svc, svc.key, None if svc.fwmark else svc.addr.packed, svc.port,
                            {d.key: d for d in svc.dests}) for sid, svc in self._by_sid.items()}
        changed: set[ServiceKey] = set()
        for sid, svc in self._by_sid.items():
            before = old.get(sid)
            if before is None or before.key != svc.key:
                self._drop_service(before)
                self.state.loads[svc.key] = {}
                changed.add(svc.key)
                continue
            if before is not svc and before != svc:  # the daemon keeps unchanged services as they were
                changed.add(svc.key)
                self._thresholds_changed(before, svc)
                if before.scheduler != svc.scheduler:
                    self.state.localities.pop(svc.key, None)  # a new scheduler starts afresh
        for sid, svc in old.items():
            if sid not in self._by_sid:
                self._drop_service(svc)
        if changed:
            self._rebind(changed)
        return changed

    def _drop_service(self, svc: Service | None) -> None:
        if svc is None:
            return
        self.state.loads.pop(svc.key, None)
        self.state.localities.pop(svc.key, None)
        for cid in [c for c, conn in self.conns.items() if conn.svc == svc.key]:
            del self.conns[cid]

    def _thresholds_changed(self, before: Service, after: Service) -> None:
        """-e with new -x/-y re-evaluates the flag (mode 0, __ip_vs_update_dest)."""
        loads = self.state.loads.setdefault(after.key, {})
        for d in after.dests:
            old = before.find_dest(d.key)
            if old is None or (old.u_threshold, old.l_threshold) != (d.u_threshold, d.l_threshold):
                dynsched.update_overload(d, dynsched.load_of(loads, d), 0)

    def _rebind(self, services: set[ServiceKey]) -> None:
        """Connections whose real server was not in the service when they
        were first seen may be bound now (a server added back: IPVS takes it
        out of its trash with its connections)."""
        for conn in self.conns.values():
            if conn.svc in services:
                svc = self._service(conn.svc)
                if svc is not None:
                    conn.dest = _resolve(svc, conn.dest)

    def _service(self, key: ServiceKey) -> Service | None:
        return self._by_key.get(key)

    def service_of(self, flow) -> Service | None:
        """Our service of a conntrack flow, or None if it is not ours (or its
        service is gone, or its sid now names another service)."""
        sid = sid_of_mark(flow.mark)
        info = self._info.get(sid) if sid else None
        if info is None:
            return None
        svc, vip, port = info[0], info[2], info[3]
        # a recycled sid must not inherit another VIP's flows
        if vip is not None and (flow.orig.dst != vip or (port and flow.orig.dport != port)):
            return None
        return svc

    # ------------------------------------------------------------ connections
    def seen(self, flow, now: float) -> ServiceKey | None:
        """A NEW or UPDATE event, or a flow of a dump.  Returns the service
        whose counts changed, if any.  The hot path: a connection already
        known only moves between active and inactive (and gets a new
        deadline); a new one is resolved to its service and real server."""
        conn = self.conns.get(flow.id)
        if conn is not None:
            state = flow.tcp_state if flow.tcp_state is not None else conn.state
            active = is_active(flow.orig.proto, state)
            if active != conn.active:
                loads = self.state.loads.get(conn.svc)
                if loads is not None:
                    load = loads.get(conn.dest)
                    if load is None:
                        load = loads[conn.dest] = dynsched.Load()
                    dynsched.set_activity(load, conn.active, active)
                conn.active = active
            conn.state = state
            if flow.timeout is not None:
                conn.deadline = now + flow.timeout
                heapq.heappush(self._expiry, (conn.deadline, flow.id))
            return conn.svc
        svc = self.service_of(flow)
        if svc is None or flow.reply is None:
            return None
        info = self._info[svc.sid]
        key, by_dest = info[1], info[4]
        state = flow.tcp_state
        active = is_active(flow.orig.proto, state)
        deadline = now + flow.timeout if flow.timeout is not None else now + 300
        loads = self.state.loads.setdefault(key, {})
        dest_key = self._resolve(by_dest, flow.reply.src, flow.reply.sport)
        conn = Conn(key, dest_key, active, self._address(flow.orig.dst), deadline, state, flow.orig)
        self.conns[flow.id] = conn
        self.created[key] = self.created.get(key, 0) + 1
        dest = by_dest.get(dest_key)
        load = loads.get(dest_key)
        if load is None:
            load = loads[dest_key] = dynsched.Load()
        if dest is not None:
            dynsched.bind(dest, load, active)
        elif active:
            load.active += 1
        else:
            load.inactive += 1
        if svc.scheduler in dynsched.LOCALITY:
            self._learn_locality(svc, conn)
        heapq.heappush(self._expiry, (deadline, flow.id))
        return key

    def _address(self, packed: bytes):
        """ipaddress object of a packed address, kept (flows repeat them)."""
        got = self._addresses.get(packed)
        if got is None:
            if len(self._addresses) > 100_000:
                self._addresses.clear()
            got = self._addresses[packed] = ipaddress.ip_address(packed)
        return got

    def _resolve(self, by_dest: dict, packed: bytes, port: int) -> tuple:
        """The Dest.key a reply source names: (af, addr, port), or the
        address alone for a server without a port (it keeps the packet's)."""
        addr = self._address(packed)
        af = socket.AF_INET6 if len(packed) == 16 else socket.AF_INET
        key = (af, addr, port)
        if key in by_dest:
            return key
        port0 = (af, addr, 0)
        return port0 if port0 in by_dest else key

    def gone(self, flow_id: int) -> ServiceKey | None:
        """A DESTROY event, or a flow a dump or a lookup no longer has."""
        conn = self.conns.pop(flow_id, None)
        if conn is None:
            return None
        svc = self._service(conn.svc)
        loads = self.state.loads.get(conn.svc)
        if loads is None:
            return None
        load = loads.setdefault(conn.dest, dynsched.Load())
        dest = svc.find_dest(conn.dest) if svc is not None else None
        if dest is not None:
            dynsched.unbind(dest, load, conn.active)
        elif conn.active:
            load.active = max(0, load.active - 1)
        else:
            load.inactive = max(0, load.inactive - 1)
        return conn.svc

    def due(self, now: float) -> list[tuple[int, Conn]]:
        """Connections whose conntrack timeout has passed by now: the caller
        asks conntrack whether each is really gone (a packet may have
        refreshed it) and reports with ``gone`` or ``seen``."""
        out = []
        while self._expiry and self._expiry[0][0] <= now:
            deadline, cid = heapq.heappop(self._expiry)
            conn = self.conns.get(cid)
            if conn is not None and conn.deadline <= now:
                out.append((cid, conn))
        return out

    def next_deadline(self) -> float | None:
        while self._expiry:
            deadline, cid = self._expiry[0]
            conn = self.conns.get(cid)
            if conn is not None and conn.deadline == deadline:
                return deadline
            heapq.heappop(self._expiry)
        return None

    def resync(self, flows, now: float) -> set[ServiceKey]:
        """A dump of every flow of ours: the truth.  Connections it lacks are
        gone, new ones are bound, and counts that drifted (lost events) are
        replaced; the overload flag is then re-evaluated from the counts
        (mode 0: the hysteresis band keeps what the flag was)."""
        before = {k: {d: (ld.active, ld.inactive) for d, ld in v.items()}
                  for k, v in self.state.loads.items()}
        present = set()
        changed: set[ServiceKey] = set()
        for flow in flows:
            present.add(flow.id)
            key = self.seen(flow, now)
            if key is not None:
                changed.add(key)
        for cid in [c for c in self.conns if c not in present]:
            key = self.gone(cid)
            if key is not None:
                changed.add(key)
        self._recount(changed)
        self.drift = 0
        for key, loads in self.state.loads.items():
            now_counts = {d: (ld.active, ld.inactive) for d, ld in loads.items()}
            old = before.get(key, {})
            if now_counts != old:
                changed.add(key)
                for d in set(now_counts) | set(old):
                    a, b = now_counts.get(d, (0, 0)), old.get(d, (0, 0))
                    self.drift += abs(a[0] - b[0]) + abs(a[1] - b[1])
        return changed

    def _recount(self, services: set[ServiceKey]) -> None:
        """Counts straight from the connections (what a dump proves)."""
        for key in services:
            loads = self.state.loads.setdefault(key, {})
            fresh: dict = {}
            for conn in self.conns.values():
                if conn.svc == key:
                    pair = fresh.setdefault(conn.dest, [0, 0])
                    pair[0 if conn.active else 1] += 1
            svc = self._service(key)
            direct = {d.key for d in svc.dests if d.fwd.value in ("route", "tunnel")} if svc else set()
            for dest_key in (set(loads) | set(fresh)) - direct:  # direct servers: set_direct counts them
                load = loads.setdefault(dest_key, dynsched.Load())
                active, inactive = fresh.get(dest_key, (0, 0))
                if (load.active, load.inactive) != (active, inactive):
                    load.active, load.inactive = active, inactive
                    dest = svc.find_dest(dest_key) if svc is not None else None
                    if dest is not None:
                        dynsched.recount_overload(dest, load)

    # ------------------------------------------------------------ locality
    def _learn_locality(self, svc: Service, conn: Conn) -> None:
        """What lblc/lblcr's table became when the kernel scheduled this
        connection: lblc remembers the destination address -> the server
        (replacing an entry that was not usable), lblcr adds the server to
        the address's set."""
        if svc.scheduler not in dynsched.LOCALITY:
            return
        table = self.state.localities.setdefault(svc.key, dynsched.Locality())
        if svc.scheduler == "lblc":
            table.entries[conn.daddr] = conn.dest
            return
        members = table.entries.setdefault(conn.daddr, [])
        if conn.dest not in members:
            members.insert(0, conn.dest)

    def set_direct(self, counts: dict) -> set[ServiceKey]:
        """The connections of direct-routed and tunnelled servers, which
        conntrack never sees: counted from the direct tables' flow memory
        (readback.direct_counts: ServiceKey -> Dest.key -> (active,
        inactive)).  Such a server has no conntrack connections, so its
        counts are replaced; the overload flag is re-evaluated (mode 0).
        Returns the services whose counts changed."""
        from ipvs2nft.model import Forward

        changed = set()
        for svc in self._by_key.values():
            direct = [d for d in svc.dests if d.fwd in (Forward.ROUTE, Forward.TUNNEL)]
            if not direct:
                continue
            loads = self.state.loads.setdefault(svc.key, {})
            got = counts.get(svc.key, {})
            for d in direct:
                active, inactive = got.get(d.key, (0, 0))
                load = dynsched.load_of(loads, d)
                if (load.active, load.inactive) != (active, inactive):
                    load.active, load.inactive = active, inactive
                    dynsched.recount_overload(d, load)
                    changed.add(svc.key)
        return changed

    def take_created(self) -> dict[ServiceKey, int]:
        """New connections per service since the last call."""
        created, self.created = self.created, {}
        return created

    def counts(self, key: ServiceKey) -> dict:
        """The loads of one service (Dest.key -> Load)."""
        return self.state.loads.get(key, {})

    def services(self):
        """The services the table follows."""
        return self._by_key.values()


def _resolve(svc: Service, key: tuple) -> tuple:
    """A reply source names the server (af, addr, port); a server given
    without a port (port 0: the packet's own port is kept) matches on the
    address alone."""
    if svc.find_dest(key) is not None:
        return key
    port0 = (key[0], key[1], 0)
    if svc.find_dest(port0) is not None:
        return port0
    return key
