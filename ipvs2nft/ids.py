"""The back-end ids of services and real servers.

``sid`` names a service's chains (``svc_<sid>``) and its block of scheduler
slots (``sid * 65536 ...``), so it is small and reused: the smallest free
one.  ``rid`` names a real server's chains and keys (``rs_<rid>``,
persistence entries, direct-routed flows), so it is never given to another
server while entries may remember it: the next one, wrapping at 2^32.  The
one exception is IPVS's own: a real server removed and added back to the
same service while its connections live is the same server again (the
kernel takes it out of its "trash", ip_vs_trash_get_dest), so it gets its
old rid back (``reuse``, store.py keeps the removed ones).  Neither id is
IPVS's business (ipvs.py leaves them 0); the store gives them when it
commits a table, and ``ipvs2nft translate`` gives them the same way
without a store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from ipvs2nft.errors import StoreError
from ipvs2nft.model import Dest, Service, Table

MAX_SID = 65535  # a sid's slot block must fit meta priority with the rid key bit clear
MAX_RID = 0xFFFFFFFF


def assign(table: Table, next_rid: int = 1,
           used_elsewhere: Callable[[], Iterable[int]] = tuple,
           reuse: Callable[[Service, Dest], int | None] = lambda svc, dest: None) -> tuple[Table, int]:
    """``table`` with ids for what has none yet (sid or rid 0), and the next
    rid.  ``used_elsewhere()``: sids taken by services not in ``table`` (a
    partial read of the store); asked only when a new service needs a sid.
    ``reuse(svc, dest)``: the rid a new real server had before it was
    removed, if it is to get it back."""
    if all(s.sid and all(d.rid for d in s.dests) for s in table.services):
        return table, next_rid
    free: Iterator[int] | None = None
    services = []
    for svc in table.services:
        if svc.sid and all(d.rid for d in svc.dests):
            services.append(svc)
            continue
        if not svc.sid and free is None:
            free = _free_sids(table, used_elsewhere)
        sid = svc.sid or next(free, None)
        if sid is None:
            raise StoreError(f"ipvs2nft: more than {MAX_SID} virtual services")
        dests = []
        for d in svc.dests:
            if not d.rid:
                rid = reuse(svc, d)
                if rid is None:
                    rid, next_rid = next_rid, next_rid % MAX_RID + 1
                d = Dest(d.addr, d.port, d.fwd, d.weight, d.u_threshold, d.l_threshold,
                         d.tun_type, d.tun_port, d.tun_flags, rid, d.last_weight)
            dests.append(d)
        # positional: several times cheaper than dataclasses.replace on a big -R
        services.append(Service(svc.af, svc.protocol, svc.addr, svc.port, svc.fwmark, svc.scheduler,
                                svc.flags, svc.timeout, svc.netmask, svc.pe_name, tuple(dests), sid,
                                svc.sched, svc.plan))
    return Table(services, table.timeouts, table.daemons, table.snat), next_rid


def _free_sids(table: Table, used_elsewhere: Callable[[], Iterable[int]]) -> Iterator[int]:
    used = set(used_elsewhere())
    used.update(s.sid for s in table.services if s.sid)
    return (sid for sid in range(1, MAX_SID + 1) if sid not in used)
