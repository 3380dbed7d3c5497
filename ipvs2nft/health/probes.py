"""One probe of each keepalived checker, as asyncio coroutines.

Time limits use ``asyncio.timeout()``, not ``asyncio.wait_for()``: on
Python 3.11 wait_for can swallow a cancellation that arrives as the awaited
operation completes (fixed in 3.12 by reimplementing it on
``asyncio.timeout``), which left a checker running after the daemon's stop.

Each probe answers one question -- did the real server pass? -- within the
checker's ``connect_timeout`` (MISC_CHECK: ``misc_timeout``), and says how
long it took (the feedback weights use it).  They run concurrently in the
daemon's one event loop: non-blocking sockets, no threads.  What each one
sends and accepts follows the keepalived checker it stands for:

* TCP_CHECK (check_tcp.c): the TCP handshake completes;
* HTTP_GET / SSL_GET (check_http.c, check_ssl.c): ``GET path HTTP/1.0`` with
  ``User-Agent: KeepAliveClient`` and a Host header (the virtualhost, else
  the address), every url in turn; the status must be in ``status_code``
  (default 200-299), the body's MD5 equal ``digest``, ``regex`` found (or,
  with ``regex_no_match``, not found).  SSL_GET does not verify the
  certificate unless the SSL block names a CA, as keepalived;
* SMTP_CHECK (check_smtp.c): 220 greeting, ``HELO name`` -> 250, ``QUIT`` -> 221;
* DNS_CHECK (check_dns.c): a query of ``type`` for ``name`` over UDP answered
  with the same id, NOERROR and at least one answer;
* UDP_CHECK (check_udp.c): the datagram is not refused (ICMP port
  unreachable); with ``require_reply`` a reply of the allowed length comes;
* PING_CHECK (check_ping.c): an ICMP/ICMPv6 echo reply;
* MISC_CHECK (check_misc.c): the script's exit status (the state machine
  reads it); a script still running at ``misc_timeout`` is killed, with its
  process group, and counts as failed.

``connect_ip``, ``connect_port``, ``bindto``, ``bind_port`` and ``fwmark``
(SO_MARK) apply to every connection-based probe.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import re
import signal
import socket
import ssl
import struct
import time
from dataclasses import dataclass

from ipvs2nft.keepalived.config import (
    Checker,
    DnsCheck,
    HttpCheck,
    MiscCheck,
    RealServer,
    SmtpCheck,
    UdpCheck,
)
from ipvs2nft.netaddr import IPAddress

MAX_BODY = 1 << 20  # what a health page may weigh before we stop reading
SO_MARK = getattr(socket, "SO_MARK", 36)
DNS_TYPES = {"A": 1, "NS": 2, "CNAME": 5, "SOA": 6, "MX": 15, "TXT": 16, "AAAA": 28}


@dataclass(frozen=True)
class Outcome:
    ok: bool
    seconds: float  # how long the probe took
    status: int | None = None  # MISC_CHECK: the exit status (None: killed at misc_timeout)
    why: str = ""


def target(chk: Checker, rs: RealServer) -> tuple[IPAddress, int]:
    return chk.connect_ip or rs.addr, chk.connect_port or rs.port


def _socket(addr: IPAddress, kind: int, chk: Checker, proto: int = 0) -> socket.socket:
    family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    sock = socket.socket(family, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, proto)
    try:
        if chk.fwmark:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, chk.fwmark)
        if chk.bindto is not None or chk.bind_port:
            host = str(chk.bindto) if chk.bindto is not None else ("::" if addr.version == 6 else "0.0.0.0")
            sock.bind((host, chk.bind_port or 0))
    except OSError:
        sock.close()
        raise
    return sock


async def _connect(chk: Checker, addr: IPAddress, port: int) -> socket.socket:
    sock = _socket(addr, socket.SOCK_STREAM, chk)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (str(addr), port))
    except BaseException:
        sock.close()
        raise
    return sock


# ---------------------------------------------------------------- the probes

async def tcp(chk: Checker, rs: RealServer) -> str:
    addr, port = target(chk, rs)
    sock = await _connect(chk, addr, port)
    sock.close()
    return ""


def _http_request(chk: HttpCheck, url, addr: IPAddress, port: int) -> bytes:
    host = url.virtualhost or chk.virtualhost
    if host is None:
        host = f"[{addr}]" if addr.version == 6 else str(addr)
        default = 443 if chk.tls else 80
        host += "" if port == default else f":{port}"
    version = "1.1" if chk.http_protocol == "1.1" else "1.0"
    close = "Connection: close\r\n" if chk.http_protocol in ("1.1", "1.0C") else ""
    return (f"GET {url.path} HTTP/{version}\r\nUser-Agent: KeepAliveClient\r\nHost: {host}\r\n{close}\r\n"
            ).encode("latin-1")


def http_verdict(url, response: bytes) -> str:
    """'' when the response passes the url's tests, else why not."""
    head, sep, body = response.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = response.partition(b"\n\n")
    m = re.match(rb"HTTP/\d(?:\.\d)? (\d{3})", head)
    if not m:
        return "no HTTP status line"
    status = int(m.group(1))
    if not url.accepts(status):
        return f"HTTP status code {status}"
    length = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
    if length:
        body = body[:int(length.group(1))]
    if url.digest is not None and hashlib.md5(body).digest() != url.digest:  # noqa: S324 - keepalived's digest
        return "MD5 digest error"
    if url.regex is not None:
        found = re.search(url.regex.encode("latin-1", "surrogateescape"), body) is not None
        if found == url.regex_no_match:
            return "Regex match failed"
    return ""


def _complete(response: bytes) -> bool:
    """Headers and a Content-Length body are in (an HTTP/1.1 server may keep
    the connection open after them); without Content-Length, read to EOF."""
    head, sep, body = response.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head) if sep else None
    return bool(length) and len(body) >= int(length.group(1))


async def http(chk: HttpCheck, rs: RealServer, tls: ssl.SSLContext | None) -> str:
    addr, port = target(chk, rs)
    for url in chk.urls:
        sock = await _connect(chk, addr, port)
        try:
            # asyncio wants a server_hostname with ssl and a bare socket: '' sends no SNI
            sni = (url.virtualhost or chk.virtualhost or str(addr)) if chk.enable_sni else ""
            reader, writer = await asyncio.open_connection(sock=sock, ssl=tls if chk.tls else None,
                                                           server_hostname=sni if chk.tls else None)
        except BaseException:
            sock.close()
            raise
        try:
            writer.write(_http_request(chk, url, addr, port))
            await writer.drain()
            response = b""
            while len(response) < MAX_BODY and not _complete(response):
                chunk = await reader.read(MAX_BODY - len(response))
                if not chunk:
                    break
                response += chunk
        finally:
            writer.close()
        why = http_verdict(url, response)
        if why:
            return f"{why} (url {url.path})"
    return ""


async def smtp(chk: SmtpCheck, rs: RealServer) -> str:
    addr, port = target(chk, rs)
    sock = await _connect(chk, addr, port or 25)
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        for send, want in ((None, b"220"), (f"HELO {chk.helo_name or socket.gethostname()}\r\n", b"250"),
                           ("QUIT\r\n", b"221")):
            if send:
                writer.write(send.encode())
                await writer.drain()
            code = await _smtp_reply(reader)
            if code != want:
                return f"SMTP reply {code.decode(errors='replace') or 'none'}, expected {want.decode()}"
    finally:
        writer.close()
    return ""


async def _smtp_reply(reader: asyncio.StreamReader) -> bytes:
    """The code of a (possibly multi-line, ``250-``) SMTP reply."""
    while True:
        line = await reader.readline()
        if len(line) < 4 or line[3:4] != b"-":
            return line[:3]


def dns_query(chk: DnsCheck, ident: int) -> bytes:
    labels = [p for p in chk.name.rstrip(".").split(".") if p]
    qname = b"".join(bytes([len(p)]) + p.encode("idna") for p in labels) + b"\0"
    header = struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0)  # RD, one question
    return header + qname + struct.pack("!HH", DNS_TYPES[chk.qtype], 1)


def dns_verdict(reply: bytes, ident: int) -> str:
    if len(reply) < 12:
        return "short DNS reply"
    rid, flags, _, ancount = struct.unpack_from("!HHHH", reply)
    if rid != ident or not flags & 0x8000:
        return "not an answer to our query"
    if flags & 0xF:
        return f"DNS rcode {flags & 0xF}"
    return "" if ancount else "no answer section"


async def _datagram(chk: Checker, addr: IPAddress, port: int, payload: bytes) -> bytes | None:
    """Send one datagram; the reply, None when none came in time; raises
    ConnectionRefusedError when the port is closed (ICMP port unreachable)."""
    loop = asyncio.get_running_loop()
    sock = _socket(addr, socket.SOCK_DGRAM, chk)
    try:
        await loop.sock_connect(sock, (str(addr), port))
        await loop.sock_sendall(sock, payload)
        try:
            async with asyncio.timeout(chk.connect_timeout):
                return await loop.sock_recv(sock, 65535)
        except TimeoutError:
            return None
    finally:
        sock.close()


async def dns(chk: DnsCheck, rs: RealServer) -> str:
    addr, port = target(chk, rs)
    ident = random.getrandbits(16)
    reply = await _datagram(chk, addr, port or 53, dns_query(chk, ident))
    return "no DNS reply" if reply is None else dns_verdict(reply, ident)


async def udp(chk: UdpCheck, rs: RealServer) -> str:
    addr, port = target(chk, rs)
    reply = await _datagram(chk, addr, port, chk.payload)
    if reply is None:
        return "no reply" if chk.require_reply else ""
    if chk.require_reply:
        if len(reply) < chk.min_reply_length or (chk.max_reply_length and len(reply) > chk.max_reply_length):
            return f"reply of {len(reply)} bytes"
    return ""


async def misc(chk: MiscCheck) -> int | None:
    """The script's exit status; None when misc_timeout killed it (its whole
    process group, as keepalived's kill(-pid))."""
    try:
        proc = await asyncio.create_subprocess_exec(*chk.path, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
                                                    user=chk.user, group=chk.group)
    except OSError:
        return 127  # what a shell says of a script it cannot run: a failure
    try:
        async with asyncio.timeout(chk.timeout):
            return await proc.wait()
    except TimeoutError:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        status = await proc.wait()
        # a script that ended before the kill (its exit not yet seen because the
        # loop was busy) keeps its status; one the kill ended is a timeout
        return status if status >= 0 else None


# ---------------------------------------------------------------- ping

class Pinger:
    """ICMP echo over one raw socket per family, shared by every PING_CHECK
    (a socket per probe would make each see all the others' replies)."""

    def __init__(self) -> None:
        self.socks: dict[int, socket.socket] = {}
        self.pending: dict[tuple[int, str, int], asyncio.Future] = {}
        self.ident = os.getpid() & 0xFFFF
        self.seq = random.getrandbits(16)

    def _sock(self, version: int) -> socket.socket:
        sock = self.socks.get(version)
        if sock is None:
            if version == 4:
                sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
            else:
                sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
            sock.setblocking(False)
            asyncio.get_running_loop().add_reader(sock.fileno(), self._read, version, sock)
            self.socks[version] = sock
        return sock

    def _read(self, version: int, sock: socket.socket) -> None:
        try:
            data, src = sock.recvfrom(2048)
        except OSError:
            return
        if version == 4:
            data = data[(data[0] & 0xF) * 4:]  # raw IPv4 sockets deliver the IP header
            want_type = 0
        else:
            want_type = 129
        if len(data) < 8 or data[0] != want_type:
            return
        ident, seq = struct.unpack_from("!HH", data, 4)
        fut = self.pending.pop((ident, src[0], seq), None)
        if fut is not None and not fut.done():
            fut.set_result(True)

    async def ping(self, chk: Checker, addr: IPAddress) -> str:
        sock = self._sock(addr.version)
        self.seq = (self.seq + 1) & 0xFFFF
        seq = self.seq
        kind = 8 if addr.version == 4 else 128
        packet = struct.pack("!BBHHH", kind, 0, 0, self.ident, seq) + b"ipvs2nft"
        if addr.version == 4:
            packet = packet[:2] + struct.pack("!H", _checksum(packet)) + packet[4:]
        fut = asyncio.get_running_loop().create_future()
        key = (self.ident, str(addr), seq)
        self.pending[key] = fut
        try:
            sock.sendto(packet, (str(addr), 0))
            async with asyncio.timeout(chk.connect_timeout):
                await fut
            return ""
        except TimeoutError:
            return "no echo reply"
        finally:
            self.pending.pop(key, None)

    def close(self) -> None:
        loop = asyncio.get_event_loop()
        for sock in self.socks.values():
            loop.remove_reader(sock.fileno())
            sock.close()
        self.socks.clear()


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


# ---------------------------------------------------------------- dispatch

class Prober:
    """Runs the probe a checker calls for, bounded by its timeout."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls or _client_context(None, None, None)
        self.pinger = Pinger()

    async def run(self, chk: Checker, rs: RealServer) -> Outcome:
        started = time.monotonic()
        if isinstance(chk, MiscCheck):
            status = await misc(chk)
            return Outcome(status == 0, time.monotonic() - started, status)
        try:
            async with asyncio.timeout(chk.connect_timeout):
                why = await self._probe(chk, rs)
        except TimeoutError:
            why = "timed out"
        except (OSError, ssl.SSLError, EOFError, UnicodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        return Outcome(not why, time.monotonic() - started, why=why)

    def _probe(self, chk: Checker, rs: RealServer):
        if isinstance(chk, HttpCheck):
            return http(chk, rs, self.tls)
        if isinstance(chk, SmtpCheck):
            return smtp(chk, rs)
        if isinstance(chk, DnsCheck):
            return dns(chk, rs)
        if isinstance(chk, UdpCheck):
            return udp(chk, rs)
        if chk.kind == "PING_CHECK":
            return self.pinger.ping(chk, chk.connect_ip or rs.addr)
        return tcp(chk, rs)

    def close(self) -> None:
        self.pinger.close()


def _client_context(ca: str | None, cert: str | None, key: str | None, password: str | None = None
                    ) -> ssl.SSLContext:
    """keepalived's SSL context: certificates checked only against a given CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    if ca:
        ctx.load_verify_locations(ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE
    if cert:
        ctx.load_cert_chain(cert, key, password)
    return ctx


def client_context(cfg) -> ssl.SSLContext:
    return _client_context(cfg.ssl_ca, cfg.ssl_certificate, cfg.ssl_key, cfg.ssl_password)
