"""keepalived's virtual-server grammar: the tree of ``lexer.py`` to ``config.py``.

The keywords and their checks are those keepalived installs in
``init_check_keywords()`` (keepalived/check/check_parser.c), the checkers'
``install_*_check_keyword()`` (check_tcp.c, check_http.c, check_misc.c,
check_smtp.c, check_dns.c, check_udp.c, check_ping.c) and
``install_checker_common_keywords()`` (check_api.c); the defaults and
corrections are ``alloc_vs()``, ``alloc_rs()`` and ``validate_check_config()``
(check_data.c).  The messages are keepalived's own.

Three outcomes, never a silent one:

* keepalived *rejects* something (it logs the error and ignores the line or
  the block: an invalid number, an unknown keyword, a bad address): a
  ``ConfigError`` with file and line -- running the rest would not be the
  configuration the user wrote;
* keepalived *corrects* something (no protocol: UDP; no forwarding method:
  NAT; ports that do not match...): the same correction, and its message as
  a warning;
* a section that belongs to the other half of keepalived (VRRP, global
  settings): one note each, since ``keepalived --vrrp`` keeps doing them.

Keywords that ipvs2nft does not carry out (BFD_CHECK, FILE_CHECK,
ha_suspend, regex options, ...) are a ``ConfigError`` naming them.  The
``ipvs2nft_feedback`` and ``ipvs2nft_snmp`` blocks are ipvs2nft's own
extension (README, "feedback weights"): keepalived's config test would
call them unknown, but ``keepalived --vrrp`` skips every virtual_server
block whole, so the shared file still works for both.
"""

from __future__ import annotations

import ipaddress
import re
import shlex

from ipvs2nft.keepalived.config import (
    WEIGHT_LIMIT,
    Checker,
    Configuration,
    DnsCheck,
    Feedback,
    GroupEntry,
    HttpCheck,
    MiscCheck,
    RealServer,
    SmtpCheck,
    SnmpSource,
    UdpCheck,
    Url,
    VirtualServer,
)
from ipvs2nft.keepalived.lexer import ConfigError, Node, Where
from ipvs2nft.model import (
    F_ONEPACKET,
    F_SCHED1,
    F_SCHED2,
    F_SCHED3,
    MAX_TIMEOUT,
    SCHEDULERS,
    TUN_CSUM,
    TUN_NOCSUM,
    TUN_REMCSUM,
    Forward,
    TunType,
)
from ipvs2nft.netaddr import AF_INET, AF_INET6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, IPAddress

UINT_MAX = 2**32 - 1
IPVS_FWMARK_MAX = UINT_MAX
DEFAULT_PERSISTENCE = 360  # IPVS_SVC_PERSISTENT_TIMEOUT

# The other half of keepalived: left to `keepalived --vrrp`, one note each.
VRRP_SECTIONS = frozenset((
    "vrrp_instance", "vrrp_sync_group", "vrrp_script", "vrrp_track_process", "static_ipaddress",
    "static_routes", "static_rules", "linkbeat_interfaces", "garp_group", "bfd_instance", "track_file",
    "vrrp_track_file", "net_namespace", "net_namespace_ipvs", "instance", "use_pid_dir",
))
GLOBAL_SECTIONS = frozenset(("global_defs",))
# global_defs keywords that change IPVS itself: said out loud, not carried out.
LVS_GLOBALS = {
    "lvs_timeouts": "use `ipvsadm --set TCP TCPFIN UDP`",
    "lvs_sync_daemon": "IPVS's connection sync has no nftables counterpart (compat-matrix.md, sync daemon)",
    "lvs_flush": "the services are replaced at start-up anyway",
    "lvs_flush_onstop": "the services are removed at stop as keepalived does by default",
    "nftables_ipvs": "the services are nftables already",
}
NOT_CARRIED_OUT = {
    "BFD_CHECK": "BFD_CHECK needs keepalived's BFD process",
    "FILE_CHECK": "FILE_CHECK (track_file) is not supported by ipvs2nft",
    "track_file": "track_file is not supported by ipvs2nft",
    "ha_suspend": "ha_suspend is not supported by ipvs2nft",
    "snmp_name": "keepalived's SNMP MIB is not served by ipvs2nft",
    "regex_options": "regex_options (PCRE2 flags) are not supported by ipvs2nft",
    "regex_min_offset": "regex offsets are not supported by ipvs2nft",
    "regex_max_offset": "regex offsets are not supported by ipvs2nft",
    "regex_stack": "regex_stack is not supported by ipvs2nft",
    "hashed": "hashed is not supported by ipvs2nft",
    "bind_if": "bind_if is not supported by ipvs2nft",
}
LVS_SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "sh", "mh", "dh", "fo", "ovf", "lblcr", "sed", "nq")
DNS_TYPES = ("A", "NS", "CNAME", "SOA", "MX", "TXT", "AAAA")


# ---------------------------------------------------------------- values

def _unsigned(node: Node, index: int, low: int, high: int, message: str | None = None) -> int:
    """read_unsigned_strvec(): a decimal, no sign, within [low, high]."""
    text = _arg(node, index)
    word = text.strip(" \t")
    if word.startswith("-"):
        problem = f"negative number '{text}'"
    elif not re.fullmatch(r"\+?[0-9]+", word):
        problem = f"invalid number '{text}'"
    elif not low <= int(word) <= high:
        problem = f"number '{text}' outside range [{low}, {high}]"
    else:
        return int(word)
    raise ConfigError(node.where, message.format(text) if message else problem)


def _timer(node: Node, index: int, minimum: float, message: str) -> float:
    """read_timer(): seconds with up to 6 decimals (TIMER_HZ_DIGITS)."""
    text = _arg(node, index)
    if not re.fullmatch(r"[0-9]+(\.[0-9]{0,6})?|\.[0-9]{1,6}", text):
        raise ConfigError(node.where, message.format(text))
    value = float(text)
    if value < minimum:
        raise ConfigError(node.where, message.format(text))
    return value


def _arg(node: Node, index: int) -> str:
    if len(node.words) <= index:
        if index > 1:
            raise ConfigError(node.where, f"*** Configuration line starting `{node.keyword}` is missing a "
                                          f"parameter after keyword `{node.words[index - 1]}` at word "
                                          f"position {index + 1}")
        raise ConfigError(node.where, f"*** Configuration line starting `{node.keyword}` is missing a "
                                      f"parameter at word position {index + 1}")
    return node.words[index]


def _bool(node: Node, what: str) -> bool:
    """Keywords that take an optional on/off word (check_true_false())."""
    if len(node.words) < 2:
        return True
    word = node.words[1]
    if word in ("true", "on", "yes"):
        return True
    if word in ("false", "off", "no"):
        return False
    raise ConfigError(node.where, f"Invalid {what} parameter {word}")


def _address(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _port(node: Node, index: int, what: str) -> int:
    """inet_stosockaddr()'s port: 1-65535, and "0"/absent means none."""
    if len(node.words) <= index or not node.words[index].strip("0"):
        return 0
    text = node.words[index]
    if not text.isdigit() or not 0 < int(text) <= 65535:
        raise ConfigError(node.where, what)
    return int(text)


def _script(node: Node) -> list[str]:
    """A notify/misc script: the rest of the line, split into argv as
    keepalived's notify_script_init() does (a quoted word may hold spaces)."""
    if len(node.words) < 2:
        raise ConfigError(node.where, f"{node.keyword}: script missing")
    if len(node.words) == 2:
        try:
            return shlex.split(node.words[1])
        except ValueError as exc:
            raise ConfigError(node.where, f"{node.keyword}: {exc}") from None
    return node.args


def _block(node: Node) -> list[Node]:
    if node.block is None:
        raise ConfigError(node.where, "Missing '{' at beginning of configuration block")
    return node.block


def _no_block(node: Node) -> None:
    if node.block is not None:
        raise ConfigError(node.where, f"'{node.keyword}' does not take a {{ }} block")


def _unknown(node: Node) -> ConfigError:
    if node.keyword in NOT_CARRIED_OUT:
        return ConfigError(node.where, NOT_CARRIED_OUT[node.keyword])
    return ConfigError(node.where, f"Unknown keyword '{node.keyword}'")


def _forwarding(node: Node, kind: str) -> tuple[Forward, TunType, int, int]:
    """svr_forwarding_handler(): NAT|DR|TUN [type ipip|gue|gre] [port N] [nocsum|csum|remcsum]."""
    method = {"NAT": Forward.MASQ, "DR": Forward.ROUTE, "TUN": Forward.TUNNEL}.get(_arg(node, 1))
    if method is None:
        raise ConfigError(node.where, f"PARSER : unknown [{node.words[1]}] routing method for {kind} server.")
    tun, port, csum = TunType.IPIP, 0, TUN_NOCSUM
    words, i = node.words, 2
    while i < len(words):
        word = words[i]
        if word == "type":
            if i + 1 == len(words):
                raise ConfigError(node.where, f"Missing tunnel type for {kind} server.")
            tun = {"ipip": TunType.IPIP, "gue": TunType.GUE, "gre": TunType.GRE}.get(words[i + 1])
            if tun is None:
                raise ConfigError(node.where, f"Unknown tunnel type {words[i + 1]} for {kind} server.")
            i += 1
        elif word == "port":
            if i + 1 == len(words):
                raise ConfigError(node.where, f"Missing port for {kind} server gue tunnel.")
            port = _unsigned(node, i + 1, 1, 65535, "Invalid gue tunnel port {} for " + kind + " server.")
            i += 1
        elif word in ("nocsum", "csum", "remcsum"):
            csum = {"nocsum": TUN_NOCSUM, "csum": TUN_CSUM, "remcsum": TUN_REMCSUM}[word]
        else:
            raise ConfigError(node.where, f"Invalid tunnel option {word} for {kind} server.")
        i += 1
    if (tun is TunType.GUE) != (port != 0):
        raise ConfigError(node.where, "gue tunnels require port, otherwise cannot have port.")
    if tun is TunType.IPIP and csum != TUN_NOCSUM:
        raise ConfigError(node.where, "ipip tunnels do not support checksum option.")
    if tun is TunType.GRE and csum == TUN_REMCSUM:
        raise ConfigError(node.where, "gre tunnels do not support remote checksum option.")
    return method, tun, port, csum


class _Parser:
    def __init__(self) -> None:
        self.cfg = Configuration()
        self.groups: dict[str, list[GroupEntry]] = {}
        self.group_where: dict[str, Where] = {}

    # ------------------------------------------------------------ top level
    def top(self, nodes: list[Node]) -> None:
        for node in nodes:
            key = node.keyword
            if key in GLOBAL_SECTIONS:
                self.global_defs(node)
            elif key in VRRP_SECTIONS:
                name = f" {node.args[0]}" if node.args else ""
                self.cfg.notes.append(f"{node.where} {key}{name} ignored: VRRP and its tracking stay "
                                      "with keepalived (run it as `keepalived --vrrp`)")
            elif key == "SSL":
                self.ssl(node)
            elif key == "virtual_server_group":
                self.group(node)
            elif key == "virtual_server":
                self.cfg.virtual_servers.append(self.virtual_server(node))
            else:
                raise _unknown(node)

    def global_defs(self, node: Node) -> None:
        self.cfg.notes.append(f"{node.where} global_defs ignored: keepalived's global settings "
                              "(notification, router_id, scripts...) stay with keepalived")
        for sub in node.block or []:
            if sub.keyword in LVS_GLOBALS:
                why = LVS_GLOBALS[sub.keyword]
                self.cfg.notes.append(f"{sub.where} {sub.keyword} not carried out: {why}")

    def ssl(self, node: Node) -> None:
        for sub in _block(node):
            value = _arg(sub, 1)
            if sub.keyword == "ca":
                self.cfg.ssl_ca = value
            elif sub.keyword == "certificate":
                self.cfg.ssl_certificate = value
            elif sub.keyword == "key":
                self.cfg.ssl_key = value
            elif sub.keyword == "password":
                self.cfg.ssl_password = value
            else:
                raise _unknown(sub)

    # ------------------------------------------------------------ groups
    def group(self, node: Node) -> None:
        name = _arg(node, 1)
        entries = [self.group_entry(sub, name) for sub in _block(node)]
        if not entries:
            raise ConfigError(node.where, f"virtual server group {name} has no entries - removing")
        self.groups[name] = entries
        self.group_where[name] = node.where

    def group_entry(self, node: Node, group: str) -> GroupEntry:
        """alloc_vsg_entry(): ``fwmark N [inet|inet6]`` or ``ADDR[-END|/MASK] [PORT]``."""
        if node.keyword == "fwmark":
            mark = _unsigned(node, 1, 0, UINT_MAX,
                             f"({group}): fwmark '{{}}' must be in [0, {UINT_MAX}] - ignoring")
            family = 0
            if len(node.words) > 2:
                family = {"inet": AF_INET, "inet6": AF_INET6}.get(node.words[2], -1)
                if family < 0:
                    raise ConfigError(node.where, f"({group}): fwmark '{mark}' family {node.words[2]} "
                                                  "unknown "
                                                  "- ignoring")
            return GroupEntry(node.where, fwmark=mark, family=family)
        text = node.keyword
        port = _port(node, 1, f"Invalid virtual server group IP address {text} - skipping")
        first, last = self.range(node, text)
        return GroupEntry(node.where, first=first, last=last, port=port)

    def range(self, node: Node, text: str) -> tuple[IPAddress, IPAddress]:
        if "/" in text:
            try:
                net = ipaddress.ip_network(text, strict=True)
            except ValueError:
                raise ConfigError(node.where, f"Invalid netmask - {text} - skipping") from None
            return net.network_address, net.broadcast_address
        start, dash, end = text.partition("-")
        first = _address(start)
        if first is None:
            raise ConfigError(node.where, f"Invalid virtual server group IP address {text} - skipping")
        if not dash:
            return first, first
        last = _address(end)
        if last is None:  # the old form: 192.168.200.3-10 ends the last byte (16-bit group for IPv6)
            width = 8 if first.version == 4 else 16
            if not end.isdigit() and not (first.version == 6 and re.fullmatch(r"[0-9a-fA-F]+", end)):
                raise ConfigError(node.where, f"Invalid range end {text} - skipping")
            top = int(end, 10 if first.version == 4 else 16)
            low = int(first) & ((1 << width) - 1)
            if top >= 1 << width or low >= top:
                raise ConfigError(node.where, f"Address range end is not greater than address range start - "
                                              f"{text} - skipping")
            last = ipaddress.ip_address(int(first) - low + top)
        if last.version != first.version:
            raise ConfigError(node.where, f"Range address families do not match {text} - skipping")
        if int(last) < int(first):
            raise ConfigError(node.where, f"Address range end is less than address range start - {text} "
                                          "- skipping")
        return first, last

    # ------------------------------------------------------------ virtual servers
    def virtual_server(self, node: Node) -> VirtualServer:
        """alloc_vs(): ``IP [PORT]``, ``fwmark N`` or ``group NAME``."""
        first = _arg(node, 1)
        vs = VirtualServer(node.where)
        if first == "group":
            vs.group = _arg(node, 2)
        elif first == "fwmark":
            vs.fwmark = _unsigned(node, 2, 0, IPVS_FWMARK_MAX,
                                  f"virtual server fwmark '{{}}' must be in [0, {IPVS_FWMARK_MAX}] "
                                  "- ignoring")
        else:
            port_text = node.words[2] if len(node.words) > 2 else ""
            vs.addr = _address(first)
            if vs.addr is None:
                raise ConfigError(node.where, f"Invalid virtual server IP address/port {first}/{port_text} "
                                              "- skipping")
            vs.port = _port(node, 2, f"Invalid virtual server IP address/port {first}/{port_text} - skipping")
            vs.af = AF_INET if vs.addr.version == 4 else AF_INET6
        for sub in _block(node):
            self.vs_keyword(vs, sub)
        self.vs_end(vs)
        return vs

    def vs_keyword(self, vs: VirtualServer, node: Node) -> None:
        key = node.keyword
        handler = VS_KEYWORDS.get(key)
        if handler is not None:
            if key != "real_server" and key not in BLOCK_KEYWORDS:
                _no_block(node)
            handler(self, vs, node)
        elif key in SCHED_FLAGS:
            _no_block(node)
            self.sched_flag(vs, node)
        else:
            raise _unknown(node)

    def vs_end(self, vs: VirtualServer) -> None:
        """vs_end_handler(): the family from the sorry server when none was given."""
        if vs.sorry is not None and vs.sorry.fwd is not Forward.TUNNEL:
            if not vs.af:
                vs.af = vs.sorry.af
            elif vs.af != vs.sorry.af:
                raise ConfigError(vs.sorry.where, "Address family of virtual server and sorry server "
                                                  f"{vs.sorry.addr} don't match - skipping sorry server.")
        if not vs.af and not vs.group:
            families = {rs.af for rs in vs.real_servers}
            vs.af = families.pop() if len(families) == 1 else AF_INET

    def ip_family(self, vs: VirtualServer, node: Node) -> None:
        af = {"inet": AF_INET, "inet6": AF_INET6}.get(_arg(node, 1))
        if af is None:
            raise ConfigError(node.where, f"unknown address family {node.words[1]}")
        if vs.af and af != vs.af:
            raise ConfigError(node.where, f"Virtual server specified family {node.words[1]} conflicts with "
                                          "server family")
        vs.af = af

    def lb_algo(self, vs: VirtualServer, node: Node) -> None:
        name = _arg(node, 1)
        if name not in LVS_SCHEDULERS or name not in SCHEDULERS:
            raise ConfigError(node.where, f"Invalid lvs_scheduler '{name}' - ignoring")
        vs.scheduler = name

    def sched_flag(self, vs: VirtualServer, node: Node) -> None:
        """lbflags_handler(): sh-/mh- flags only after their scheduler."""
        key = node.keyword
        generic = {"ops": F_ONEPACKET, "flag-1": F_SCHED1, "flag-2": F_SCHED2, "flag-3": F_SCHED3}
        if key in generic:
            vs.flags |= generic[key]
        elif key.startswith(vs.scheduler + "-") and vs.scheduler in ("sh", "mh"):
            vs.flags |= F_SCHED2 if key.endswith("-port") else F_SCHED1
        else:
            raise ConfigError(node.where, f"{key} only applies to {key[:2]} scheduler - ignoring")

    def lb_kind(self, vs: VirtualServer, node: Node) -> None:
        vs.fwd, vs.tun_type, vs.tun_port, vs.tun_flags = _forwarding(node, "virtual")

    def persistence_timeout(self, vs: VirtualServer, node: Node) -> None:
        if len(node.words) < 2:
            vs.persistence_timeout = DEFAULT_PERSISTENCE
            return
        vs.persistence_timeout = _unsigned(node, 1, 1, MAX_TIMEOUT, "persistence_timeout invalid")

    def persistence_granularity(self, vs: VirtualServer, node: Node) -> None:
        text = _arg(node, 1)
        af = vs.af or (AF_INET if "." in text else AF_INET6)
        if af == AF_INET6:
            vs.persistence_granularity = _unsigned(node, 1, 1, 128, "Invalid IPv6 persistence_granularity "
                                                                   "specified - {}")
        else:
            mask = _address(text)
            if mask is None or mask.version != 4:
                raise ConfigError(node.where, f"Invalid IPv4 persistence_granularity specified - {text}")
            vs.persistence_granularity = int(mask)
        vs.af = vs.af or af
        if not vs.persistence_timeout:
            vs.persistence_timeout = DEFAULT_PERSISTENCE

    def protocol(self, vs: VirtualServer, node: Node) -> None:
        proto = {"TCP": IPPROTO_TCP, "UDP": IPPROTO_UDP, "SCTP": IPPROTO_SCTP}.get(_arg(node, 1).upper())
        if proto is None:
            raise ConfigError(node.where, f"Unknown protocol {node.words[1]} - ignoring")
        vs.protocol = proto

    def quorum(self, vs: VirtualServer, node: Node) -> None:
        vs.quorum = _unsigned(node, 1, 1, UINT_MAX, f"Quorum {{}} must be in [1, {UINT_MAX}]. Setting to 1.")

    def hysteresis(self, vs: VirtualServer, node: Node) -> None:
        vs.hysteresis = _unsigned(node, 1, 0, UINT_MAX,
                                  f"Hysteresis {{}} must be in [0, {UINT_MAX}] - ignoring")

    def sorry_server(self, vs: VirtualServer, node: Node) -> None:
        addr = _address(_arg(node, 1))
        if addr is None:
            raise ConfigError(node.where, f"Invalid sorry server IP address {node.words[1]} - skipping")
        port = _port(node, 2, f"Invalid sorry server IP address {node.words[1]} - skipping")
        vs.sorry = RealServer(node.where, addr, port, weight=1, fwd=vs.fwd, tun_type=vs.tun_type,
                              tun_port=vs.tun_port, tun_flags=vs.tun_flags)

    def sorry_server_inhibit(self, vs: VirtualServer, node: Node) -> None:
        if vs.sorry is None:
            raise ConfigError(node.where, "Ignoring sorry_server inhibit used before or without sorry_server")
        vs.sorry_inhibit = True

    def sorry_server_lvs_method(self, vs: VirtualServer, node: Node) -> None:
        if vs.sorry is None:
            raise ConfigError(node.where, "sorry_server forwarding used without sorry_server")
        vs.sorry.fwd, vs.sorry.tun_type, vs.sorry.tun_port, vs.sorry.tun_flags = _forwarding(node, "sorry")

    def vs_common(self, vs: VirtualServer, node: Node) -> None:
        """Timing keywords a virtual server passes down to its real servers."""
        key = node.keyword
        if key == "delay_loop":
            vs.delay_loop = _timer(node, 1, 1e-6, "virtual server delay loop '{}' invalid - ignoring")
        elif key == "connect_timeout":
            vs.connect_timeout = _timer(node, 1, 1e-6, "virtual server connect_timeout {} invalid - ignoring")
        elif key == "delay_before_retry":
            vs.delay_before_retry = _timer(node, 1, 0,
                                           "virtual server delay before retry '{}' invalid - ignoring")
        elif key == "warmup":
            vs.warmup = _timer(node, 1, 0, "virtual server warmup '{}' invalid - ignoring")
        elif key == "retry":
            vs.retry = _unsigned(node, 1, 1, UINT_MAX, "retry value invalid - {}")
        elif key == "weight":
            vs.weight = _unsigned(node, 1, 1, WEIGHT_LIMIT,
                                  f"Virtual server weight {{}} is outside range 1-{WEIGHT_LIMIT}")

    def vs_flags(self, vs: VirtualServer, node: Node) -> None:
        key = node.keyword
        if key == "inhibit_on_failure":
            vs.inhibit = _bool(node, "inhibit_on_failure")
        elif key == "alpha":
            vs.alpha = True
        elif key == "omega":
            vs.omega = True
        elif key == "virtualhost":
            vs.virtualhost = _arg(node, 1)
        elif key == "persistence_engine":
            vs.persistence_engine = _arg(node, 1)
        elif key == "smtp_alert":
            _bool(node, "virtual_server smtp_alert")
            self.cfg.warnings.append(f"{node.where} smtp_alert: ipvs2nft sends no e-mail; the alerts are "
                                     "logged to stderr")

    def quorum_script(self, vs: VirtualServer, node: Node) -> None:
        if node.keyword == "quorum_up":
            vs.quorum_up = _script(node)
        else:
            vs.quorum_down = _script(node)

    def feedback(self, vs: VirtualServer, node: Node) -> None:
        """``ipvs2nft_feedback response|load { interval smoothing deadband min_weight }``."""
        method = _arg(node, 1)
        if method not in ("response", "load"):
            raise ConfigError(node.where, f"ipvs2nft_feedback: '{method}' is neither response nor load")
        fb = Feedback(node.where, method)
        for sub in node.block or []:
            if sub.keyword == "interval":
                fb.interval = _timer(sub, 1, 0.1, "ipvs2nft_feedback interval '{}' invalid (>= 0.1 s)")
            elif sub.keyword == "smoothing":
                fb.smoothing = _fraction(sub)
            elif sub.keyword == "deadband":
                fb.deadband = float(_unsigned(sub, 1, 0, 100, "ipvs2nft_feedback deadband '{}' is not a "
                                                              "percentage"))
            elif sub.keyword == "min_weight":
                fb.min_weight = _unsigned(sub, 1, 1, WEIGHT_LIMIT,
                                          "ipvs2nft_feedback min_weight '{}' invalid")
            else:
                raise ConfigError(sub.where, f"Unknown keyword '{sub.keyword}' in ipvs2nft_feedback")
        vs.feedback = fb

    # ------------------------------------------------------------ real servers
    def real_server(self, vs: VirtualServer, node: Node) -> None:
        addr = _address(_arg(node, 1))
        port_text = node.words[2] if len(node.words) > 2 else ""
        if addr is None:
            raise ConfigError(node.where, f"Invalid real server ip address/port {node.words[1]}/{port_text} "
                                          "- skipping")
        port = _port(node, 2, f"Invalid real server ip address/port {node.words[1]}/{port_text} - skipping")
        rs = RealServer(node.where, addr, port, fwd=vs.fwd, tun_type=vs.tun_type, tun_port=vs.tun_port,
                        tun_flags=vs.tun_flags)
        for sub in _block(node):
            self.rs_keyword(vs, rs, sub)
        if rs.fwd is not Forward.TUNNEL:  # rs_end_handler()
            if not vs.af:
                vs.af = rs.af
            elif vs.af != rs.af:
                raise ConfigError(node.where, "Address family of virtual server and real server "
                                              f"{rs.addr} don't match - skipping real server.")
        vs.real_servers.append(rs)

    def rs_keyword(self, vs: VirtualServer, rs: RealServer, node: Node) -> None:
        key = node.keyword
        if key in CHECKERS:
            rs.checkers += self.checker(vs, node)
            return
        if key == "ipvs2nft_snmp":
            rs.snmp = self.snmp(node)
            return
        _no_block(node)
        if key == "weight":
            rs.weight = _unsigned(node, 1, 0, WEIGHT_LIMIT,
                                  f"Real server weight {{}} is outside range 0-{WEIGHT_LIMIT}")
        elif key == "lvs_method":
            rs.fwd, rs.tun_type, rs.tun_port, rs.tun_flags = _forwarding(node, "real")
        elif key in ("uthreshold", "lthreshold"):
            value = _unsigned(node, 1, 0, UINT_MAX, f"Invalid real_server {key} '{{}}' - ignoring")
            if key == "uthreshold":
                rs.u_threshold = value
            else:
                rs.l_threshold = value
        elif key == "inhibit_on_failure":
            rs.inhibit = _bool(node, "inhibit_on_failure")
        elif key == "alpha":
            rs.alpha = _bool(node, "alpha")
        elif key in ("notify_up", "notify_down"):
            if getattr(rs, key) is not None:
                raise ConfigError(node.where, f"({vs.group or ''}) {key} script already specified - ignoring "
                                              f"{node.words[1] if len(node.words) > 1 else ''}")
            setattr(rs, key, _script(node))
        elif key in ("retry", "delay_before_retry", "warmup", "connect_timeout", "delay_loop"):
            self.rs_timing(rs, node)
        elif key == "virtualhost":
            rs.virtualhost = _arg(node, 1)
        elif key == "smtp_alert":
            _bool(node, "real_server smtp_alert")
            self.cfg.warnings.append(f"{node.where} smtp_alert: ipvs2nft sends no e-mail; the alerts are "
                                     "logged to stderr")
        else:
            raise _unknown(node)

    def rs_timing(self, rs: RealServer, node: Node) -> None:
        key = node.keyword
        if key == "retry":
            rs.retry = _unsigned(node, 1, 1, UINT_MAX, "retry value invalid - {}")
        elif key == "delay_before_retry":
            rs.delay_before_retry = _timer(node, 1, 0,
                                           "real server delay_before_retry '{}' invalid - ignoring")
        elif key == "warmup":
            rs.warmup = _timer(node, 1, 0, "real server warmup '{}' invalid - ignoring")
        elif key == "connect_timeout":
            rs.connect_timeout = _timer(node, 1, 1e-6, "real server connect_timeout {} invalid - ignoring")
        else:
            rs.delay_loop = _timer(node, 1, 1e-6, "real server delay_loop '{}' invalid - ignoring")

    def snmp(self, node: Node) -> SnmpSource:
        src = SnmpSource(node.where)
        for sub in _block(node):
            key = sub.keyword
            if key == "community":
                src.community = _arg(sub, 1)
            elif key == "version":
                src.version = _arg(sub, 1)
                if src.version not in ("1", "2c"):
                    raise ConfigError(sub.where, f"ipvs2nft_snmp version '{src.version}': 1 or 2c")
            elif key == "port":
                src.port = _unsigned(sub, 1, 1, 65535, "ipvs2nft_snmp port '{}' invalid")
            elif key == "oid":
                src.oid = _arg(sub, 1)
                if src.oid not in ("laLoad", "hrProcessorLoad") and not re.fullmatch(r"\.?[0-9]+(\.[0-9]+)+",
                                                                                     src.oid):
                    raise ConfigError(sub.where, f"ipvs2nft_snmp oid '{src.oid}': laLoad, hrProcessorLoad or "
                                                 "a numeric OID")
            elif key == "capacity":
                src.capacity = _timer(sub, 1, 1e-6, "ipvs2nft_snmp capacity '{}' invalid")
            elif key == "timeout":
                src.timeout = _timer(sub, 1, 1e-3, "ipvs2nft_snmp timeout '{}' invalid")
            elif key == "connect_ip":
                src.address = _address(_arg(sub, 1))
                if src.address is None:
                    raise ConfigError(sub.where, f"ipvs2nft_snmp connect_ip '{sub.words[1]}' invalid")
            else:
                raise ConfigError(sub.where, f"Unknown keyword '{key}' in ipvs2nft_snmp")
        return src

    # ------------------------------------------------------------ checkers
    def checker(self, vs: VirtualServer, node: Node) -> list[Checker]:
        kind = node.keyword
        if kind in NOT_CARRIED_OUT:
            raise ConfigError(node.where, NOT_CARRIED_OUT[kind])
        make = CHECKERS[kind]
        chk = make(kind, node.where)
        hosts: list[Node] = []
        for sub in _block(node):
            if kind == "SMTP_CHECK" and sub.keyword == "host":
                hosts.append(sub)
                continue
            self.checker_keyword(chk, sub)
        self.checker_end(chk, node)
        if not hosts:
            return [chk]
        # the old SMTP_CHECK `host { }` blocks: one checker per host, with the outer settings
        out = []
        for host in hosts:
            copy = _clone(chk)
            for sub in _block(host):
                if sub.keyword not in CONNECTION_KEYWORDS:
                    raise ConfigError(sub.where, f"Unknown keyword '{sub.keyword}' in SMTP_CHECK host")
                self.common(copy, sub)
            out.append(copy)
        return out

    def checker_keyword(self, chk: Checker, node: Node) -> None:
        key = node.keyword
        if key == "url" and isinstance(chk, HttpCheck):
            chk.urls.append(self.url(node))
            return
        _no_block(node)
        if key in COMMON_KEYWORDS and (chk.has_connection or key not in CONNECTION_KEYWORDS):
            self.common(chk, node)
        elif isinstance(chk, HttpCheck) and key in ("nb_get_retry", "virtualhost", "http_protocol",
                                                     "enable_sni", "fast_recovery"):
            self.http_keyword(chk, node)
        elif isinstance(chk, MiscCheck) and key in ("misc_path", "misc_timeout", "misc_dynamic", "user"):
            self.misc_keyword(chk, node)
        elif isinstance(chk, SmtpCheck) and key == "helo_name":
            chk.helo_name = _arg(node, 1)
        elif isinstance(chk, DnsCheck) and key in ("type", "name"):
            self.dns_keyword(chk, node)
        elif isinstance(chk, UdpCheck) and key in ("payload", "require_reply", "min_reply_length",
                                                    "max_reply_length"):
            self.udp_keyword(chk, node)
        else:
            raise _unknown(node)

    def common(self, chk: Checker, node: Node) -> None:
        key = node.keyword
        if key == "connect_ip":
            chk.connect_ip = _address(_arg(node, 1))
            if chk.connect_ip is None:
                raise ConfigError(node.where, f"Invalid connect_ip address {node.words[1]} - ignoring")
        elif key == "connect_port":
            chk.connect_port = _unsigned(node, 1, 1, 65535, "Invalid checker connect_port '{}'")
        elif key == "bindto":
            chk.bindto = _address(_arg(node, 1))
            if chk.bindto is None:
                raise ConfigError(node.where, f"Invalid bindto address {node.words[1]} - ignoring")
        elif key == "bind_port":
            chk.bind_port = _unsigned(node, 1, 1, 65535, "Invalid checker bind_port '{}'")
        elif key == "bind_if":
            raise ConfigError(node.where, NOT_CARRIED_OUT["bind_if"])
        elif key == "connect_timeout":
            chk.connect_timeout = _timer(node, 1, 1e-6, "connect_timeout {} invalid - ignoring")
        elif key == "fwmark":
            chk.fwmark = _unsigned(node, 1, 0, UINT_MAX, "Invalid fwmark connection value '{}'")
        elif key == "retry":
            chk.retry = _unsigned(node, 1, 0, UINT_MAX, "Invalid retry connection value '{}'")
        elif key == "delay_before_retry":
            chk.delay_before_retry = _timer(node, 1, 0, "Invalid delay_before_retry connection value '{}'")
        elif key == "warmup":
            chk.warmup = _timer(node, 1, 0, "Invalid warmup connection value '{}'")
        elif key == "delay_loop":
            chk.delay_loop = _timer(node, 1, 1e-6, "delay_loop '{}' is invalid - ignoring")
        elif key == "alpha":
            chk.alpha = _bool(node, "alpha")
        elif key == "log_all_failures":
            chk.log_all_failures = _bool(node, "log_all_failures")

    def checker_end(self, chk: Checker, node: Node) -> None:
        if isinstance(chk, HttpCheck) and not chk.urls:
            raise ConfigError(node.where, "HTTP/SSL_GET checker has no urls specified - ignoring")
        if isinstance(chk, MiscCheck) and not chk.path:
            raise ConfigError(node.where, "Misc check with no script specified - ignoring")
        if isinstance(chk, UdpCheck) and chk.max_reply_length and chk.min_reply_length > chk.max_reply_length:
            raise ConfigError(node.where, "UDP_CHECK min_reply_length > max_reply_length")

    def url(self, node: Node) -> Url:
        url = Url(node.where)
        codes: set[int] = set()
        for sub in _block(node):
            key = sub.keyword
            if key == "path":
                url.path = _arg(sub, 1)
            elif key == "digest":
                text = _arg(sub, 1)
                if url.digest is not None:
                    raise ConfigError(sub.where, f"Digest '{text}' is a duplicate")
                if len(text) != 32:
                    raise ConfigError(sub.where, f"digest '{text}' character length should be 32 rather than "
                                                 f"{len(text)}")
                try:
                    url.digest = bytes.fromhex(text)
                except ValueError:
                    raise ConfigError(sub.where, f"Unable to interpret hex digit in '{text}'") from None
            elif key == "status_code":
                codes |= _status_codes(sub)
            elif key == "virtualhost":
                url.virtualhost = _arg(sub, 1)
            elif key == "regex":
                url.regex = _arg(sub, 1)
                try:
                    re.compile(url.regex)
                except re.error as exc:
                    raise ConfigError(sub.where, f"Invalid regex: '{url.regex}': {exc}") from None
            elif key == "regex_no_match":
                url.regex_no_match = True
            else:
                raise _unknown(sub)
        if not url.path:
            raise ConfigError(node.where, "HTTP/SSL_GET checker url has no path - ignoring")
        if url.regex_no_match and url.regex is None:
            raise ConfigError(node.where, "regex parameters specified without regex")
        url.status_codes = frozenset(codes)
        return url

    def http_keyword(self, chk: HttpCheck, node: Node) -> None:
        key = node.keyword
        if key == "nb_get_retry":
            self.cfg.warnings.append(f"{node.where} nb_get_retry is deprecated - please use 'retry'")
            chk.retry = _unsigned(node, 1, 0, UINT_MAX, "Invalid nb_get_retry value '{}'")
        elif key == "virtualhost":
            chk.virtualhost = _arg(node, 1)
        elif key == "http_protocol":
            proto = _arg(node, 1)
            if proto not in ("1.0", "1.1", "1.0C", "1.0c"):
                raise ConfigError(node.where, f"Invalid http_protocol version {proto}")
            chk.http_protocol = proto.upper()
        elif key == "enable_sni":
            chk.enable_sni = _bool(node, "enable_sni")
        else:
            chk.fast_recovery = _bool(node, "fast_recovery")

    def misc_keyword(self, chk: MiscCheck, node: Node) -> None:
        key = node.keyword
        if key == "misc_path":
            chk.path = _script(node)
        elif key == "misc_timeout":
            chk.timeout = float(_unsigned(node, 1, 0, UINT_MAX, "Invalid misc_timeout value '{}'")) or None
        elif key == "user":
            chk.user = _arg(node, 1)
            chk.group = node.words[2] if len(node.words) > 2 else None
            if not _known_user(chk.user, chk.group):
                raise ConfigError(node.where, f"Unable to set uid/gid for misc script - user {chk.user} "
                                              "unknown")
        else:
            chk.dynamic = True

    def dns_keyword(self, chk: DnsCheck, node: Node) -> None:
        if node.keyword == "type":
            qtype = _arg(node, 1).upper()
            if qtype not in DNS_TYPES:
                raise ConfigError(node.where, f"DNS_CHECK type {node.words[1]} is not valid")
            chk.qtype = qtype
        else:
            chk.name = _arg(node, 1)

    def udp_keyword(self, chk: UdpCheck, node: Node) -> None:
        key = node.keyword
        if key == "payload":
            text = "".join(node.args)
            try:
                chk.payload = bytes.fromhex(text)
            except ValueError:
                raise ConfigError(node.where, f"Invalid UDP_CHECK payload '{text}'") from None
        elif key == "require_reply":
            chk.require_reply = True
            if len(node.words) > 1:  # an expected reply, like payload
                raise ConfigError(node.where, "UDP_CHECK require_reply with expected data is not supported "
                                              "by ipvs2nft")
        elif key == "min_reply_length":
            chk.min_reply_length = _unsigned(node, 1, 0, 65535, "Invalid UDP_CHECK min_reply_length '{}'")
        else:
            chk.max_reply_length = _unsigned(node, 1, 0, 65535, "Invalid UDP_CHECK max_reply_length '{}'")

    # ------------------------------------------------------------ validation
    def link_groups(self) -> None:
        for vs in self.cfg.virtual_servers:
            if vs.group is None:
                continue
            if vs.group not in self.groups:
                raise ConfigError(vs.where, f"Virtual server group {vs.group} specified but not configured "
                                            "- ignoring virtual server")
            vs.group_entries = self.groups[vs.group]
            families = {(AF_INET if e.first.version == 4 else AF_INET6) for e in vs.group_entries if e.first}
            families |= {e.family for e in vs.group_entries if e.fwmark and e.family}
            if len(families) > 1:
                raise ConfigError(vs.where, f"virtual server group {vs.group} mixes IPv4 and IPv6: not "
                                            "supported by ipvs2nft (use one group per family)")
            vs.af = vs.af or (families.pop() if families else AF_INET)

    def validate(self) -> None:
        """validate_check_config(), in keepalived's order."""
        self.link_groups()
        seen: dict[tuple, Where] = {}
        for vs in self.cfg.virtual_servers:
            self.validate_vs(vs)
            for key in _service_keys(vs):
                if key in seen:
                    raise ConfigError(vs.where, f"virtual server {vs.name()} duplicates the service defined "
                                                f"at {seen[key]}")
                seen[key] = vs.where

    def validate_vs(self, vs: VirtualServer) -> None:
        warn = self.cfg.warnings.append
        name = vs.name()
        if not vs.real_servers:
            raise ConfigError(vs.where, f"Virtual server {name} has no real servers - ignoring")
        by_address = (vs.group and any(e.first for e in vs.group_entries)) or (not vs.group and not vs.fwmark)
        by_mark = (vs.group and not any(e.first for e in vs.group_entries)) or (not vs.group and vs.fwmark)
        if by_address:
            if not vs.protocol:
                warn(f"{vs.where} Virtual server {name}: no protocol set - defaulting to UDP")
                vs.protocol = IPPROTO_UDP
            if vs.flags & F_ONEPACKET and vs.protocol != IPPROTO_UDP:
                warn(f"{vs.where} Virtual server {name}: one packet scheduling requires UDP - resetting")
                vs.flags &= ~F_ONEPACKET
            if not vs.persistence_timeout and not vs.group and not vs.fwmark and not vs.port:
                warn(f"{vs.where} Virtual server {name}: zero port only valid for persistent services "
                     "- setting")
                vs.persistence_timeout = DEFAULT_PERSISTENCE
        if not vs.persistence_timeout and vs.group and any(e.first and not e.port for e in vs.group_entries):
            warn(f"{vs.where} Virtual server {name}: zero port only valid for persistent services - setting")
            vs.persistence_timeout = DEFAULT_PERSISTENCE
        name = vs.name()  # FMT_VS() shows the protocol just set
        if vs.protocol and by_mark:
            warn(f"{vs.where} Warning: Virtual server {name}: protocol specified for fwmark - protocol "
                 "will be "
                 "ignored")
            vs.protocol = 0
        if not vs.scheduler:
            warn(f"{vs.where} Virtual server {name}: no scheduler set, setting default 'wlc'")
            vs.scheduler = "wlc"
        if vs.feedback is not None and vs.scheduler in ("rr", "lc", "dh"):
            warn(f"{vs.feedback.where} ipvs2nft_feedback: lb_algo {vs.scheduler} does not use weights; the "
                 "feedback weights need wrr, wlc, sed, sh, mh...")
        self.validate_real_servers(vs, warn)

    def validate_real_servers(self, vs: VirtualServer, warn) -> None:
        name = vs.name()
        seen: dict[tuple, Where] = {}
        weight_sum = 0
        for rs in vs.real_servers:
            key = (rs.addr, rs.port)
            if key in seen:
                raise ConfigError(rs.where, f"VS {name}: real server {rs.addr}:{rs.port} is duplicated - "
                                            "removing second rs")
            seen[key] = rs.where
            if rs.fwd is None:
                if vs.fwd is None:
                    warn(f"{vs.where} Virtual server {name}: no forwarding method set, setting default NAT")
                    vs.fwd = Forward.MASQ
                rs.fwd, rs.tun_type = vs.fwd, vs.tun_type
                rs.tun_port, rs.tun_flags = vs.tun_port, vs.tun_flags
            self.inherit(vs, rs)
            weight_sum += rs.weight or 0
            self.fix_port(vs, rs, warn, "real server")
            if vs.sorry is not None and (vs.sorry.addr, vs.sorry.port or vs.port) == (rs.addr, rs.port):
                raise ConfigError(vs.sorry.where, f"Virtual server {name}: a sorry server that is also a "
                                                  "real "
                                                  "server is not supported by ipvs2nft")
        if vs.sorry is not None:
            if vs.sorry.fwd is None:
                if vs.fwd is None:
                    warn(f"{vs.where} Virtual server {name}: no forwarding method set, setting default NAT")
                    vs.fwd = Forward.MASQ
                vs.sorry.fwd = vs.fwd
            vs.sorry.inhibit = vs.sorry_inhibit
            self.fix_port(vs, vs.sorry, warn, "sorry server")
        if vs.quorum > weight_sum:
            warn(f"{vs.where} Warning - quorum {vs.quorum} for {name} exceeds total weight of real servers "
                 f"{weight_sum}, reducing quorum to {weight_sum}")
            vs.quorum = weight_sum
        if vs.hysteresis >= vs.quorum:
            fixed = max(vs.quorum - 1, 0)
            warn(f"{vs.where} Virtual server {name}: hysteresis {vs.hysteresis} >= quorum {vs.quorum}; "
                 "setting "
                 f"hysteresis to {fixed}")
            vs.hysteresis = fixed
        for rs in vs.real_servers:
            for chk in rs.checkers:
                self.resolve_checker(vs, rs, chk)

    @staticmethod
    def inherit(vs: VirtualServer, rs: RealServer) -> None:
        """A real server's unset settings come from its virtual server."""
        rs.alpha = vs.alpha if rs.alpha is None else rs.alpha
        rs.inhibit = vs.inhibit if rs.inhibit is None else rs.inhibit
        rs.retry = vs.retry if rs.retry is None else rs.retry
        rs.connect_timeout = vs.connect_timeout if rs.connect_timeout is None else rs.connect_timeout
        rs.delay_loop = vs.delay_loop if rs.delay_loop is None else rs.delay_loop
        rs.warmup = vs.warmup if rs.warmup is None else rs.warmup
        if rs.delay_before_retry is None:
            rs.delay_before_retry = vs.delay_before_retry
        rs.weight = vs.weight if rs.weight is None else rs.weight
        rs.virtualhost = rs.virtualhost or vs.virtualhost

    @staticmethod
    def fix_port(vs: VirtualServer, rs: RealServer, warn, what: str) -> None:
        """Ports as validate_check_config() sets them: NAT keeps its own (or the
        service's), DR/TUN use the service's, fwmark services none."""
        if vs.group:
            return
        if rs.fwd is Forward.MASQ:
            if not vs.fwmark and not rs.port:
                rs.port = vs.port
            return
        if vs.fwmark:
            if rs.port:
                warn(f"{rs.where} WARNING - fwmark virtual server {vs.name()}, {what} {rs.addr} has port "
                     "specified - clearing")
                rs.port = 0
        elif not rs.port:
            rs.port = vs.port
        elif rs.port != vs.port:
            warn(f"{rs.where} WARNING - virtual server {vs.name()} and {what} {rs.addr}:{rs.port} ports "
                 "don't "
                 "match - resetting")
            rs.port = vs.port

    @staticmethod
    def resolve_checker(vs: VirtualServer, rs: RealServer, chk: Checker) -> None:
        """A checker's unset settings come from its real server (check_data.c)."""
        chk.alpha = rs.alpha if chk.alpha is None else chk.alpha
        if chk.retry is None:
            chk.retry = rs.retry if rs.retry is not None else chk.default_retry
        if chk.connect_timeout is None:
            chk.connect_timeout = rs.connect_timeout
        chk.delay_loop = rs.delay_loop if chk.delay_loop is None else chk.delay_loop
        if chk.warmup is None:
            chk.warmup = rs.warmup if rs.warmup is not None else chk.delay_loop
        if chk.delay_before_retry is None:
            if rs.delay_before_retry is not None:
                chk.delay_before_retry = rs.delay_before_retry
            else:
                chk.delay_before_retry = chk.default_delay_before_retry or chk.delay_loop
        if isinstance(chk, MiscCheck) and chk.timeout is None:
            chk.timeout = vs.delay_loop
        if isinstance(chk, HttpCheck) and chk.virtualhost is None:
            chk.virtualhost = rs.virtualhost


def _known_user(user: str, group: str | None) -> bool:
    import grp
    import pwd

    try:
        pwd.getpwnam(user)
        if group is not None:
            grp.getgrnam(group)
    except KeyError:
        return False
    return True


def _fraction(node: Node) -> float:
    text = _arg(node, 1)
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise ConfigError(node.where, f"ipvs2nft_feedback smoothing '{text}' must be in (0, 1]")
    return value


def _status_codes(node: Node) -> set[int]:
    """status_code_handler(): codes and ranges, 100-999."""
    codes: set[int] = set()
    for word in node.args:
        m = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", word)
        low = int(m.group(1)) if m else 0
        high = int(m.group(2) or low) if m else 0
        if not m or not 100 <= low <= high <= 999:
            raise ConfigError(node.where, f"Invalid HTTP_GET status code '{word}'")
        codes |= set(range(low, high + 1))
    return codes


def _clone(chk: Checker) -> Checker:
    import copy

    return copy.deepcopy(chk)


def _service_keys(vs: VirtualServer) -> list[tuple]:
    from ipvs2nft.keepalived.mapping import service_keys

    return [(k.af, k.fwmark, k.protocol, k.addr, k.port) for k in service_keys(vs)]


def _checker_factory(cls, **defaults):
    def make(kind: str, where: Where) -> Checker:
        return cls(kind, where, **defaults)

    return make


CHECKERS = {
    "TCP_CHECK": _checker_factory(Checker),
    "HTTP_GET": _checker_factory(HttpCheck, default_delay_before_retry=3.0),
    "SSL_GET": _checker_factory(HttpCheck, default_delay_before_retry=3.0),
    "MISC_CHECK": _checker_factory(MiscCheck, default_retry=0),
    "SMTP_CHECK": _checker_factory(SmtpCheck),
    "DNS_CHECK": _checker_factory(DnsCheck, default_retry=3, default_delay_before_retry=0.0),
    "UDP_CHECK": _checker_factory(UdpCheck),
    "PING_CHECK": _checker_factory(Checker),
    "BFD_CHECK": None,
    "FILE_CHECK": None,
}
CONNECTION_KEYWORDS = frozenset(("connect_ip", "connect_port", "bindto", "bind_port", "bind_if",
                                 "connect_timeout", "fwmark"))
COMMON_KEYWORDS = CONNECTION_KEYWORDS | {"retry", "delay_before_retry", "warmup", "delay_loop", "alpha",
                                         "log_all_failures"}
SCHED_FLAGS = frozenset(("ops", "flag-1", "flag-2", "flag-3", "sh-port", "sh-fallback", "mh-port",
                         "mh-fallback"))
BLOCK_KEYWORDS = frozenset(("ipvs2nft_feedback",))
VS_KEYWORDS = {
    "ip_family": _Parser.ip_family,
    "lb_algo": _Parser.lb_algo,
    "lvs_sched": _Parser.lb_algo,
    "lb_kind": _Parser.lb_kind,
    "lvs_method": _Parser.lb_kind,
    "persistence_timeout": _Parser.persistence_timeout,
    "persistence_granularity": _Parser.persistence_granularity,
    "persistence_engine": _Parser.vs_flags,
    "protocol": _Parser.protocol,
    "quorum": _Parser.quorum,
    "hysteresis": _Parser.hysteresis,
    "quorum_up": _Parser.quorum_script,
    "quorum_down": _Parser.quorum_script,
    "sorry_server": _Parser.sorry_server,
    "sorry_server_inhibit": _Parser.sorry_server_inhibit,
    "sorry_server_lvs_method": _Parser.sorry_server_lvs_method,
    "delay_loop": _Parser.vs_common,
    "connect_timeout": _Parser.vs_common,
    "delay_before_retry": _Parser.vs_common,
    "warmup": _Parser.vs_common,
    "retry": _Parser.vs_common,
    "weight": _Parser.vs_common,
    "inhibit_on_failure": _Parser.vs_flags,
    "alpha": _Parser.vs_flags,
    "omega": _Parser.vs_flags,
    "virtualhost": _Parser.vs_flags,
    "smtp_alert": _Parser.vs_flags,
    "real_server": _Parser.real_server,
    "ipvs2nft_feedback": _Parser.feedback,
}


def parse(nodes: list[Node]) -> Configuration:
    """The virtual servers of a configuration tree, validated as keepalived does."""
    parser = _Parser()
    parser.top(nodes)
    parser.validate()
    return parser.cfg


def load(path: str, config_id: str | None = None) -> Configuration:
    from ipvs2nft.keepalived.lexer import read

    return parse(read(path, config_id))


def loads(text: str, name: str = "keepalived.conf", directory: str = ".") -> Configuration:
    from ipvs2nft.keepalived.lexer import read_text

    return parse(read_text(text, name, directory))
