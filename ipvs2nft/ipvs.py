"""What the IPVS kernel code accepts or refuses, applied to the model.

Each operation checks everything first and then changes the table in place
(``Table`` explains why); on an error the table is untouched.  Back-end ids
are not IPVS's business: new services and real servers leave
here with ``sid``/``rid`` 0 and the store gives them ids when it commits.

ipvsadm validates some input itself and leaves the rest to the kernel
(``net/netfilter/ipvs/ip_vs_ctl.c``); its libipvs then turns the errno into a
message (``ipvs_strerror``).  Here the kernel is the ``Table``: each operation
returns the new table or raises ``KernelError`` with the message libipvs would
print, in the order the kernel checks things.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import replace

from ipvs2nft import host, sched
from ipvs2nft.errors import KernelError
from ipvs2nft.model import (
    NO_SCHEDULER,
    PERSISTENCE_ENGINES,
    SCHEDULERS,
    Dest,
    Forward,
    Service,
    ServiceKey,
    SyncDaemon,
    Table,
    Timeouts,
)
from ipvs2nft.netaddr import AF_INET, AF_INET6

# libipvs ipvs_strerror() texts
SERVICE_EXISTS = "Service already exists"
SCHED_NOT_FOUND = "Scheduler or persistence engine not found"
NO_SUCH_SERVICE = "No such service"
SERVICE_NOT_DEFINED = "Service not defined"
DEST_EXISTS = "Destination already exists"
NO_SUCH_DEST = "No such destination"
DAEMON_RUNNING = "Daemon has already run"
NO_DAEMON = "No daemon is running"
EINVAL_TEXT = "Invalid operation.  Possibly wrong module version, address not unicast, ..."
ERANGE_TEXT = os.strerror(34)  # "Numerical result out of range"
ENODEV_TEXT = os.strerror(19)  # "No such device"

def _with_dests(svc: Service, dests: tuple[Dest, ...], state=None, sid: int | None = None) -> Service:
    """svc with other real servers (and scheduler state, sid): a positional
    copy, several times cheaper than dataclasses.replace on a -R of 40,000 lines."""
    return Service(svc.af, svc.protocol, svc.addr, svc.port, svc.fwmark, svc.scheduler, svc.flags,
                   svc.timeout, svc.netmask, svc.pe_name, dests, svc.sid if sid is None else sid,
                   svc.sched if state is None else state, svc.plan)


def _put(table: Table, svc: Service) -> Table:
    table.put(svc)
    return table


def _check_scheduler(svc: Service) -> None:
    if svc.scheduler != NO_SCHEDULER and svc.scheduler not in SCHEDULERS:
        raise KernelError(SCHED_NOT_FOUND)
    if svc.pe_name and svc.pe_name not in PERSISTENCE_ENGINES:
        raise KernelError(SCHED_NOT_FOUND)


def add_service(table: Table, svc: Service) -> Table:
    """``-A``: the identity must be new; then scheduler and pe must exist."""
    if table.find(svc.key) is not None:
        raise KernelError(SERVICE_EXISTS)
    _check_scheduler(svc)
    new = _with_dests(svc, (), sid=0)
    table.put(_with_dests(new, (), sched.on_init(new), sid=0))
    return table


def edit_service(table: Table, svc: Service) -> Table:
    """``-E``: a full replacement of scheduler, flags, timeout, netmask and pe."""
    old = table.find(svc.key)
    if old is None:
        raise KernelError(NO_SUCH_SERVICE)
    _check_scheduler(svc)
    new = replace(
        old,
        scheduler=svc.scheduler,
        flags=svc.flags,
        timeout=svc.timeout,
        netmask=svc.netmask,
        pe_name=svc.pe_name,
    )
    if new.scheduler != old.scheduler:  # ip_vs_edit_service binds the new scheduler afresh
        new = replace(new, sched=sched.on_init(new))
    return _put(table, new)


def delete_service(table: Table, key: ServiceKey) -> Table:
    """``-D``."""
    old = table.find(key)
    if old is None:
        raise KernelError(NO_SUCH_SERVICE)
    table.remove(key)
    return table


def flush(table: Table) -> Table:
    """``-C``: every service goes; timeouts and sync daemons stay."""
    table.index.clear()
    return table


def check_zero(table: Table, key: ServiceKey | None) -> None:
    """``-Z [service]``: only the existence check is a kernel matter."""
    if key is not None and table.find(key) is None:
        raise KernelError(NO_SUCH_SERVICE)


def _mixed_family(svc: Service, dest: Dest) -> bool:
    return dest.af != svc.af


def _check_dest_family(table: Table, svc: Service, dest: Dest) -> None:
    # ip_vs_genl_set_cmd: a dest of another family is only for tunnels, and
    # never while a sync daemon runs (the sync protocol cannot carry it).
    if _mixed_family(svc, dest):
        if table.daemons or dest.fwd is not Forward.TUNNEL:
            raise KernelError(EINVAL_TEXT)


def _check_thresholds(dest: Dest) -> None:
    if dest.weight < 0 or dest.l_threshold > dest.u_threshold:
        raise KernelError(ERANGE_TEXT)


def add_dest(table: Table, key: ServiceKey, dest: Dest) -> Table:
    """``-a``: new real servers go to the head of the list, as the kernel's."""
    svc = table.find(key)
    if svc is None:
        raise KernelError(SERVICE_NOT_DEFINED)
    _check_dest_family(table, svc, dest)
    _check_thresholds(dest)
    if svc.find_dest(dest.key) is not None:
        raise KernelError(DEST_EXISTS)
    if not dest_address_usable(dest.addr):
        raise KernelError(EINVAL_TEXT)
    if dest.rid or dest.last_weight != dest.weight:
        dest = replace(dest, rid=0, last_weight=dest.weight)
    dests = (dest,) + svc.dests
    state = sched.on_add(_with_dests(svc, dests), svc.sched) if svc.scheduler == "wrr" else svc.sched
    return _put(table, _with_dests(svc, dests, state))


def edit_dest(table: Table, key: ServiceKey, dest: Dest) -> Table:
    """``-e``: a full replacement of forward method, weight, thresholds, tunnel."""
    svc = table.find(key)
    if svc is None:
        raise KernelError(SERVICE_NOT_DEFINED)
    _check_dest_family(table, svc, dest)
    _check_thresholds(dest)
    old = svc.find_dest(dest.key)
    if old is None:
        raise KernelError(NO_SUCH_DEST)
    # __ip_vs_update_dest keeps the latest non-zero weight for mh
    last = dest.weight if dest.weight != 0 else old.last_weight
    new_dest = replace(dest, rid=old.rid, last_weight=last)
    new_svc = replace(svc, dests=tuple(new_dest if d is old else d for d in svc.dests))
    new_svc = replace(new_svc, sched=sched.on_update(new_svc, svc.sched))
    return _put(table, new_svc)


def delete_dest(table: Table, key: ServiceKey, dest_key: tuple) -> Table:
    """``-d``."""
    svc = table.find(key)
    if svc is None:
        raise KernelError(SERVICE_NOT_DEFINED)
    old = svc.find_dest(dest_key)
    if old is None:
        raise KernelError(NO_SUCH_DEST)
    new_svc = replace(svc, dests=tuple(d for d in svc.dests if d is not old))
    new_svc = replace(new_svc, sched=sched.on_delete(svc, new_svc, old.key, svc.sched))
    return _put(table, new_svc)


def set_timeouts(table: Table, wanted: Timeouts) -> Table:
    """``--set``: zero keeps the current value."""
    cur = table.timeouts
    table.timeouts = Timeouts(tcp=wanted.tcp or cur.tcp, tcpfin=wanted.tcpfin or cur.tcpfin,
                              udp=wanted.udp or cur.udp)
    return table


def start_daemon(table: Table, daemon: SyncDaemon) -> Table:
    """``--start-daemon``: one master and one backup at most.

    Fills in what the kernel's start_sync_thread() fills in, so ``-L --daemon``
    shows the same: group 224.0.0.81, port 8848, ttl 1 and the message size
    derived from the interface MTU.
    """
    # Order of ip_vs_genl_new_daemon() and start_sync_thread(): mixed
    # families, then the interface, then "already running", then sockets.
    if any(d.af != s.af for s in table.services for d in s.dests):
        raise KernelError(EINVAL_TEXT)
    mtu = host.interface_mtu(daemon.mcast_ifn)
    if mtu is None:
        raise KernelError(ENODEV_TEXT)
    if table.daemon(daemon.state) is not None:
        raise KernelError(DAEMON_RUNNING)
    mcast_af = daemon.mcast_af or AF_INET
    group = daemon.mcast_group or "224.0.0.81"
    header = 40 + 8 if mcast_af == AF_INET6 else 20 + 8
    # start_sync_thread(): a given size is clamped to [1024 (backup) or 1,
    # 65535 - headers]; the default follows the MTU (a master uses 1500).
    if daemon.state == "backup":
        mtu, min_len = max(1500, min(mtu, 65535)), 1024
    else:
        mtu, min_len = 1500, 1
    maxlen = daemon.sync_maxlen
    maxlen = min(max(maxlen, min_len), 65535 - header) if maxlen else mtu - header
    started = replace(
        daemon,
        mcast_af=mcast_af,
        mcast_group=group,
        mcast_port=daemon.mcast_port or 8848,
        mcast_ttl=daemon.mcast_ttl or 1,
        sync_maxlen=maxlen,
    )
    failure = host.sync_socket_error(started.state, started.mcast_ifn, started.mcast_af,
                                     started.mcast_group, started.mcast_port, started.mcast_ttl)
    if failure is not None:
        raise KernelError(os.strerror(failure))
    table.daemons = tuple(sorted(table.daemons + (started,), key=lambda d: d.state != "master"))
    return table


def stop_daemon(table: Table, state: str) -> Table:
    """``--stop-daemon``."""
    if table.daemon(state) is None:
        raise KernelError(NO_DAEMON)
    table.daemons = tuple(d for d in table.daemons if d.state != state)
    return table


def dest_address_usable(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """The kernel's real-server address test (ip_vs_new_dest).

    IPv4: inet_addr_type() must say LOCAL or UNICAST, so 0.0.0.0,
    255.255.255.255, multicast and the broadcast addresses of this
    namespace's interfaces are refused (0.0.0.1 and 240.0.0.1 pass on 6.1).
    IPv6: ipv6_addr_type() must say unicast (not ::, multicast or
    IPv4-mapped) and not link-local, unless the address is local.
    """
    if addr.version == 4:
        if int(addr) in (0, 0xFFFFFFFF) or addr.is_multicast:
            return False
        return str(addr) not in host.local_broadcasts()
    if addr.is_unspecified or addr.is_multicast or addr.ipv4_mapped is not None:
        return False
    if addr.is_link_local:
        return host.is_local_v6(addr)
    return True
