"""What each mutating ipvsadm command does to the table.

Shared by the ``ipvsadm`` CLI (which adds locking, the kernel and the store)
and by ``ipvs2nft translate`` and the tests (which work on a table in memory).
"""

from __future__ import annotations

from collections.abc import Callable

from ipvs2nft import ipvs
from ipvs2nft.ipvsadm.cmdline import Command
from ipvs2nft.model import ServiceKey, Table

Change = Callable[[Table], Table]


def mutation(cmd: Command) -> tuple[list[ServiceKey] | None, Change] | None:
    """(services touched -- None for all --, the change), or None for a
    command that does not change the table (listings, -Z, -h...)."""
    key = cmd.service.key
    name = cmd.name
    if name == "add-service":
        return [key], lambda t: ipvs.add_service(t, cmd.service)
    if name == "edit-service":
        return [key], lambda t: ipvs.edit_service(t, cmd.service)
    if name == "delete-service":
        return [key], lambda t: ipvs.delete_service(t, key)
    if name == "flush":
        return None, ipvs.flush
    if name == "add-server":
        return [key], lambda t: ipvs.add_dest(t, key, cmd.dest)
    if name == "edit-server":
        return [key], lambda t: ipvs.edit_dest(t, key, cmd.dest)
    if name == "delete-server":
        return [key], lambda t: ipvs.delete_dest(t, key, cmd.dest.key)
    if name == "set":
        return [], lambda t: ipvs.set_timeouts(t, cmd.timeouts)
    if name == "start-daemon":
        return None, lambda t: ipvs.start_daemon(t, cmd.daemon)
    if name == "stop-daemon":
        return [], lambda t: ipvs.stop_daemon(t, cmd.daemon.state)
    return None
