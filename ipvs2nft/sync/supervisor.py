"""The sync daemon process: conntrackd instances and the set replication.

One per network namespace (the abstract socket ``@ipvs2nft/sync`` is its
lock, as IPVS's sync threads belong to a namespace), started by the first
``ipvsadm --start-daemon`` and ended by the last ``--stop-daemon``.  ipvsadm
tells it which daemons are started (``apply``) and waits for the answer, so
a conntrackd that cannot start makes the command fail and nothing is
recorded.  In between it

* keeps one conntrackd per channel running (``conf.py``), as its child, in
  the foreground; restarts one that died, and one whose configuration
  changed because the table's real servers did (conntrackd has no reload);
* on a master: stops TCP window tracking on each new connection of ours
  (``Conntrack.be_liberal``), as conntrackd does on the states it injects,
  so that a connection that went through the other director for a while
  and comes back is not refused for sequence numbers this table never saw;
* replicates the persistence and direct-routing sets (``sets.py``).

Its files live in ``<state directory>/sync/<channel>/``: conntrackd.conf,
the lock file, the UNIX socket, conntrackd's log; its own messages go to
``<state directory>/sync/supervisor.log``.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from ipvs2nft import host
from ipvs2nft.daemon import control
from ipvs2nft.model import SyncDaemon, Table
from ipvs2nft.netaddr import AF_INET6
from ipvs2nft.sync import ADDRESS, CONNTRACKD, run_directory
from ipvs2nft.sync.conf import Channel, Instance, instances, render
from ipvs2nft.sync.sets import SEND_EVERY, Receiver, Sender

READY_WAIT = 10.0  # seconds a new conntrackd gets to open its UNIX socket
RESTART_AFTER = 1.0  # seconds before a conntrackd that died is started again
STOP_WAIT = 5.0  # seconds a conntrackd gets to end, on SIGTERM and then on SIGKILL
SETTLE = 1.0  # seconds the table must stay unchanged before conntrackd is restarted for it
PUBLISH_WAIT = 10.0  # seconds ipvsadm may take to publish the state it asked for


class StartError(Exception):
    """conntrackd did not start: the text ipvsadm prints."""


@dataclass
class Running:
    """One conntrackd child and the set replication of its channel."""

    instance: Instance
    text: str
    where: Path
    proc: subprocess.Popen | None = None
    died_at: float = 0.0
    sender: Sender | None = None
    receiver: Receiver | None = None
    out: socket.socket | None = None
    inp: socket.socket | None = None
    sockets: list = field(default_factory=list)


def _hash_limit() -> int:
    """conntrackd.conf(5): twice nf_conntrack_max."""
    try:
        return 2 * int(Path("/proc/sys/net/netfilter/nf_conntrack_max").read_text())
    except (OSError, ValueError):
        return 524288


def _die_with_parent() -> None:
    """In the child: SIGTERM when the sync daemon ends, even by SIGKILL
    (prctl PR_SET_PDEATHSIG), so a new one never finds an orphan conntrackd
    on its channel."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def _interface_address(ifname: str, af: int) -> str | None:
    """An address of the interface, which is how conntrackd names it."""
    if af != AF_INET6:
        return host._interface_ipv4(ifname)
    try:
        with open("/proc/net/if_inet6", encoding="ascii") as f:
            for line in f:
                words = line.split()
                if len(words) == 6 and words[5] == ifname:
                    return str(ipaddress.IPv6Address(bytes.fromhex(words[0])))
    except OSError:
        pass
    return None


def _log(message: str) -> None:
    sys.stderr.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ipvs2nft sync: {message}\n")
    sys.stderr.flush()


class Supervisor:
    def __init__(self, store) -> None:
        self.store = store
        self.base = run_directory(store)
        self.table = Table()
        self.generation = -1
        self.daemons: tuple[SyncDaemon, ...] = ()
        self.running: dict[Channel, Running] = {}
        self.sel = selectors.DefaultSelector()
        self.stopping = False
        self.sock: socket.socket | None = None
        self.events = self.ct = self.nfnl = None
        self.zombies: list[subprocess.Popen] = []
        self.changed_at: float | None = None  # the table changed; conntrackd not yet reconfigured
        self.published = False  # the state file has listed the daemons ipvsadm last asked for
        self.applied_time = 0.0

    # ------------------------------------------------------------ conntrackd
    def _start(self, run: Running) -> None:
        run.where.mkdir(parents=True, exist_ok=True)
        for leftover in ("lock", "ctl"):  # a conntrackd of ours killed with -9
            (run.where / leftover).unlink(missing_ok=True)
        conf = run.where / "conntrackd.conf"
        conf.write_text(run.text)
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        with open(run.where / "console", "ab") as console:
            run.proc = subprocess.Popen([CONNTRACKD, "-C", str(conf)], stdin=subprocess.DEVNULL,
                                        stdout=console, stderr=subprocess.STDOUT, env=env,
                                        preexec_fn=_die_with_parent)
        deadline = time.monotonic() + READY_WAIT
        while not (run.where / "ctl").exists():
            if run.proc.poll() is not None or time.monotonic() > deadline:
                reason = _last_words(run.where)
                self._stop(run)
                raise StartError(f"ipvs2nft: conntrackd did not start on {run.instance.channel.ifname}"
                                 f"{': ' + reason if reason else ''}")
            time.sleep(0.02)
        if run.instance.master:  # what exists already goes to the backup now
            try:
                subprocess.run([CONNTRACKD, "-C", str(conf), "-B"], capture_output=True, timeout=10)
            except (subprocess.TimeoutExpired, OSError) as exc:
                _log(f"conntrackd -B: {exc}")

    def _stop(self, run: Running) -> None:
        proc, run.proc = run.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=STOP_WAIT)
        except subprocess.TimeoutExpired:
            _log(f"conntrackd (pid {proc.pid}) did not end on SIGTERM: killed")
            proc.kill()
            try:
                proc.wait(timeout=STOP_WAIT)
            except subprocess.TimeoutExpired:
                self.zombies.append(proc)  # reaped by a later tick

    # ------------------------------------------------------------ reconciling
    def reconcile(self) -> None:
        """Make the running instances those of ``self.daemons`` and the table.
        Raises StartError (with everything it started stopped again)."""
        wanted = {i.channel: i for i in instances(self.daemons)}
        for ch in [c for c in self.running if c not in wanted]:
            self._retire(self.running.pop(ch))
        limit = _hash_limit()
        for ch, inst in wanted.items():
            where = self.base / ch.name
            text = render(inst, self.table, where, _interface_address(ch.ifname, ch.af), limit)
            old = self.running.get(ch)
            if old is not None and old.text == text and old.instance == inst:
                continue
            if old is not None:
                self._retire(old)
            run = Running(inst, text, where)
            try:
                self._start(run)
                self._open_sets(run)
            except (StartError, OSError) as exc:
                self.running.pop(ch, None)
                self._retire(run)
                raise exc if isinstance(exc, StartError) else StartError(
                    f"ipvs2nft: cannot start the sync daemon on {ch.ifname}: {exc.strerror or exc}") from None
            self.running[ch] = run
        self._liberal(any(i.master for i in wanted.values()))

    def _retire(self, run: Running) -> None:
        self._stop(run)
        self._close_sets(run)

    def _open_sets(self, run: Running) -> None:
        inst, ch = run.instance, run.instance.channel
        index = socket.if_nametoindex(ch.ifname)
        port = ch.port % 65535 + 1
        if inst.master:
            run.sender = Sender(inst.send_id, inst.maxlen)
            run.out = socket.socket(ch.af, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            run.sockets.append(run.out)
            host._master_socket(run.out, ch.af, ch.ifname, index, ch.group, port, inst.ttl)
            if ch.af == AF_INET6:
                run.out.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
            else:
                run.out.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
            run.out.setblocking(False)
        if inst.backup:
            run.receiver = Receiver(inst.accept_id)
            run.inp = socket.socket(ch.af, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            run.sockets.append(run.inp)
            host._backup_socket(run.inp, ch.af, ch.ifname, index, ch.group, port)
            run.inp.setblocking(False)
            self.sel.register(run.inp, selectors.EVENT_READ, lambda r=run: self._receive(r))

    def _close_sets(self, run: Running) -> None:
        if run.inp is not None:
            try:
                self.sel.unregister(run.inp)
            except (KeyError, ValueError):
                pass
        for s in run.sockets:
            s.close()
        run.sockets.clear()
        run.out = run.inp = None

    def _liberal(self, wanted: bool) -> None:
        """Follow the new connections of ours while a master runs here."""
        from ipvs2nft.conntrack import Conntrack, Event, Events
        from ipvs2nft.nft.build import CT_MARK_OURS

        if wanted and self.events is None:
            # packets_only: not the states conntrackd writes from the peer (they are
            # liberal already, and a change here would send them back to the peer,
            # whose conntrackd would then replace its own entry with our copy)
            self.events = Events(kinds=(Event.NEW,), mark=CT_MARK_OURS, mask=CT_MARK_OURS, packets_only=True)
            self.ct = Conntrack()
            self.sel.register(self.events, selectors.EVENT_READ, self._on_events)
        elif not wanted and self.events is not None:
            self.sel.unregister(self.events)
            self.events.close()
            self.ct.close()
            self.events = self.ct = None

    def _on_events(self) -> None:
        from ipvs2nft.conntrack import EventsLost

        try:
            events = self.events.read()
        except EventsLost as lost:
            events = lost.args[0] if lost.args else []
            _log("conntrack events were lost; their connections keep window tracking")
        for _, flow in events:
            if flow.proto == socket.IPPROTO_TCP:
                try:
                    self.ct.be_liberal(flow.orig)
                except OSError:
                    pass  # gone already

    # ------------------------------------------------------------ sets
    def _receive(self, run: Running) -> None:
        while run.inp is not None:
            try:
                data = run.inp.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            run.receiver.apply(self._nfnl(), self.table, data)

    def _send(self) -> None:
        for run in self.running.values():
            if run.sender is None or run.out is None:
                continue
            for data in run.sender.collect(self._nfnl(), self.table):
                try:
                    run.out.send(data)
                except OSError:
                    break  # interface down: the next full send repeats it

    def _nfnl(self):
        if self.nfnl is None:
            from ipvs2nft.nft.nfnetlink import Nfnetlink

            self.nfnl = Nfnetlink()
        return self.nfnl

    # ------------------------------------------------------------ control
    def _on_accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(2.0)
            if control.peer(conn)[1] != 0:
                control.answer(conn, {"ok": False, "error": "permission denied"})
                return
            request = control.read_request(conn)
            control.answer(conn, self._handle(request))

    def _handle(self, request: dict | None) -> dict:
        if request is None:
            return {"ok": False, "error": "malformed request"}
        if request["op"] == "ping":
            return {"ok": True, "pid": os.getpid()}
        if request["op"] != "apply":
            return {"ok": False, "error": f"unknown op {request['op']}"}
        try:
            daemons = tuple(SyncDaemon(*d) for d in request.get("daemons", []))
        except TypeError:
            return {"ok": False, "error": "malformed daemons"}
        before = self.daemons
        self.daemons = daemons
        self._follow(force=True)
        self.changed_at = None
        self.published, self.applied_time = False, time.monotonic()  # ipvsadm publishes the table next
        try:
            self.reconcile()
        except StartError as exc:
            self.daemons = before
            try:
                self.reconcile()
            except StartError:
                pass
            return {"ok": False, "error": str(exc)}
        if not daemons:  # every conntrackd has ended: the next start may begin afresh at once
            self.stopping = True
            self.sel.unregister(self.sock)
            self.sock.close()
        return {"ok": True}

    def _follow(self, force: bool = False) -> bool:
        """Read the table again if the state file changed; True if it did."""
        try:
            snap = self.store.read()
        except Exception as exc:  # noqa: BLE001 - an unusable state file: keep the last table
            _log(f"cannot read the state file: {exc}")
            return False
        if snap.generation == self.generation and not force:
            return False
        self.generation, self.table = snap.generation, snap.table
        return True

    # ------------------------------------------------------------ the loop
    def tick(self) -> None:
        """Every SEND_EVERY: follow the table (the store reads the file only
        when it changed), restart a conntrackd that died, send the sets.
        A conntrackd whose filter the table changed is restarted once the
        table has settled (a restore or a health checker changes it in
        bursts, and each restart costs the peer a resynchronisation)."""
        now = time.monotonic()
        if self._follow():
            self.changed_at = now
            self.published |= self.table.daemons == self.daemons
        settled = self.published or now - self.applied_time > PUBLISH_WAIT
        if self.daemons and not self.table.daemons and settled:
            # the state lists no sync daemon: the state file was removed or
            # replaced (as after a reboot), not changed by ipvsadm
            _log("the state file lists no sync daemon any more: stopping")
            self.daemons = ()
            self.reconcile()
            self.stopping = True
            return
        if self.changed_at is not None and now - self.changed_at >= SETTLE:
            self.changed_at = None
            try:
                self.reconcile()
            except StartError as exc:
                _log(str(exc))
        self.zombies = [z for z in self.zombies if z.poll() is None]
        for run in self.running.values():
            if run.proc is not None and run.proc.poll() is not None:
                _log(f"conntrackd on {run.instance.channel.ifname} exited ({run.proc.returncode}): "
                     f"{_last_words(run.where)}")
                run.proc, run.died_at = None, now
            if run.proc is None and now - run.died_at >= RESTART_AFTER:
                try:
                    self._start(run)
                except StartError as exc:
                    _log(str(exc))
                    run.died_at = now
        self._send()

    def run(self) -> int:
        try:
            self.sock = control.bind(ADDRESS)
        except OSError as exc:
            _log(f"cannot open the control socket: {exc.strerror}")
            return 1
        self.sel.register(self.sock, selectors.EVENT_READ, self._on_accept)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: setattr(self, "stopping", True))
        _log(f"started (pid {os.getpid()})")
        next_tick = 0.0
        try:
            while not self.stopping:
                for key, _ in self.sel.select(timeout=SEND_EVERY / 2):
                    _guarded(key.data)
                now = time.monotonic()
                if now >= next_tick and not self.stopping:
                    next_tick = now + SEND_EVERY
                    _guarded(self.tick)
        finally:
            for run in self.running.values():
                self._retire(run)
            self.running.clear()
            self._liberal(False)
            if self.sock.fileno() >= 0:
                self.sock.close()
            _log("stopped")
        return 0


def _guarded(step) -> None:
    """One step of the loop; a bug in it is logged, and the sync goes on."""
    try:
        step()
    except Exception:  # noqa: BLE001 - the sync daemon must outlive its bugs
        _log("unexpected error:\n" + traceback.format_exc())


def _last_words(where: Path) -> str:
    """The last line conntrackd wrote (console or log), for an error."""
    for name in ("console", "conntrackd.log"):
        try:
            lines = [x for x in (where / name).read_text(errors="replace").splitlines() if x.strip()]
        except OSError:
            continue
        if lines:
            return lines[-1].split("] ", 2)[-1].strip()
    return ""


def main() -> int:
    from ipvs2nft.store import Store

    return Supervisor(Store()).run()


if __name__ == "__main__":
    sys.exit(main())
