"""The health checks of a keepalived configuration, running in an asyncio loop.

One task per checker.  Each probe is bounded by its timeout (probes.py) and
the next one is planned from when this one was *planned* to start, not from
when it ended: a probe that takes 300 ms does not push a 1 s ``delay_loop``
to 1.3 s, so 1,000 real servers checked every second stay on their grid
(bench/health.py measures how late probes start).  keepalived itself plans
TCP-style checks from the end of the previous one (``tcp_epilog()``) and
MISC_CHECK from its start (``misc_check_child_thread()``); the difference
is at most one probe's duration per cycle.  The first probe starts after a
random part of ``warmup`` (by default ``delay_loop``), as
``register_checkers_thread()`` spreads them.

The decisions are ``state.py``'s; every change of a virtual server's image
is applied to the table by ``apply`` (the daemon's ``mutate``: store lock,
one nftables transaction) -- changes of one event-loop turn go together.
Notify and quorum scripts run detached, as keepalived's ``notify_exec()``.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from ipvs2nft.health.feedback import FeedbackLoop
from ipvs2nft.health.probes import Outcome, Prober, client_context
from ipvs2nft.health.state import CheckerState, VirtualServerState
from ipvs2nft.keepalived.config import Configuration, MiscCheck

Apply = Callable[[list[VirtualServerState]], None]
RETRY_APPLY = 1.0  # seconds before a refused table change is tried again
STALL = 0.25  # a failed probe that ends this much after its timeout saw a busy loop, not the server
MAX_DISCARDS = 3  # such failures discarded in a row before they count anyway


@dataclass
class Lateness:
    """How late probes started against their plan (bench/health.py reads it)."""

    samples: list[float] = field(default_factory=list)
    probes: int = 0
    limit: int = 200_000

    def add(self, late: float) -> None:
        self.probes += 1
        if len(self.samples) < self.limit:
            self.samples.append(late)

    def summary(self) -> dict:
        if not self.samples:
            return {"probes": 0}
        ordered = sorted(self.samples)
        return {"probes": self.probes, "median": statistics.median(ordered),
                "p99": ordered[int(len(ordered) * 0.99)], "max": ordered[-1]}


def _log(text: str) -> None:
    sys.stderr.write(f"ipvs2nft daemon: keepalived: {text}\n")
    sys.stderr.flush()


class Engine:
    def __init__(self, cfg: Configuration, apply: Apply, log: Callable[[str], None] = _log,
                 remove: Apply | None = None) -> None:
        self.cfg = cfg
        self.apply = apply
        self.remove = remove
        self.log = log
        self.states = [VirtualServerState.build(vs) for vs in cfg.virtual_servers]
        self.prober = Prober(client_context(cfg))
        self.feedback = [FeedbackLoop(state, self.changed, log) for state in self.states
                         if state.cfg.feedback is not None]
        self.tasks: list[asyncio.Task] = []
        self.children: set[asyncio.Task] = set()
        self.lateness = Lateness()
        self._flush_pending = False
        self.running = True  # checkers end when this goes False, cancelled or not

    # ------------------------------------------------------------ life cycle
    def start(self) -> None:
        """init_services(), then one task per checker."""
        for state in self.states:
            state.start()
        self.apply(self.states)  # a refusal here stops the daemon: nothing was set up
        for state in self.states:
            state.changed = False
        for state in self.states:
            self.actions(state)
            for chk in state.checkers:
                self.tasks.append(asyncio.create_task(self.run(chk)))
        for loop in self.feedback:
            self.tasks.append(asyncio.create_task(loop.run(self.prober)))

    async def stop(self) -> None:
        """clear_services(): checks stop, the virtual servers go, omega notifiers run."""
        self.running = False
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for state in self.states:
            state.stop()
        if self.remove is not None:
            self.remove(self.states)
        for state in self.states:
            self.actions(state)
        self.prober.close()
        if self.children:
            await asyncio.wait(self.children, timeout=0.5)

    # ------------------------------------------------------------ checkers
    @staticmethod
    def stalled(chk: CheckerState, outcome: Outcome) -> bool:
        """A probe that failed well after its timeout: the loop was held (a
        table change, the daemon's drift check) when the deadline passed, so
        the failure may be ours, not the server's.  asyncio runs I/O
        callbacks before timers, so an answer that came in time still wins."""
        timeout = chk.cfg.connect_timeout if chk.cfg.has_connection else None
        return not outcome.ok and timeout is not None and outcome.seconds > timeout + STALL

    async def run(self, chk: CheckerState) -> None:
        loop = asyncio.get_running_loop()
        planned = loop.time() + random.uniform(0, chk.cfg.warmup or 0)
        discarded = 0
        while self.running:
            await asyncio.sleep(max(0.0, planned - loop.time()))
            started = loop.time()
            self.lateness.add(started - planned)
            try:
                outcome = await self.prober.run(chk.cfg, chk.server.cfg)
            except Exception as exc:  # noqa: BLE001 - a probe's bug must not stop its checker
                self.log(f"{chk.cfg.kind} on {chk.label}: {type(exc).__name__}: {exc}")
                outcome = Outcome(False, 0.0, status=None, why=str(exc))
            if self.stalled(chk, outcome) and discarded < MAX_DISCARDS:
                discarded += 1  # not believed: probe again at once
                planned = loop.time()
                continue
            discarded = 0
            if isinstance(chk.cfg, MiscCheck):
                delay = chk.vs.misc_epilog(chk, outcome.status, chk.cfg.dynamic)
            else:
                if outcome.ok:
                    chk.rtt = outcome.seconds
                elif chk.is_up and chk.cfg.log_all_failures:
                    self.log(f"{chk.cfg.kind} on {chk.label}: {outcome.why}")
                delay = chk.vs.epilog(chk, outcome.ok)
            self.changed(chk.vs)
            planned = max(planned + delay, loop.time())

    # ------------------------------------------------------------ applying
    def changed(self, state: VirtualServerState) -> None:
        """A state may have a new image or actions: apply them at the end of
        this loop turn, together with every other change of the turn."""
        if state.actions:
            self.actions(state)
        if state.changed and not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_pending = False
        pending = [s for s in self.states if s.changed]
        if not pending:
            return
        try:
            self.apply(pending)
        except Exception as exc:  # noqa: BLE001 - the kernel or the store refused: try again soon
            self.log(f"could not apply the checks' results ({type(exc).__name__}: {exc}); retrying")
            asyncio.get_running_loop().call_later(RETRY_APPLY, self.flush)
            return
        for state in pending:
            state.changed = False

    def actions(self, state: VirtualServerState) -> None:
        for action in state.take_actions():
            if action.kind == "log":
                self.log(action.text)
            elif action.argv:
                task = asyncio.get_event_loop().create_task(self._run_script(action.argv))
                self.children.add(task)
                task.add_done_callback(self.children.discard)

    async def _run_script(self, argv: list[str]) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                        start_new_session=True)
            await proc.wait()
        except OSError as exc:
            self.log(f"cannot run {argv[0]}: {exc.strerror}")

    # ------------------------------------------------------------ introspection
    def status(self) -> dict:
        out = {"lateness": self.lateness.summary(), "virtual_servers": []}
        for state in self.states:
            out["virtual_servers"].append({
                "name": state.cfg.name(), "quorum_up": state.quorum_up,
                "servers": {s.label: {"alive": s.alive, "weight": s.kernel_weight()} for s in state.servers}})
        return out

