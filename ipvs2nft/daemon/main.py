"""The daemon process: start-up, the event loop, shutdown.

One asyncio loop, one thread: conntrack events, the control socket, and
timers (the estimator's 2-second tick, conntrack timeouts, the store and
drift checks) all run in it, so the connection table has a single owner
and needs no locks.  Start-up order matters (daemon.md §0): subscribe to
events first, then dump, so that no connection falls between the two; a
flow created before any listener existed never sends an event, which is
why counts always come from a dump first.

Extensions share the loop: ``--keepalived FILE`` adds
``ipvs2nft/health/extension.py`` (keepalived's virtual servers, health
checks and feedback weights; ``ipvs2nft/keepalived/`` reads the file), whose
table changes go through ``Daemon.mutate``.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import os
import signal
import socket
import sys
import time

from ipvs2nft import dynsched
from ipvs2nft.conntable import LiveTable
from ipvs2nft.daemon import control, mutate
from ipvs2nft.daemon.estimator import TICK, Estimator
from ipvs2nft.daemon.publish import Publisher, StaleGeneration
from ipvs2nft.model import Table

# seconds between ...
FOLLOW_EVERY = 0.2  # looks at the state file
DIRECT_EVERY = 0.25  # reads of direct-routed flows (no events for them)
TEMPLATE_EVERY = 1.0  # looks at persistence templates about to expire
DRIFT_EVERY = 5.0  # checks that our table is still there (the monitor's safety net)
RESYNC_EVERY = 10.0  # full conntrack dumps (events are hints)
COALESCE = 0.002  # seconds the events of a burst are gathered before the choices are published
TEMPLATE_REARM = 60  # seconds: ip_vs_conn_expire re-arms a template that still controls connections

OURS = (("inet", "ipvs2nft"), ("ip", "ipvs2nft"), ("ip6", "ipvs2nft"))
# conntrack's closing TCP states: FIN_WAIT, CLOSE_WAIT, LAST_ACK, TIME_WAIT, CLOSE
CLOSING = frozenset({4, 5, 6, 7, 8})


class DaemonError(Exception):
    """Start-up failed: one line for the user, exit status 1."""


def notify(message: str) -> None:
    """sd_notify(3): a datagram to $NOTIFY_SOCKET (abstract if it starts with @)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(path)
            sock.sendall(message.encode())
    except OSError:
        pass  # systemd gone: nothing to tell


class Extension:
    """A part of the daemon that lives in its loop (keepalived's checkers,
    metrics...).  ``start`` runs before READY=1 (an error there stops the
    daemon with its message); ``stop`` at SIGTERM."""

    async def start(self, daemon: Daemon) -> None:  # pragma: no cover - interface
        pass

    async def stop(self) -> None:  # pragma: no cover - interface
        pass


class Daemon:
    def __init__(self, store, resync_every: float = RESYNC_EVERY, extensions=()) -> None:
        self.store = store
        self.extensions = list(extensions)
        self.resync_every = resync_every
        self.table = Table()
        self.generation = 0
        self.identity = None
        self.sessions: list = []  # the sessions of the ipvsadm call being carried out (mutate._session)
        self.live = LiveTable()
        self.estimator = Estimator()
        self.dirty: set = set()
        self.stopping = asyncio.Event()
        self.sock = self.events = self.ct = self.nfnl = self.monitor = None
        self._verifying = False
        self._flush_timer = None
        self.batch_started: float | None = None
        self.publisher: Publisher | None = None
        self.table_handle = None
        self._expiry_timer = None
        self.counters = {"events": 0, "lost": 0, "resyncs": 0, "pushes": 0, "elements": 0, "stale": 0,
                         "drift": 0}
        # seconds from reading a batch of conntrack events to the data plane
        # holding the choices they lead to (the last 100,000 batches)
        self.lags: collections.deque = collections.deque(maxlen=100_000)

    # ------------------------------------------------------------ start-up
    def claim(self) -> None:
        """The namespace's control socket, which is also its daemon lock."""
        try:
            self.sock = control.bind()
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                pid = control.running_pid()
                who = f" (pid {pid})" if pid else ""
                raise DaemonError("another ipvs2nft daemon is running in this network namespace"
                                  f"{who}") from None
            raise DaemonError(f"cannot open the control socket: {exc.strerror}") from None

    def open_kernel(self) -> None:
        """conntrack's events (subscribed before the first dump) and dumps,
        and nfnetlink.  A kernel without ctnetlink is a clear error."""
        from ipvs2nft.conntrack import Conntrack, ConntrackUnavailable, Events, counting_filter_program
        from ipvs2nft.nft.build import CT_MARK_OURS
        from ipvs2nft.nft.nfnetlink import Monitor, Nfnetlink

        try:
            self.events = Events(mark=CT_MARK_OURS, mask=CT_MARK_OURS, program=counting_filter_program)
            self.ct = Conntrack()
            self.ct.dump(CT_MARK_OURS, CT_MARK_OURS)
        except (ConntrackUnavailable, OSError) as exc:
            raise DaemonError(f"connection tracking is not available ({exc}): the daemon needs "
                              "nf_conntrack and its netlink interface (nf_conntrack_netlink)") from None
        self.nfnl = Nfnetlink()
        self.monitor = Monitor()  # before the first repair: no change can slip between
        self.publisher = Publisher(self.nfnl)

    async def run(self) -> int:
        self.claim()
        try:
            self.open_kernel()
            self.reload(repair=True)  # primes what is published, writes what differs
            self.resync()
            self.flush()
            self.tick()
            for ext in self.extensions:
                await ext.start(self)
        except DaemonError:
            self.close()
            raise
        loop = asyncio.get_running_loop()
        loop.add_reader(self.events.fileno(), self.on_events)
        loop.add_reader(self.sock.fileno(), self.on_accept)
        loop.add_reader(self.monitor.fileno(), self.on_nft_events)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self.reload(repair=True))
        tasks = [asyncio.create_task(self._every(TICK, self.tick)),
                 asyncio.create_task(self._every(FOLLOW_EVERY, self.follow)),
                 asyncio.create_task(self._every(DRIFT_EVERY, self.check_drift)),
                 asyncio.create_task(self._every(self.resync_every, self.resync_and_publish)),
                 asyncio.create_task(self._every(DIRECT_EVERY, self.poll_direct)),
                 asyncio.create_task(self._every(TEMPLATE_EVERY, self.keep_templates))]
        self.schedule_expiry()
        count = sum(1 for _ in self.table.services)
        notify(f"READY=1\nSTATUS=following {count} services\nMAINPID={os.getpid()}")
        await self.stopping.wait()
        notify("STOPPING=1")
        for ext in self.extensions:
            try:
                await asyncio.wait_for(ext.stop(), timeout=1.0)
            except Exception as exc:  # noqa: BLE001 - stopping goes on
                _log(f"stopping {type(ext).__name__}: {exc}")
        for task in tasks:
            task.cancel()
        loop.remove_reader(self.events.fileno())
        loop.remove_reader(self.sock.fileno())
        loop.remove_reader(self.monitor.fileno())
        self.close()
        return 0

    def close(self) -> None:
        for thing in (self.sock, self.events, self.ct, self.nfnl, self.monitor):
            if thing is not None:
                try:
                    thing.close()
                except OSError:
                    pass

    async def _every(self, seconds: float, action) -> None:
        """Run ``action`` every ``seconds``; an error is logged, not fatal."""
        while True:
            await asyncio.sleep(seconds)
            try:
                action()
            except Exception as exc:  # noqa: BLE001 - a long-running daemon survives a bad moment
                _log(f"{getattr(action, '__name__', action)}: {type(exc).__name__}: {exc}")

    # ------------------------------------------------------------ the model
    def follow(self) -> None:
        """Reload the state file when ipvsadm replaced it."""
        if self._file_identity() != self.identity:
            self.reload()

    def _file_identity(self) -> tuple | None:
        """The state file's inode, size and mtime: it is only ever replaced
        (store.py), so the same identity is the same content."""
        try:
            st = os.stat(self.store.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def reload(self, repair: bool = False) -> None:
        """Read the state file; with ``repair``, first make our tables what it
        says (as any ipvsadm command would: ``Session.check``)."""
        from ipvs2nft.errors import IpvsadmError

        if repair:
            try:
                from ipvs2nft import host
                from ipvs2nft.cli.ipvsadm import _session

                host.forget()  # the host's addresses decide which real servers are local
                _session().check()
            except IpvsadmError as exc:
                _log(f"cannot repair the ruleset: {exc.message}")
        self.identity = self._file_identity()
        try:
            snapshot = self.store.read()
        except IpvsadmError as exc:
            _log(f"cannot read the state file: {exc.message}")
            return
        self.counters["reloads"] = self.counters.get("reloads", 0) + 1
        self._take(snapshot.table, snapshot.generation, repair)

    def absorb(self, sessions: list) -> None:
        """Take in the daemon's own changes (the ipvsadm calls it carried
        out, its extensions' mutations) from what their commits wrote,
        instead of decoding the whole state file again: at 10,000 services
        that read costs a quarter of a second that the next ipvsadm call
        would wait for.  A change that did not go through us shows as a
        generation we did not write, and then the file is read as a whole."""
        commits = [c for s in sessions for c in s.commits]
        if not commits or not self._absorb(commits):
            self.follow()

    def _absorb(self, commits) -> bool:
        from ipvs2nft.errors import IpvsadmError

        table, generation = self.table.copy(), self.generation
        for keys, read_generation, prepared in commits:
            if read_generation != generation:
                return False  # someone else wrote in between
            written = prepared.table
            if keys is None:
                table = written.copy()
            else:
                for key in keys:
                    if written.find(key) is None and table.find(key) is not None:
                        table.remove(key)
                for svc in written.services:
                    table.put(svc)
                table.timeouts, table.daemons, table.snat = written.timeouts, written.daemons, written.snat
            generation = prepared.generation
        identity = self._file_identity()  # before the read: a later writer shows in either
        try:
            on_disk = self.store.read_header().generation
        except IpvsadmError:
            return False
        if identity is None or on_disk != generation:
            return False
        self.identity = identity
        self.counters["absorbed"] = self.counters.get("absorbed", 0) + 1
        self._take(table, generation)
        return True

    def _take(self, table: Table, generation: int, repair: bool = False) -> None:
        """Follow a new table: the live counts, then the published choices."""
        changed = self.live.set_table(table)
        self.table, self.generation = table, generation
        handle = self._handle()
        if repair or handle != self.table_handle:
            self.publisher.forget()  # the table was rebuilt: nothing we wrote is left
            self.publisher.prime([s for s in self.table.services if dynsched.managed(s)])
            changed = {s.key for s in self.table.services}
        else:
            self.publisher.forget(changed)
        self.table_handle = handle
        self.dirty |= changed
        self.flush()

    def _handle(self):
        try:
            return self.nfnl.table_handle("inet", "ipvs2nft")
        except OSError:
            return None

    def on_nft_events(self) -> None:
        """nftables changes by anyone: our own are ignored, an ipvsadm
        commit (it always swaps the generation element) is followed at once,
        and anything else that touches our tables -- a flush, a deleted
        table, a rule added by hand -- is repaired from the store, within a
        moment and without polling the ruleset."""
        from ipvs2nft.netlink import EventsLost
        from ipvs2nft.nft.nfnetlink import NFT_MSG_DELSETELEM, NFT_MSG_NEWSETELEM

        gen_writes = (NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM)  # a flush deletes the set, not its element
        try:
            done = self.monitor.transactions()
        except EventsLost as exc:  # some notifications were lost: look for ourselves
            done, lost = exc.events, True
        else:
            lost = False
        foreign = committed = False
        for t in done:
            if t.pid == os.getpid() or not any(t.touches(f, n) for f, n in OURS):
                continue
            if any(e.kind in gen_writes and e.table == "ipvs2nft" and e.name == "gen" for e in t.events):
                committed = True  # ipvsadm (or another ipvs2nft) moved the generation
            else:
                foreign = True
        if committed:
            self.follow()
        if foreign or lost:
            self.counters["foreign"] = self.counters.get("foreign", 0) + 1
            asyncio.get_event_loop().create_task(self.verify_and_repair())

    async def verify_and_repair(self) -> None:
        """Compare our tables with the store's (a scratch namespace: slow at
        10,000 services, so off the loop) and rebuild them if they differ,
        as ipvsadm's drift check does; then publish the live choices again."""
        if self._verifying:
            return
        self._verifying = True
        try:
            await asyncio.get_running_loop().run_in_executor(None, _verify_and_repair)
        except Exception as exc:  # noqa: BLE001 - the next change or check tries again
            _log(f"repair: {type(exc).__name__}: {exc}")
        finally:
            self._verifying = False
        self._flush_timer = None
        self.batch_started: float | None = None
        self.reload()

    def check_drift(self) -> None:
        """Our table flushed or deleted by someone else (``nft flush
        ruleset``, an nftables reload): rebuild it from the store and
        publish the live choices again."""
        if self._handle() != self.table_handle or self._kernel_generation() != self.generation:
            self.reload(repair=True)

    def _kernel_generation(self) -> int | None:
        import struct

        try:
            found = self.nfnl.set_elements("inet", "ipvs2nft", "gen")
        except OSError:
            return None
        return struct.unpack_from("=I", found[0].key)[0] if found else None

    def mutate(self, keys, change) -> None:
        """Change the table as an ipvsadm command does -- under the store's
        lock, one kernel transaction, then the state file -- for extensions
        (keepalived's checkers add, remove and re-weight real servers).
        ``keys``: the ServiceKeys ``change`` touches (None: all).  Facts
        about the host that a long-running process would otherwise keep
        from its start are looked up afresh."""
        from ipvs2nft import host
        from ipvs2nft.cli.ipvsadm import _session

        host.forget()
        session = _session()
        session.mutate(keys, change)
        self.absorb([session])

    # ------------------------------------------------------------ connections
    def on_events(self) -> None:
        from ipvs2nft.conntrack import Event, EventsLost

        started = time.monotonic()
        try:
            events = self.events.read()
            lost = False
        except EventsLost as exc:
            events, lost = exc.events, True
        now = time.monotonic()
        live = self.live
        for kind, flow in events:
            key = live.gone(flow.id) if kind == Event.DESTROY else live.seen(flow, now)
            if key is not None:
                self.dirty.add(key)
        self.counters["events"] += len(events)
        if lost:
            self.counters["lost"] += 1
            self.resync()
        self.batch_started = min(self.batch_started or started, started)
        if self._flush_timer is None:  # a burst of readable events shares one publication
            self._flush_timer = asyncio.get_event_loop().call_later(COALESCE, self.flush_batch)

    def flush_batch(self) -> None:
        self._flush_timer = None
        self.flush()
        if self.batch_started is not None:
            self.lags.append(time.monotonic() - self.batch_started)
            self.batch_started = None
        self.schedule_expiry()

    def resync(self) -> None:
        """A dump: the truth about every flow of ours."""
        from ipvs2nft.nft.build import CT_MARK_OURS

        flows = self.ct.dump(CT_MARK_OURS, CT_MARK_OURS)
        self.dirty |= self.live.resync(flows, time.monotonic())
        self.counters["resyncs"] += 1
        self.counters["drift"] = self.counters.get("drift", 0) + self.live.drift
        self.poll_direct(always=True)

    def poll_direct(self, always: bool = False) -> None:
        """Direct-routed and tunnelled flows never reach conntrack: their
        counts come from the direct tables' flow memory, read while a
        service that schedules from counts has such servers (and at every
        resync for the others)."""
        from ipvs2nft import dynsched
        from ipvs2nft.nft import direct, readback

        wanted = [s for s in self.table.services if direct.is_direct(s) and (always or dynsched.managed(s))]
        if not wanted:
            return
        flows = readback.read_direct_flows(self.nfnl)
        self.dirty |= self.live.set_direct(readback.direct_counts(self.table, flows))
        self.flush()

    def keep_templates(self) -> None:
        """IPVS keeps a persistence template alive while connections it sent
        are still in the connection table (``n_control``), re-arming it for
        60 s at a time; the data plane refreshes ours only when the client
        opens a new connection.  So a template about to expire whose client
        network still has a connection of ours to that server gets 60 s more."""
        import struct

        from ipvs2nft.nft import readback
        from ipvs2nft.nft.nfnetlink import Batch

        persistent = [s for s in self.table.services if s.persistent]
        if not persistent:
            return
        soon = [t for t in readback.read_templates(self.nfnl) if t.expires_ms < 2000 * TEMPLATE_EVERY]
        if not soon:
            return
        by_rid = {d.rid: (svc, d) for svc in persistent for d in svc.dests}
        controlled = self._controlled(persistent)
        batch = Batch("inet", "ipvs2nft")
        for t in soon:
            found = by_rid.get(t.rid)
            if found is None or (found[0].key, found[1].key, t.client) not in controlled:
                continue
            name = "persist6" if t.client.version == 6 else "persist4"
            key = t.client.packed + struct.pack("=I", t.rid)
            batch.delete(name, key)
            batch.add(name, key, timeout=TEMPLATE_REARM * 1000)
        if len(batch):
            try:
                self.nfnl.commit(batch)
            except OSError:
                pass  # the template expired meanwhile: the next connection makes a new one

    def _controlled(self, services) -> set:
        """(service, real server, client network) of every connection of ours."""
        import ipaddress
        import socket as socketlib

        wanted = {s.key: s for s in services}
        out = set()
        for conn in self.live.conns.values():
            svc = wanted.get(conn.svc)
            if svc is None or conn.orig is None:
                continue
            packed = conn.orig.src
            if len(packed) == 4:
                net = ipaddress.IPv4Address(int.from_bytes(packed, "big") & svc.netmask)
            else:
                net = ipaddress.IPv6Network((socketlib.inet_ntop(socketlib.AF_INET6, packed), svc.netmask),
                                            strict=False).network_address
            out.add((svc.key, conn.dest, net))
        return out

    def resync_and_publish(self) -> None:
        self.resync()
        self.flush()
        self.schedule_expiry()

    def schedule_expiry(self) -> None:
        deadline = self.live.next_deadline()
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        if deadline is None:
            return
        loop = asyncio.get_event_loop()
        delay = max(0.0, deadline - time.monotonic()) + 0.01
        self._expiry_timer = loop.call_later(delay, self.expire)

    def expire(self) -> None:
        """Connections whose conntrack timeout passed: gone unless conntrack
        still has them (a packet refreshed them)."""
        self._expiry_timer = None
        now = time.monotonic()
        for cid, conn in self.live.due(now):
            # A closing TCP connection is not refreshed by its traffic: it is
            # gone at its timeout (its DESTROY event comes late, ignored then).
            # Others may have been kept alive by packets conntrack does not
            # report: ask.
            if conn.state in CLOSING or conn.orig is None:
                flow = None
            else:
                flow = self.ct.get(conn.orig)
            if flow is None or flow.id != cid:
                key = self.live.gone(cid)
            else:
                key = self.live.seen(flow, now)
            if key is not None:
                self.dirty.add(key)
        self.flush()
        self.schedule_expiry()

    # ------------------------------------------------------------ the data plane
    def flush(self) -> None:
        """Publish the choices of the services whose counts changed."""
        self.publisher.account(self.live.take_created())
        if not self.dirty:
            return
        keys, self.dirty = self.dirty, set()
        services = [s for s in (self.table.find(k) for k in keys) if s is not None and dynsched.managed(s)]
        if services:
            self._push(services)

    def _push(self, services) -> None:
        for _ in range(3):
            try:
                written = self.publisher.push(services, self.live.state, self.generation)
                self.counters["pushes"] += 1
                self.counters["elements"] += written
                return
            except StaleGeneration:
                self.counters["stale"] += 1
                self.reload()  # ipvsadm committed meanwhile: its table, then ours again
                services = [s for s in (self.table.find(x.key) for x in services)
                            if s is not None and dynsched.managed(s)]
        _log("could not publish live choices: the table keeps changing under us")

    # ------------------------------------------------------------ statistics
    def tick(self) -> None:
        """The estimator's 2-second tick over the kernel's counters."""
        from ipvs2nft.nft import readback

        counts = readback.read_counts(self.nfnl, self.table)
        services: dict[str, list[int]] = {}
        dests: dict[str, list[int]] = {}
        for svc in self.table.services:
            services[str(svc.sid)] = counts.service(svc.sid)
            for d in svc.dests:
                dests[readback.dest_tag(svc.sid, d.key)] = counts.dest(svc.sid, d.key)
        self.estimator.tick(services, dests)

    # ------------------------------------------------------------ control socket
    def on_accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(1.0)
            try:
                _, uid, _ = control.peer(conn)
            except OSError:
                return
            data = control.read_record(conn)  # read first: closing on an unread record resets the answer
            if uid != 0:
                control.answer(conn, {"ok": False, "error": "permission denied (root only)"})
                return
            if data.startswith(mutate.REQUEST):  # an ipvsadm call to carry out
                conn.settimeout(mutate.ANSWER_TIMEOUT)
                self.sessions = []
                done = mutate.carry_out(self, data)
                if done is not None:
                    try:
                        conn.sendall(done)
                    except OSError:
                        pass
                    self.absorb(self.sessions)
                    return
            request = control.parse_request(data)
            if request is None:
                control.answer(conn, {"ok": False, "error": "malformed request"})
                return
            control.answer(conn, self.handle(request))

    def handle(self, request: dict) -> dict:
        op = request.get("op")
        if op == "ping":
            return {"ok": True, "pid": os.getpid()}
        if op == "stats":
            return {"ok": True, **self.estimator.answer()}
        if op == "zeroed":
            sids = request.get("sids")
            if not isinstance(sids, list) or not all(type(s) is int for s in sids):
                return {"ok": False, "error": "sids must be a list of integers"}
            self.estimator.zero(set(sids))
            return {"ok": True}
        if op == "changed":
            self.follow()
            return {"ok": True}
        if op == "status":
            return {"ok": True, "services": sum(1 for _ in self.table.services),
                    "generation": self.generation,
                    "connections": len(self.live.conns), **self.counters, "lag": _percentiles(self.lags),
                    "cpu": _cpu_seconds()}
        if op == "lag":  # the lag samples so far, then start afresh (bench/daemon.py)
            lag = _percentiles(self.lags)
            self.lags.clear()
            return {"ok": True, **lag}
        if op == "resync":  # a dump now; how far the counts were off
            self.resync()
            self.flush()
            return {"ok": True, "drift": self.live.drift}
        return {"ok": False, "error": f"unknown request {op!r}"}


def _percentiles(samples) -> dict:
    """p50/p99/max of lag samples, in milliseconds."""
    if not samples:
        return {"batches": 0}
    ordered = sorted(samples)
    at = lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)  # noqa: E731
    return {"batches": len(ordered), "p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": at(1.0)}


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _verify_and_repair() -> None:
    from ipvs2nft import host
    from ipvs2nft.cli.ipvsadm import _session

    host.forget()

    session = _session()
    with session.store.locked():
        session._repair()  # noqa: SLF001 - the same repair every ipvsadm command runs


def _log(text: str) -> None:
    sys.stderr.write(f"ipvs2nft daemon: {text}\n")
    sys.stderr.flush()


def main(args, extensions=()) -> int:
    """``ipvs2nft daemon`` with these extensions (metrics...)."""
    from ipvs2nft.privilege import may_administer_network
    from ipvs2nft.store import Store

    if not may_administer_network():
        _log("Permission denied (you must be root)")
        return 2
    daemon = Daemon(Store(), resync_every=getattr(args, "resync", RESYNC_EVERY), extensions=extensions)
    try:
        return asyncio.run(daemon.run())
    except DaemonError as exc:
        _log(str(exc))
        return 1
    except KeyboardInterrupt:
        return 0
