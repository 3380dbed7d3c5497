"""Hand the data plane its next choices: the ``dyn`` and ``lbl`` elements.

A managed service (dynsched.managed) picks with ``numgen inc mod K`` through
the ``dyn`` map: entry ``base + i`` names the fixed slot of a real server.
ipvsadm writes the whole map of a service when it writes the service (the
numgen counter then restarts at 0); from then on only this module changes
it, whenever the counts change what IPVS would choose next.  The numgen
counter has moved on meanwhile (it equals the packet counter of the same
rule, read over nfnetlink), so the new choices are written from that
position on, and only the entries that differ.

Every transaction deletes and re-adds the store's generation element: if
ipvsadm committed a newer table in between, the kernel refuses the whole
batch (ENOENT) and the caller reloads the store before trying again.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

from ipvs2nft import dynsched, sched
from ipvs2nft.model import Service
from ipvs2nft.nft import build, direct

_U32 = struct.Struct("=I").pack  # nft integer and mark registers hold host order


class StaleGeneration(Exception):
    """The kernel's table is newer (or other) than the model we computed from."""


@dataclass
class Published:
    """What was last written for one service: the ``dyn`` values by map
    position, the lblc/lblcr entries (destination address -> rid), and how
    many of the numgen rule's picks the counts already include."""

    dyn: list[int] | None = None
    lbl: dict = field(default_factory=dict)
    accounted: int | None = None
    states: dict = field(default_factory=dict)  # rr/wrr: numgen count -> state before that pick


class Publisher:
    def __init__(self, nfnl) -> None:
        self.nfnl = nfnl
        self.published: dict = {}  # ServiceKey -> Published

    def account(self, created: dict) -> None:
        """New connections the counts now include.  Only a service whose
        every new connection goes through its numgen rule can be accounted
        so (no persistence, no locality table in front of it)."""
        for key, count in created.items():
            record = self.published.get(key)
            if record is not None and record.accounted is not None:
                record.accounted += count

    def forget(self, keys=None) -> None:
        """The kernel's copy of these services (all, with None) is not ours
        any more: ipvsadm rewrote them, or the table was rebuilt."""
        if keys is None:
            self.published.clear()
        else:
            for key in keys:
                self.published.pop(key, None)

    def prime(self, services: list[Service]) -> None:
        """Learn what the kernel holds for these managed services -- their
        ``dyn`` entries and how far each numgen rule has counted -- in a few
        dumps, so that start-up writes only what differs from what ipvsadm
        (or an earlier daemon) left, not 10,000 services' maps."""
        from ipvs2nft.nft.nfnetlink import counter_packets

        wanted = {s.key: s for s in services if dynsched.managed(s) and s.sid}
        if not wanted:
            return
        counts: dict = {}
        values: dict = {}
        for family, table, name in (("inet", "ipvs2nft", "dyn"), ("ip", "ipvs2nft", "ddyn"),
                                    ("ip6", "ipvs2nft", "ddyn")):
            try:
                for chain, exprs in self.nfnl.table_rules(family, table):
                    names = [n for n, _ in exprs]
                    if "numgen" in names and "counter" in names:
                        counts[(family, chain)] = counter_packets(exprs[names.index("counter")][1])
                for e in self.nfnl.set_elements(family, table, name):
                    if e.data is not None:
                        slot = struct.unpack_from("=I", e.key)[0]
                        values[(family, slot)] = struct.unpack_from("=I", e.data)[0]
            except OSError:
                continue
        for key, svc in wanted.items():
            family, _, name = _dyn_map(svc)
            chain = direct.chain(svc) if direct.is_direct(svc) else build.svc_chain(svc)
            k = dynsched.prediction_length(svc)
            base = build.slot_base(svc)
            dyn = [values.get((family, base + i)) for i in range(k)]
            count = counts.get((family, chain))
            if count is None or None in dyn:
                continue  # not what we expect: written afresh by the first push
            self.published[key] = Published(dyn, self._kernel_lbl(svc), count)

    # ------------------------------------------------------------ reading
    def position(self, svc: Service) -> int:
        """How many connections the service's numgen rule has scheduled
        since it was written (its counter; numgen inc starts at 0)."""
        from ipvs2nft.nft.nfnetlink import counter_packets

        if direct.is_direct(svc):
            family, table = direct.table("6" if svc.af == socket.AF_INET6 else "4").split()
            chain = direct.chain(svc)
        else:
            family, table = build.TABLE.split()
            chain = build.svc_chain(svc)
        try:
            found = self.nfnl.rules(family, table, chain)
        except OSError:
            return 0
        for exprs in found:
            names = [name for name, _ in exprs]
            if "numgen" in names and "counter" in names:
                return counter_packets(exprs[names.index("counter")][1])
        return 0

    # ------------------------------------------------------------ writing
    def push(self, services: list[Service], live: dynsched.LiveState, generation: int) -> int:
        """Write what changed for these managed services, in one transaction.
        Returns the number of elements written."""
        from ipvs2nft.nft.nfnetlink import Batch

        batch = Batch("inet", "ipvs2nft")
        gen = _U32(generation)
        batch.delete("gen", gen)  # the guard: first, so that a stale batch fails as a whole
        batch.add("gen", gen)
        pending: dict = {}
        for svc in services:
            if not dynsched.managed(svc) or not svc.sid:
                continue
            record = self.published.get(svc.key)
            if record is None:
                record = Published(None, self._kernel_lbl(svc))
            states: list = []
            dyn, accounted = self._dyn(batch, svc, live, record, states)
            lbl = self._lbl(batch, svc, live, record)
            pending[svc.key] = Published(dyn, lbl, accounted, states=dict(states))
        written = len(batch) - 2
        if written:
            try:
                self.nfnl.commit(batch)
            except OSError as exc:
                raise StaleGeneration(str(exc)) from None
        self.published.update(pending)
        return written

    def _kernel_lbl(self, svc: Service) -> dict:
        """The lbl elements of this service's servers the kernel holds now
        (after a restart, or when ipvsadm rewrote the service)."""
        if svc.scheduler not in dynsched.LOCALITY:
            return {}
        from ipvs2nft.netaddr import address

        v6 = svc.af == socket.AF_INET6
        rids = {d.rid for d in svc.dests}
        alen = 16 if v6 else 4
        found = {}
        try:
            elements = self.nfnl.set_elements("inet", "ipvs2nft", "lbl6" if v6 else "lbl4")
        except OSError:
            return {}
        for e in elements:
            rid = struct.unpack_from("=I", e.key, alen)[0]
            if rid in rids:
                af = socket.AF_INET6 if v6 else socket.AF_INET
                found[address(socket.inet_ntop(af, e.key[:alen]))] = rid
        return found

    def _dyn(self, batch, svc: Service, live: dynsched.LiveState,
             record: Published, states: list) -> tuple[list[int], int]:
        """The ``dyn`` entries from the numgen rule's position on.  Picks
        the data plane already made but whose NEW events have not arrived
        yet (the counter runs ahead of the events) are counted as the
        connections they are -- on the servers the entries at those
        positions named -- so a burst does not see the same server twice
        where IPVS would not.

        When every connection since the last write was one this prediction
        foresaw (counted by their NEW events), the entries ahead already say
        what IPVS would choose: nothing is read or written."""
        if self._still_right(svc, live, record):
            return record.dyn, record.accounted
        count = self.position(svc)
        k = dynsched.prediction_length(svc)
        accounted = record.accounted
        if (accounted is None or accounted > count or svc.persistent or svc.scheduler in dynsched.LOCALITY
                or direct.is_direct(svc)):  # direct flows are polled, not reported one by one
            accounted = count
        if accounted < count and record.dyn is not None and len(record.dyn) == k:
            live = _with_picks(svc, live, [record.dyn[pos % k] - build.slot_base(svc)
                                          for pos in range(accounted, count)])
        sequence: list = []
        if sched.is_sequence(svc):  # rr/wrr with thresholds: where the walk stands now
            here = record.states.get(count)
            if here is None and record.states:
                here = record.states[max(record.states)]
            if here is not None:
                live = dynsched.LiveState(live.loads, live.localities, {**live.sched, svc.key: here})
        slots = dynsched.slots(svc, live, sequence)
        if not slots.dyn:  # no real server: the rule does not consult dyn (build.py), nothing to write
            return [], accounted
        if sequence:
            states.extend((count + i, st) for i, st in enumerate(sequence))
        k = len(slots.dyn)
        base = build.slot_base(svc)
        at = count % k
        wanted = [0] * k
        for i, j in enumerate(slots.dyn):
            wanted[(at + i) % k] = base + (j if j >= 0 else build.NO_SLOT)
        old = record.dyn if record.dyn is not None and len(record.dyn) == k else None
        where = _dyn_map(svc)
        for pos, value in enumerate(wanted):
            if old is not None and old[pos] == value:
                continue
            key = _U32(base + pos)
            batch.delete(where[2], key, family=where[0], table=where[1])
            batch.add(where[2], key, _U32(value), family=where[0], table=where[1])
        return wanted, accounted

    @staticmethod
    def _still_right(svc: Service, live: dynsched.LiveState, record: Published) -> bool:
        """Does the map, read from the position the NEW events account for,
        already hold the choices the counts lead to now?"""
        if (record.dyn is None or record.accounted is None or svc.persistent or direct.is_direct(svc)
                or svc.scheduler in dynsched.LOCALITY or sched.is_sequence(svc)):
            return False
        k = len(record.dyn)
        slots = dynsched.slots(svc, live)
        if len(slots.dyn) != k:
            return False
        base, at = build.slot_base(svc), record.accounted % k
        return all(record.dyn[(at + i) % k] == base + (j if j >= 0 else build.NO_SLOT)
                   for i, j in enumerate(slots.dyn))

    def _lbl(self, batch, svc: Service, live: dynsched.LiveState, record: Published) -> dict:
        """lblc/lblcr: per destination address the table knows, the server
        its next connection goes to (the ``lbl`` rules of the service's
        chain are tried before the prediction)."""
        if svc.scheduler not in dynsched.LOCALITY:
            return {}
        table = live.localities.get(svc.key)
        loads = live.loads.get(svc.key, {})
        wanted = {}
        for daddr in list(table.entries) if table is not None else []:
            pick = dynsched.predict(svc, loads, 1, daddr, table)[0]
            if pick is not None:
                wanted[daddr] = pick.rid
        name = "lbl6" if svc.af == socket.AF_INET6 else "lbl4"
        for daddr, rid in record.lbl.items():
            if wanted.get(daddr) != rid:
                batch.delete(name, daddr.packed + _U32(rid))
        for daddr, rid in wanted.items():
            if record.lbl.get(daddr) != rid:
                batch.add(name, daddr.packed + _U32(rid))
        return wanted


def _with_picks(svc: Service, live: dynsched.LiveState, slots: list[int]) -> dynsched.LiveState:
    """``live`` plus connections on the servers of these fixed slots."""
    loads = {k: v.copy() for k, v in live.loads.get(svc.key, {}).items()}
    active = dynsched.new_connection_is_active(svc)
    for j in slots:
        if 0 <= j < len(svc.dests):
            dest = svc.dests[j]
            dynsched.bind(dest, dynsched.load_of(loads, dest), active)
    return dynsched.LiveState({**live.loads, svc.key: loads}, live.localities, live.sched)


def _dyn_map(svc: Service) -> tuple[str, str, str]:
    """(family, table, map) holding the service's ``dyn`` entries."""
    if direct.is_direct(svc):
        family, table = direct.table("6" if svc.af == socket.AF_INET6 else "4").split()
        return family, table, "ddyn"
    return "inet", "ipvs2nft", "dyn"
