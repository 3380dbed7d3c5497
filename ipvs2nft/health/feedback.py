"""Feedback weights: the talk's weighted least response and weighted least
CPU load (slides 31-32), which neither IPVS nor keepalived has.

A virtual server with ``ipvs2nft_feedback response|load { }`` keeps its
scheduler (wrr, wlc...) and has its real servers' weights set from what
the daemon measures, every ``interval`` seconds:

* ``response``: the duration of each real server's last successful health
  probe (TCP handshake, whole HTTP exchange...), measured by its checkers;
* ``load``: the real server's load read over SNMP (``ipvs2nft_snmp { }``):
  UCD-SNMP-MIB ``laLoad.1`` (1-minute load average; ``capacity`` is the
  load that counts as fully busy, 1 by default -- set it to the number of
  CPUs) or HOST-RESOURCES-MIB ``hrProcessorLoad`` (percent, capacity 100).

Each measurement is smoothed (exponential moving average, ``smoothing``
the weight of the newest value); a server's factor is its share against
the best one -- fastest response, most idle CPU -- so the best server
keeps its configured weight and the others get proportionally less, never
below ``min_weight`` (the health checks, not the feedback, take servers
out).  A new weight is published only when it moves by more than
``deadband`` per cent, so measurement noise does not make weights flap
(and does not rewrite the slot tables every interval).

The SNMP client is pysnmp's asyncio API: measured against a real snmpd in
a namespace (README, feedback weights) it costs about 1 ms of CPU per GET
and never blocks the event loop on a dead agent; net-snmp's snmpget costs
a fork and about 6 ms per GET; easysnmp is cheaper per GET but blocks
(a thread per outstanding request) and needs a C build at set-up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ipvs2nft.health.state import ServerState, VirtualServerState
from ipvs2nft.keepalived.config import Feedback, SnmpSource

LA_LOAD_1 = "1.3.6.1.4.1.2021.10.1.3.1"  # UCD-SNMP-MIB::laLoad.1
HR_PROCESSOR_LOAD = "1.3.6.1.2.1.25.3.3.1.2"  # HOST-RESOURCES-MIB::hrProcessorLoad (a table, per CPU)


class SnmpUnavailable(Exception):
    """pysnmp is not installed."""


class SnmpClient:
    """GET and GETNEXT over SNMP v1/v2c with pysnmp's asyncio API."""

    def __init__(self) -> None:
        try:
            from pysnmp.hlapi.v3arch import asyncio as hlapi
        except ImportError:
            raise SnmpUnavailable("the load feedback needs pysnmp (make setup installs it; "
                                  "pip install 'ipvs2nft[snmp]')") from None
        self.hlapi = hlapi
        self.engine = hlapi.SnmpEngine()

    async def _target(self, src: SnmpSource, addr):
        kind = self.hlapi.UdpTransportTarget if addr.version == 4 else self.hlapi.Udp6TransportTarget
        return await kind.create((str(addr), src.port), timeout=src.timeout, retries=0)

    def _auth(self, src: SnmpSource):
        return self.hlapi.CommunityData(src.community, mpModel=0 if src.version == "1" else 1)

    async def load(self, src: SnmpSource, addr) -> float:
        """The load the source names, as a float; raises OSError when the agent does not answer."""
        h = self.hlapi
        target = await self._target(src, addr)
        if src.oid == "hrProcessorLoad":
            values = []
            rows = h.walk_cmd(self.engine, self._auth(src), target, h.ContextData(),
                              h.ObjectType(h.ObjectIdentity(HR_PROCESSOR_LOAD)), lexicographicMode=False)
            async for err, status, _, binds in rows:
                if err or status:
                    raise OSError(f"SNMP: {err or status.prettyPrint()}")
                values += [float(v) for _, v in binds]
            if not values:
                raise OSError("SNMP: no hrProcessorLoad rows")
            return sum(values) / len(values)
        oid = LA_LOAD_1 if src.oid == "laLoad" else src.oid.lstrip(".")
        err, status, _, binds = await h.get_cmd(self.engine, self._auth(src), target, h.ContextData(),
                                                h.ObjectType(h.ObjectIdentity(oid)))
        if err or status:
            raise OSError(f"SNMP: {err or status.prettyPrint()}")
        value = binds[0][1]
        try:
            return float(str(value))
        except ValueError:
            raise OSError(f"SNMP: {oid} is {value.prettyPrint()!r}, not a number") from None


def capacity(src: SnmpSource) -> float:
    if src.capacity:
        return src.capacity
    return 100.0 if src.oid == "hrProcessorLoad" else 1.0


def factors(scores: dict[ServerState, float]) -> dict[ServerState, float]:
    """Each server's share against the best score (higher is better)."""
    best = max(scores.values(), default=0.0)
    if best <= 0:
        return {s: 1.0 for s in scores}
    return {s: v / best for s, v in scores.items()}


class FeedbackLoop:
    """One virtual server's feedback weights."""

    def __init__(self, state: VirtualServerState, changed: Callable[[VirtualServerState], None],
                 log: Callable[[str], None]) -> None:
        self.state = state
        self.cfg: Feedback = state.cfg.feedback
        self.changed = changed
        self.log = log
        self.smoothed: dict[ServerState, float] = {}
        self.snmp: SnmpClient | None = None
        self.failing: set[ServerState] = set()

    async def run(self, prober) -> None:
        if self.cfg.method == "load":
            self.snmp = SnmpClient()
        while True:
            await asyncio.sleep(self.cfg.interval)
            measured = await (self.loads() if self.cfg.method == "load" else self.responses())
            self.update(measured)

    async def responses(self) -> dict[ServerState, float]:
        """Score = 1 / the last successful probe's duration."""
        out = {}
        for chk in self.state.checkers:
            if chk.rtt is not None and chk.server.alive:
                out[chk.server] = max(out.get(chk.server, 0.0), chk.rtt)
        return out

    async def loads(self) -> dict[ServerState, float]:
        servers = [s for s in self.state.servers if s.cfg.snmp is not None and s.alive]
        results = await asyncio.gather(*(self.snmp.load(s.cfg.snmp, s.cfg.snmp.address or s.cfg.addr)
                                         for s in servers), return_exceptions=True)
        out = {}
        for server, value in zip(servers, results, strict=True):
            if isinstance(value, Exception):
                if server not in self.failing:
                    self.log(f"load of {server.label}: {value}")
                    self.failing.add(server)
                continue
            self.failing.discard(server)
            out[server] = value
        return out

    def smooth(self, measured: dict[ServerState, float]) -> dict[ServerState, float]:
        a = self.cfg.smoothing
        for server, value in measured.items():
            old = self.smoothed.get(server)
            self.smoothed[server] = value if old is None else a * value + (1 - a) * old
        return {s: self.smoothed[s] for s in measured}

    def scores(self, measured: dict[ServerState, float]) -> dict[ServerState, float]:
        smoothed = self.smooth(measured)
        if self.cfg.method == "response":
            return {s: 1.0 / max(v, 1e-6) for s, v in smoothed.items()}
        return {s: max(0.0, 1.0 - v / capacity(s.cfg.snmp)) for s, v in smoothed.items()}

    def update(self, measured: dict[ServerState, float]) -> None:
        if not measured:
            return
        for server, factor in factors(self.scores(measured)).items():
            base = max(server.effective_weight, 0)
            if not base:
                continue
            floor = min(1.0, self.cfg.min_weight / base)
            factor = max(factor, floor)
            new, current = round(base * factor), server.kernel_weight()
            if current and abs(new - current) * 100 <= self.cfg.deadband * current:
                continue
            self.state.set_feedback(server, factor)
            self.log(f"feedback ({self.cfg.method}): weight of {server.label} in VS {self.state.cfg.name()} "
                     f"now {server.kernel_weight()}")
        self.changed(self.state)
