"""keepalived's health-check state machine, without I/O.

A transcription of what keepalived's checker process decides when a check
ends, so that a configuration behaves here as it does there:

* ``epilog()`` / ``misc_epilog()``: ``tcp_epilog()`` (keepalived/check/check_tcp.c;
  the HTTP, SMTP, DNS, UDP and PING checkers end the same way) and the
  result handling of ``misc_check_child_thread()`` (check_misc.c): retries
  at ``delay_before_retry``, a state change only after ``retry`` failures in
  a row, and -- ``validate_check_config()`` sets ``retry_it = retry`` at
  start -- one failure is enough before the first success;
* ``update_svr_checker_state()``, ``set_checker_state()``,
  ``perform_svr_state()``, ``update_quorum_state()``,
  ``perform_quorum_state()``, ``update_svr_wgt()``, ``init_service_vs()``
  and ``clear_service_vs()`` (keepalived/check/ipwrapper.c): a real server
  leaves the pool when a checker fails and comes back when all of them pass;
  the sum of the live weights against ``quorum`` ± ``hysteresis`` swaps the
  sorry server in and out;
* ``ipvs_cmd()`` (ipvswrapper.c): with ``inhibit_on_failure`` a removal is an
  edit to weight 0 and a later add an edit back.

What keepalived would send to IPVS is kept as an *image*: per virtual
server, the real servers that are in the kernel and their weights.  The
daemon makes the table match the images (``reconcile``); side effects
(notify scripts, log lines) are queued in ``VirtualServerState.actions``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ipvs2nft.keepalived.config import WEIGHT_LIMIT, Checker, HttpCheck, RealServer, VirtualServer

ADD, DEL, EDIT = "add", "del", "edit"


def real_weight(weight: int) -> int:
    """check_data.h real_weight()."""
    return max(0, min(weight, WEIGHT_LIMIT))


@dataclass
class Action:
    """Something the daemon does besides changing the table."""

    kind: str  # "log" | "run"
    text: str = ""
    argv: list[str] | None = None


@dataclass(eq=False)
class ServerState:
    """``real_server_t``'s run-time fields (also used for the sorry server)."""

    cfg: RealServer
    iweight: int
    effective_weight: int
    inhibit: bool
    alive: bool = False
    set: bool = False  # in the kernel (rs->set)
    num_failed: int = 0
    feedback: float = 1.0  # ipvs2nft's feedback factor (README: feedback weights)

    @property
    def key(self) -> tuple:
        return (self.cfg.addr, self.cfg.port)

    @property
    def label(self) -> str:
        host = f"[{self.cfg.addr}]" if self.cfg.addr.version == 6 else str(self.cfg.addr)
        return f"{host}:{self.cfg.port}"

    def kernel_weight(self) -> int:
        return real_weight(round(self.effective_weight * self.feedback)) if self.feedback != 1.0 \
            else real_weight(self.effective_weight)


@dataclass(eq=False)
class CheckerState:
    cfg: Checker
    server: ServerState
    vs: VirtualServerState
    is_up: bool = True
    has_run: bool = False
    retry_it: int = 0
    last_exit: int | None = None  # MISC_CHECK: the exit status weights came from
    rtt: float | None = None  # the last successful probe's duration (feedback)

    @property
    def label(self) -> str:
        port = self.cfg.connect_port or self.server.cfg.port
        addr = self.cfg.connect_ip or self.server.cfg.addr
        host = f"[{addr}]" if addr.version == 6 else str(addr)
        return f"{host}:{port}"


@dataclass(eq=False)
class VirtualServerState:
    cfg: VirtualServer
    servers: list[ServerState] = field(default_factory=list)
    sorry: ServerState | None = None
    checkers: list[CheckerState] = field(default_factory=list)
    quorum_up: bool = True
    image: dict[tuple, int] = field(default_factory=dict)  # (addr, port) -> weight in the kernel
    actions: list[Action] = field(default_factory=list)
    changed: bool = True  # image changed since the daemon last applied it

    # ------------------------------------------------------------ construction
    @classmethod
    def build(cls, cfg: VirtualServer) -> VirtualServerState:
        """The state after keepalived's validate_check_config()."""
        vs = cls(cfg)
        for rs in cfg.real_servers:
            server = ServerState(rs, rs.weight or 0, rs.weight or 0, bool(rs.inhibit))
            vs.servers.append(server)
            for chk in rs.checkers:
                state = CheckerState(chk, server, vs)
                if chk.alpha:
                    vs.set_checker_state(state, False)
                    server.alive = False
                state.retry_it = chk.retry or 0
                vs.checkers.append(state)
        if cfg.sorry is not None:
            vs.sorry = ServerState(cfg.sorry, 1, 1, cfg.sorry_inhibit)
        # set_quorum_states(): nothing is alive yet
        vs.quorum_up = vs.live_weight() >= cfg.quorum + cfg.hysteresis
        return vs

    def start(self) -> None:
        """init_service_vs(): the real servers in, the quorum, the inhibited sorry server."""
        for server in self.servers:
            if (not server.num_failed and not server.alive) or (server.inhibit and not server.set):
                self.ipvs_cmd(ADD, server)
                if not server.num_failed:
                    server.alive = True
        self.update_quorum_state(init=True)
        if self.sorry is not None and self.sorry.inhibit and not self.sorry.set:
            self.sorry.num_failed = 1  # added with weight 0
            self.ipvs_cmd(ADD, self.sorry)
            self.sorry.num_failed = 0

    def stop(self) -> None:
        """clear_service_vs(): everything out; with ``omega`` the down notifiers run."""
        if self.sorry is not None and self.sorry.set:
            self.sorry.inhibit, saved = False, self.sorry.inhibit
            self.ipvs_cmd(DEL, self.sorry)
            self.sorry.inhibit = saved
            self.sorry.alive = False
        for server in self.servers:
            if not server.set:
                continue
            server.inhibit, saved = False, server.inhibit
            self.ipvs_cmd(DEL, server)
            server.inhibit = saved
            if server.alive:
                server.alive = False
                if self.cfg.omega:
                    self.rs_notify(server)
        if self.quorum_up or self.cfg.omega:
            self.quorum_up = False
            if self.cfg.omega:
                self.vs_notify()

    # ------------------------------------------------------------ the kernel image
    def ipvs_cmd(self, cmd: str, server: ServerState) -> None:
        """ipvswrapper.c ipvs_cmd() for a real server, on the image."""
        weight = server.kernel_weight()
        if cmd == DEL and server.inhibit:
            cmd, weight = EDIT, 0
        elif cmd == ADD and server.inhibit and server.set:
            cmd = EDIT
        elif cmd == ADD and not server.set:
            server.set = True
            if server.inhibit and server.num_failed:
                weight = 0
        elif cmd == DEL and server.set:
            server.set = False
        if cmd == DEL:
            self.image.pop(server.key, None)
        else:
            self.image[server.key] = weight  # EDIT of a missing dest adds it (ipvs_talk)
        self.changed = True

    # ------------------------------------------------------------ weights and quorum
    def live_weight(self) -> int:
        return sum(real_weight(s.effective_weight) for s in self.servers if s.alive)

    def in_pool(self) -> bool:
        """Changes reach the kernel only with quorum or without a live sorry server."""
        return self.quorum_up or self.sorry is None or not self.sorry.alive

    def update_quorum_state(self, init: bool = False) -> None:
        weight_sum = self.live_weight()
        cfg = self.cfg
        threshold = cfg.quorum + (-1 if self.quorum_up else 1) * cfg.hysteresis
        if not self.quorum_up and weight_sum >= threshold:
            self.quorum_up = True
            self.log(f"{'Starting with quorum up' if init else 'Gained quorum'} {cfg.quorum}+{cfg.hysteresis}"
                     f"={threshold} <= {weight_sum} for VS {cfg.name()}")
            if self.sorry is not None and self.sorry.alive:
                self.log(f"{'Disabling' if self.sorry.inhibit else 'Removing'} sorry server "
                         f"{self.sorry.label} from VS {cfg.name()}")
                self.ipvs_cmd(DEL, self.sorry)
                self.sorry.alive = False
                self.perform_quorum_state(add=True)
            self.vs_notify()
        elif (self.quorum_up and (not weight_sum or weight_sum < threshold)) or \
                (init and not self.quorum_up and self.sorry is not None and not self.sorry.alive):
            self.quorum_up = False
            self.log(f"{'Starting with quorum down' if init else 'Lost quorum'} {cfg.quorum}-{cfg.hysteresis}"
                     f"={threshold} > {weight_sum} for VS {cfg.name()}")
            if self.sorry is not None and not self.sorry.alive:
                self.log(f"{'Enabling' if self.sorry.inhibit else 'Adding'} sorry server {self.sorry.label} "
                         f"to VS {cfg.name()}")
                self.perform_quorum_state(add=False)
                self.ipvs_cmd(ADD, self.sorry)
                self.sorry.alive = True
            self.vs_notify()

    def perform_quorum_state(self, add: bool) -> None:
        for server in self.servers:
            if server.alive:
                self.ipvs_cmd(ADD if add else DEL, server)

    def update_svr_wgt(self, weight: int, server: ServerState, update_quorum: bool = True) -> None:
        old = server.kernel_weight()
        server.effective_weight = weight
        if server.kernel_weight() != old:
            self.log(f"Changing weight from {old} to {server.kernel_weight()} for "
                     f"{'' if server.alive else 'in'}active service {server.label} of VS {self.cfg.name()}")
            if server.set and server.alive and self.in_pool():
                self.ipvs_cmd(EDIT, server)
            if update_quorum:
                self.update_quorum_state()

    def set_feedback(self, server: ServerState, factor: float) -> None:
        """ipvs2nft's feedback weights: a factor on the effective weight."""
        old = server.kernel_weight()
        server.feedback = factor
        if server.kernel_weight() != old and server.set and server.alive and self.in_pool():
            self.ipvs_cmd(EDIT, server)

    # ------------------------------------------------------------ servers up and down
    @staticmethod
    def set_checker_state(chk: CheckerState, up: bool) -> None:
        if chk.is_up == up:
            return
        chk.is_up = up
        if not up:
            chk.server.num_failed += 1
        elif chk.server.num_failed:
            chk.server.num_failed -= 1

    def update_svr_checker_state(self, chk: CheckerState, alive: bool) -> None:
        if chk.is_up == alive:
            if not chk.has_run:
                if chk.cfg.alpha or not alive:
                    self.rs_notify(chk.server)
                chk.has_run = True
            return
        chk.has_run = True
        if alive:
            if chk.server.num_failed <= 1:
                self.perform_svr_state(chk.server, True)
        elif chk.server.num_failed == 0:
            self.perform_svr_state(chk.server, False)
        self.set_checker_state(chk, alive)

    def perform_svr_state(self, server: ServerState, alive: bool) -> None:
        if server.alive == alive:
            return
        verb = ("Enabl" if server.inhibit else "Add") if alive else ("Disabl" if server.inhibit else "Remov")
        prep = "of" if server.inhibit else ("to" if alive else "from")
        self.log(f"{verb}ing service {server.label} {prep} VS {self.cfg.name()}")
        if self.in_pool():
            self.ipvs_cmd(ADD if alive else DEL, server)
        server.alive = alive
        self.rs_notify(server)
        self.update_quorum_state()

    # ------------------------------------------------------------ check results
    def epilog(self, chk: CheckerState, success: bool) -> float:
        """tcp_epilog(): the state after one probe; returns the delay to the next."""
        cfg = chk.cfg
        if success or chk.retry_it >= (cfg.retry or 0):
            delay = cfg.delay_loop
            chk.retry_it = 0
            if success and (not chk.is_up or not chk.has_run):
                self.log(f"{cfg.kind} on service {chk.label} succeeded.")
                self.update_svr_checker_state(chk, True)
            elif not success and (chk.is_up or not chk.has_run):
                after = f" after {cfg.retry} retries" if cfg.retry and chk.has_run else ""
                self.log(f"{cfg.kind} on service {chk.label} failed{after}.")
                self.update_svr_checker_state(chk, False)
        elif isinstance(cfg, HttpCheck) and not chk.is_up and chk.has_run:
            # timeout_epilog(): a server already known as dead is not retried
            delay = max(cfg.delay_before_retry, cfg.delay_loop)
        else:
            delay = cfg.delay_before_retry
            chk.retry_it += 1
        chk.has_run = True
        return delay

    def misc_epilog(self, chk: CheckerState, status: int | None, dynamic: bool) -> float:
        """misc_check_child_thread(): exit 0 up, 1 down, 2-255 up with weight
        status-2 under misc_dynamic; None is a script killed at misc_timeout."""
        cfg = chk.cfg
        ok = status == 0 or (dynamic and status is not None and 2 <= status <= 255)
        change: bool | None = None
        if ok:
            weight = status - 2 if status >= 2 else chk.server.iweight
            if status != chk.last_exit:
                self.update_svr_wgt(weight, chk.server)
                chk.last_exit = status
            if not chk.is_up or not chk.has_run:
                change = True
            chk.retry_it = 0
        elif chk.is_up or not chk.has_run:
            if chk.retry_it < (cfg.retry or 0):
                chk.retry_it += 1
            else:
                chk.retry_it = 0
                chk.last_exit = status
                change = False
        if change is not None:
            what = "succeeded" if change else \
                ("timed out" if status is None else f"failed (exited with status {status})")
            self.log(f"Misc check for [{chk.label} VS {self.cfg.name()}] by [{cfg.path[0]}] {what}.")
            self.update_svr_checker_state(chk, change)
        chk.has_run = True
        return cfg.delay_before_retry if chk.retry_it else cfg.delay_loop

    # ------------------------------------------------------------ side effects
    def rs_notify(self, server: ServerState) -> None:
        script = server.cfg.notify_up if server.alive else server.cfg.notify_down
        if script:
            self.actions.append(Action("run", argv=list(script)))

    def vs_notify(self) -> None:
        script = self.cfg.quorum_up if self.quorum_up else self.cfg.quorum_down
        if script:
            self.actions.append(Action("run", argv=list(script)))

    def log(self, text: str) -> None:
        self.actions.append(Action("log", text))

    def take_actions(self) -> list[Action]:
        out, self.actions = self.actions, []
        return out
