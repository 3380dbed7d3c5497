"""What a keepalived configuration says about virtual servers, as data.

These mirror keepalived's ``virtual_server_t``, ``real_server_t`` and
``checker_t`` (keepalived/include/check_data.h, check_api.h) after
``validate_check_config()`` (check_data.c) has filled in the defaults a
real server takes from its virtual server and a checker from its real
server.  Times are seconds (keepalived keeps microseconds).  Nothing here
does I/O; ``parse.py`` builds these, ``mapping.py`` turns them into the
model's services, ``ipvs2nft/health`` runs the checkers.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from ipvs2nft.keepalived.lexer import Where
from ipvs2nft.model import Forward, TunType
from ipvs2nft.netaddr import IPAddress

DEFAULT_DELAY_LOOP = 60.0  # KEEPALIVED_DEFAULT_DELAY
DEFAULT_CONNECT_TIMEOUT = 5.0  # alloc_vs(): connection_to = 5 * TIMER_HZ
WEIGHT_LIMIT = 2**31 - 1  # real_weight() clamps to IPVS_WEIGHT_LIMIT


@dataclass
class Url:
    """``url { path digest status_code virtualhost regex regex_no_match }``."""

    where: Where
    path: str = ""
    digest: bytes | None = None  # MD5 of the body
    status_codes: frozenset[int] = frozenset()  # empty: 200-299 (url_check())
    virtualhost: str | None = None
    regex: str | None = None
    regex_no_match: bool = False

    def accepts(self, status: int) -> bool:
        return status in self.status_codes if self.status_codes else 200 <= status <= 299


@dataclass
class Checker:
    """The keywords every checker has (install_checker_common_keywords())."""

    kind: str  # "TCP_CHECK", "HTTP_GET"...
    where: Where
    connect_ip: IPAddress | None = None
    connect_port: int | None = None
    bindto: IPAddress | None = None
    bind_port: int | None = None
    bind_if: str | None = None
    connect_timeout: float | None = None
    fwmark: int | None = None  # SO_MARK on the probe's socket
    retry: int | None = None
    delay_before_retry: float | None = None
    warmup: float | None = None
    delay_loop: float | None = None
    alpha: bool | None = None
    log_all_failures: bool = False
    # keepalived's per-type defaults (queue_checker() and each *_handler)
    default_retry: int = 1
    default_delay_before_retry: float = 1.0  # 0: delay_loop (DNS_CHECK)

    @property
    def has_connection(self) -> bool:
        return self.kind not in ("MISC_CHECK",)


@dataclass
class HttpCheck(Checker):
    urls: list[Url] = field(default_factory=list)
    virtualhost: str | None = None
    http_protocol: str = "1.0"  # 1.0 | 1.0C | 1.1
    enable_sni: bool = False
    fast_recovery: bool = False

    @property
    def tls(self) -> bool:
        return self.kind == "SSL_GET"


@dataclass
class MiscCheck(Checker):
    path: list[str] = field(default_factory=list)  # argv, split as keepalived splits it
    timeout: float | None = None  # misc_timeout; None: the virtual server's delay_loop
    dynamic: bool = False
    user: str | None = None  # run as this user (and group), keepalived's `user USER [GROUP]`
    group: str | None = None


@dataclass
class SmtpCheck(Checker):
    helo_name: str = ""  # "" -> the local host name, as keepalived


@dataclass
class DnsCheck(Checker):
    qtype: str = "SOA"
    name: str = "."


@dataclass
class UdpCheck(Checker):
    payload: bytes = b""
    require_reply: bool = False
    min_reply_length: int = 0
    max_reply_length: int = 0


@dataclass
class SnmpSource:
    """``ipvs2nft_snmp { }`` in a real server: where its load is read."""

    where: Where
    community: str = "public"
    version: str = "2c"
    port: int = 161
    oid: str = "laLoad"  # laLoad | hrProcessorLoad | a numeric OID
    capacity: float = 0.0  # load that counts as fully busy; 0: 1.0 (laLoad), 100 (hrProcessorLoad)
    timeout: float = 1.0
    address: IPAddress | None = None  # default: the real server's address


@dataclass
class Feedback:
    """``ipvs2nft_feedback response|load { }`` in a virtual server."""

    where: Where
    method: str  # "response" | "load"
    interval: float = 5.0
    smoothing: float = 0.3
    deadband: float = 10.0  # percent
    min_weight: int = 1


@dataclass
class RealServer:
    where: Where
    addr: IPAddress
    port: int
    weight: int | None = None  # None: the virtual server's weight
    fwd: Forward | None = None
    tun_type: TunType = TunType.IPIP
    tun_port: int = 0
    tun_flags: int = 0
    u_threshold: int = 0
    l_threshold: int = 0
    inhibit: bool | None = None
    alpha: bool | None = None
    retry: int | None = None
    delay_before_retry: float | None = None
    warmup: float | None = None
    connect_timeout: float | None = None
    delay_loop: float | None = None
    virtualhost: str | None = None
    notify_up: list[str] | None = None
    notify_down: list[str] | None = None
    checkers: list[Checker] = field(default_factory=list)
    snmp: SnmpSource | None = None

    @property
    def af(self) -> int:
        from ipvs2nft.netaddr import AF_INET, AF_INET6

        return AF_INET if self.addr.version == 4 else AF_INET6


@dataclass
class GroupEntry:
    """One line of a ``virtual_server_group``: an address range and port, or a fwmark."""

    where: Where
    first: IPAddress | None = None
    last: IPAddress | None = None
    port: int = 0
    fwmark: int = 0
    family: int = 0  # fwmark entries: AF_INET/AF_INET6 or 0 (the virtual server's)

    def addresses(self) -> list[IPAddress]:
        if self.first is None or self.last is None:
            return []
        count = int(self.last) - int(self.first) + 1
        return [ipaddress.ip_address(int(self.first) + i) for i in range(count)]


@dataclass
class VirtualServer:
    where: Where
    addr: IPAddress | None = None
    port: int = 0
    fwmark: int = 0
    group: str | None = None
    group_entries: list[GroupEntry] = field(default_factory=list)
    af: int = 0
    scheduler: str = ""
    flags: int = 0
    fwd: Forward | None = None
    tun_type: TunType = TunType.IPIP
    tun_port: int = 0
    tun_flags: int = 0
    persistence_timeout: int = 0
    persistence_granularity: int | None = None  # IPv4 mask as an integer, IPv6 prefix length
    persistence_engine: str = ""
    protocol: int = 0
    delay_loop: float = DEFAULT_DELAY_LOOP
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    retry: int | None = None
    delay_before_retry: float | None = None
    warmup: float | None = None
    inhibit: bool = False
    alpha: bool = False
    omega: bool = False
    quorum: int = 1
    hysteresis: int = 0
    quorum_up: list[str] | None = None
    quorum_down: list[str] | None = None
    weight: int = 1
    virtualhost: str | None = None
    sorry: RealServer | None = None
    sorry_inhibit: bool = False
    real_servers: list[RealServer] = field(default_factory=list)
    feedback: Feedback | None = None

    def name(self) -> str:
        """FMT_VS(): how keepalived names a virtual server in its messages."""
        if self.group:
            return f"[{self.group}]:{self.port}"
        if self.fwmark:
            return f"FWM {self.fwmark}"
        proto = {6: "tcp", 17: "udp", 132: "sctp"}.get(self.protocol, "none")
        host = f"[{self.addr}]" if self.addr is not None and self.addr.version == 6 else str(self.addr)
        return f"{host}:{proto}:{self.port}"


@dataclass
class Configuration:
    """A whole file: the virtual servers, plus what was noted on the way."""

    virtual_servers: list[VirtualServer] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # sections left to keepalived (VRRP, globals)
    warnings: list[str] = field(default_factory=list)  # keepalived's own corrections
    ssl_ca: str | None = None
    ssl_certificate: str | None = None
    ssl_key: str | None = None
    ssl_password: str | None = None
