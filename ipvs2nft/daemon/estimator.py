"""IPVS's rate estimator over the kernel's counters.

net/netfilter/ipvs/ip_vs_est.c (6.1): every 2 seconds, per service and real
server, the counters are copied (``kstats``, what ``-L --stats`` shows, so
listings lag by up to 2 s) and each rate is averaged with weight 1/4::

    rate = (now - last) << 9     (connections, packets: 2^10 scale, per 2 s)
    rate = (now - last) << 4     (bytes: 2^5 scale, per 2 s)
    avg += (rate - avg) >> 2

and read out rounded: ``(avg + 0x1FF) >> 10`` and ``(avg + 0xF) >> 5``.
``-Z`` restarts both from the current counters (ip_vs_zero_estimator).
"""

from __future__ import annotations

from dataclasses import dataclass, field

TICK = 2.0  # seconds
SHIFTS = (9, 9, 9, 4, 4)  # conns, inpkts, outpkts, inbytes, outbytes


@dataclass(slots=True)
class Estimate:
    """One service's or real server's counters and averages."""

    shown: list[int] = field(default_factory=lambda: [0] * 5)  # kstats - kstats0 at the last tick
    last: list[int] = field(default_factory=lambda: [0] * 5)  # counters at the last tick
    avg: list[int] = field(default_factory=lambda: [0] * 5)  # scaled averages
    base: list[int] = field(default_factory=lambda: [0] * 5)  # kstats0

    def tick(self, now: list[int]) -> list[int]:
        """Take the counters now; returns how much each grew since the last tick."""
        grown = [0] * 5
        for i in range(5):
            value = now[i]
            if value < self.last[i]:  # the kernel's counter went away (-Z deleted it)
                self.last[i] = self.base[i] = 0
            grown[i] = value - self.last[i]
            rate = grown[i] << SHIFTS[i]
            self.last[i] = value
            self.avg[i] += (rate - self.avg[i]) >> 2
            self.shown[i] = max(0, value - self.base[i])
        return grown

    def zero(self) -> None:
        """ip_vs_zero_stats + ip_vs_zero_estimator: listing and rates from 0."""
        self.base = list(self.last)
        self.shown = [0] * 5
        self.avg = [0] * 5

    def rates(self) -> list[int]:
        cps, inpps, outpps, inbps, outbps = self.avg
        return [(cps + 0x1FF) >> 10, (inpps + 0x1FF) >> 10, (outpps + 0x1FF) >> 10,
                (inbps + 0xF) >> 5, (outbps + 0xF) >> 5]

    def row(self) -> list[int]:
        """The ten numbers of listing.Stats: counters then rates."""
        return list(self.shown) + self.rates()


class Estimator:
    """Estimates by name (a service's sid, or readback.dest_tag)."""

    def __init__(self) -> None:
        self.services: dict[str, Estimate] = {}
        self.dests: dict[str, Estimate] = {}
        # /proc/net/ip_vs_stats (ip_vs_ctl.c tot_stats): what every service
        # counted, deleted ones included, until a -Z of every service
        self.totals = [0] * 5

    def tick(self, services: dict[str, list[int]], dests: dict[str, list[int]]) -> None:
        """A 2-second tick with the kernel's counters now.  Names that are
        gone (a service deleted) are forgotten; new ones start at their
        current counters, as a new service's estimator starts at zero."""
        for table, now in ((self.services, services), (self.dests, dests)):
            for name in list(table):
                if name not in now:
                    del table[name]
            for name, values in now.items():
                est = table.get(name)
                if est is None:
                    est = table[name] = Estimate()
                grown = est.tick(values)
                if table is self.services:
                    self.totals = [t + g for t, g in zip(self.totals, grown, strict=True)]

    def zero(self, sids: set[int]) -> None:
        """-Z of these services; of all of them (ipvsadm -Z alone:
        ip_vs_zero_all) also the totals."""
        if {int(name) for name in self.services} <= sids:
            self.totals = [0] * 5
        prefixes = {f"{sid}/" for sid in sids}
        for name, est in self.services.items():
            if int(name) in sids:
                est.zero()
        for name, est in self.dests.items():
            if any(name.startswith(p) for p in prefixes):
                est.zero()

    def answer(self) -> dict:
        """What ``stats`` returns to ipvsadm."""
        return {"services": {n: e.row() for n, e in self.services.items()},
                "dests": {n: e.row() for n, e in self.dests.items()}}
