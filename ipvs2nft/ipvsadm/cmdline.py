"""ipvsadm's command line, read the way ipvsadm 1.31 reads it.

ipvsadm uses popt and validates each option the moment popt returns it, so
which error a script sees depends on argv order; argparse cannot reproduce
that.  ``Popt`` is a small re-implementation of the popt behaviour ipvsadm
relies on (bundled short options, ``-tVALUE``, ``--opt=value``, the optional
argument of ``-p``, leftover words, ``--``); ``parse`` follows
``parse_options`` and the checks of ``process_options`` in ipvsadm.c, and
returns a ``Command`` for the CLI to carry out.  Nothing here has side effects.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, field

from ipvs2nft.errors import PoptError, TryHelp, UsageError
from ipvs2nft.ipvsadm.options import (
    BY_LONG,
    BY_SHORT,
    COLUMN_OF,
    MATRIX,
    MATRIX_OPTIONS,
    TUNNEL_MATRIX,
    TUNNEL_NAMES,
    TUNNEL_OPTIONS,
    Arg,
    Spec,
)
from ipvs2nft.model import (
    DEFAULT_PERSISTENT_TIMEOUT,
    DEFAULT_SCHEDULER,
    F_ONEPACKET,
    F_PERSISTENT,
    F_SCHED1,
    F_SCHED2,
    F_SCHED3,
    F_SCHED_MASK,
    MAX_TIMEOUT,
    NETMASK_V4_HOST,
    TUN_CSUM,
    TUN_REMCSUM,
    Dest,
    Forward,
    Service,
    SyncDaemon,
    Timeouts,
    TunType,
)
from ipvs2nft.netaddr import (
    AF_INET,
    AF_INET6,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    atoi,
    inet_pton6,
    ntop,
    parse_netmask_v4,
    parse_service,
    string_to_number,
    strtol,
)

INT_MAX = 2**31 - 1
# Debian's ipvsadm accepts weights up to INT_MAX (bug #814348); upstream stops at 65535.
MAX_WEIGHT = INT_MAX

# poptStrerror() texts of the errors ipvsadm can meet.
POPT_NOARG = "missing argument"
POPT_BADOPT = "unknown option"
POPT_UNWANTEDARG = "option does not take an argument"

COMMAND_TAGS = frozenset(
    ("add-service", "edit-service", "delete-service", "flush", "list", "add-server",
     "edit-server", "delete-server", "zero", "set", "restore", "save", "start-daemon",
     "stop-daemon", "help", "version")
)


@dataclass(frozen=True)
class Format:
    """Listing format flags (ipvsadm's FMT_*)."""

    numeric: bool = False
    stats: bool = False
    rate: bool = False
    thresholds: bool = False
    persistent_conn: bool = False
    nosort: bool = False
    exact: bool = False
    tun_info: bool = False


@dataclass(frozen=True)
class Command:
    """One parsed ipvsadm invocation, ready to be carried out."""

    name: str  # ipvsadm's command name: "add-service", "list", "help"...
    argv0: str
    options: frozenset[str] = frozenset()  # matrix columns that were given
    service: Service = field(default_factory=Service)
    dest: Dest | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    daemon: SyncDaemon | None = None
    fmt: Format = field(default_factory=Format)


@dataclass
class _Hit:
    spec: Spec
    value: str | None


class Popt:
    """The parts of popt's poptGetNextOpt() that ipvsadm's options exercise."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.next = 0  # index of the next argv word to read
        self.cluster = ""  # unread characters of a bundle of short options
        self.leftovers: list[str] = []
        self.rest_leftover = False  # after "--" everything is a leftover
        self.posixly_correct = "POSIXLY_CORRECT" in os.environ

    def bad_option(self) -> str:
        """poptBadOption(): the argv word popt was reading."""
        return self.argv[self.next - 1] if self.next else ""

    def get(self) -> _Hit | str | None:
        """Next option as a _Hit, None at the end, or a popt error text."""
        while True:
            if self.cluster:
                return self._short()
            if self.next >= len(self.argv):
                return None
            word = self.argv[self.next]
            self.next += 1
            if self.rest_leftover or not word.startswith("-") or word == "-":
                self.leftovers.append(word)
                if self.posixly_correct:
                    self.rest_leftover = True
                continue
            if word == "--":
                self.rest_leftover = True
                continue
            if word.startswith("--"):
                return self._long(word[2:])
            self.cluster = word[1:]

    def _long(self, text: str) -> _Hit | str:
        name, eq, value = text.partition("=")
        spec = BY_LONG.get(name)
        if spec is None:
            return POPT_BADOPT
        if spec.arg is Arg.NONE:
            return POPT_UNWANTEDARG if eq else _Hit(spec, None)
        if eq:
            return _Hit(spec, value)
        return self._word_argument(spec)

    def _short(self) -> _Hit | str:
        spec = BY_SHORT.get(self.cluster[0])
        rest = self.cluster[1:]
        if spec is None:
            self.cluster = ""
            return POPT_BADOPT
        if rest.startswith("="):  # popt reads "-t=addr" as "-t addr"
            rest = rest[1:]
        if spec.arg is Arg.NONE:
            self.cluster = rest
            return _Hit(spec, None)
        self.cluster = ""
        if rest:
            return _Hit(spec, rest)
        return self._word_argument(spec)

    def _word_argument(self, spec: Spec) -> _Hit | str:
        if self.next >= len(self.argv):
            return _Hit(spec, None) if spec.arg is Arg.OPTIONAL else POPT_NOARG
        word = self.argv[self.next]
        if spec.arg is Arg.OPTIONAL and word.startswith("-"):
            return _Hit(spec, None)
        self.next += 1
        return _Hit(spec, word)


class _Entry:
    """ipvsadm's ``struct ipvs_command_entry`` while options are read."""

    def __init__(self) -> None:
        self.cmd = ""
        self.af = 0  # memset(0): neither family until an address is parsed
        self.protocol = 0
        self.addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
        self.port = 0
        self.fwmark = 0
        self.sched = ""
        self.flags = 0
        self.timeout = 0
        self.netmask = NETMASK_V4_HOST
        self.pe = ""
        self.dest_af = 0
        self.dest_addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
        self.dest_port = 0
        self.fwd = Forward.ROUTE
        self.weight = 1
        self.u_threshold = 0
        self.l_threshold = 0
        self.tun_type = 0
        self.tun_port = 0
        self.tun_flags = 0
        self.timeouts: list[int] = []
        self.daemon_state = ""
        self.mcast_ifn = ""
        self.syncid = 0
        self.sync_maxlen = 0
        self.mcast_af = 0
        self.mcast_group = ""
        self.mcast_port = 0
        self.mcast_ttl = 0
        self.sched_flags_arg = ""
        self.options: set[str] = set()
        self.fmt: dict[str, bool] = {}


def _timeout(text: str | None, low: int) -> int:
    """parse_timeout(): no value means the default persistence timeout."""
    if text is None:
        return DEFAULT_PERSISTENT_TIMEOUT
    value = string_to_number(text, low, MAX_TIMEOUT)
    if value is None:
        raise UsageError(f"invalid timeout value `{text}' specified")
    return value


def _number(text: str, low: int, high: int, message: str) -> int:
    value = string_to_number(text, low, high)
    if value is None:
        raise UsageError(message)
    return value


def _set_option(e: _Entry, column: str) -> None:
    if column in e.options:
        raise UsageError(f"multiple '{column}' options specified")
    e.options.add(column)


def _service_option(e: _Entry, protocol: int, value: str) -> None:
    e.protocol = protocol
    parsed = parse_service(value, protocol)
    if parsed is None:
        raise UsageError("illegal virtual server address[:port] specified")
    e.af, e.addr = parsed.af, parsed.addr
    if parsed.af == AF_INET6:
        e.netmask = 128
    if parsed.port is not None:
        e.port = parsed.port


def _fwmark(text: str) -> int:
    value = strtol(text)
    if value is None or value <= 0 or value > 0xFFFFFFFF:
        raise UsageError(f"invalid fwmark value `{text}' specified")
    return value


def _real_server(e: _Entry, value: str) -> None:
    parsed = parse_service(value, e.protocol)
    if parsed is None:
        raise UsageError("illegal real server address[:port] specified")
    e.dest_af, e.dest_addr = parsed.af, parsed.addr
    # No port given: the service port as known at this point of argv.
    e.dest_port = e.port if parsed.port is None else parsed.port


def _netmask(e: _Entry, value: str) -> None:
    if e.af != AF_INET6:
        mask = parse_netmask_v4(value)
        if mask is None:
            raise UsageError("illegal virtual server persistent mask specified")
        e.netmask = mask
    else:
        e.netmask = atoi(value)
        if not 1 <= e.netmask <= 128:
            raise UsageError("illegal ipv6 netmask specified")


def _mcast_group(e: _Entry, value: str) -> None:
    """--mcast-group: inet_pton() of the family its text suggests, multicast only."""
    if ":" in value:
        group = inet_pton6(value)
        if group is None or not group.is_multicast:
            raise UsageError(f"invalid IPv6 mcast-group `{value}'")
        e.mcast_af, e.mcast_group = AF_INET6, ntop(group)
    else:
        try:
            group4 = ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, value))
        except (OSError, ValueError):
            group4 = None
        if group4 is None or not group4.is_multicast:
            raise UsageError(f"invalid IPv4 mcast-group `{value}'")
        e.mcast_af, e.mcast_group = AF_INET, str(group4)


_FORMAT_OPTIONS = {
    "numeric": "numeric", "stats": "stats", "rate": "rate", "thresholds": "thresholds",
    "persistent-conn": "persistent_conn", "nosort": "nosort", "exact": "exact",
    "tun-info": "tun_info",
}
_PLAIN_OPTIONS = {"connection", "timeout", "daemon"}
_FORWARD = {"gatewaying": Forward.ROUTE, "ipip": Forward.TUNNEL, "masquerading": Forward.MASQ}
_TUN_FLAG = {"tun-nocsum": 0, "tun-csum": TUN_CSUM, "tun-remcsum": TUN_REMCSUM}
_PROTOCOL = {"tcp-service": IPPROTO_TCP, "udp-service": IPPROTO_UDP, "sctp-service": IPPROTO_SCTP}


def _option(e: _Entry, tag: str, value: str | None, popt: Popt) -> None:
    """One option after the command, validated at once as ipvsadm does."""
    if tag in COMMAND_TAGS:
        raise UsageError(f"invalid option `{popt.bad_option()}'")
    if tag == "sort":
        return  # a no-op, exempt from every check
    if tag == "ipv6":
        if not e.fwmark:
            raise UsageError("-6 used before -f\n")
        e.af, e.netmask = AF_INET6, 128
        return
    column = COLUMN_OF.get(tag, tag)
    _set_option(e, column)
    if tag in _PROTOCOL:
        _service_option(e, _PROTOCOL[tag], value)
    elif tag == "fwmark-service":
        e.af, e.protocol, e.fwmark = AF_INET, IPPROTO_TCP, _fwmark(value)
    elif tag == "scheduler":
        e.sched = value[:15]
    elif tag == "persistent":
        e.flags |= F_PERSISTENT
        e.timeout = _timeout(value, 1)
    elif tag == "netmask":
        _netmask(e, value)
    elif tag == "real-server":
        _real_server(e, value)
    elif tag in _FORWARD:
        e.fwd = _FORWARD[tag]
    elif tag == "weight":
        e.weight = _number(value, 0, MAX_WEIGHT, "illegal weight specified")
    elif tag == "u-threshold":
        e.u_threshold = _number(value, 0, INT_MAX, "illegal u_threshold specified")
    elif tag == "l-threshold":
        e.l_threshold = _number(value, 0, INT_MAX, "illegal l_threshold specified")
    elif tag in _FORMAT_OPTIONS:
        e.fmt[_FORMAT_OPTIONS[tag]] = True
    elif tag in _PLAIN_OPTIONS:
        pass
    elif tag == "mcast-interface":
        e.mcast_ifn = value[:15]
    elif tag == "syncid":
        e.syncid = _number(value, 0, 255, "illegal syncid specified")
    elif tag == "ops":
        e.flags |= F_ONEPACKET
    elif tag == "pe":
        e.pe = value[:16]
    elif tag == "sched-flags":
        e.sched_flags_arg = value[:127]
    elif tag == "mcast-group":
        _mcast_group(e, value)
    elif tag == "mcast-port":
        e.mcast_port = _number(value, 1, 65535, "illegal mcast-port specified")
    elif tag == "mcast-ttl":
        e.mcast_ttl = _number(value, 1, 255, "illegal mcast-ttl specified")
    elif tag == "sync-maxlen":
        e.sync_maxlen = _number(value, 1, 65535 - 20 - 8, "illegal sync-maxlen specified")
    elif tag == "tun-type":
        if value not in TUNNEL_NAMES:
            raise UsageError("illegal tunnel type specified")
        e.tun_type = TUNNEL_NAMES.index(value)
    elif tag == "tun-port":
        e.tun_port = _number(value, 1, 65535, "illegal tunnel port specified")
    elif tag in _TUN_FLAG:
        e.tun_flags |= _TUN_FLAG[tag]


def _first_command(e: _Entry, hit: _Hit) -> str:
    """The first option must be a command (else ``Try ...``)."""
    tag = hit.spec.tag
    if tag in ("start-daemon", "stop-daemon"):
        if hit.value not in ("master", "backup"):
            raise UsageError("illegal start-daemon parameter specified" if tag == "start-daemon"
                             else "illegal start_daemon specified")
        e.daemon_state = hit.value
    return tag


def _sched_flags(sched: str, text: str) -> int:
    """parse_sched_flags(): strtok over ',' and checks against the scheduler."""
    sched = sched or DEFAULT_SCHEDULER
    items = [item for item in text.split(",") if item]
    if not items:
        # strtok() finds no item and ipvsadm 1.31 dereferences its NULL:
        # the real program dies of SIGSEGV (139).  A clear error instead.
        raise UsageError(f"invalid scheduler flag `{text}'")
    flags = 0
    generic = {"flag-1": F_SCHED1, "flag-2": F_SCHED2, "flag-3": F_SCHED3}
    specific = {"sh-fallback": ("sh", F_SCHED1), "sh-port": ("sh", F_SCHED2),
                "mh-fallback": ("mh", F_SCHED1), "mh-port": ("mh", F_SCHED2)}
    for item in items:
        if item in generic:
            flags |= generic[item]
        elif item in specific:
            needed, bit = specific[item]
            flags |= bit
            if sched != needed:
                raise UsageError(f"incompatible scheduler flag `{item}'")
        else:
            raise UsageError(f"invalid scheduler flag `{item}'")
    return flags


def _check_matrix(cmd: str, options: set[str]) -> None:
    """generic_opt_check(): the command x option table, in column order."""
    row = MATRIX[cmd]
    first_exclusive = None
    for column in MATRIX_OPTIONS:
        cell = row[column]
        if column not in options:
            if cell == "+":
                raise UsageError(f"You need to supply the '{column}' option for the '{cmd}' command")
            continue
        if cell == "x":
            raise UsageError(f"Illegal '{column}' option with the '{cmd}' command")
        if cell == "1":
            if first_exclusive is None:
                first_exclusive = column
                continue
            raise UsageError(f"The option '{column}' conflicts with the '{first_exclusive}' "
                             f"option in the '{cmd}' command")


def _check_tunnel(tun_type: int, options: set[str]) -> None:
    """tunnel_opt_check(): the tunnel type x tunnel option table."""
    name = TUNNEL_NAMES[tun_type]
    first_exclusive = None
    for column, cell in zip(TUNNEL_OPTIONS, TUNNEL_MATRIX[name], strict=True):
        if column not in options:
            if cell == "+":
                raise UsageError(f"You need to supply the '{column}' option for the '{name}' tunnel type")
            continue
        if cell == "x":
            raise UsageError(f"Illegal '{column}' option with the '{name}' tunnel type")
        if cell == "1":
            if first_exclusive is None:
                first_exclusive = column
                continue
            raise UsageError(f"The option '{column}' conflicts with the '{first_exclusive}' "
                             f"option in the '{name}' tunnel type")


def _simple_hits(argv: list[str]) -> list[tuple[_Hit, int]] | None:
    """popt's answer for the plain argv that -S writes and -R reads by the
    ten thousand (``-a -t VIP:80 -r RS:80 -m -w 1``): every word a lone
    short option, each required value a word that does not start with '-'.
    None for anything else -- bundles, long options, optional values,
    leftovers -- which the full Popt reads.  Each hit comes with popt's
    read position after it (for the words error messages quote)."""
    hits: list[tuple[_Hit, int]] = []
    i, n = 0, len(argv)
    while i < n:
        w = argv[i]
        spec = BY_SHORT.get(w[1]) if len(w) == 2 and w[0] == "-" else None
        if spec is None:
            return None
        if spec.arg is Arg.NONE:
            i += 1
            hits.append((_Hit(spec, None), i))
        elif spec.arg is Arg.REQUIRED and i + 1 < n and argv[i + 1][:1] not in ("-", ""):
            i += 2
            hits.append((_Hit(spec, argv[i - 1]), i))
        else:
            return None
    return hits or None


def _read_options(argv: list[str], argv0: str) -> tuple[_Entry, Popt]:
    """parse_options(): the command, then every option in argv order."""
    popt = Popt(argv)
    e = _Entry()
    simple = _simple_hits(argv)
    first = simple.pop(0)[0] if simple else popt.get()
    if not isinstance(first, _Hit) or first.spec.tag not in COMMAND_TAGS:
        raise TryHelp(argv0)
    e.cmd = _first_command(e, first)
    if e.cmd in ("help", "version"):
        return e, popt
    if simple is not None:
        for hit, popt.next in simple:  # popt.next: for bad_option() in messages
            _option(e, hit.spec.tag, hit.value, popt)
    while simple is None:
        hit = popt.get()
        if hit is None:
            break
        if isinstance(hit, str):
            raise PoptError(f"{popt.bad_option()}: {hit}")
        _option(e, hit.spec.tag, hit.value, popt)
    leftovers = list(popt.leftovers)
    if e.cmd == "set":
        if len(leftovers) < 3:
            raise UsageError("--set option requires 3 timeout values")
        e.timeouts = [_timeout(text, 0) for text in leftovers[:3]]
        leftovers = leftovers[3:]
    if leftovers:
        raise UsageError(f"unexpected argument {leftovers[0]}")
    if e.sched_flags_arg:
        e.flags = (e.flags & ~F_SCHED_MASK) | _sched_flags(e.sched, e.sched_flags_arg)
    return e, popt


def _check_command(e: _Entry) -> None:
    """process_options(): the checks between parsing and the kernel call."""
    _check_matrix(e.cmd, e.options)
    if e.cmd in ("add-service", "edit-service"):
        if not e.fwmark and not e.port and not e.flags & F_PERSISTENT:
            raise UsageError("Zero port specified for non-persistent service")
        if e.flags & F_ONEPACKET and not e.fwmark and e.protocol != IPPROTO_UDP:
            raise UsageError("One-Packet Scheduling is only for UDP virtual services")
        e.sched = e.sched or DEFAULT_SCHEDULER
    if e.cmd == "start-daemon" and not e.mcast_ifn:
        e.mcast_ifn = "eth0"
    if e.cmd in ("add-server", "edit-server"):
        # -g and -i real servers of address services take the service port.
        if not e.fwmark and e.fwd in (Forward.TUNNEL, Forward.ROUTE):
            e.dest_port = e.port
        if e.dest_af != e.af and e.fwd is not Forward.TUNNEL:
            raise UsageError("Different address family is allowed only for tunneling servers")
        tunnel_given = e.options & {"tun-type", "tun-port", "tun-nocsum", "tun-csum", "tun-remcsum"}
        if tunnel_given and e.fwd is not Forward.TUNNEL:
            raise UsageError("Tunnel options conflict with forward method")
        _check_tunnel(e.tun_type, e.options)
    if e.cmd == "list":
        o = e.options
        if (o & {"connection", "timeout", "daemon"} and o & {"stats", "rate", "thresholds"}) or (
            o & {"timeout", "daemon"} and "persistent-conn" in o
        ):
            raise UsageError("options conflicts in the list command")


def parse(argv: list[str], argv0: str = "ipvsadm") -> Command:
    """Read one ipvsadm command line (without argv[0]).

    Raises UsageError, TryHelp or PoptError exactly where ipvsadm would stop.
    """
    e, _ = _read_options(argv, argv0)
    if e.cmd in ("help", "version"):
        return Command(name=e.cmd, argv0=argv0)
    _check_command(e)
    return _command(e, argv0)


def _command(e: _Entry, argv0: str) -> Command:
    service = Service(
        af=e.af or AF_INET,
        protocol=e.protocol or IPPROTO_TCP,
        addr=None if e.fwmark else e.addr,
        port=0 if e.fwmark else e.port,
        fwmark=e.fwmark,
        scheduler=e.sched,
        flags=e.flags,
        timeout=e.timeout,
        netmask=e.netmask,
        pe_name=e.pe,
    )
    dest = None
    if e.dest_addr is not None:
        dest = Dest(
            addr=e.dest_addr,
            port=e.dest_port,
            fwd=e.fwd,
            weight=e.weight,
            u_threshold=e.u_threshold,
            l_threshold=e.l_threshold,
            tun_type=TunType(e.tun_type),
            tun_port=e.tun_port,
            tun_flags=e.tun_flags,
        )
    daemon = None
    if e.daemon_state:
        daemon = SyncDaemon(
            state=e.daemon_state,
            mcast_ifn=e.mcast_ifn,
            syncid=e.syncid,
            sync_maxlen=e.sync_maxlen,
            mcast_af=e.mcast_af,
            mcast_group=e.mcast_group,
            mcast_port=e.mcast_port,
            mcast_ttl=e.mcast_ttl,
        )
    timeouts = Timeouts(*e.timeouts) if e.timeouts else Timeouts()
    return Command(
        name=e.cmd,
        argv0=argv0,
        options=frozenset(e.options),
        service=service,
        dest=dest,
        timeouts=timeouts,
        daemon=daemon,
        fmt=Format(**e.fmt),
    )
