"""IPVS schedulers as slot tables.

nftables picks a real server per new connection with ``numgen inc`` or
``jhash`` into a table of slots.  This module computes those tables so that
they give what the kernel's schedulers (net/netfilter/ipvs/ip_vs_*.c, 6.1)
give:

* ``rr`` and ``wrr`` are deterministic sequences.  Their state (rr's pointer,
  wrr's cl/cw/mw/di) is kernel state kept in the model, changed by the same
  add/update/delete callbacks the kernel runs, and advanced by the number of
  connections the data plane scheduled.  A slot table is one period of the
  sequence that follows from the current state, so ``numgen inc mod N``
  replays exactly what IPVS would have done next.
* ``sh``/``dh``: the kernel's 256-bucket table (each real server fills
  ``weight`` consecutive buckets, in list order); the hash of the client is
  nft's jhash, not the kernel's, so which client lands where differs while
  stickiness and shares are the same.  ``sh-fallback`` is precomputed per
  bucket exactly as ip_vs_sh_get_fallback() walks the table.
* ``mh``: a Maglev table of 4093 entries populated as ip_vs_mh.c does
  (offset/skip per server, turns from last_weight/gcd), so removing one of N
  servers moves only about 1/N of the slots.
* ``fo``: the available server with the highest weight.
* lc, wlc, sed, nq, ovf, lblc, lblcr (and any scheduler once thresholds
  are set) decide from live connection counts: ``dynsched`` computes their
  choices, the data plane walks them through the ``dyn`` map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ipvs2nft.model import F_SCHED1, F_SCHED2, Dest, SchedState, Service

SH_TAB_SIZE = 256  # IP_VS_SH_TAB_BITS 8
MH_TAB_SIZE = 4093  # primes[CONFIG_IP_VS_MH_TAB_INDEX(12) - 8]
MH_TAB_BITS = 6  # CONFIG_IP_VS_MH_TAB_INDEX / 2
MAX_SLOTS = 8192  # longer rr/wrr periods are scaled down (and warned about)

Key = tuple  # a real server's identity within its service: Dest.key


def available(dest: Dest) -> bool:
    """is_unavailable() of the kernel, minus overload (no live counts here)."""
    return dest.weight > 0


def _kind(svc: Service) -> str:
    return svc.scheduler


# ------------------------------------------------------------------ callbacks

def _wrr_gcd(dests: tuple[Dest, ...]) -> int:
    g = 0
    for d in dests:
        if d.weight > 0:
            g = math.gcd(g, d.weight)
    return g or 1


def _wrr_changed(svc: Service, st: SchedState) -> SchedState:
    """ip_vs_wrr_dest_changed()."""
    di = _wrr_gcd(svc.dests)
    mw = max((d.weight for d in svc.dests), default=0) - (di - 1)
    cw = st.cw
    if cw > mw or not cw:
        cw = mw
    elif di > 1:
        cw = (cw // di) * di + 1
    return SchedState(None, cw, mw, di)


def on_init(svc: Service) -> SchedState:
    """init_service(): a new service, or a new scheduler on -E."""
    if _kind(svc) == "wrr":
        di = _wrr_gcd(svc.dests)
        mw = max((d.weight for d in svc.dests), default=0) - (di - 1)
        return SchedState(None, mw, mw, di)
    return SchedState()


def on_add(svc: Service, st: SchedState) -> SchedState:
    """add_dest(), called with the new server already at the list head."""
    return _wrr_changed(svc, st) if _kind(svc) == "wrr" else st


def on_update(svc: Service, st: SchedState) -> SchedState:
    """upd_dest()."""
    return _wrr_changed(svc, st) if _kind(svc) == "wrr" else st


def on_delete(before: Service, after: Service, key: Key, st: SchedState) -> SchedState:
    """del_dest(): wrr recomputes; rr moves its pointer off the removed server
    to the one before it (``p->next->prev`` once the server is unlinked)."""
    kind = _kind(after)
    if kind == "wrr":
        return _wrr_changed(after, st)
    if kind == "rr" and st.cl == key:
        keys = [d.key for d in before.dests]
        i = keys.index(key)
        return replace(st, cl=keys[i - 1] if i > 0 else None)
    return st


# ------------------------------------------------------------------ sequences

def _index(dests: tuple[Dest, ...], key: Key | None) -> int:
    """Position of ``key`` in the list, -1 for the head (or a vanished server)."""
    if key is None:
        return -1
    for i, d in enumerate(dests):
        if d.key == key:
            return i
    return -1


def _rr_pick(dests: tuple[Dest, ...], st: SchedState) -> tuple[Dest | None, SchedState]:
    """ip_vs_rr_schedule(): the next available server after the pointer,
    wrapping round to the pointer itself; from the head, one pass only."""
    start = _index(dests, st.cl)
    order = list(range(start + 1, len(dests)))
    if start >= 0:
        order += range(0, start + 1)
    for i in order:
        if available(dests[i]):
            return dests[i], replace(st, cl=dests[i].key)
    return None, st


def _wrr_pick(dests: tuple[Dest, ...], st: SchedState) -> tuple[Dest | None, SchedState]:
    """ip_vs_wrr_schedule(), pass for pass."""
    if st.mw == 0:
        return None, st
    n = len(dests)
    last = _index(dests, st.cl)
    pos = last
    cw, stop = st.cw, None
    last_pass = restarted = False
    while True:
        for i in range(pos + 1, n):
            d = dests[i]
            if available(d) and d.weight >= cw:
                return d, SchedState(d.key, cw, st.mw, st.di)
            if stop is not None and i == stop:
                return None, SchedState(d.key, cw, st.mw, st.di)
        pos = -1
        cw -= st.di
        if cw <= 0:
            cw = st.mw
            if last_pass or last == -1:
                return None, SchedState(None, cw, st.mw, st.di)
            restarted = True
        last_pass = cw <= st.di
        if last_pass and restarted and last != -1:
            stop = last


def pick(svc: Service, st: SchedState) -> tuple[Dest | None, SchedState]:
    """One scheduling decision of a sequence scheduler."""
    if _kind(svc) == "wrr":
        return _wrr_pick(svc.dests, st)
    return _rr_pick(svc.dests, st)


def trajectory(svc: Service, st: SchedState, limit: int) -> tuple[list, list, int]:
    """Picks and states from ``st`` until the state repeats (or ``limit``).

    Returns (picks, states, loop): ``states[k]`` is the state before pick
    ``k``; the states from index ``loop`` on repeat with period
    ``len(states) - loop`` (loop is -1 if ``limit`` was reached first).
    """
    seen: dict[SchedState, int] = {}
    picks: list[Dest | None] = []
    states: list[SchedState] = []
    while len(states) < limit:
        if st in seen:
            return picks, states, seen[st]
        seen[st] = len(states)
        states.append(st)
        d, st = pick(svc, st)
        picks.append(d)
    return picks, states, -1


def advance(svc: Service, st: SchedState, count: int) -> SchedState:
    """The state after ``count`` connections were scheduled.

    The scheduler's own state (not only its picks) matters afterwards: the
    callbacks of a later change read it.  So the trajectory is followed and
    its cycle used to skip whole periods, rather than ``count % period``.
    """
    limit = 4 * MAX_SLOTS + 2 * len(svc.dests) + 2
    picks, states, loop = trajectory(svc, st, min(count + 1, limit))
    if count < len(states):
        return states[count]
    if loop < 0:  # no repetition within the bound: walk the rest
        st = states[-1]
        for _ in range(count - len(states) + 1):
            _, st = pick(svc, st)
        return st
    return states[loop + (count - loop) % (len(states) - loop)]


def _period(svc: Service) -> int:
    usable = [d for d in svc.dests if available(d)]
    if not usable:
        return 0
    if _kind(svc) == "wrr":
        g = _wrr_gcd(svc.dests)
        return sum(d.weight // g for d in usable)
    return len(usable)


def is_sequence(svc: Service) -> bool:
    """rr and wrr (and what is approximated by them) keep a pointer."""
    return _kind(svc) in ("rr", "wrr")


# ------------------------------------------------------------------ slot tables

class _Pass:
    """A slot that lets the connection go on un-NATed (no IPVS scheduler has
    one; an iptables cascade can leave connections alone)."""

    def __repr__(self) -> str:
        return "PASS"


PASS = _Pass()


@dataclass(frozen=True)
class Slots:
    """What the data plane needs: ``table[i]`` serves slot ``i`` (None: no server).

    ``hash``: None for ``numgen inc``, else the jhash key ("saddr",
    "saddr+sport" or "daddr").  ``exact``: False when the table only
    approximates the kernel (scaled weights, approximated scheduler).
    """

    table: tuple[Dest | _Pass | None, ...]
    hash: str | None = None
    exact: bool = True
    note: str = ""
    random: bool = False  # numgen random instead of numgen inc (no IPVS scheduler does this)
    # A service whose choice follows live counts (dynsched.managed): ``table``
    # is every real server in list order (slot i = server i, fixed), and
    # ``dyn`` the predicted next choices as indices into it (-1: none), which
    # ``numgen inc`` walks through the ``dyn`` map.
    dyn: tuple[int, ...] = ()


def _planned(svc: Service) -> Slots:
    """The slot table the service's front end fixed (``Service.plan``: an
    iptables cascade), with its dest keys turned into the service's Dests
    (which have their ids by now)."""
    plan = svc.plan
    by_key = {d.key: d for d in svc.dests}
    table = tuple(PASS if k is None else by_key[k] for k in plan.table)
    return Slots(table, None, plan.exact, plan.note, plan.random)


def slots(svc: Service, st: SchedState) -> Slots:
    """The slot table for ``svc`` in scheduler state ``st``."""
    if svc.plan is not None:
        return _planned(svc)
    kind = _kind(svc)
    exact, note = True, ""
    if svc.scheduler == "none" or not svc.dests:
        return Slots((), exact=exact, note=note)
    if kind in ("rr", "wrr"):
        table, scaled = _sequence_table(svc, st)
        if scaled:
            exact, note = False, f"wrr period above {MAX_SLOTS} slots; weights scaled down"
        return Slots(table, None, exact, note)
    if kind == "fo":
        best = None
        for d in svc.dests:
            if available(d) and (best is None or d.weight > best.weight):
                best = d
        return Slots((best,) if best else (), None, exact, note)
    if kind in ("sh", "dh"):
        fallback = kind == "sh" and bool(svc.flags & F_SCHED1)
        key = "daddr" if kind == "dh" else ("saddr+sport" if svc.flags & F_SCHED2 else "saddr")
        return Slots(_sh_table(svc.dests, fallback), key, exact, note)
    if kind == "mh":
        fallback = bool(svc.flags & F_SCHED1)
        key = "saddr+sport" if svc.flags & F_SCHED2 else "saddr"
        note = note or ("mh-fallback walks the table in order, not the kernel's rehash sequence"
                        if fallback else "")
        return Slots(_mh_table(svc, fallback), key, exact and not fallback, note)
    return Slots(())


def _sequence_table(svc: Service, st: SchedState) -> tuple[tuple[Dest | None, ...], bool]:
    """One period of the picks that follow ``st``: what ``numgen inc mod N``
    replays.  The picks are periodic from the first one (the kernel's first
    pass after a change is the tail of its cycle), which the tests check
    against recorded IPVS sequences."""
    if _kind(svc) == "rr":
        return _rr_table(svc.dests, st), False
    period = _period(svc)
    if not period:
        return (), False
    if period > MAX_SLOTS:
        return _scaled_table(svc), True
    picks, _, _ = trajectory(svc, st, period)
    return tuple(picks[:period]), False


def _rr_table(dests: tuple[Dest, ...], st: SchedState) -> tuple[Dest, ...]:
    """rr's period in closed form (what ``trajectory`` walks pick by pick,
    10,000 times in a restore): the available servers in list order,
    starting after the pointer and wrapping round."""
    start = _index(dests, st.cl) + 1
    return tuple(d for d in dests[start:] + dests[:start] if d.weight > 0)


def _scaled_table(svc: Service) -> tuple[Dest | None, ...]:
    """Weights too large for one slot per turn: an interleaved table with
    the same proportions (largest remainder), MAX_SLOTS long."""
    usable = [d for d in svc.dests if available(d)]
    total = sum(d.weight for d in usable)
    shares = [max(1, d.weight * MAX_SLOTS // total) for d in usable]
    # smooth interleave: each slot goes to the server furthest behind its share
    out, given = [], [0] * len(usable)
    size = sum(shares)
    for i in range(size):
        j = max(range(len(usable)), key=lambda k: shares[k] * (i + 1) / size - given[k])
        given[j] += 1
        out.append(usable[j])
    return tuple(out)


def _sh_table(dests: tuple[Dest, ...], fallback: bool) -> tuple[Dest | None, ...]:
    """ip_vs_sh_reassign(): buckets filled in list order, ``weight`` each
    (at least one), then availability with or without sh-fallback."""
    buckets: list[Dest] = []
    i = count = 0
    while len(buckets) < SH_TAB_SIZE:
        d = dests[i]
        buckets.append(d)
        count += 1
        if count >= d.weight:
            i, count = (i + 1) % len(dests), 0
    table = []
    for b, d in enumerate(buckets):
        if available(d):
            table.append(d)
        elif fallback:
            # ip_vs_sh_get_fallback(): try bucket (2*b + k) mod 256, k = 0..255
            alt = next((buckets[(2 * b + k) % SH_TAB_SIZE] for k in range(SH_TAB_SIZE)
                        if available(buckets[(2 * b + k) % SH_TAB_SIZE])), None)
            table.append(alt)
        else:
            table.append(None)
    return tuple(table)


def _mh_hash(dest: Dest, salt: bytes) -> int:
    import hashlib  # only mh needs it; most commands never do

    digest = hashlib.blake2b(dest.addr.packed + dest.port.to_bytes(2, "big"), digest_size=8,
                             key=salt).digest()
    return int.from_bytes(digest, "big")


def _mh_table(svc: Service, fallback: bool) -> tuple[Dest | None, ...]:
    """ip_vs_mh_permutate() + ip_vs_mh_populate() over last_weight."""
    dests = svc.dests
    g = 0
    for d in dests:
        if d.last_weight > 0:
            g = math.gcd(g, d.last_weight)
    if g < 1:
        return ()
    mw = max(d.last_weight for d in dests) // g
    rshift = max(0, mw.bit_length() - MH_TAB_BITS)
    setup = []
    for d in dests:
        offset = _mh_hash(d, b"ipvs2nft-mh-1") % MH_TAB_SIZE
        skip = _mh_hash(d, b"ipvs2nft-mh-2") % (MH_TAB_SIZE - 1) + 1
        turns = ((d.last_weight // g) >> rshift) or (1 if d.last_weight else 0)
        setup.append([offset, skip, turns])
    table: list[Dest | None] = [None] * MH_TAB_SIZE
    filled, i, dt = 0, 0, 0
    while filled < MH_TAB_SIZE:
        ds = setup[i]
        if ds[2] < 1:
            i = (i + 1) % len(dests)
            continue
        c = ds[0]
        while table[c] is not None:
            ds[0] = (ds[0] + ds[1]) % MH_TAB_SIZE
            c = ds[0]
        table[c] = dests[i]
        filled += 1
        dt += 1
        if dt >= ds[2]:
            dt, i = 0, (i + 1) % len(dests)
    out = []
    for s, d in enumerate(table):
        if d is not None and available(d):
            out.append(d)
        elif fallback:
            out.append(next((table[(s + k) % MH_TAB_SIZE] for k in range(1, MH_TAB_SIZE)
                             if available(table[(s + k) % MH_TAB_SIZE])), None))
        else:
            out.append(None)
    return tuple(out)
