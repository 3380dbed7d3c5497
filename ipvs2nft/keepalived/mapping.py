"""keepalived virtual servers as the model's services, and back to the table.

A ``virtual_server`` is one IPVS service; a ``virtual_server group`` is one
per address (ranges expanded) and port of the group, plus one per fwmark,
all with the same real servers -- as keepalived's ``ipvs_group_cmd()``
(keepalived/check/ipvswrapper.c) creates them.  ``ipvs_set_srule()`` and
``ipvs_set_drule()`` give the fields: persistence timeout and granularity
set the persistent flag and netmask, a fwmark service's direct-routed or
tunnelled real servers have port 0, an address service's those of the
service.

``reconcile`` makes a table hold the services and real servers that the
health state machine's images say, through ``ipvs.py`` -- the same
operations ``ipvsadm`` uses, so every kernel rule of IPVS applies -- and
leaves alone real servers the configuration does not name.
"""

from __future__ import annotations

from ipvs2nft import ipvs
from ipvs2nft.keepalived.config import RealServer, VirtualServer
from ipvs2nft.model import (
    F_PERSISTENT,
    NETMASK_V4_HOST,
    Dest,
    Forward,
    Service,
    ServiceKey,
    Table,
)
from ipvs2nft.netaddr import AF_INET, AF_INET6, IPPROTO_TCP


def service_keys(vs: VirtualServer) -> list[ServiceKey]:
    """The IPVS services a virtual server stands for, in keepalived's order."""
    proto = vs.protocol or IPPROTO_TCP
    if vs.group is None:
        if vs.fwmark:
            return [ServiceKey(vs.af or AF_INET, vs.fwmark, 0, None, 0)]
        return [ServiceKey(vs.af, 0, vs.protocol, vs.addr, vs.port)]
    keys: list[ServiceKey] = []
    for entry in vs.group_entries:
        if entry.fwmark:
            keys.append(ServiceKey(entry.family or vs.af or AF_INET, entry.fwmark, 0, None, 0))
            continue
        af = AF_INET if entry.first.version == 4 else AF_INET6
        keys += [ServiceKey(af, 0, proto, addr, entry.port) for addr in entry.addresses()]
    return keys


def service(vs: VirtualServer, key: ServiceKey) -> Service:
    """ipvs_set_srule(): scheduler, flags, persistence."""
    flags = vs.flags
    timeout, netmask = 0, NETMASK_V4_HOST if key.af == AF_INET else 128
    if vs.persistence_timeout:
        flags |= F_PERSISTENT
        timeout = vs.persistence_timeout
        if vs.persistence_granularity is not None:
            netmask = vs.persistence_granularity
    return Service(af=key.af, protocol=key.protocol or IPPROTO_TCP, addr=key.addr, port=key.port,
                   fwmark=key.fwmark, scheduler=vs.scheduler, flags=flags, timeout=timeout, netmask=netmask,
                   pe_name=vs.persistence_engine if vs.persistence_timeout else "")


def dest(rs: RealServer, key: ServiceKey, weight: int) -> Dest:
    """ipvs_set_drule() plus ipvs_cmd()'s port rule."""
    port = rs.port
    if rs.fwd is not Forward.MASQ:
        port = 0 if key.fwmark else key.port
    return Dest(addr=rs.addr, port=port, fwd=rs.fwd or Forward.MASQ, weight=weight,
                u_threshold=rs.u_threshold, l_threshold=rs.l_threshold, tun_type=rs.tun_type,
                tun_port=rs.tun_port, tun_flags=rs.tun_flags)


def servers_by_key(vs: VirtualServer) -> dict[tuple, RealServer]:
    out = {(rs.addr, rs.port): rs for rs in vs.real_servers}
    if vs.sorry is not None:
        out[(vs.sorry.addr, vs.sorry.port)] = vs.sorry
    return out


def reconcile(table: Table, vs: VirtualServer, image: dict[tuple, int]) -> Table:
    """Make the services of ``vs`` exist with its settings and hold exactly
    the configured real servers ``image`` names, with its weights."""
    known = servers_by_key(vs)
    for key in service_keys(vs):
        want = service(vs, key)
        have = table.find(key)
        if have is None:
            table = ipvs.add_service(table, want)
        elif (have.scheduler, have.flags, have.timeout, have.netmask, have.pe_name) != \
                (want.scheduler, want.flags, want.timeout, want.netmask, want.pe_name):
            table = ipvs.edit_service(table, want)
        table = _dests(table, key, known, image)
    return table


def _dests(table: Table, key: ServiceKey, known: dict[tuple, RealServer], image: dict[tuple, int]) -> Table:
    svc = table.find(key)
    for rkey, rs in known.items():
        want = dest(rs, key, image[rkey]) if rkey in image else None
        probe = want or dest(rs, key, 0)
        have = svc.find_dest(probe.key)
        if want is None:
            if have is not None:
                table = ipvs.delete_dest(table, key, have.key)
        elif have is None:
            table = ipvs.add_dest(table, key, want)
        elif (have.weight, have.fwd, have.u_threshold, have.l_threshold) != \
                (want.weight, want.fwd, want.u_threshold, want.l_threshold):
            table = ipvs.edit_dest(table, key, want)
        svc = table.find(key)
    return table


def remove(table: Table, vs: VirtualServer) -> Table:
    """clear_service_vs(): the services go (keepalived deletes them at stop)."""
    for key in service_keys(vs):
        if table.find(key) is not None:
            table = ipvs.delete_service(table, key)
    return table
