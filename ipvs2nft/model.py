"""The one model every front end produces and every back end consumes.

It mirrors what the IPVS kernel keeps (``struct ip_vs_service`` and
``ip_vs_dest`` as seen through libipvs), plus the two ids the nftables back end
needs to name its chains and slots, and the slot plan of a service whose
front end fixed its scheduling itself (an iptables cascade).  Services and
real servers are frozen dataclasses; a ``Table`` is changed in place by the
operations of ``ipvs.py`` (its docstring says why).  Nothing here does I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from ipvs2nft.netaddr import AF_INET, AF_INET6, IPPROTO_TCP, IPAddress

# IP_VS_SVC_F_* from include/uapi/linux/ip_vs.h
F_PERSISTENT = 0x0001
F_ONEPACKET = 0x0004
F_SCHED1 = 0x0008  # sh-fallback / mh-fallback / flag-1
F_SCHED2 = 0x0010  # sh-port / mh-port / flag-2
F_SCHED3 = 0x0020  # flag-3
F_SCHED_MASK = F_SCHED1 | F_SCHED2 | F_SCHED3

DEFAULT_SCHEDULER = "wlc"
DEFAULT_PERSISTENT_TIMEOUT = 360  # IPVS_SVC_PERSISTENT_TIMEOUT; ipvsadm(8) says 300, wrongly
MAX_TIMEOUT = 86400 * 31
NETMASK_V4_HOST = 0xFFFFFFFF

# Schedulers of the Debian 12 kernel (CONFIG_IP_VS_TWOS is not set there).
SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh")
NO_SCHEDULER = "none"  # accepted by the kernel: a service nothing is scheduled to
PERSISTENCE_ENGINES = ("sip",)


class Forward(enum.Enum):
    """Packet-forwarding method of a real server."""

    MASQ = "masq"  # -m, NAT
    ROUTE = "route"  # -g, direct routing (ipvsadm's default)
    TUNNEL = "tunnel"  # -i, IP-in-IP and friends
    # IP_VS_CONN_F_LOCALNODE: the real server is this host.  No ipvsadm
    # option gives it and the store never holds it; the nftables back end
    # carries out a -g or -i server whose address is local this way, as
    # ip_vs_xmit.c does per packet (nft/direct.py: local_nodes).
    LOCAL = "local"

    @property
    def listing_name(self) -> str:
        return _LISTING_NAMES[self.value]

    @property
    def switch(self) -> str:
        # ipvsadm.c fwd_switch(): LOCALNODE saves as -g
        return _SWITCHES[self.value]


_LISTING_NAMES = {"masq": "Masq", "route": "Route", "tunnel": "Tunnel", "local": "Local"}
_SWITCHES = {"masq": "-m", "route": "-g", "tunnel": "-i", "local": "-g"}


class TunType(enum.IntEnum):
    """IP_VS_CONN_F_TUNNEL_TYPE_*."""

    IPIP = 0
    GUE = 1
    GRE = 2


# IP_VS_TUNNEL_ENCAP_FLAG_*: the value indexes ipvsadm's name tables.
TUN_NOCSUM = 0
TUN_CSUM = 1
TUN_REMCSUM = 2


@dataclass(frozen=True, slots=True)
class Dest:
    """A real server of one service."""

    addr: IPAddress
    port: int
    fwd: Forward = Forward.ROUTE
    weight: int = 1
    u_threshold: int = 0
    l_threshold: int = 0
    tun_type: TunType = TunType.IPIP
    tun_port: int = 0
    tun_flags: int = TUN_NOCSUM
    rid: int = 0  # back-end id, unique over the store's life; 0 = not stored yet
    last_weight: int = -1  # the kernel's latest non-zero weight (mh keeps its slots); -1 = weight

    def __post_init__(self) -> None:
        if self.last_weight < 0:
            object.__setattr__(self, "last_weight", self.weight)

    @property
    def af(self) -> int:
        return AF_INET if self.addr.version == 4 else AF_INET6

    @property
    def key(self) -> tuple[int, IPAddress, int]:
        """Identity within a service: (af, addr, port)."""
        return (self.af, self.addr, self.port)


@dataclass(frozen=True, slots=True)
class SchedState:
    """The scheduler's own state in the kernel (rr and wrr keep one).

    rr: ``cl`` is the real server used last.  wrr: ip_vs_wrr_mark, ``cl``
    the current server, ``cw`` the current weight, ``mw`` the maximum
    weight less (di - 1), ``di`` the gcd of the weights.  ``cl`` None is the
    list head.
    """

    cl: tuple | None = None
    cw: int = 0
    mw: int = 0
    di: int = 1


@dataclass(frozen=True, slots=True)
class Plan:
    """A slot table fixed by a front end, not by an IPVS scheduler: the
    real server (``Dest.key``) of each slot, None for a connection left
    un-NATed; drawn by ``numgen random`` or in turn.  The iptables front end
    reproduces a ``-m statistic`` cascade this way (iptables/lift.py)."""

    random: bool
    table: tuple
    exact: bool = True
    note: str = ""


@dataclass(frozen=True, slots=True)
class Service:
    """A virtual service: VIP/proto/port or fwmark, plus its real servers."""

    af: int = AF_INET
    protocol: int = IPPROTO_TCP  # the kernel stores TCP for fwmark services
    addr: IPAddress | None = None
    port: int = 0
    fwmark: int = 0
    scheduler: str = DEFAULT_SCHEDULER
    flags: int = 0
    timeout: int = 0  # persistence timeout, seconds
    netmask: int = NETMASK_V4_HOST  # IPv4: 32-bit mask; IPv6: prefix length
    pe_name: str = ""
    dests: tuple[Dest, ...] = ()  # kernel list order: newest first
    sid: int = 0  # back-end id: names its chain and its slot block; 0 = not stored
    sched: SchedState = field(default_factory=SchedState)
    plan: Plan | None = None  # the front end's own slot table; never stored (translate only)

    @property
    def key(self) -> ServiceKey:
        return ServiceKey.of(self)

    @property
    def persistent(self) -> bool:
        return bool(self.flags & F_PERSISTENT)

    @property
    def onepacket(self) -> bool:
        return bool(self.flags & F_ONEPACKET)

    def find_dest(self, key: tuple[int, IPAddress, int]) -> Dest | None:
        for dest in self.dests:
            if dest.key == key:
                return dest
        return None


@dataclass(frozen=True, slots=True)
class ServiceKey:
    """Service identity: (af, fwmark) or (af, protocol, addr, port)."""

    af: int
    fwmark: int
    protocol: int
    addr: IPAddress | None
    port: int

    @classmethod
    def of(cls, svc: Service) -> ServiceKey:
        if svc.fwmark:
            return cls(svc.af, svc.fwmark, 0, None, 0)
        return cls(svc.af, 0, svc.protocol, svc.addr, svc.port)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """``--set tcp tcpfin udp`` (IPVS defaults)."""

    tcp: int = 900
    tcpfin: int = 120
    udp: int = 300


@dataclass(frozen=True, slots=True)
class SyncDaemon:
    """A started connection-synchronisation daemon, as the kernel reports it."""

    state: str  # "master" | "backup"
    mcast_ifn: str = "eth0"
    syncid: int = 0
    sync_maxlen: int = 0
    mcast_af: int = 0  # 0 = not given
    mcast_group: str = ""
    mcast_port: int = 0
    mcast_ttl: int = 0


class Table:
    """Everything ``ipvsadm`` can see: the IPVS table plus global settings.

    Services are indexed by identity and keep their creation order (which
    stands in for the kernel's hash order in ``--nosort``).  Unlike the
    frozen services, a table is changed in place by the operations of
    ``ipvs.py`` (which validate before they change anything): replaying a
    50,000-line ``-R`` file must not copy 10,000 services per line.  Code
    that needs the table as it was takes a ``copy()`` first.
    """

    __slots__ = ("index", "timeouts", "daemons", "snat")

    def __init__(self, services: Iterable[Service] = (), timeouts: Timeouts | None = None,
                 daemons: tuple[SyncDaemon, ...] = (), snat: str = "") -> None:
        self.index: dict[ServiceKey, Service] = {s.key: s for s in services}
        self.timeouts = timeouts or Timeouts()
        self.daemons = daemons  # master before backup
        # ipvs2nft's own option, not IPVS state: source NAT for balanced
        # connections ("" off, "masquerade", or source addresses "A[,B]")
        self.snat = snat

    @property
    def services(self) -> Iterable[Service]:
        """The services in creation order (a live view)."""
        return self.index.values()

    def find(self, key: ServiceKey) -> Service | None:
        return self.index.get(key)

    def put(self, svc: Service) -> None:
        """Add a service, or replace the one with its identity (in place)."""
        self.index[svc.key] = svc

    def remove(self, key: ServiceKey) -> None:
        del self.index[key]

    def copy(self) -> Table:
        table = Table(timeouts=self.timeouts, daemons=self.daemons, snat=self.snat)
        table.index = dict(self.index)
        return table

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Table) and self.index == other.index and self.snat == other.snat
                and self.timeouts == other.timeouts and self.daemons == other.daemons)

    def daemon(self, state: str) -> SyncDaemon | None:
        for d in self.daemons:
            if d.state == state:
                return d
        return None
