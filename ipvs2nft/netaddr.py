"""Addresses, ports and numbers exactly as ipvsadm 1.31 reads and prints them.

ipvsadm parses with glibc (``strtol``, ``inet_aton``, ``inet_pton``,
``gethostbyname``, ``getservbyname``) and prints with ``inet_ntop``,
``gethostbyaddr`` and ``getservbyport``.  Python's ``socket`` module calls the
very same libc functions, so this module uses them instead of re-implementing
their quirks (``inet_aton("10.1")`` is 10.0.0.1, trailing blanks are accepted,
``inet_ntop`` prints ``::ffff:1.2.3.4``...).  It is the only module that touches
name resolution or ``/etc/services``.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

AF_INET = int(socket.AF_INET)  # 2: sorts before AF_INET6 as in the kernel
AF_INET6 = int(socket.AF_INET6)  # 10

IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_SCTP = 132
PROTO_NAMES = {IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp", IPPROTO_SCTP: "sctp"}

# strtol(s, &end, 10) accepting the whole string: leading isspace() blanks,
# an optional sign, at least one decimal digit, nothing after.
_STRTOL_RE = re.compile(r"[ \t\n\v\f\r]*([+-]?[0-9]+)\Z")


def strtol(text: str) -> int | None:
    """The value of ``text`` if ``strtol(text, &end, 10)`` consumes all of it."""
    m = _STRTOL_RE.match(text)
    if not m:
        return None
    sign, digits = _split_sign(m.group(1))
    if len(digits) > 20:  # beyond any long; also keeps int() under its digit limit
        return None
    value = int(sign + digits)
    # strtol saturates and sets ERANGE beyond a 64-bit long; ipvsadm rejects that.
    if not -(2**63) <= value < 2**63:
        return None
    return value


def _split_sign(word: str) -> tuple[str, str]:
    """A signed digit string as (sign, digits without leading zeros)."""
    sign = word[0] if word[0] in "+-" else ""
    return sign, word[len(sign):].lstrip("0") or "0"


def string_to_number(text: str, low: int, high: int) -> int | None:
    """ipvsadm's ``string_to_number``: a decimal in [low, high], else None."""
    value = strtol(text)
    if value is None or not low <= value <= high:
        return None
    return value


def inet_aton(text: str) -> ipaddress.IPv4Address | None:
    """glibc ``inet_aton`` (``10.1``, ``0x7f.1``, ``1.2.3``, trailing blanks...)."""
    try:
        return ipaddress.IPv4Address(socket.inet_aton(text))
    except (OSError, ValueError):
        return None


def inet_pton6(text: str) -> ipaddress.IPv6Address | None:
    """glibc ``inet_pton(AF_INET6, ...)``."""
    try:
        return ipaddress.IPv6Address(socket.inet_pton(socket.AF_INET6, text))
    except (OSError, ValueError):
        return None


def host_to_addr(name: str) -> ipaddress.IPv4Address | None:
    """``gethostbyname`` restricted to IPv4, first address, as ipvsadm does.

    getaddrinfo is called directly rather than ``socket.gethostbyname``, which
    gives the names ``""`` and ``"<broadcast>"`` special meanings C does not.
    """
    if not name or "\0" in name:
        return None
    try:
        infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError):
        return None
    if not infos:
        return None
    return ipaddress.IPv4Address(infos[0][4][0])


def service_to_port(name: str, protocol: int) -> int | None:
    """``getservbyname`` for the protocol known at that point of the command line."""
    proto = PROTO_NAMES.get(protocol)
    if proto is None or not name or "\0" in name:
        return None
    try:
        return socket.getservbyname(name, proto)
    except (OSError, UnicodeError, ValueError):
        return None


def ipv4_from_aton_or_name(text: str) -> ipaddress.IPv4Address | None:
    """inet_aton, then a host name lookup: ipvsadm's IPv4 address rule."""
    return inet_aton(text) or host_to_addr(text)


_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_CANONICAL_V4 = re.compile(
    rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}:(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{{2}}"
    rf"|6[0-4][0-9]{{3}}|[1-5][0-9]{{4}}|[1-9][0-9]{{0,3}}|0)")


_ADDRESS_CACHE: dict[str, IPAddress] = {}


def address(text: str) -> IPAddress:
    """An address in its canonical text (as ``str()`` writes it), parsed by
    inet_pton (C) rather than ipaddress's Python parser, and cached: the
    same real servers appear in many services.  ValueError if it is none."""
    addr = _ADDRESS_CACHE.get(text)
    if addr is None:
        try:
            if ":" in text:
                addr = ipaddress.IPv6Address(socket.inet_pton(socket.AF_INET6, text))
            else:
                addr = ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, text))
        except (OSError, TypeError) as exc:
            raise ValueError(f"bad address {text!r}") from exc
        if len(_ADDRESS_CACHE) < 65536:
            _ADDRESS_CACHE[text] = addr
    return addr


@dataclass(frozen=True, slots=True)
class ParsedAddr:
    """What ``parse_service`` found: family, address and the port if one was given."""

    af: int
    addr: IPAddress
    port: int | None


def parse_service(buf: str, protocol: int) -> ParsedAddr | None:
    """ipvsadm's ``parse_service``: ``host[:port]``, ``[v6addr]:port``, bare IPv6.

    ``protocol`` is the service protocol known when the option is parsed; it
    decides how a port name is looked up (``-r RS:http`` before ``-t`` fails).
    Returns None where ipvsadm reports "illegal ... address[:port] specified".
    """
    if _CANONICAL_V4.fullmatch(buf):  # the common "a.b.c.d:port": what the rules below give it
        host, _, port_text = buf.rpartition(":")
        return ParsedAddr(AF_INET, address(host), int(port_text))
    if _c_all_digits(buf):
        return None
    port_text: str | None = None
    if buf.startswith("["):
        inner, sep, rest = buf[1:].partition("]")
        if not sep or not rest.startswith(":"):
            return None
        buf, port_text = inner, rest[1:]
    addr6 = inet_pton6(buf)
    if addr6 is not None:
        af: int = AF_INET6
        addr: IPAddress = addr6
    else:
        # As in ipvsadm, the IPv4 branch looks for its own ':' and so drops a
        # port that came from a bracketed form: "[1.2.3.4]:80" has no port.
        host, colon, port_text_v4 = buf.rpartition(":")
        if colon:
            buf, port_text = host, port_text_v4
        else:
            port_text = None
        addr4 = ipv4_from_aton_or_name(buf)
        if addr4 is None:
            return None
        af, addr = AF_INET, addr4
    if port_text is None:
        return ParsedAddr(af, addr, None)
    port = string_to_number(port_text, 0, 65535)
    if port is None:
        port = service_to_port(port_text, protocol)
    if port is None:
        return None
    return ParsedAddr(af, addr, port)


def _c_all_digits(text: str) -> bool:
    """``str_is_digit``: every char is an ASCII digit (true for "")."""
    return all("0" <= ch <= "9" for ch in text)


def parse_netmask_v4(text: str) -> int | None:
    """``-M`` for IPv4 services: inet_aton or a host name; a 32-bit mask."""
    addr = ipv4_from_aton_or_name(text)
    return None if addr is None else int(addr)


def atoi(text: str) -> int:
    """C ``atoi``: leading blanks, sign, digits, then stop ("64abc" is 64)."""
    m = re.match(r"[ \t\n\v\f\r]*([+-]?[0-9]+)", text)
    if not m:
        return 0
    sign, digits = _split_sign(m.group(1))
    value = int(sign + digits) if len(digits) <= 20 else int(sign + "1" + "0" * 20)
    # strtol saturates to a 64-bit long (keeping int() bounded for huge words too).
    value = min(max(value, -(2**63)), 2**63 - 1)
    # atoi is strtol cast to int: wrap into 32 bits like the C code sees it.
    value &= 0xFFFFFFFF
    return value - 2**32 if value >= 2**31 else value


_NTOP4: dict[int, str] = {}


def ntop(addr: IPAddress) -> str:
    """``inet_ntop`` text of an address (glibc's rules for IPv6 compression).
    IPv4 text is cached by the address's number: a listing of 10,000 services
    prints the same real servers often, and an int hashes far faster than an
    ``ipaddress`` object does."""
    if type(addr) is ipaddress.IPv4Address:
        number = int(addr)
        text = _NTOP4.get(number)
        if text is None:
            text = str(addr)
            if len(_NTOP4) < 65536:
                _NTOP4[number] = text
        return text
    return socket.inet_ntop(socket.AF_INET6, addr.packed)


@functools.lru_cache(maxsize=4096)
def addr_to_host(addr: IPAddress) -> str | None:
    """Reverse name of an address, or None (``gethostbyaddr``)."""
    try:
        return socket.gethostbyaddr(str(addr))[0]
    except (OSError, UnicodeError, ValueError):
        return None


@functools.lru_cache(maxsize=4096)
def port_to_service(port: int, protocol: int) -> str | None:
    """``getservbyport`` name for TCP/UDP/SCTP ports, else None."""
    proto = PROTO_NAMES.get(protocol)
    if proto is None:
        return None
    try:
        return socket.getservbyport(port, proto)
    except (OSError, OverflowError):
        return None


def addrport(addr: IPAddress, port: int, protocol: int, numeric: bool) -> str:
    """ipvsadm's ``addrport_to_anyname``: ``a.b.c.d:port`` or ``[v6]:port``.

    Without ``numeric`` the host and port are names where they resolve.  The
    C code writes into a 60-byte buffer, so the text is cut at 59 characters.
    """
    if numeric:
        host, service = ntop(addr), str(port)
    else:
        host = addr_to_host(addr) or ntop(addr)
        service = port_to_service(port, protocol) or str(port)
    if addr.version == 6:
        host = f"[{host}]"
    return f"{host}:{service}"[:59]
