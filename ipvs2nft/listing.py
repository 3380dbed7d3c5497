"""ipvsadm's listings, byte for byte: ``-L`` in all its variants, ``-S``,
``--timeout``, ``--daemon`` and ``-c``.

Pure functions of the model plus counters.  The format strings are ipvsadm
1.31's (``print_title``, ``print_service_entry``, ``print_largenum``,
``list_timeout``, ``list_daemon``, ``list_conn`` in ipvsadm.c), including
their trailing blanks and their truncations (IPv4 service names at 33
characters, real-server names at 28).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ipvs2nft.ipvsadm.cmdline import Format
from ipvs2nft.model import F_SCHED1, F_SCHED2, F_SCHED3, F_SCHED_MASK, Dest, Forward, Service, Table, TunType
from ipvs2nft.netaddr import AF_INET, AF_INET6, addrport

VERSION_HEADER = "IP Virtual Server version 1.2.1 (size=4096)\n"
PROTOCOL_NAMES = {6: "TCP", 17: "UDP", 132: "SCTP"}
PROTOCOL_SWITCHES = {6: "-t", 17: "-u", 132: "--sctp-service"}
TUNNEL_FLAG_NAMES = ("-c", "+c", "r+c")
TUNNEL_FLAG_SWITCHES = ("--tun-nocsum", "--tun-csum", "--tun-remcsum")


@dataclass(frozen=True, slots=True)
class Stats:
    """IPVS counters and rate estimates of a service or a real server."""

    conns: int = 0
    inpkts: int = 0
    outpkts: int = 0
    inbytes: int = 0
    outbytes: int = 0
    cps: int = 0
    inpps: int = 0
    outpps: int = 0
    inbps: int = 0
    outbps: int = 0


@dataclass(frozen=True, slots=True)
class DestConns:
    """Connection counts of a real server (ActiveConn, InActConn, PersistConn)."""

    active: int = 0
    inactive: int = 0
    persistent: int = 0


_NO_STATS, _NO_CONNS = Stats(), DestConns()  # frozen: one of each serves every row
_IDLE = f" {0:<10d} {0:<10d}"  # ActiveConn and InActConn of a plain -L line, both 0
_LISTING_NAME = {f: f.listing_name for f in Forward}  # an Enum property costs a call per line


class Counters:
    """What the data plane counted; all zero here.  Back ends subclass it."""

    def service(self, svc: Service) -> Stats:
        return _NO_STATS

    def dest(self, svc: Service, dest: Dest) -> Stats:
        return _NO_STATS

    def conns(self, svc: Service, dest: Dest) -> DestConns:
        return _NO_CONNS

    def idle(self, svc: Service) -> bool:
        """True when ``conns`` is all zero for every real server of ``svc``."""
        return True


ZERO = Counters()


# ---------------------------------------------------------------- sorting

def _s32(value: int) -> int:
    """An unsigned 32-bit difference read back as a C int."""
    value &= 0xFFFFFFFF
    return value - 0x100000000 if value & 0x80000000 else value


def _words(addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> tuple[int, int, int, int]:
    """The address as libipvs holds it: union nf_inet_addr, four host-order words."""
    if addr is None:
        return (0, 0, 0, 0)
    if addr.version == 4:
        return (int(addr), 0, 0, 0)
    v = int(addr)
    return (v >> 96, (v >> 64) & 0xFFFFFFFF, (v >> 32) & 0xFFFFFFFF, v & 0xFFFFFFFF)


def _cmp_addr(af: int, a: tuple, b: tuple) -> int:
    if af == AF_INET6:
        for x, y in zip(a, b, strict=True):
            r = _s32(x - y)
            if r:
                return r
        return 0
    return _s32(a[0] - b[0])


def _service_sort_key(svc: Service) -> tuple:
    return (svc.fwmark, svc.af, svc.protocol, _words(svc.addr), svc.port)


def cmp_services(a: Service, b: Service) -> int:
    """libipvs ipvs_cmp_services(), with its u32 wrap-around subtractions."""
    ka, kb = _service_sort_key(a), _service_sort_key(b)
    return (_s32(ka[0] - kb[0]) or ka[1] - kb[1] or ka[2] - kb[2]
            or _cmp_addr(a.af, ka[3], kb[3]) or ka[4] - kb[4])


def cmp_dests(a: Dest, b: Dest) -> int:
    """libipvs ipvs_cmp_dests(): the family of ``a`` decides the compare."""
    return _cmp_addr(a.af, _words(a.addr), _words(b.addr)) or a.port - b.port


def msort(items: list, cmp: Callable[[object, object], int]) -> list:
    """glibc qsort(): a stable top-down merge sort (msort_with_tmp)."""
    if len(items) <= 1:
        return list(items)
    half = len(items) // 2
    left, right = msort(items[:half], cmp), msort(items[half:], cmp)
    out, i, j = [], 0, 0
    while i < len(left) and j < len(right):
        if cmp(left[i], right[j]) <= 0:
            out.append(left[i])
            i += 1
        else:
            out.append(right[j])
            j += 1
    out.extend(left[i:])
    out.extend(right[j:])
    return out


def _spread_ok(values: Iterable[int]) -> bool:
    """True if wrap-around subtraction orders these values like plain ints."""
    values = list(values)
    return not values or max(values) - min(values) < 0x80000000


SVC_TAB_MASK = 0xFF  # IP_VS_SVC_TAB_BITS 8
# The kernel mixes a per-boot pointer (ipvs >> 8) into its service hashes;
# it only permutes buckets, and 0 stands for it here.
HASH_SEED = 0


def _svc_bucket(svc: Service) -> int:
    """ip_vs_svc_hashkey() / ip_vs_svc_fwm_hashkey()."""
    if svc.fwmark:
        return (HASH_SEED ^ svc.fwmark) & SVC_TAB_MASK
    w = _words(svc.addr)
    fold = w[0] ^ w[1] ^ w[2] ^ w[3] if svc.af == AF_INET6 else w[0]
    return (svc.protocol ^ fold ^ HASH_SEED ^ (svc.port >> 8) ^ svc.port) & SVC_TAB_MASK


def kernel_order(services: Iterable[Service]) -> list[Service]:
    """The order IPVS hands services to ipvsadm: the address table, then the
    fwmark table, each bucket by bucket, newest first inside a bucket (the
    kernel adds at the head).  It is what ``--nosort`` prints, and the input
    of the sort, which matters where ipvsadm's comparator wraps around."""
    items = list(services)
    newest_first = list(reversed(items))
    return sorted(newest_first, key=lambda s: (bool(s.fwmark), _svc_bucket(s)))


def sort_services(services: Iterable[Service]) -> list[Service]:
    """ipvsadm's service order.  When every wrapped compare agrees with the
    plain one (all keys inside one 2^31 window), a key sort gives the same
    result much faster; otherwise the comparator is not transitive and only
    the same merge sort over the kernel's order reproduces ipvsadm's.  (No
    two services have the same key, so the key sort needs no input order.)"""
    items = list(services)
    keys = [_service_sort_key(s) for s in items]
    v4 = [k[3][0] for k, s in zip(keys, items, strict=True) if s.af == AF_INET]
    v6 = [k[3] for k, s in zip(keys, items, strict=True) if s.af == AF_INET6]
    if _spread_ok(k[0] for k in keys) and _spread_ok(v4) and all(
        _spread_ok(w[i] for w in v6) for i in range(4)
    ):
        return [items[i] for i in sorted(range(len(items)), key=keys.__getitem__)]
    return msort(kernel_order(items), cmp_services)


def sort_dests(dests: Iterable[Dest]) -> list[Dest]:
    items = list(dests)
    if len(items) < 2:
        return items
    if all(type(d.addr) is ipaddress.IPv4Address for d in items):  # the usual case: the key sort, short
        numbers = [int(d.addr) for d in items]
        if max(numbers) - min(numbers) < 0x80000000:
            keys = [n << 16 | d.port for n, d in zip(numbers, items, strict=True)]  # (addr, port), one int
            return [items[i] for i in sorted(range(len(items)), key=keys.__getitem__)]
    families = {d.af for d in items}
    words = [_words(d.addr) for d in items]
    if len(families) <= 1 and all(_spread_ok(w[i] for w in words) for i in range(4)):
        return [d for _, d in sorted(zip(words, items, strict=True), key=lambda p: (p[0], p[1].port))]
    return msort(items, cmp_dests)


# ---------------------------------------------------------------- formats

def largenum(value: int, exact: bool) -> str:
    """print_largenum(): 9 columns, 1000-based units from 10^8 on."""
    if exact:
        digits = len(str(value))
        return f"{value:{9 if digits <= 8 else digits + 1}d}"
    if value < 100_000_000:
        return f"{value:9d}"
    if value < 1_000_000_000:
        return f"{value // 1000:8d}K"
    if value < 100_000_000_000:
        return f"{value // 1_000_000:8d}M"
    if value < 100_000_000_000_000:
        return f"{value // 1_000_000_000:8d}G"
    return f"{value // 1_000_000_000_000:8d}T"


def _c_int(value: int) -> int:
    """printf("%d") of an unsigned 32-bit value (Debian prints fwmarks so)."""
    return _s32(value)


def sched_flag_names(svc: Service) -> str:
    """print_sched_flags(): names depend on the scheduler; bit 0x20 has none on sh/mh."""
    names = []
    if svc.scheduler in ("sh", "mh"):
        if svc.flags & F_SCHED1:
            names.append(f"{svc.scheduler}-fallback")
        if svc.flags & F_SCHED2:
            names.append(f"{svc.scheduler}-port")
    else:
        for bit, name in ((F_SCHED1, "flag-1"), (F_SCHED2, "flag-2"), (F_SCHED3, "flag-3")):
            if svc.flags & bit:
                names.append(name)
    return ",".join(names)


def service_name(svc: Service, numeric: bool, rule: bool) -> str:
    """svc_name of print_service_entry()."""
    if svc.fwmark:
        mark = _c_int(svc.fwmark)
        if rule:
            return f"-f {mark} -6" if svc.af == AF_INET6 else f"-f {mark}"
        return f"FWM  {mark} IPv6" if svc.af == AF_INET6 else f"FWM  {mark}"
    vname = addrport(svc.addr, svc.port, svc.protocol, numeric)
    if rule:
        return f"{PROTOCOL_SWITCHES.get(svc.protocol, '--xxx-service')} {vname}"
    name = f"{PROTOCOL_NAMES.get(svc.protocol, '?'):<4} {vname}"
    return name if svc.af == AF_INET6 else name[:33]


def _persistence_suffix(svc: Service, rule: bool) -> str:
    if not svc.persistent:
        return ""
    text = f" -p {svc.timeout}" if rule else f" persistent {svc.timeout}"
    mask_word = " -M" if rule else " mask"
    if svc.af == AF_INET and svc.netmask != 0xFFFFFFFF:
        text += f"{mask_word} {ipaddress.IPv4Address(svc.netmask)}"
    elif svc.af == AF_INET6 and svc.netmask != 128:
        text += f"{mask_word} {svc.netmask}"
    return text


def service_line(svc: Service, fmt: Format, rule: bool, counters: Counters) -> str:
    name = service_name(svc, fmt.numeric, rule)
    if rule:
        line = f"-A {name} -s {svc.scheduler}{_persistence_suffix(svc, True)}"
        if svc.pe_name:
            line += f" --pe {svc.pe_name}"
        if svc.onepacket:
            line += " -o"
        if svc.flags & F_SCHED_MASK:
            line += f" -b {sched_flag_names(svc)}"
        return line
    if fmt.stats or fmt.rate:
        s = counters.service(svc)
        values = ((s.conns, s.inpkts, s.outpkts, s.inbytes, s.outbytes) if fmt.stats
                  else (s.cps, s.inpps, s.outpps, s.inbps, s.outbps))
        return f"{name:<33}" + "".join(largenum(v, fmt.exact) for v in values)
    line = f"{name} {svc.scheduler}"
    if svc.flags & F_SCHED_MASK:
        line += f" ({sched_flag_names(svc)})"
    line += _persistence_suffix(svc, False)
    if svc.persistent and svc.pe_name:
        line += f" pe {svc.pe_name}"
    if svc.onepacket:
        line += " ops"
    return line


def tunnel_info(dest: Dest) -> str:
    """fwd_tun_info(), or n/a."""
    if dest.fwd is not Forward.TUNNEL:
        return "n/a"
    if dest.tun_type is TunType.IPIP:
        return "ipip"
    if dest.tun_type is TunType.GUE:
        return f"gue:{dest.tun_port}:{TUNNEL_FLAG_NAMES[dest.tun_flags]}"[:15]
    return f"gre:{TUNNEL_FLAG_NAMES[dest.tun_flags]}"


def _dest_rule(svc_name: str, dname: str, dest: Dest) -> str:
    line = f"-a {svc_name} -r {dname} {dest.fwd.switch} -w {dest.weight}"
    if dest.fwd is not Forward.TUNNEL:
        return line
    if dest.tun_type is TunType.GRE:
        return f"{line} --tun-type gre {TUNNEL_FLAG_SWITCHES[dest.tun_flags]}"
    if dest.tun_type is TunType.GUE:
        return f"{line} --tun-type gue --tun-port {dest.tun_port} {TUNNEL_FLAG_SWITCHES[dest.tun_flags]}"
    return f"{line} --tun-type ipip"


def _name_protocol(svc: Service) -> int:
    """The protocol ipvsadm looks port names up with.  The kernel reports
    none for fwmark services, so their real-server ports stay numeric."""
    return 0 if svc.fwmark else svc.protocol


def dest_line(svc: Service, svc_name: str, dest: Dest, fmt: Format, rule: bool,
              counters: Counters) -> str:
    dname = addrport(dest.addr, dest.port, _name_protocol(svc), fmt.numeric)
    if rule:
        return _dest_rule(svc_name, dname, dest)
    if dest.af != AF_INET6:
        dname = dname[:28]
    if fmt.stats:
        s = counters.dest(svc, dest)
        values = (s.conns, s.inpkts, s.outpkts, s.inbytes, s.outbytes)
        return f"  -> {dname:<28}" + "".join(largenum(v, fmt.exact) for v in values)
    if fmt.rate:
        s = counters.dest(svc, dest)
        return (f"  -> {dname:<28} {s.cps:8d} {s.inpps:8d} {s.outpps:8d}"
                + largenum(s.inbps, fmt.exact) + largenum(s.outbps, fmt.exact))
    c = counters.conns(svc, dest)
    if fmt.thresholds:
        return (f"  -> {dname:<28} {dest.u_threshold:<10d} {dest.l_threshold:<10d} "
                f"{c.active:<10d} {c.inactive:<10d}")
    if fmt.persistent_conn:
        return f"  -> {dname:<28} {dest.weight:<9d} {c.persistent:<11d} {c.active:<10d} {c.inactive:<10d}"
    if fmt.tun_info:
        return (f"  -> {dname:<28} {dest.fwd.listing_name:<7} {tunnel_info(dest):<13} {dest.weight:<6d} "
                f"{c.active:<10d} {c.inactive:<10d}")
    return _plain_line(dname, dest, c)


def _plain_line(dname: str, dest: Dest, c: DestConns) -> str:
    """A real server's line of the plain ``-L``."""
    return f"  -> {dname:<28} {dest.fwd.listing_name:<7} {dest.weight:<6d} {c.active:<10d} {c.inactive:<10d}"


def _plain_lines(svc: Service, dests: list[Dest], numeric: bool, counters: Counters) -> list[str]:
    """dest_line for every real server of a plain ``-L [-n]`` (no column
    options), in one loop: a listing of 10,000 services has 40,000 of them,
    mostly of services without connections (``counters.idle``)."""
    protocol, out = _name_protocol(svc), []
    conns = None if counters.idle(svc) else counters.conns
    for d in dests:
        dname = addrport(d.addr, d.port, protocol, numeric)
        if conns is None:  # _plain_line, written out
            out.append(f"  -> {dname if d.addr.version == 6 else dname[:28]:<28} "
                       f"{_LISTING_NAME[d.fwd]:<7} {d.weight:<6d}{_IDLE}")
        else:
            out.append(_plain_line(dname if d.addr.version == 6 else dname[:28], d, conns(svc, d)))
    return out


def title(fmt: Format, rule: bool) -> str:
    """print_title()."""
    if fmt.stats:
        return (f"{'Prot LocalAddress:Port':<33} {'Conns':>8} {'InPkts':>8} {'OutPkts':>8} "
                f"{'InBytes':>8} {'OutBytes':>8}\n  -> RemoteAddress:Port\n")
    if fmt.rate:
        return (f"{'Prot LocalAddress:Port':<33} {'CPS':>8} {'InPPS':>8} {'OutPPS':>8} "
                f"{'InBPS':>8} {'OutBPS':>8}\n  -> RemoteAddress:Port\n")
    if fmt.thresholds:
        return (f"{'Prot LocalAddress:Port':<33} {'Uthreshold':<10} {'Lthreshold':<10} "
                f"{'ActiveConn':<10} {'InActConn':<10}\n  -> RemoteAddress:Port\n")
    if fmt.persistent_conn:
        return (f"{'Prot LocalAddress:Port':<33} {'Weight':<9} {'PersistConn':<11} "
                f"{'ActiveConn':<10} {'InActConn':<10}\n  -> RemoteAddress:Port\n")
    if fmt.tun_info:
        return ("Prot LocalAddress:Port Scheduler Flags\n"
                "  -> RemoteAddress:Port           Forward TunnelInfo    Weight ActiveConn InActConn\n")
    if rule:
        return ""
    return ("Prot LocalAddress:Port Scheduler Flags\n"
            "  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n")


def service_entry(svc: Service, fmt: Format, rule: bool, counters: Counters) -> str:
    """One service and its real servers (print_service_entry)."""
    lines = [service_line(svc, fmt, rule, counters)]
    name = service_name(svc, fmt.numeric, rule) if rule else ""
    dests = list(svc.dests) if fmt.nosort else sort_dests(svc.dests)
    if not rule and not (fmt.stats or fmt.rate or fmt.thresholds or fmt.persistent_conn or fmt.tun_info):
        lines += _plain_lines(svc, dests, fmt.numeric, counters)
    else:
        lines.extend(dest_line(svc, name, d, fmt, rule, counters) for d in dests)
    return "\n".join(lines) + "\n"


def list_all(table: Table, fmt: Format, counters: Counters = ZERO, rule: bool = False) -> str:
    """``-L`` (or ``-S`` with ``rule``): every service."""
    services = kernel_order(table.services) if fmt.nosort else sort_services(table.services)
    head = "" if rule else VERSION_HEADER
    return head + title(fmt, rule) + "".join(service_entry(s, fmt, rule, counters) for s in services)


def list_service(svc: Service, fmt: Format, counters: Counters = ZERO) -> str:
    """``-L -t VIP:PORT``: one service, without the version line."""
    return title(fmt, False) + service_entry(svc, fmt, False, counters)


def save(table: Table, numeric: bool) -> str:
    """``-S [-n]``."""
    return list_all(table, Format(numeric=numeric), ZERO, rule=True)


def list_timeout(table: Table) -> str:
    t = table.timeouts
    return f"Timeout (tcp tcpfin udp): {t.tcp} {t.tcpfin} {t.udp}\n"


def list_daemon(table: Table) -> str:
    """``-L --daemon``: master first; nothing when none runs."""
    out = []
    for d in table.daemons:
        line = f"{d.state} sync daemon (mcast={d.mcast_ifn}, syncid={d.syncid}"
        if d.sync_maxlen:
            line += f", maxlen={d.sync_maxlen}"
        if d.mcast_af:
            line += f", group={d.mcast_group}"
        if d.mcast_port:
            line += f", port={d.mcast_port}"
        if d.mcast_ttl:
            line += f", ttl={d.mcast_ttl}"
        out.append(line + ")\n")
    return "".join(out)


@dataclass(frozen=True, slots=True)
class ConnRow:
    """One connection for ``-L -c``, already in ipvsadm's terms."""

    protocol: str  # "TCP", "UDP", "SCTP", "IP"
    expires: int  # seconds
    state: str
    client: tuple
    virtual: tuple
    dest: tuple  # each (addr, port)
    proto_number: int = 0  # for service-name lookups; 0 keeps ports numeric
    pe_name: str = ""
    pe_data: str = ""


def list_conn(rows: Iterable[ConnRow], fmt: Format) -> str:
    """``-L -c``: list_conn() and print_conn()."""
    out = ["IPVS connection entries\n"]
    if fmt.persistent_conn:
        out.append(f"pro expire {'state':<11} {'source':<18} {'virtual':<18} "
                   f"{'destination':<18} {'pe name':<16} pe_data\n")
    else:
        out.append(f"pro expire {'state':<11} {'source':<18} {'virtual':<18} destination\n")
    for r in rows:
        names = [addrport(a, p, r.proto_number, fmt.numeric) for a, p in (r.client, r.virtual, r.dest)]
        expire = f"{r.expires // 60:02d}:{r.expires % 60:02d}"
        if fmt.persistent_conn and r.pe_name:
            out.append(f"{r.protocol:<3} {expire:<6} {r.state:<11} {names[0]:<18} {names[1]:<18} "
                       f"{names[2]:<16} {r.pe_name:<18} {r.pe_data}\n")
        else:
            out.append(f"{r.protocol:<3} {expire:<6} {r.state:<11} {names[0]:<18} {names[1]:<18} "
                       f"{names[2]}\n")
    return "".join(out)
