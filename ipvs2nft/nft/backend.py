"""The nftables back end: the only module that imports ``nftables``.

Each ipvsadm command becomes one nf_tables transaction, which the kernel
applies as a whole or not at all.  The services a command touched are
written over raw netlink (``netbuild``: no libnftables, whose cache of a
big table costs more than the change), guarded by the generation swap of
``build.incremental``; libnftables loads the fixed skeleton of our tables
and rebuilds them when the kernel's are not what the store says (someone
ran ``nft flush ruleset``, a crash came between the kernel and the store):
in one transaction from the store, or, when our tables are gone anyway,
skeleton first and then the services over netlink.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace

from ipvs2nft import host, notice, sched
from ipvs2nft.backend import Backend
from ipvs2nft.errors import BackendError
from ipvs2nft.model import Forward, Service, Table
from ipvs2nft.nft import build, direct, fingerprint, netbuild, nfnetlink, scratch, tunnels

MISSING_BINDING = ("ipvs2nft: the nftables Python binding is missing "
                   "(Debian: apt-get install python3-nftables)")

LIBNFTABLES = "libnftables.so.1"  # the binding's default soname

class Nft:
    """One libnftables context, (rc, out, err) turned into exceptions."""

    def __init__(self) -> None:
        try:
            import nftables
        except ImportError:
            raise BackendError(MISSING_BINDING) from None
        import ctypes

        try:
            # Load the library first: when the binding's own constructor fails
            # to, its __del__ prints a traceback on the half-made object.
            ctypes.CDLL(LIBNFTABLES)
            self._ctx = nftables.Nftables(sofile=LIBNFTABLES)
        except OSError as exc:
            raise BackendError(f"ipvs2nft: libnftables cannot be loaded ({exc}); "
                               "install the nftables package") from None
        self._ctx.set_handle_output(False)

    def run(self, text: str) -> None:
        rc, _, err = self._ctx.cmd(text)
        if rc != 0:
            raise BackendError(_first_error(err) or f"nft failed with status {rc}")

    def check(self, text: str) -> None:
        """Kernel validation without committing (nft -c)."""
        self._ctx.set_dry_run(True)
        try:
            self.run(text)
        finally:
            self._ctx.set_dry_run(False)

    def json(self, text: str) -> dict | None:
        self._ctx.set_json_output(True)
        try:
            rc, out, _ = self._ctx.cmd(text)
        finally:
            self._ctx.set_json_output(False)
        if rc != 0 or not out:
            return None
        return json.loads(out)


def _first_error(err: str) -> str:
    for line in (err or "").splitlines():
        if "Error:" in line:
            return "ipvs2nft: nftables refused the change: " + line.split("Error:", 1)[1].strip()
    return (err or "").strip()


class NftBackend(Backend):
    """Programs ``table inet ipvs2nft`` from the model."""

    checks = True

    def __init__(self, store) -> None:
        self.store = store
        self._nft: Nft | None = None

    @property
    def nft(self) -> Nft:
        if self._nft is None:
            self._nft = Nft()
        return self._nft

    # ------------------------------------------------------------ scheduler state
    def observe(self, table: Table, services: list[Service]) -> Table:
        """Advance rr/wrr state by the connections the kernel scheduled since
        the service's chain was last written (the counter of its numgen rule)."""
        for svc in services:
            if not sched.is_sequence(svc) or not svc.sid:
                continue
            picks = self._scheduled(svc)
            if picks:
                carried = self._carry(Table([svc])).find(svc.key)  # what the kernel scheduled over
                new = replace(svc, sched=sched.advance(carried, svc.sched, picks))
                table.put(new)
        return table

    def _scheduled(self, svc: Service) -> int:
        """The packet counter of the service's scheduling rule (the one with
        ``numgen``, build._scheduler_rule), read by a filtered rule dump."""
        if direct.is_direct(svc):
            where = direct.table("6" if svc.af == 10 else "4").split() + [direct.chain(svc)]
        else:
            where = build.TABLE.split() + [build.svc_chain(svc)]
        try:
            found = nfnetlink.rules(*where)
        except OSError:
            return 0
        for exprs in found:
            names = [name for name, _ in exprs]
            if "numgen" in names and "counter" in names:
                return nfnetlink.counter_packets(exprs[names.index("counter")][1])
        return 0

    # ------------------------------------------------------------ applying
    def apply(self, old, new) -> None:
        """Take the kernel from snapshot ``old`` to snapshot ``new``.

        Tunnel devices the new table needs are created first (and removed
        again if nftables refuses); those it no longer needs go afterwards.
        """
        wanted = _tunnels(new.table)
        created = tunnels.ensure(wanted)
        try:
            self._apply(old, new)
        except BaseException:
            tunnels.remove(created)
            raise
        self._forget_counters(old.table, new.table)
        before = tunnels.existing() if old.header_only else set(_tunnels(old.table))
        tunnels.remove(sorted(before - set(wanted)))

    def _apply(self, old, new) -> None:
        if old.header_only or not (old.partial or (old.table.services and new.table.services)):
            # Every service replaced (ipvsadm-restore, -C, the first -R): one
            # transaction that swaps them all, cheaper than service by
            # service, keeping what the data path learnt (direct-routed flows:
            # a restore must not break connections).  A rebuild if our
            # tables are missing or their skeleton must change.
            if not self._replace_all(old, new):
                self.rebuild(new.table, new.generation)
            return
        absent = self._absent(new.table)
        change = self._change("incremental", self._carry(old.table, absent), old, new, absent)
        if change is not None and self._commit(change):
            return
        self.rebuild(self._whole(old, new), new.generation)  # the kernel table is not what the store says

    def _change(self, kind: str, before, old, new, absent: frozenset[str]):
        """``netbuild.<kind>`` (a netlink batch), or ``build.<kind>`` (nft
        text) for what netbuild leaves to libnftables."""
        carried = self._carry(new.table, absent)
        args = (before, carried, old.generation, new.generation, absent, _live(carried))
        try:
            return getattr(netbuild, kind)(*args)
        except netbuild.Unsupported:
            return getattr(build, kind)(*args)

    def _commit(self, change) -> bool:
        """One transaction (a netbuild batch, or nft text); False if the
        kernel refused it -- our tables are not what the store says.  For a
        batch that touched few chains, their states before it are kept, so
        that ``seal`` brings the fingerprint up to date from them alone."""
        touched = getattr(change, "touched", None)
        before = None
        if touched is not None and len(touched) <= fingerprint.MANY:
            before = fingerprint.chains(_nfnl(), touched | set(fingerprint.JUMPED_TO))
        try:
            if isinstance(change, build.Script):
                self.nft.run(change.text())
                committed = None
            else:
                committed = _nfnl().commit(change)
        except (BackendError, OSError):
            return False
        self._committed = (committed, before)
        return True

    # ------------------------------------------------------------ the fingerprint
    _committed: tuple | None = None
    _rebuilt = False

    def fingerprint(self) -> dict | None:
        return fingerprint.take(_nfnl())

    def seal(self, verified: bool = False) -> tuple[int | None, dict | None]:
        """The ruleset generation id and our tables' fingerprint after a
        change of ours, to record.  After a rebuild or a verified repair
        (``verified``) the tables are the store's: their fingerprint is read.
        After a change, it is vouched for only if it follows from the last
        one recorded and nobody else committed since; otherwise None, and
        the next command whose generation id differs verifies."""
        committed, before = self._committed or (None, None)
        trusted = verified or self._rebuilt
        self._committed, self._rebuilt = None, False
        nfnl = _nfnl()
        genid = self.ruleset_genid()
        if trusted:
            return genid, fingerprint.take(nfnl)
        seen, recorded = self.store.seen()
        ours_alone = seen is not None and genid == (seen + 1) & 0xFFFFFFFF and committed in (None, genid)
        if recorded is None or not ours_alone:
            return genid, None  # someone else committed too: the next command looks
        if before is not None:
            return genid, fingerprint.changed(nfnl, recorded, before, fingerprint.chains(nfnl, before))
        return genid, fingerprint.take(nfnl)

    def _replace_all(self, old, new, chains: dict | None = None) -> bool:
        """build.replace_all in the tables the kernel holds; False when only
        a rebuild can do it (no tables, new timeouts or SNAT option, or the
        kernel's generation is not the old one)."""
        if new.table.timeouts != old.table.timeouts or new.table.snat != old.table.snat:
            return False
        chains = _service_chains() if chains is None else chains
        if chains is None:
            return False
        return self._commit(self._change("replace_all", chains, old, new, self._absent(new.table)))

    @staticmethod
    def _forget_counters(old: Table, new: Table) -> None:
        """A deleted service's statistics go with it (IPVS frees them), so a
        later service given the same sid starts from zero."""
        kept = {s.sid for s in new.services}
        gone = {s.sid for s in old.services if s.sid and s.sid not in kept}
        if gone:
            from ipvs2nft.nft import readback

            readback.zero(gone, rids={d.rid for s in old.services if s.sid in gone for d in s.dests})

    def _whole(self, old, new) -> Table:
        """The full table after the change.  A partial snapshot holds only
        the services the command touched; the rest come from the store."""
        if not new.partial:
            return new.table
        changed = {s.key: s for s in new.table.services}
        touched = {s.key for s in old.table.services} | set(changed)
        services = []
        for svc in self.store.read().table.services:
            if svc.key in changed:
                services.append(changed.pop(svc.key))
            elif svc.key not in touched:
                services.append(svc)
        services.extend(changed.values())
        return Table(services, new.table.timeouts, new.table.daemons, new.table.snat)

    def rebuild(self, table: Table, generation: int) -> None:
        """Replace our tables as a whole: in one transaction while they
        exist (traffic never sees them half made); when they are gone, the
        skeleton first and the services over netlink (at 10,000 services
        several times faster than libnftables)."""
        tunnels.ensure(_tunnels(table))
        self._rebuilt = True
        if _service_chains() is None and not table.snat:
            skeleton = Table([], table.timeouts, table.daemons, table.snat)
            self.nft.run(self.expected_script(skeleton, 0))
            bare = _Bare(skeleton, 0)
            if self._replace_all(bare, _Bare(table, generation), {}):
                return
        self.nft.run(self.expected_script(table, generation, live=True))

    # ------------------------------------------------------------ what this kernel can carry
    def expected_script(self, table: Table, generation: int, live: bool = False) -> str:
        """The full script our tables should have been loaded from, on this
        kernel; with ``live``, managed services' choices from live counts
        (the drift check does not compare those)."""
        absent = self._absent(table)
        carried = self._carry(table, absent)
        return build.full(carried, generation, absent=absent, live=_live(carried) if live else None).text()

    @staticmethod
    def _absent(table: Table) -> frozenset[str]:
        """Tunnel devices the table needs that do not exist (after
        tunnels.ensure: the kernel has no driver for them)."""
        wanted = _tunnels(table)
        return frozenset(set(wanted) - tunnels.existing()) if wanted else frozenset()

    def _carry(self, table: Table, absent: frozenset[str] | None = None) -> Table:
        """The table as this kernel can carry it out.  A tunnelled real
        server without its device (no ipip, gre or fou driver) stays in the
        store, in listings and in ``-S`` -- ipvsadm accepted it and IPVS
        would use it -- but is given no new connections here (weight 0, as
        quiesced) and forwards nothing; syslog says so once.  A direct or
        tunnelled server that is this host is delivered locally, as IPVS
        delivers it (direct.local_nodes)."""
        table = direct.local_nodes(table, host.is_local)
        absent = self._absent(table) if absent is None else absent
        if not absent:
            return table
        services = []
        for svc in table.services:
            dests = tuple(replace(d, weight=0, last_weight=d.last_weight)
                          if d.fwd is Forward.TUNNEL and direct.tunnel_device(d) in absent else d
                          for d in svc.dests)
            services.append(svc if dests == svc.dests else replace(svc, dests=dests))
        notice.once(self.store, "no-tunnel-driver", "this kernel cannot make tunnel devices (no ipip/gre/fou "
                    "driver): tunnelled real servers (-i) are kept but get no connections")
        return Table(services, table.timeouts, table.daemons, table.snat)

    # ------------------------------------------------------------ what was counted
    def counters(self, table: Table):
        """Connection counts from conntrack, persistence templates, and the
        statistics: the daemon's (as of its last 2-second tick, with rates,
        as IPVS lists them) when it runs, else the kernel's counters now."""
        from ipvs2nft.nft import readback

        return readback.measured(table, _daemon_stats())

    def connections(self, table: Table) -> list:
        from ipvs2nft.nft import readback

        return readback.connection_rows(table)

    def zero(self, services: list[Service]) -> None:
        """-Z: the kernel's counters of these services restart from zero,
        and the daemon (if it runs) zeroes its estimator for them."""
        from ipvs2nft.daemon import control
        from ipvs2nft.nft import readback

        sids = {s.sid for s in services if s.sid}
        readback.zero(sids, rids={d.rid for s in services for d in s.dests})
        control.tell("zeroed", sids=sorted(sids))

    # ------------------------------------------------------------ checking
    def generation(self) -> int | None:
        """The store generation in our ``gen`` set (one element, host order),
        read over netlink: libnftables would load its cache first."""
        try:
            found = _nfnl().set_elements("inet", "ipvs2nft", "gen")
        except OSError:
            return None
        return int.from_bytes(found[0].key, sys.byteorder) if found else None

    def _our_tables(self) -> dict:
        """Our tables as nft lists them in JSON, and nothing else: a host
        with kube-proxy or Docker may hold far more rules than we do."""
        names = self.nft.json("list tables") or {}
        ours = [f"{t['family']} {t['name']}" for item in names.get("nftables", [])
                if (t := item.get("table")) and (t.get("family"), t.get("name")) in scratch.OURS]
        listing: dict = {"nftables": []}
        for name in sorted(ours):
            listing["nftables"] += (self.nft.json(f"list table {name}") or {}).get("nftables", [])
        return listing

    def ruleset_genid(self) -> int | None:
        return nfnetlink.ruleset_genid()

    def verify(self, snapshot) -> bool:
        """Compare our tables with the same script loaded in a scratch
        namespace (both listed by the same nft); any difference -- a rule
        added, an element changed, a chain flushed -- means rebuild."""
        import subprocess
        import threading

        expected = self.expected_script(snapshot.table, snapshot.generation)
        # The scratch namespace loads and lists while we list the kernel's
        # tables: at 10,000 services each side takes about a second.
        child = subprocess.Popen(["unshare", "-n", sys.executable, "-P", "-m", "ipvs2nft.nft.scratch"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 text=True, env=_module_env())
        chunks: list[str] = []
        reader = threading.Thread(target=lambda: chunks.append(child.stdout.read()), daemon=True)
        try:
            child.stdin.write(expected)
            child.stdin.close()
            reader.start()
            actual = self._our_tables()
            reader.join()
            child.wait()
            out = "".join(chunks)
        except BaseException:
            child.kill()
            child.wait()
            raise
        if child.returncode != 0:
            return False
        try:
            return scratch.normalize(json.loads(out)) == scratch.normalize(actual or {})
        except (ValueError, KeyError, TypeError):
            return False


# Up to this many managed services, their connections are dumped service by
# service (the kernel filters on the service's mark); more, in one dump of
# all of ours.  Either way the cost follows the services a command touches,
# not the size of the table: a -a at 10,000 wlc services reads one service's
# connections.
FEW = 16


def _live(table: Table):
    """The live counts of the managed services among ``table`` (lc, wlc...
    and thresholds: those a command writes), from conntrack, so that what
    ipvsadm writes is IPVS's next choice even when no daemon runs; None if
    there are none."""
    from ipvs2nft import dynsched

    managed = [s for s in table.services if dynsched.managed(s)]
    if not managed:
        return None
    import time

    from ipvs2nft.conntable import LiveTable
    from ipvs2nft.conntrack import Conntrack

    conntable = LiveTable(table)
    try:
        with Conntrack() as ct:
            if len(managed) <= FEW and all(s.sid for s in managed):
                flows = [f for s in managed for f in ct.dump(build.ct_mark(s), build.CT_MARK_MASK)]
            else:
                flows = ct.dump(build.CT_MARK_OURS, build.CT_MARK_OURS)
    except Exception:  # noqa: BLE001 - no conntrack here: choose as for no connections
        return None
    conntable.resync(flows, time.monotonic())
    return conntable.state


class _Bare:
    """What _replace_all reads of a snapshot."""

    def __init__(self, table: Table, generation: int) -> None:
        self.table = table
        self.generation = generation


def _nfnl() -> nfnetlink.Nfnetlink:
    """This process's nf_tables socket (kept open: closing one waits for the
    kernel to free what a transaction deleted, see bench/evidence.py)."""
    return nfnetlink._shared()  # noqa: SLF001 - the module's one-per-process socket


def _service_chains() -> dict[str, list[str]] | None:
    """The service chains of our tables as the kernel holds them (table ->
    names), or None if our inet table is not there."""
    found = {}
    for where, prefixes in ((build.TABLE, build.SERVICE_CHAINS), (direct.table("4"), direct.SERVICE_CHAINS),
                            (direct.table("6"), direct.SERVICE_CHAINS)):
        family, name = where.split()
        try:
            chains = _nfnl().chains(family, name)
        except OSError:
            return None
        if not chains:
            return None  # the table is missing (a table has its hook chains)
        found[where] = [c[0] for c in chains if c[0].startswith(prefixes)]
    return found


def _daemon_stats() -> dict | None:
    """The daemon's statistics, or None when no daemon runs here."""
    from ipvs2nft.daemon import control

    try:
        return control.ask("stats")
    except control.ControlError:
        return None


def _tunnels(table: Table) -> dict:
    """The tunnel devices the table needs here: none for a local server."""
    return direct.tunnels(direct.local_nodes(table, host.is_local).services)


def _module_env() -> dict:
    """Run our own modules in the child whatever the caller's sys.path: the
    directory this package was imported from (a checkout, a venv, Debian's
    dist-packages), not the working directory, which ``-m`` would put first
    (the child runs with ``-P``): an ipvsadm started from inside another
    checkout must not load that checkout's code."""
    import ipvs2nft

    root = os.path.dirname(os.path.dirname(os.path.abspath(ipvs2nft.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env
