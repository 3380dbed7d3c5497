"""ipvsadm's changes carried out by the daemon: a call costs little more than
the interpreter's start.

A mutating ipvsadm call in its own process pays for its imports (the model,
the store, the back end: tens of milliseconds), reads the state file and, at
its exit, closing its nf_tables socket waits for the kernel to free what the
transaction deleted (an RCU grace period).  The daemon has all of that
loaded and its socket open, so when it runs, ipvsadm hands it its argv over
the control socket (root only, SO_PEERCRED) and prints the answer:

    request   "\\0run\\0" STATE_PATH "\\0" ARGV0 "\\0" ARG "\\0" ARG ...
    answer    "\\0ran\\0" status(u32) len(stdout)(u32) stdout stderr
              "\\0no\\0"  -- carry it out yourself

The daemon answers ``no`` to what it does not serve (listings, -R, -Z, a
state file other than its own) and when another ipvsadm holds the store's
lock (the caller then waits for it, as always); everything else runs the
very code of ``cli.ipvsadm.serve`` with a session of the daemon's, so exit
status, stdout and stderr are those of the in-process path (the oracle
fixtures replay through it: tests/test_mutate.py).  A request that is not
one of these is refused as malformed and changes nothing.

The client side imports nothing beyond ``_socket``: it runs before the
parser is imported.  ``IPVS2NFT_DAEMON=no`` keeps ipvsadm in-process.
"""

from __future__ import annotations

import os
import sys

REQUEST = b"\0run\0"
DONE = b"\0ran\0"
DECLINE = b"\0no\0"
ADDRESS = b"\0ipvs2nft/daemon"  # control.ADDRESS
ANSWER_TIMEOUT = 60.0  # seconds: -C of 10,000 services takes about one
# what the daemon carries out (cmdline's command names); the rest stays in-process
SERVED = frozenset({"add-service", "edit-service", "delete-service", "flush", "add-server", "edit-server",
                    "delete-server", "set", "start-daemon", "stop-daemon"})
# environment a call depends on that the daemon's process does not share
_PRIVATE = ("IPVS2NFT_FAULT", "POSIXLY_CORRECT")


class NoAnswer(Exception):
    """The daemon took the request and did not answer."""


# ---------------------------------------------------------------- client

def ask(argv: list[str], argv0: str) -> tuple[int, str, str] | None:
    """(status, stdout, stderr) of ``ipvsadm argv`` as the daemon of this
    namespace carried it out, or None: no daemon, or it left it to us."""
    env = os.environ
    if env.get("IPVS2NFT_DAEMON") == "no" or env.get("IPVS2NFT_BACKEND", "nft") != "nft":
        return None
    if any(name in env for name in _PRIVATE):
        return None
    import _socket

    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        try:
            sock.connect(ADDRESS)
        except OSError:
            return None  # no daemon here
        # store.state_path(), without importing the store (the model, json...)
        fields = [os.path.abspath(env.get("IPVS2NFT_STATE") or "/run/ipvs2nft/state.json"), argv0, *argv]
        sock.send(REQUEST + "\0".join(fields).encode("utf-8", "surrogateescape"))
        sock.settimeout(ANSWER_TIMEOUT)
        try:
            size = len(sock.recv(1, _socket.MSG_PEEK | _socket.MSG_TRUNC))
            data = sock.recv(max(size, 1))
        except OSError as exc:
            raise NoAnswer(str(exc)) from None
    finally:
        sock.close()
    if data.startswith(DONE) and len(data) >= len(DONE) + 8:
        at = len(DONE)
        status, length = int.from_bytes(data[at:at + 4], "big"), int.from_bytes(data[at + 4:at + 8], "big")
        text = data[at + 8:].decode("utf-8", "surrogateescape")
        return status, text[:length], text[length:]
    if not data:
        raise NoAnswer("the daemon closed the connection")
    return None  # declined, or refused (another uid, a daemon that does not know the request)


# ---------------------------------------------------------------- daemon

class Busy(BaseException):
    """Another ipvsadm holds the store's lock: the caller carries it out and waits."""


def fields(data: bytes) -> list[str] | None:
    """The request's fields, or None if it is malformed."""
    if not data.startswith(REQUEST):
        return None
    try:
        found = data[len(REQUEST):].decode("utf-8", "surrogateescape").split("\0")
    except UnicodeDecodeError:
        return None
    if len(found) < 3 or not found[0] or not found[1]:
        return None
    return found


def carry_out(daemon, data: bytes) -> bytes | None:
    """The answer to a run request (None: malformed).  The caller sends it,
    then takes in what the command changed (``Daemon.absorb`` of
    ``daemon.sessions``): the answer need not wait for the daemon's own
    bookkeeping."""
    found = fields(data)
    if found is None:
        return None
    path, argv0, argv = found[0], found[1], found[2:]
    if path != os.path.abspath(daemon.store.path):
        return DECLINE
    from ipvs2nft.errors import IpvsadmError
    from ipvs2nft.ipvsadm import cmdline

    try:
        if cmdline.parse(argv, argv0).name not in SERVED:
            return DECLINE
    except IpvsadmError:
        pass  # the same error the in-process call would give: answered below
    try:
        status, out, err = _run(daemon, argv, argv0)
    except Busy:
        return DECLINE
    daemon.counters["served"] = daemon.counters.get("served", 0) + 1
    text = (out + err).encode("utf-8", "surrogateescape")
    return DONE + status.to_bytes(4, "big") + len(out).to_bytes(4, "big") + text


def _run(daemon, argv: list[str], argv0: str) -> tuple[int, str, str]:
    """cli.ipvsadm.serve with the daemon's session, its output captured."""
    import io

    from ipvs2nft import host
    from ipvs2nft.cli import ipvsadm as cli

    host.forget()  # the routes and addresses of now, not of the daemon's start
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        status = cli.serve(argv, argv0, lambda: _session(daemon), stdin=None)
    finally:
        sys.stdout, sys.stderr = saved
    return status, out.getvalue(), err.getvalue()


def _session(daemon):
    """A session whose store never waits for the lock (Busy instead) and
    that does not tell the daemon about its own changes."""
    from contextlib import contextmanager

    from ipvs2nft.cli import ipvsadm as cli
    from ipvs2nft.errors import LockTimeout
    from ipvs2nft.store import Store

    class _Store(Store):
        @contextmanager
        def locked(self, wait: float | None = None):
            try:
                guard = super().locked(wait=0)
                guard.__enter__()
            except LockTimeout:
                raise Busy from None
            try:
                yield
            finally:
                guard.__exit__(None, None, None)

    backend = getattr(daemon, "_mutation_backend", None)
    store = _Store(daemon.store.path)
    if backend is None:
        from ipvs2nft.backend import open_backend

        backend = daemon._mutation_backend = open_backend(store)
    backend.store = store
    session = cli.Session(store=store, backend=backend, in_daemon=True)
    daemon.sessions.append(session)  # Daemon.absorb takes in what its commits wrote
    return session
