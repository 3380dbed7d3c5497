"""The JSON state file: the IPVS table that the nftables ruleset is derived from.

Where: ``$IPVS2NFT_STATE``, default ``/run/ipvs2nft/state.json`` -- on tmpfs,
so like the kernel's IPVS table it is empty after a reboot until
``ipvsadm-restore`` runs.  A lock file beside it (``state.json.lock``) is held
for a command's whole read-modify-write; readers need no lock because every
write is a complete new file renamed into place.

Layout: one JSON document, one service per line::

    {"schema":"ipvs2nft-state/1","generation":7,"next_rid":12,"timeouts":[900,120,300],"daemons":[],"services":[
    ["tcp4/192.168.0.40/80",1,2,6,"192.168.0.40",80,0,"rr",0,0,4294967295,"",[["192.168.100.10",80,"masq",1,0,0,0,0,0,3]]],
    null]}

A command that touches one service finds that line with a byte search,
decodes only it and splices its new text back, so the cost of ``ipvsadm -a``
does not grow with the size of the table beyond copying bytes (measured: a
full decode of 10,000 services x 4 takes ~150 ms here, the splice a few ms).
The final ``null`` keeps every service line framed the same way.

Beside it, ``state.json.trash`` keeps the direct-routed and tunnelled real
servers that were removed while their flows may still live (IPVS's "trash"
of destinations, ip_vs_ctl.c): service, server, rid and until when.  A
server added back to its service in that time gets its rid again (ids.py),
so its flows go on.  The file is a hint: lost, a server added back is a new
one and its old flows are dropped until they expire.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import stat
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass

from ipvs2nft import faults, ids
from ipvs2nft.errors import LockTimeout, StoreError
from ipvs2nft.model import (
    Dest,
    Forward,
    SchedState,
    Service,
    ServiceKey,
    SyncDaemon,
    Table,
    Timeouts,
    TunType,
)
from ipvs2nft.netaddr import PROTO_NAMES, address

if False:  # typing.TYPE_CHECKING without importing typing
    from collections.abc import Callable, Iterable, Iterator

SCHEMA = "ipvs2nft-state/1"
DEFAULT_PATH = "/run/ipvs2nft/state.json"
DEFAULT_LOCK_WAIT = 10.0  # seconds, like a generous ``iptables -w``
_TRAILER = b"null]}\n"


def state_path() -> str:
    return os.environ.get("IPVS2NFT_STATE") or DEFAULT_PATH  # also daemon/mutate.py's client


def lock_wait() -> float:
    """IPVS2NFT_LOCK_WAIT seconds; anything but a finite number >= 0 (nan,
    inf, -1, junk) means the default, so the wait is always bounded."""
    try:
        value = float(os.environ.get("IPVS2NFT_LOCK_WAIT", DEFAULT_LOCK_WAIT))
    except ValueError:
        return DEFAULT_LOCK_WAIT
    return value if math.isfinite(value) and value >= 0 else DEFAULT_LOCK_WAIT


# ---------------------------------------------------------------- codec

def key_text(key: ServiceKey) -> str:
    """The line tag of a service: ``tcp4/192.168.0.40/80``, ``fwm6/1``."""
    fam = "6" if key.af == 10 else "4"
    if key.fwmark:
        return f"fwm{fam}/{key.fwmark}"
    return f"{PROTO_NAMES.get(key.protocol, key.protocol)}{fam}/{key.addr}/{key.port}"


def _dest_row(d: Dest) -> list:
    return [str(d.addr), d.port, d.fwd.value, d.weight, d.u_threshold, d.l_threshold,
            int(d.tun_type), d.tun_port, d.tun_flags, d.rid, d.last_weight]


def _sched_row(st: SchedState) -> list:
    cl = None if st.cl is None else [st.cl[0], str(st.cl[1]), st.cl[2]]
    return [cl, st.cw, st.mw, st.di]


def _sched_of(r: list) -> SchedState:
    if type(r) is not list or len(r) != 4 or any(type(v) is not int for v in r[1:]):
        raise TypeError("bad scheduler state")
    cl = None if r[0] is None else (r[0][0], address(r[0][1]), r[0][2])
    return SchedState(cl, r[1], r[2], r[3])


def _service_row(s: Service) -> list:
    return [key_text(s.key), s.sid, s.af, s.protocol, None if s.addr is None else str(s.addr),
            s.port, s.fwmark, s.scheduler, s.flags, s.timeout, s.netmask, s.pe_name,
            [_dest_row(d) for d in s.dests], _sched_row(s.sched)]


# Field types of a service row and a real-server row, checked when decoding:
# a wrongly typed field in a JSON-valid file must be "unusable", not a crash
# or a wrong listing later.  (type() is not isinstance(): True is no int here.)
_SERVICE_TYPES = (
    (str, int, int, int, str, int, int, str, int, int, int, str, list, list),
    (str, int, int, int, type(None), int, int, str, int, int, int, str, list, list),  # fwmark
)
_DEST_TYPES = ((str, int, str, int, int, int, int, int, int, int, int),)


def _check(row: object, shapes: tuple) -> None:
    if type(row) is not list or tuple(map(type, row)) not in shapes:
        raise TypeError(f"a row of the wrong shape: {row!r:.80}")


# a dict lookup is a tenth of an Enum call; LOCAL is the back end's, never stored
_FORWARD_OF = {f.value: f for f in Forward if f is not Forward.LOCAL}
_TUN_TYPE_OF = {t.value: t for t in TunType}


def _dest_of(r: list) -> Dest:
    _check(r, _DEST_TYPES)
    return Dest(address(r[0]), r[1], _FORWARD_OF[r[2]], r[3], r[4], r[5], _TUN_TYPE_OF[r[6]], r[7], r[8],
                r[9], r[10])


def _service_of(r: list) -> Service:
    _check(r, _SERVICE_TYPES)
    # _dest_of, written out: a store of 10,000 services has 40,000 of them
    shape, fwd_of, tun_of, dests = _DEST_TYPES[0], _FORWARD_OF, _TUN_TYPE_OF, []
    for d in r[12]:
        if type(d) is not list or tuple(map(type, d)) != shape:
            raise TypeError(f"a row of the wrong shape: {d!r:.80}")
        dests.append(Dest(address(d[0]), d[1], fwd_of[d[2]], d[3], d[4], d[5], tun_of[d[6]], d[7], d[8],
                          d[9], d[10]))
    return Service(r[2], r[3], None if r[4] is None else address(r[4]), r[5], r[6], r[7], r[8], r[9],
                   r[10], r[11], tuple(dests), r[1], _sched_of(r[13]))


def _line(svc: Service) -> bytes:
    """The service's line: json.dumps of its row, written out by hand where
    every string is one json.dumps leaves as it is (ipvsadm-restore writes
    10,000 lines); tests/test_store.py compares the two."""
    sched, pe = svc.scheduler, svc.pe_name
    if not (_PLAIN.fullmatch(sched) and (not pe or _PLAIN.fullmatch(pe))):
        return json.dumps(_service_row(svc), separators=(",", ":")).encode() + b",\n"
    texts = _TEXTS
    dests = ",".join(
        f'["{texts.get(d.addr) or _text(d.addr)}",{d.port},"{d.fwd.value}",{d.weight},{d.u_threshold},'
        f'{d.l_threshold},{int(d.tun_type)},{d.tun_port},{d.tun_flags},{d.rid},{d.last_weight}]'
        for d in svc.dests)
    st = svc.sched
    cl = "null" if st.cl is None else f'[{st.cl[0]},"{_text(st.cl[1])}",{st.cl[2]}]'
    addr = "null" if svc.addr is None else f'"{texts.get(svc.addr) or _text(svc.addr)}"'
    return (f'["{key_text(svc.key)}",{svc.sid},{svc.af},{svc.protocol},{addr},{svc.port},{svc.fwmark},'
            f'"{sched}",{svc.flags},{svc.timeout},{svc.netmask},"{pe}",[{dests}],[{cl},{st.cw},{st.mw},{st.di}]]'
            ",\n").encode()


_PLAIN = re.compile(r"[a-z0-9_.-]*")  # a scheduler or engine name json.dumps writes as it is
_TEXTS: dict = {}  # address -> its text: the same real servers recur in many services


def _text(addr) -> str:
    text = _TEXTS.get(addr)
    if text is None:
        text = _TEXTS[addr] = str(addr)
    return text


@dataclass(frozen=True)
class Snapshot:
    """What one read of the state file saw.

    ``partial``: only the services asked for were decoded; ``raw`` then keeps
    the file's bytes so that a commit can splice into them.
    """

    table: Table
    generation: int = 0
    next_rid: int = 1
    partial: bool = False
    raw: bytes = b""
    header_only: bool = False  # no service was read: the table is about to be replaced as a whole
    trash: dict | None = None  # prepare: the removed servers to keep (None: as they are)


def _digest(body: bytes) -> str:
    """Checksum of the service lines: a one-service command decodes only its
    own line, and this is how it still notices a file damaged elsewhere.
    CRC-32: made for catching damage, and five times faster than blake2b on
    the 3 MB of 10,000 services (the file is root's, not a trust boundary)."""
    return f"crc32:{zlib.crc32(body):08x}"


def _digest_matches(recorded: object, body: bytes) -> bool:
    if isinstance(recorded, str) and not recorded.startswith("crc32:"):
        import hashlib  # a file from before the CRC (blake2b, 32 hex digits)

        return recorded == hashlib.blake2b(body, digest_size=16).hexdigest()
    return recorded == _digest(body)


def _header(generation: int, next_rid: int, table: Table, body: bytes) -> bytes:
    t = table.timeouts
    head = {
        "schema": SCHEMA,
        "generation": generation,
        "next_rid": next_rid,
        "digest": _digest(body),
        "timeouts": [t.tcp, t.tcpfin, t.udp],
        "daemons": [[d.state, d.mcast_ifn, d.syncid, d.sync_maxlen, d.mcast_af, d.mcast_group,
                     d.mcast_port, d.mcast_ttl] for d in table.daemons],
        "snat": table.snat,
    }
    text = json.dumps(head, separators=(",", ":"))
    return text[:-1].encode() + b',"services":[\n'


def _split_header(raw: bytes, path: str) -> tuple[dict, int]:
    """The header object and where the service lines begin."""
    end = raw.find(b"\n")
    if end < 0 or not raw.endswith(_TRAILER):
        raise _corrupt(path, "not an ipvs2nft state file")
    try:
        head = json.loads(raw[:end].removesuffix(b',"services":[') + b"}")
    except ValueError as exc:
        raise _corrupt(path, str(exc)) from None
    if not isinstance(head, dict) or head.get("schema") != SCHEMA:
        raise _corrupt(path, f"schema is not {SCHEMA}")
    for name in ("generation", "next_rid"):
        value = head.get(name)
        if type(value) is not int or not 0 <= value <= 0xFFFFFFFF:
            raise _corrupt(path, f"bad {name}")
    if not _digest_matches(head.get("digest"), raw[end + 1:]):
        raise _corrupt(path, "checksum mismatch")
    return head, end + 1


class UnusableStateFile(StoreError):
    """The state file is there but damaged: ``-C`` and ipvsadm-restore may
    set it aside and start afresh; every other command reports it."""


def _corrupt(path: str, why: str) -> UnusableStateFile:
    return UnusableStateFile(f"ipvs2nft: the state file {path} is unusable ({why}); "
                      f"'ipvsadm -C' or ipvsadm-restore starts a new one")


def _table_from(head: dict, services: Iterable[Service], path: str) -> Table:
    try:
        if any(type(t) is not int for t in head["timeouts"]) or len(head["timeouts"]) != 3:
            raise TypeError("timeouts are not three integers")
        daemons = tuple(SyncDaemon(*d) for d in head["daemons"])
        if any(type(d.mcast_ifn) is not str or type(d.syncid) is not int for d in daemons):
            raise TypeError("bad daemon")
        timeouts = Timeouts(*head["timeouts"])
        snat = head.get("snat", "")
        if not isinstance(snat, str):
            raise TypeError("snat is not a string")
        return Table(services, timeouts, daemons, snat)
    except (KeyError, TypeError, ValueError) as exc:
        raise _corrupt(path, f"bad header: {exc}") from None


# ---------------------------------------------------------------- the store

class Store:
    """The state file, its lock, and the commit of a new table."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path or state_path()
        self.lock_path = self.path + ".lock"
        self.directory = os.path.dirname(os.path.abspath(self.path))
        self._last: tuple[tuple, bytes] | None = None
        self._split_cache: tuple[bytes, tuple[dict, int]] | None = None

    # ------------------------------------------------------------ reading
    def _raw(self) -> bytes | None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"ipvs2nft: cannot read the state file {self.path}: "
                             f"{os.strerror(exc.errno or 0)}") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            # The file is only ever replaced (rename), never rewritten in
            # place: the same inode, size and mtime is the same content, and
            # a command reads it twice (check, then under the lock).
            identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if self._last is not None and self._last[0] == identity:
                return self._last[1]
            raw = f.read()
        self._last = (identity, raw)
        return raw

    def _split(self, raw: bytes) -> tuple[dict, int]:
        """_split_header (digest included), once per content read."""
        if self._split_cache is not None and self._split_cache[0] is raw:
            return self._split_cache[1]
        result = _split_header(raw, self.path)
        self._split_cache = (raw, result)
        return result

    def read(self, fresh_if_unusable: bool = False) -> Snapshot:
        """Everything, decoded: for listings, -R and full syncs.

        ``fresh_if_unusable``: see ``_or_fresh``."""
        if fresh_if_unusable:
            return self._or_fresh(self.read, Snapshot(Table()))
        raw = self._raw()
        if raw is None:
            return Snapshot(Table())
        head, start = self._split(raw)
        try:
            rows = json.loads(b"[" + raw[start:-len(_TRAILER)] + b"null]")[:-1]
            services = [_service_of(r) for r in rows]
        except (ValueError, TypeError, IndexError, KeyError) as exc:
            raise _corrupt(self.path, str(exc)) from None
        return Snapshot(_table_from(head, services, self.path), head["generation"], head["next_rid"],
                        False, raw)

    def read_header(self, fresh_if_unusable: bool = False) -> Snapshot:
        """The header alone (generation, ids, timeouts, daemons): for
        ipvsadm-restore, which replaces every service and so has no use for
        decoding (and verifying) ten thousand lines it throws away.  The
        digest is still checked, so a corrupt file is caught as by ``read``."""
        if fresh_if_unusable:
            return self._or_fresh(self.read_header, Snapshot(Table(), header_only=True))
        raw = self._raw()
        if raw is None:
            return Snapshot(Table(), header_only=True)
        head, _ = self._split(raw)
        return Snapshot(_table_from(head, [], self.path), head["generation"], head["next_rid"],
                        raw=raw, header_only=True)

    def _or_fresh(self, read: Callable[[], Snapshot], empty: Snapshot) -> Snapshot:
        """``read()``, or ``empty`` with an unusable file set aside (renamed
        ``*.corrupt``): how ``-C`` and ipvsadm-restore start a new table, as
        the corruption message tells the user they do."""
        try:
            return read()
        except UnusableStateFile:
            self._set_aside()
            return empty

    def read_services(self, keys: Iterable[ServiceKey]) -> Snapshot:
        """Only the given services (and the header): what one-service commands need."""
        raw = self._raw()
        if raw is None:
            return Snapshot(Table(), partial=True)
        head, _ = self._split(raw)
        services = []
        for key in keys:
            span = _find_line(raw, key)
            if span is None:
                continue
            try:
                services.append(_service_of(json.loads(raw[span[0]:span[1] - 2])))
            except (ValueError, TypeError, IndexError, KeyError) as exc:
                raise _corrupt(self.path, str(exc)) from None
        return Snapshot(_table_from(head, services, self.path), head["generation"], head["next_rid"],
                        True, raw)

    # ------------------------------------------------------------ locking
    @contextmanager
    def locked(self, wait: float | None = None) -> Iterator[None]:
        """Hold the lock file (flock) for a whole read-modify-write."""
        self._ensure_directory()
        wait = lock_wait() if wait is None else wait
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(f"ipvs2nft: cannot open the lock file {self.lock_path}: "
                             f"{os.strerror(exc.errno or 0)}") from None
        try:
            deadline = time.monotonic() + wait
            delay = 0.002
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise LockTimeout(
                            f"ipvs2nft: another ipvsadm has held {self.lock_path} for more than "
                            f"{wait:g} s; giving up (set IPVS2NFT_LOCK_WAIT to wait longer)"
                        ) from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.05)
            yield
        finally:
            os.close(fd)

    def _ensure_directory(self) -> None:
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            st = os.lstat(self.directory)
        except OSError as exc:
            raise StoreError(f"ipvs2nft: cannot create {self.directory}: "
                             f"{os.strerror(exc.errno or 0)}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise StoreError(f"ipvs2nft: {self.directory} is not a directory")

    # ------------------------------------------------------------ writing
    def prepare(self, old: Snapshot, table: Table) -> Snapshot:
        """The state that committing ``table`` will write, ids assigned.

        New services and real servers get their ids (ids.py).  With a
        partial ``old`` only the services it holds are rewritten.
        Nothing is written yet: the kernel transaction comes first.
        """
        now = time.time()
        removed = self._direct_servers(old)
        trash, pruned = self.read_trash(now)
        kept = {**trash, **removed}

        def reuse(svc: Service, dest: Dest) -> int | None:
            if dest.fwd not in _DIRECT:
                return None
            found = kept.get(_trash_key(svc, dest))
            return found[0] if found is not None else None

        table, next_rid = ids.assign(table, old.next_rid,
                                     lambda: _all_sids(old.raw) if old.partial else (), reuse)
        in_use = {d.rid for svc in table.services for d in svc.dests}
        retired = {k: (rid, now + life) for k, (rid, life) in removed.items() if rid not in in_use}
        left = {k: v for k, v in trash.items() if v[0] not in in_use and k not in retired}
        new_trash = {**left, **retired} if (retired or pruned or len(left) != len(trash)) else None
        generation = old.generation + 1
        if old.partial and old.raw:
            body = self._splice(old, table)
        else:
            body = b"".join(_line(s) for s in table.services)
        body += _TRAILER
        data = _header(generation, next_rid, table, body) + body
        return Snapshot(table, generation, next_rid, old.partial, data, trash=new_trash)

    # ------------------------------------------------------------ removed servers
    @property
    def trash_path(self) -> str:
        return self.path + ".trash"

    def read_trash(self, now: float) -> tuple[dict, bool]:
        """The removed servers still kept: (service, af, address, port) ->
        (rid, until); and whether the file holds more (expired or damaged
        rows), which the next write leaves out.  An unreadable file is an
        empty trash: it is a hint."""
        try:
            with open(self.trash_path, "rb") as f:
                rows = json.loads(f.read()).get("servers", [])
        except FileNotFoundError:
            return {}, False
        except (OSError, ValueError, AttributeError):
            return {}, True
        rows = rows if isinstance(rows, list) else [None]
        out = {}
        for row in rows:
            if (type(row) is list and len(row) == 6 and tuple(map(type, row)) == _TRASH_TYPES
                    and row[5] > now):
                out[tuple(row[:4])] = (row[4], row[5])
        return out, len(out) != len(rows)

    def write_trash(self, prepared: Snapshot) -> None:
        """Keep the removed servers ``prepare`` listed (after a commit)."""
        if prepared.trash is None:
            return
        rows = [[*k, rid, until] for k, (rid, until) in sorted(prepared.trash.items())]
        try:
            if not rows:
                os.unlink(self.trash_path)
                return
            fd, tmp = _temporary(self.directory, ".trash-")
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps({"schema": "ipvs2nft-trash/1", "servers": rows}).encode())
            os.replace(tmp, self.trash_path)
        except OSError:
            pass  # only a hint: a server added back is then a new one

    def _direct_servers(self, old: Snapshot) -> dict:
        """The direct-routed and tunnelled servers of the services ``old``
        holds (all of them for a restore, which read the header only):
        trash key -> (rid, how long their flows and templates may live)."""
        if old.header_only:
            services = _direct_services(old.raw)
        else:
            services = [s for s in old.table.services if any(d.fwd in _DIRECT for d in s.dests)]
        out = {}
        for svc in services:
            t = old.table.timeouts if old.table.timeouts.tcp else Timeouts()
            life = max(t.tcp, t.tcpfin, t.udp, svc.timeout if svc.persistent else 0)
            for d in svc.dests:
                if d.fwd in _DIRECT and d.rid:
                    out[_trash_key(svc, d)] = (d.rid, life)
        return out

    def write(self, new: Snapshot) -> None:
        """Make ``new`` (from ``prepare``) the state file: stage, then publish."""
        self.publish(self.stage(new))
        self.write_trash(new)

    def stage(self, new: Snapshot) -> str:
        """Write ``new`` next to the state file, durably, without making it
        current.  Done before the kernel transaction, so a full disk or a
        read-only directory fails before anything has changed; a crash after
        the kernel leaves this file behind for the next command to publish
        (its generation is the kernel's).  Returns its path."""
        self._ensure_directory()
        tmp = None
        try:
            fd, tmp = _temporary(self.directory, f".state-{new.generation}-")
            with os.fdopen(fd, "wb") as f:
                f.write(new.raw)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            if tmp is not None:
                self.discard(tmp)
            raise StoreError(f"ipvs2nft: cannot write the state file {self.path}: "
                             f"{os.strerror(exc.errno or errno.EIO)}; nothing was changed") from None
        return tmp

    def publish(self, staged: str) -> None:
        """Rename a staged state file into place (atomic), then sync the directory."""
        faults.point("before-rename")
        try:
            os.replace(staged, self.path)
            dfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            raise StoreError(f"ipvs2nft: cannot replace the state file {self.path}: "
                             f"{os.strerror(exc.errno or errno.EIO)}") from None

    def _set_aside(self) -> None:
        try:
            os.replace(self.path, self.path + ".corrupt")
        except OSError as exc:
            raise StoreError(f"ipvs2nft: cannot move the unusable state file {self.path} aside: "
                             f"{os.strerror(exc.errno or errno.EIO)}") from None

    @staticmethod
    def discard(staged: str) -> None:
        try:
            os.unlink(staged)
        except OSError:
            pass

    def staged(self) -> list[tuple[int, str]]:
        """State files staged by commands that did not finish: (generation, path)."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        found = []
        for name in names:
            m = _STAGED_RE.fullmatch(name)
            if m:
                found.append((int(m.group(1)), os.path.join(self.directory, name)))
        return sorted(found)

    # ------------------------------------------------------------ ruleset id
    @property
    def seen_path(self) -> str:
        return self.path + ".genid"

    def seen(self) -> tuple[int | None, dict | None]:
        """The kernel's ruleset generation id after our last commit or check,
        and the fingerprint of our tables then (nft/fingerprint.py)."""
        try:
            with open(self.seen_path, encoding="ascii") as f:
                genid, _, rest = f.read().partition("\n")
            return int(genid), (json.loads(rest) if rest.strip() else None)
        except (OSError, ValueError):
            return None, None

    def seen_genid(self) -> int | None:
        return self.seen()[0]

    def record_genid(self, genid: int | None, fingerprint: dict | None = None) -> None:
        if genid is None:
            return
        text = f"{genid}\n" + (json.dumps(fingerprint, separators=(",", ":")) + "\n" if fingerprint else "")
        try:
            fd, tmp = _temporary(self.directory, ".genid-")
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(text)
            os.replace(tmp, self.seen_path)
        except OSError:
            pass  # only an optimisation: the next command verifies the table

    def first_uses(self, names: set[str]) -> set[str]:
        """Which of ``names`` this state directory has not met before; they
        are remembered from now on (``<state>.seen``, one name per line).
        For warnings that should be given once, not on every command."""
        path = self.path + ".seen"
        try:
            with open(path, encoding="utf-8") as f:
                known = set(f.read().split())
        except OSError:
            known = set()
        new = names - known
        if new:
            try:
                flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                fd = os.open(path, flags, 0o600)
                with os.fdopen(fd, "a", encoding="utf-8") as f:
                    f.write("".join(f"{n}\n" for n in sorted(new)))
            except OSError:
                pass
        return new

    def _splice(self, old: Snapshot, table: Table) -> bytes:
        """The service lines of ``old.raw`` with the loaded services replaced."""
        raw = old.raw
        _, start = self._split(raw)
        body_end = len(raw) - len(_TRAILER)
        edits: list[tuple[int, int, bytes]] = []
        new_by_key = {s.key: s for s in table.services}
        for svc in old.table.services:
            span = _find_line(raw, svc.key)
            if span is None:
                continue
            new = new_by_key.pop(svc.key, None)
            edits.append((span[0], span[1], _line(new) if new is not None else b""))
        appended = b"".join(_line(s) for s in table.services if s.key in new_by_key)
        edits.append((body_end, body_end, appended))
        out, pos = [], start
        for begin, end, text in sorted(edits, key=lambda e: e[0]):
            out.append(raw[pos:begin])
            out.append(text)
            pos = end
        out.append(raw[pos:body_end])
        return b"".join(out)


_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _temporary(directory: str, prefix: str) -> tuple[int, str]:
    """A new file ``<prefix><unique>.tmp`` in ``directory``, mode 0600, open
    for writing: tempfile.mkstemp without importing tempfile (shutil,
    random...: a few ms of every change)."""
    for attempt in range(100):
        path = os.path.join(directory, f"{prefix}{os.getpid()}x{time.monotonic_ns()}x{attempt}.tmp")
        try:
            return os.open(path, _NEW_FILE, 0o600), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), directory)


_DIRECT = (Forward.ROUTE, Forward.TUNNEL)
_TRASH_TYPES = (str, int, str, int, int, float)


def _trash_key(svc: Service, dest: Dest) -> tuple:
    return (key_text(svc.key), dest.af, str(dest.addr), dest.port)


def _direct_services(raw: bytes) -> list[Service]:
    """The services of a state file's bytes that have a direct-routed or
    tunnelled server (only their lines are decoded)."""
    if not raw or (b'"route"' not in raw and b'"tunnel"' not in raw):
        return []
    out = []
    for line in raw.split(b"\n")[1:]:
        if line.startswith(b'["') and (b'"route"' in line or b'"tunnel"' in line):
            try:
                out.append(_service_of(json.loads(line[:-1])))
            except (ValueError, TypeError, IndexError, KeyError):
                continue  # the digest was checked: not reached
    return out


def _find_line(raw: bytes, key: ServiceKey) -> tuple[int, int] | None:
    """Byte span of the service's line, newline included."""
    tag = b'\n["' + key_text(key).encode() + b'",'
    pos = raw.find(tag)
    if pos < 0:
        return None
    end = raw.find(b"\n", pos + 1)
    return pos + 1, end + 1


_SID_RE = re.compile(rb'\n\["[^"\n]*",(\d+),')
_STAGED_RE = re.compile(r"\.state-(\d+)-\w+\.tmp")


def _all_sids(raw: bytes) -> Iterator[int]:
    for m in _SID_RE.finditer(raw):
        yield int(m.group(1))
