"""The daemon's local socket: one per network namespace, root only.

An abstract unix socket (``@ipvs2nft/daemon``) belongs to the network
namespace it was bound in, so binding it is also the "one daemon per
namespace" lock: a second daemon's bind fails with EADDRINUSE, and nothing
is left behind on disk when a daemon is killed with -9.

Messages are JSON objects, one per SOCK_SEQPACKET record.  ipvsadm uses
this module's client side to tell the daemon what it changed (``changed``,
``zeroed``) and to ask what only the daemon knows (``stats``: the estimator's
rates and the counters as of its last 2-second tick, as IPVS lists them).
The one other kind of record is a change for the daemon to carry out, in a
framing of its own (daemon/mutate.py).
Every request is checked (SO_PEERCRED: uid 0, as ipvsadm itself needs
CAP_NET_ADMIN); a malformed one gets an error answer and changes nothing.
"""

from __future__ import annotations

import json
import os
import socket
import struct

ADDRESS = "\0ipvs2nft/daemon"
MAX_MESSAGE = 1 << 16  # requests are small; answers may be large (SOCK_SEQPACKET has no limit but memory)
CLIENT_TIMEOUT = 2.0


class ControlError(Exception):
    """A request the daemon refused, or no daemon."""


def bind(address: str = ADDRESS) -> socket.socket:
    """The listening socket; OSError(EADDRINUSE) if a daemon runs here."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        sock.bind(address)
        sock.listen(16)
    except OSError:
        sock.close()
        raise
    return sock


def peer(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the other end (SO_PEERCRED)."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", data)


def running_pid(address: str = ADDRESS) -> int | None:
    """The pid of the daemon of this namespace, or None if there is none."""
    try:
        with _connect(address) as sock:
            return peer(sock)[0]
    except OSError:
        return None


def _connect(address: str = ADDRESS, timeout: float = CLIENT_TIMEOUT) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        raise
    return sock


def ask(op: str, *, address: str = ADDRESS, timeout: float = CLIENT_TIMEOUT, **args) -> dict:
    """Send one request and return the answer.  Raises ControlError when no
    daemon runs or it refused; callers that can do without the daemon catch
    it and carry on.  (``address``: another daemon's socket, the sync
    daemon's.)"""
    try:
        with _connect(address, timeout) as sock:
            sock.send(json.dumps({"op": op, **args}).encode())
            data = _receive(sock)
    except OSError as exc:
        raise ControlError(f"no daemon ({os.strerror(exc.errno) if exc.errno else exc})") from None
    try:
        answer = json.loads(data)
    except ValueError:
        raise ControlError("unreadable answer") from None
    if not isinstance(answer, dict) or not answer.get("ok"):
        raise ControlError(str(answer.get("error") if isinstance(answer, dict) else answer))
    return answer


def tell(op: str, **args) -> bool:
    """A notification that may go unheard (no daemon running): True if heard."""
    try:
        ask(op, **args)
    except ControlError:
        return False
    return True


def _receive(sock: socket.socket) -> bytes:
    """One record, however large (peek at its size first)."""
    size = len(sock.recv(MAX_MESSAGE, socket.MSG_PEEK | socket.MSG_TRUNC))
    return sock.recv(max(size, 1))


def read_request(sock: socket.socket) -> dict | None:
    """A request from a connected client, or None if it is not one."""
    return parse_request(read_record(sock))


def read_record(sock: socket.socket) -> bytes:
    """One record from a connected client (b"" if there is none)."""
    try:
        return _receive(sock)
    except OSError:
        return b""


def parse_request(data: bytes) -> dict | None:
    """A JSON request, or None if ``data`` is not one."""
    if not data or len(data) > MAX_MESSAGE:
        return None
    try:
        request = json.loads(data)
    except ValueError:
        return None
    if not isinstance(request, dict) or not isinstance(request.get("op"), str):
        return None
    return request


def answer(sock: socket.socket, payload: dict) -> None:
    try:
        sock.send(json.dumps(payload, separators=(",", ":")).encode())
    except OSError:
        pass
