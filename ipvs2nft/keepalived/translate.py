"""``ipvs2nft translate --from keepalived FILE``: the table keepalived would set
up at start, without a kernel.

At start keepalived puts every real server whose checkers are not in
``alpha`` mode into its service (init_service_rs(), ipwrapper.c): they
count as up until a check says otherwise; alpha servers wait for their
first good check, and a sorry server stands in when the quorum is not
met.  That start state is what this prints, as ``ipvsadm -S -n`` lines
(default) or as the nft script (``--to nft``).  The health checks
themselves need ``ipvs2nft daemon --keepalived``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from ipvs2nft.health.state import VirtualServerState
from ipvs2nft.keepalived import mapping
from ipvs2nft.keepalived.config import Configuration
from ipvs2nft.keepalived.lexer import ConfigError
from ipvs2nft.model import Table
from ipvs2nft.unsupported import Report


def start_table(cfg: Configuration) -> Table:
    """The services and real servers right after keepalived's init_services()."""
    table = Table()
    for vs in cfg.virtual_servers:
        state = VirtualServerState.build(vs)
        state.start()
        table = mapping.reconcile(table, vs, state.image)
    return table


def load(path: str):
    """(configuration, None) or (None, error line)."""
    from ipvs2nft.keepalived.parse import load as parse_file
    from ipvs2nft.keepalived.parse import loads

    try:
        if path == "-":  # standard input: includes are relative to the working directory
            return loads(sys.stdin.read(), name="<stdin>"), None
        return parse_file(path), None
    except ConfigError as exc:
        return None, str(exc)


def translate(path: str, target: str, report: Report, table_script: Callable[[Table, Report], str]) -> int:
    """Exit status: 0, 2 when the configuration is refused (one line, with
    file and line number, nothing on stdout), 3 with --strict and a loss.
    The notes and warnings name their file and line themselves."""
    from ipvs2nft.listing import save

    cfg, error = load(path)
    if cfg is None:
        sys.stderr.write(f"ipvs2nft: {error}\n")
        return 2
    for note in cfg.notes:
        report.note(note)
    for warning in cfg.warnings:
        report.warn(warning)
    table = start_table(cfg)
    if target == "ipvsadm":
        return report.finish(save(table, numeric=True))
    return report.finish(table_script(table, report))
