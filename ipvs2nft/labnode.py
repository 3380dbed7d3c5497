"""The two programs a traffic lab runs inside its namespaces.

``serve``: a real server that answers every TCP connection and every UDP
datagram on the given ports with its own name (one line), on IPv4 and IPv6.
``connect``: a client that opens connections one after another (like the
oracle's ``@connect``) and prints, per connection, which server answered, as
JSON lines.  Standard library only, so they run in any namespace.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import socketserver
import sys
import threading
import time

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # <linux/in.h>; Python 3.11 lacks the name


class _TCP(socketserver.ThreadingMixIn, socketserver.TCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 256  # bursts of connections (bench/daemon.py); socketserver's default is 5


class _TCP6(_TCP):
    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()


def serve(name: str, tcp_ports: list[int], udp_ports: list[int], sctp_ports: list[int],
          hold_ports: list[int] = (), loopback: bool = False) -> None:
    """Answer with ``name``; on ``hold_ports`` then echo lines until the
    client closes (a long-lived connection, to watch it survive changes).
    ``loopback``: TCP on 127.0.0.1 only (a service meant for this host)."""
    reply = (name + "\n").encode()

    class TcpHandler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            try:
                self.request.sendall(reply)
                if self.server.server_address[1] in hold_ports:
                    self.request.settimeout(120)
                    while data := self.request.recv(4096):
                        self.request.sendall(data)
            except OSError:
                pass

    servers = []
    for port in list(tcp_ports) + list(hold_ports):
        servers += [_TCP(("127.0.0.1", port), TcpHandler)] if loopback else \
            [_TCP(("0.0.0.0", port), TcpHandler), _TCP6(("::", port), TcpHandler)]
    for port in udp_ports:
        for family in (socket.AF_INET, socket.AF_INET6):
            threading.Thread(target=_udp_server, args=(family, port, reply), daemon=True).start()
    for port in sctp_ports:
        threading.Thread(target=_sctp_server, args=(port, reply), daemon=True).start()
    for srv in servers:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        time.sleep(3600)


def _udp_server(family: int, port: int, reply: bytes) -> None:
    """Answer each datagram from the address it was sent to (IP_PKTINFO), as
    a UDP service must when the director routes it directly (-g): the VIP
    is only on this server's loopback."""
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        s.bind(("::", port))
        level, kind = socket.IPPROTO_IPV6, socket.IPV6_PKTINFO
    else:
        s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        s.bind(("0.0.0.0", port))
        level, kind = socket.IPPROTO_IP, IP_PKTINFO
    while True:
        _, ancillary, _, client = s.recvmsg(4096, 256)
        info = [data for lvl, typ, data in ancillary if lvl == level and typ == kind]
        try:
            s.sendmsg([reply], [(level, kind, info[0])] if info else [], 0, client)
        except OSError:
            pass


def _sctp_server(port: int, reply: bytes) -> None:
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP)
    except OSError:
        return  # no SCTP in this kernel
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(64)
    while True:
        conn, _ = s.accept()
        try:
            conn.sendall(reply)
        finally:
            conn.close()


def connect(host: str, port: int, count: int, proto: str, timeout: float, sources: list[str],
            sport: int | None) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for i in range(count):
        src = sources[i % len(sources)] if sources else None
        started = time.monotonic()
        answer, error = None, None
        try:
            answer = _one(family, host, port, proto, timeout, src, sport)
        except OSError as exc:
            error = exc.strerror or str(exc)
        print(json.dumps({"i": i, "source": src, "backend": answer, "error": error,
                          "ms": round((time.monotonic() - started) * 1000, 1)}), flush=True)


def _one(family, host, port, proto, timeout, src, sport) -> str | None:
    kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
    number = socket.IPPROTO_SCTP if proto == "sctp" else 0
    with socket.socket(family, kind, number) as s:
        s.settimeout(timeout)
        if src or sport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((src or ("::" if family == socket.AF_INET6 else "0.0.0.0"), sport or 0))
        if proto == "udp":
            s.connect((host, port))
            s.send(b"hello\n")
            return s.recv(200).decode().strip() or None
        s.connect((host, port))
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(200)
            if not chunk:
                break
            data += chunk
        return data.decode().strip() or None


class _Lines:
    """Lines from a socket, read with a deadline; a timeout loses nothing
    (unlike a socket file's readline), so a later read still gets the line
    that was late."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def read(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out")
            self.sock.settimeout(left)
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode().strip()


def session(host: str, port: int, timeout: float) -> None:
    """One long-lived TCP connection: print the server's name, then for each
    line on stdin send it and print the echo (or the error) -- to show an
    established connection still works after the table changed.  A line
    ``!wait SECONDS`` sends nothing and waits that long for an echo still
    owed (a segment that was dropped and is sent again)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect((host, port))
        lines = _Lines(s)
        print(json.dumps({"backend": lines.read(timeout)}), flush=True)
        for line in sys.stdin:
            try:
                if line.startswith("!wait "):
                    echo = lines.read(float(line.split()[1]))
                else:
                    s.sendall(line.encode())
                    echo = lines.read(timeout)
                print(json.dumps({"echo": echo or None}), flush=True)
            except OSError as exc:
                print(json.dumps({"echo": None, "error": exc.strerror or str(exc)}), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m ipvs2nft.labnode")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sv = sub.add_parser("serve")
    sv.add_argument("--name", required=True)
    sv.add_argument("--tcp", default="")
    sv.add_argument("--udp", default="")
    sv.add_argument("--sctp", default="")
    sv.add_argument("--hold", default="", help="TCP ports whose connections stay open (echo)")
    sv.add_argument("--loopback", action="store_true", help="TCP on 127.0.0.1 only")
    cn = sub.add_parser("connect")
    cn.add_argument("host")
    cn.add_argument("port", type=int)
    cn.add_argument("count", type=int)
    cn.add_argument("--proto", default="tcp", choices=("tcp", "udp", "sctp"))
    cn.add_argument("--timeout", type=float, default=2.0)
    cn.add_argument("--from", dest="sources", default="")
    cn.add_argument("--sport", type=int)
    se = sub.add_parser("session")
    se.add_argument("host")
    se.add_argument("port", type=int)
    se.add_argument("--timeout", type=float, default=5.0)
    args = ap.parse_args(argv)
    ports = lambda text: [int(p) for p in text.split(",") if p]  # noqa: E731
    if args.cmd == "session":
        session(args.host, args.port, args.timeout)
    elif args.cmd == "serve":
        serve(args.name, ports(args.tcp), ports(args.udp), ports(args.sctp), ports(args.hold),
              args.loopback)
    else:
        connect(args.host, args.port, args.count, args.proto, args.timeout,
                [s for s in args.sources.split(",") if s], args.sport)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
