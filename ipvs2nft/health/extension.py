"""``ipvs2nft daemon --keepalived FILE``: keepalived's virtual servers and
health checks as an extension of the daemon (daemon/main.py ``Extension``).

At start the configuration is read (an error refuses to start the daemon,
with keepalived's message, file and line), the services are set up as
keepalived's ``init_services()`` sets them up, and the checkers start in
the daemon's event loop (health/engine.py).  Every table change goes
through ``Daemon.mutate`` -- the store's lock, one nftables transaction,
the state file -- exactly like an ipvsadm command, so ``ipvsadm -L -n``
and ``-S`` show the services and the dynamic schedulers of the daemon
follow their real servers.  At SIGTERM the checks stop and the services
are removed, as keepalived's ``clear_services()`` removes its own.
"""

from __future__ import annotations

from ipvs2nft.daemon.main import DaemonError, Extension
from ipvs2nft.health.engine import Engine
from ipvs2nft.health.feedback import SnmpClient, SnmpUnavailable
from ipvs2nft.health.state import VirtualServerState
from ipvs2nft.keepalived import mapping
from ipvs2nft.keepalived.lexer import ConfigError
from ipvs2nft.model import Table


def _reconcile(states: list[VirtualServerState]):
    images = [(s.cfg, dict(s.image)) for s in states]

    def change(table: Table) -> Table:
        for vs, image in images:
            table = mapping.reconcile(table, vs, image)
        return table

    return change


def _removal(states: list[VirtualServerState]):
    def change(table: Table) -> Table:
        for state in states:
            table = mapping.remove(table, state.cfg)
        return table

    return change


class KeepalivedExtension(Extension):
    def __init__(self, path: str) -> None:
        self.path = path
        self.engine: Engine | None = None

    async def start(self, daemon) -> None:
        from ipvs2nft.daemon.main import _log
        from ipvs2nft.errors import IpvsadmError
        from ipvs2nft.keepalived.parse import load

        try:
            cfg = load(self.path)
        except ConfigError as exc:
            raise DaemonError(f"keepalived configuration refused: {exc}") from None
        for line in cfg.notes:
            _log(f"keepalived: note: {line}")
        for line in cfg.warnings:
            _log(f"keepalived: warning: {line}")
        if any(vs.feedback is not None and vs.feedback.method == "load" for vs in cfg.virtual_servers):
            try:
                SnmpClient()
            except SnmpUnavailable as exc:
                raise DaemonError(str(exc)) from None

        def apply(states: list[VirtualServerState]) -> None:
            keys = [k for s in states for k in mapping.service_keys(s.cfg)]
            daemon.mutate(keys, _reconcile(states))

        def remove(states: list[VirtualServerState]) -> None:
            keys = [k for s in states for k in mapping.service_keys(s.cfg)]
            daemon.mutate(keys, _removal(states))

        self.engine = Engine(cfg, apply, remove=remove)
        try:
            self.engine.start()
        except IpvsadmError as exc:
            raise DaemonError(f"keepalived virtual servers refused: {exc.message.strip()}") from None

    async def stop(self) -> None:
        if self.engine is not None:
            await self.engine.stop()


def extensions(args) -> list:
    """The keepalived extension the command line asks for (``--keepalived FILE``), if any."""
    path = getattr(args, "keepalived", None)
    return [KeepalivedExtension(path)] if path else []
