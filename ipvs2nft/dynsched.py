"""IPVS's connection-count schedulers and its overload flag, over live counts.

lc, wlc (ipvsadm's default), sed, nq, ovf, lblc and lblcr choose a real
server from the connections each one holds; thresholds (``-x``/``-y``) take
an overloaded server out of every scheduler.  nftables cannot compute an
argmin per packet, so the choice is made here, in user space, by the same
code the kernel runs (net/netfilter/ipvs/ip_vs_{lc,wlc,sed,nq,ovf,fo,lblc,
lblcr}.c and ip_vs_conn.c of the Debian 6.1 kernel the oracle runs), and the
data plane is handed a short *prediction*: the servers IPVS would choose for
the next connections if every one of them stayed open (``predict``).  A
connection that closes, or one that arrives by another way, changes the
counts; whoever watches the counts (the daemon, or ipvsadm when it writes a
service) then hands over a new prediction.

Pure: no I/O.  Counts come in as ``Load`` per real server (``Dest.key``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ipvs2nft import sched
from ipvs2nft.model import Dest, SchedState, Service
from ipvs2nft.netaddr import IPPROTO_SCTP, IPPROTO_TCP

# Schedulers whose decision depends on connection counts.
LIVE = frozenset({"lc", "wlc", "sed", "nq", "ovf", "lblc", "lblcr"})
LOCALITY = frozenset({"lblc", "lblcr"})

Key = tuple  # Dest.key


@dataclass(slots=True)
class Load:
    """What IPVS keeps per real server (``struct ip_vs_dest``): activeconns,
    totalconns (non-template connections, active or not), persistconns, and
    the OVERLOAD flag that the thresholds drive."""

    active: int = 0
    inactive: int = 0
    persistent: int = 0
    overloaded: bool = False

    @property
    def total(self) -> int:
        return self.active + self.inactive

    @property
    def overhead(self) -> int:
        """ip_vs_dest_conn_overhead(): ``(activeconns << 8) + totalconns``
        (the 2026 "totalconns" change the oracle kernel carries)."""
        return (self.active << 8) + self.total

    def copy(self) -> Load:
        return Load(self.active, self.inactive, self.persistent, self.overloaded)


Loads = dict  # Key -> Load


def load_of(loads: Loads, dest: Dest) -> Load:
    got = loads.get(dest.key)
    if got is None:
        got = loads[dest.key] = Load()
    return got


# ------------------------------------------------------------------ thresholds

def lower_threshold(dest: Dest) -> int:
    """l_threshold_val: -y, or 3/4 of -x rounded up (``u - (u >> 2)``)."""
    return dest.l_threshold or (dest.u_threshold - (dest.u_threshold >> 2))


def update_overload(dest: Dest, load: Load, mode: int) -> None:
    """__ip_vs_dest_update_overload() (ip_vs_ctl.c, 2026 semantics): mode
    +1 when a connection is bound, -1 when one is unbound, 0 when -e changes
    the thresholds."""
    u = dest.u_threshold
    if not u:
        load.overloaded = False
        return
    lower = lower_threshold(dest)
    conns = load.total
    if conns >= (lower if mode > 0 else u):
        load.overloaded = True
    elif conns >= (u if mode < 0 else lower):
        return
    else:
        load.overloaded = False


def bind(dest: Dest, load: Load, active: bool) -> None:
    """ip_vs_bind_dest(): a new (non-template) connection on ``dest``."""
    if active:
        load.active += 1
    else:
        load.inactive += 1
    if load.total == dest.u_threshold:
        update_overload(dest, load, 1)


def unbind(dest: Dest, load: Load, active: bool) -> None:
    """ip_vs_unbind_dest(): a connection of ``dest`` expired."""
    before = load.total
    if active:
        load.active = max(0, load.active - 1)
    else:
        load.inactive = max(0, load.inactive - 1)
    if before == lower_threshold(dest) and dest.u_threshold:
        update_overload(dest, load, -1)


def set_activity(load: Load, was_active: bool, active: bool) -> None:
    """A connection's protocol state moved between active and inactive."""
    if was_active == active:
        return
    if active:
        load.active += 1
        load.inactive = max(0, load.inactive - 1)
    else:
        load.active = max(0, load.active - 1)
        load.inactive += 1


def recount_overload(dest: Dest, load: Load) -> None:
    """The flag from counts alone, when no history is known (a fresh dump):
    at or over -x it is set; under the lower threshold it is clear; in
    between the flag is kept (the hysteresis band), which is what mode 0
    does."""
    update_overload(dest, load, 0)


# ------------------------------------------------------------------ decisions

def _choose(name: str, dests, loads: Loads) -> Dest | None:
    """One decision of scheduler ``name`` over ``dests`` (kernel list
    order): the kernel's loop, run by the array picker below."""
    dests = list(dests)
    n = len(dests)
    weight, active, total, over = [0] * n, [0] * n, [0] * n, [False] * n
    for i, d in enumerate(dests):
        load = loads.get(d.key)
        weight[i] = d.weight
        if load is not None:
            active[i], total[i], over[i] = load.active, load.total, load.overloaded
    i = _FAST[name](n, weight, active, total, over)
    return dests[i] if i >= 0 else None


def _wlc(svc: Service, loads: Loads) -> Dest | None:
    return _choose("wlc", svc.dests, loads)


def is_overloaded(svc: Service, dest: Dest, loads: Loads) -> bool:
    """lblc/lblcr's own test (not the OVERLOAD flag): more active
    connections than weight while some server is under half its weight."""
    if load_of(loads, dest).active > dest.weight:
        return any(load_of(loads, d).active * 2 < d.weight for d in svc.dests)
    return False


@dataclass
class Locality:
    """lblc/lblcr's table: destination address -> server (lblc) or servers,
    newest first (lblcr).  Entries name servers by key; a server deleted
    from the service is "not available" (IP_VS_DEST_CF_AVAILABLE cleared)
    and is skipped, as the kernel skips a server in its trash."""

    entries: dict = field(default_factory=dict)  # daddr -> Key (lblc) | list[Key] (lblcr)

    def copy(self) -> Locality:
        return Locality({k: (list(v) if isinstance(v, list) else v) for k, v in self.entries.items()})


def _lblc(svc: Service, loads: Loads, daddr, table: Locality) -> Dest | None:
    cached = svc.find_dest(table.entries.get(daddr)) if daddr in table.entries else None
    if cached is not None and cached.weight > 0 and not is_overloaded(svc, cached, loads):
        return cached
    dest = _wlc(svc, loads)
    if dest is not None:
        table.entries[daddr] = dest.key  # ip_vs_lblc_new() replaces the entry
    return dest


def _lblcr_min(svc: Service, members: list, loads: Loads) -> Dest | None:
    """ip_vs_dest_set_min(): the weighted least of the set (newest member
    first); a member no longer in the service is not available."""
    dests = [svc.find_dest(k) for k in members]
    present = [d for d in dests if d is not None]
    return _choose("wlc", present, loads)


def _lblcr(svc: Service, loads: Loads, daddr, table: Locality) -> Dest | None:
    members = table.entries.get(daddr)
    if members is not None:
        dest = _lblcr_min(svc, members, loads)
        if dest is not None and not is_overloaded(svc, dest, loads):
            return dest
        dest = _wlc(svc, loads)
        if dest is not None and dest.key not in members:
            members.insert(0, dest.key)  # ip_vs_dest_set_insert(): at the head
        return dest
    dest = _wlc(svc, loads)
    if dest is not None:
        table.entries[daddr] = [dest.key]
    return dest




def _sequence_pick(svc: Service, st: SchedState, loads: Loads) -> tuple[Dest | None, SchedState]:
    """rr and wrr skip an overloaded server (ip_vs_rr.c, ip_vs_wrr.c) like a
    quiesced one: the same walk with overloaded servers at weight 0."""
    view = _quiesce_overloaded(svc, loads)
    dest, st = sched.pick(view, st)
    return (None if dest is None else svc.find_dest(dest.key)), st


def _quiesce_overloaded(svc: Service, loads: Loads) -> Service:
    from dataclasses import replace

    dests = tuple(replace(d, weight=0) if load_of(loads, d).overloaded else d for d in svc.dests)
    return svc if dests == svc.dests else replace(svc, dests=dests)


def schedule(svc: Service, loads: Loads, daddr=None, table: Locality | None = None,
             st: SchedState | None = None) -> tuple[Dest | None, SchedState | None]:
    """IPVS's choice for one new connection (not persistence), and the
    scheduler's new state for rr/wrr.  ``table`` (lblc/lblcr) is updated as
    the kernel updates it."""
    name = svc.scheduler
    if name in LOCALITY:
        table = table if table is not None else Locality()
        pick = _lblc if name == "lblc" else _lblcr
        return pick(svc, loads, daddr, table), st
    if name in _FAST:
        return _choose(name, svc.dests, loads), st
    if sched.is_sequence(svc):
        return _sequence_pick(svc, st if st is not None else svc.sched, loads)
    raise ValueError(f"{name} is not scheduled from counts")


def new_connection_is_active(svc: Service) -> bool:
    """A new TCP or SCTP connection counts as active from its first packet
    (TCP: NONE -> SYN_RECV on the client's SYN; SCTP likewise); UDP never
    (ip_vs_proto_udp.c keeps no active state).  A fwmark service is
    predicted as TCP, the common case."""
    return svc.fwmark != 0 or svc.protocol in (IPPROTO_TCP, IPPROTO_SCTP)


def predict(svc: Service, loads: Loads, count: int, daddr=None, table: Locality | None = None,
            st: SchedState | None = None, states: list | None = None) -> list[Dest | None]:
    """The next ``count`` choices, assuming each new connection stays open
    (bound as active for TCP, inactive for UDP, and pushing its server to
    the overload flag when it reaches -x).  Inputs are not changed.  With
    ``states``, rr/wrr's state before each choice and after the last is
    appended to it."""
    if states is None and svc.scheduler in _FAST:
        return _predict_fast(svc, loads, count)
    loads = {k: v.copy() for k, v in loads.items()}
    table = table.copy() if table is not None else Locality()  # one table for all the steps
    active = new_connection_is_active(svc)
    out = []
    for _ in range(count):
        if states is not None:
            states.append(st)
        dest, st = schedule(svc, loads, daddr, table, st)
        out.append(dest)
        if dest is not None:
            bind(dest, load_of(loads, dest), active)
    if states is not None:
        states.append(st)
    return out


def _predict_fast(svc: Service, loads: Loads, count: int) -> list[Dest | None]:
    """``predict`` for lc, wlc, sed, nq, ovf and fo over plain lists of
    numbers: the daemon computes a prediction for every service whose counts
    change, many times a second, and the general path's objects cost more
    than the arithmetic (test_dynsched checks the two agree)."""
    dests = svc.dests
    n = len(dests)
    weight = [d.weight for d in dests]
    active, total, over = [0] * n, [0] * n, [False] * n
    upper = [d.u_threshold for d in dests]
    lower = [lower_threshold(d) for d in dests]
    for i, d in enumerate(dests):
        load = loads.get(d.key)
        if load is not None:
            active[i], total[i], over[i] = load.active, load.total, load.overloaded
    grows = 1 if new_connection_is_active(svc) else 0
    pick = _FAST[svc.scheduler]
    out: list[Dest | None] = []
    for _ in range(count):
        i = pick(n, weight, active, total, over)
        if i < 0:
            out.append(None)
            continue
        out.append(dests[i])
        active[i] += grows
        total[i] += 1
        if total[i] == upper[i] and upper[i]:  # bind() at -x: mode +1
            over[i] = over[i] or total[i] >= lower[i]
    return out


# The schedulers' loops (ip_vs_{lc,wlc,sed,nq,ovf,fo}.c) over one list per
# field, servers in the kernel's list order (newest first); each returns the
# index of the server IPVS takes, or -1 for none.

def _fast_weighted(overhead):
    """The two-stage loop of wlc and sed (and of lblc/lblcr's fresh
    choices): the first usable server, then any later one not overloaded
    whose overhead/weight is strictly lower (``loh * w_d > doh * w_least``;
    a weight-0 server can never win that comparison)."""
    def pick(n, weight, active, total, over) -> int:
        least = -1
        for i in range(n):
            if not over[i] and weight[i] > 0:
                least = i
                break
        if least < 0:
            return -1
        loh = overhead(active[least], total[least])
        for i in range(least + 1, n):
            if over[i]:
                continue
            doh = overhead(active[i], total[i])
            if loh * weight[i] > doh * weight[least]:
                least, loh = i, doh
        return least
    return pick


def _fast_lc(n, weight, active, total, over) -> int:
    least, loh = -1, 0
    for i in range(n):
        if over[i] or weight[i] == 0:
            continue
        doh = (active[i] << 8) + total[i]
        if least < 0 or doh < loh:
            least, loh = i, doh
    return least


def _fast_nq(n, weight, active, total, over) -> int:
    least, loh = -1, 0
    for i in range(n):
        if over[i] or weight[i] == 0:
            continue
        doh = active[i] + 1
        if active[i] == 0:
            return i
        if least < 0 or loh * weight[i] > doh * weight[least]:
            least, loh = i, doh
    return least


def _fast_ovf(n, weight, active, total, over) -> int:
    best = -1
    for i in range(n):
        if over[i] or active[i] > weight[i] or weight[i] == 0:
            continue
        if best < 0 or weight[i] > weight[best]:
            best = i
    return best


def _fast_fo(n, weight, active, total, over) -> int:
    best, hw = -1, 0
    for i in range(n):
        if not over[i] and weight[i] > hw:
            best, hw = i, weight[i]
    return best


_FAST = {"lc": _fast_lc, "wlc": _fast_weighted(lambda a, t: (a << 8) + t),
         "sed": _fast_weighted(lambda a, t: a + 1), "nq": _fast_nq, "ovf": _fast_ovf, "fo": _fast_fo}


def managed(svc: Service) -> bool:
    """Does the service's choice depend on live counts?  The connection-count
    schedulers, and any scheduler once a real server has thresholds (the
    overload flag).  sh, dh and mh hash the client into a fixed table; for
    them thresholds are not enforced (compat-matrix.md)."""
    if svc.scheduler in LIVE:
        return True
    if svc.scheduler in ("sh", "dh", "mh", "none") or svc.scheduler not in sched_names():
        return False
    return any(d.u_threshold for d in svc.dests)


def sched_names() -> frozenset[str]:
    from ipvs2nft.model import SCHEDULERS

    return frozenset(SCHEDULERS)


def prediction_length(svc: Service) -> int:
    """How many upcoming choices the data plane holds for a managed
    service: enough for a burst between two updates, bounded so that 10,000
    services do not load hundreds of thousands of map elements.  A function
    of the model alone, so ipvsadm and the daemon agree on the slot range
    without asking each other."""
    return min(32, max(8, 2 * len(svc.dests)))


@dataclass
class LiveState:
    """The live counts a managed service's prediction is computed from:
    per service (ServiceKey) its Loads and, for lblc/lblcr, its Locality.
    An empty state is a service nobody has connected to yet (what ipvsadm
    writes without a kernel, e.g. ``ipvs2nft translate``)."""

    loads: dict = field(default_factory=dict)
    localities: dict = field(default_factory=dict)
    # rr/wrr's state where the data plane is now, when the daemon follows it
    # (a thresholded rr/wrr service is walked through predictions, so the
    # store's state, advanced only by ipvsadm, lags behind)
    sched: dict = field(default_factory=dict)

    def prediction(self, svc: Service, states: list | None = None) -> list[Dest | None]:
        loads = self.loads.get(svc.key, {})
        table = self.localities.get(svc.key)
        # misses of a fwmark service's locality table are new destination
        # addresses; a normal service has one, its VIP
        daddr = None if svc.fwmark else svc.addr
        st = self.sched.get(svc.key, svc.sched) if sched.is_sequence(svc) else None
        return predict(svc, loads, prediction_length(svc), daddr, table, st, states)


NO_LIVE = LiveState()


def slots(svc: Service, live: LiveState | None = None, states: list | None = None) -> sched.Slots:
    """The slot table of a managed service: one fixed slot per real server
    and the prediction as indices into them (``states``: see predict)."""
    if not svc.dests:
        return sched.Slots(svc.dests)
    live = live or NO_LIVE
    shape = None
    if states is None and not live.loads.get(svc.key) and svc.key not in live.localities \
            and not sched.is_sequence(svc):
        # No connection yet: the prediction depends on the servers' weights and
        # thresholds alone, and a restore of 10,000 alike services asks for
        # the same one 10,000 times.
        shape = (svc.scheduler, svc.fwmark != 0, svc.protocol,
                 tuple((d.weight, d.u_threshold, d.l_threshold) for d in svc.dests))
        dyn = _EMPTY.get(shape)
        if dyn is not None:
            return sched.Slots(svc.dests, dyn=dyn)
    index = {d.key: i for i, d in enumerate(svc.dests)}
    picks = live.prediction(svc, states)
    dyn = tuple(-1 if d is None else index[d.key] for d in picks)
    if shape is not None:
        if len(_EMPTY) > 4096:
            _EMPTY.clear()
        _EMPTY[shape] = dyn
    return sched.Slots(svc.dests, dyn=dyn)


# predictions for services without connections, by their shape (a pure
# function of the key: it never goes stale)
_EMPTY: dict = {}
