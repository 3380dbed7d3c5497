"""The ``ipvsadm``, ``ipvsadm-save`` and ``ipvsadm-restore`` commands.

The only place that prints errors and chooses exit statuses: everything
below raises typed errors (``ipvs2nft.errors``) carrying ipvsadm's text.
A command loads what it needs from the store (one service for most
commands), applies the IPVS rules of ``ipvs.py``, lets the back end change
the kernel in one transaction, and only then writes the store.
"""

from __future__ import annotations

import _signal
import gc
import os
import sys

from ipvs2nft.errors import (
    Exit,
    IpvsadmError,
    KernelError,
    ListError,
    LockTimeout,
    PoptError,
    StoreError,
    TryHelp,
    UsageError,
    internal_error,
)
from ipvs2nft.ipvsadm.options import VERSION_LINE
from ipvs2nft.privilege import may_administer_network

# The parser and the table's machinery (store, IPVS rules, listings,
# nftables) are imported where they are first needed, so that -h and -v
# start as fast as the interpreter allows: no dataclasses, enum, signal or
# collections module on their way (bench/RESULTS.md, section 5).
if False:  # typing.TYPE_CHECKING without importing typing (1.5 ms of start-up)
    from collections.abc import Callable, Iterable

    from ipvs2nft.backend import Backend
    from ipvs2nft.ipvsadm.cmdline import Command
    from ipvs2nft.model import Table
    from ipvs2nft.store import Snapshot, Store

    Mutation = Callable[[Table], Table]

INIT_FAILURE = ("Can't initialize ipvs: {reason}\n"
                "Are you sure that IP Virtual Server is built in the kernel or as module?")
# argv that can only mean -h or -v: answered before the parser is imported
QUICK_ANSWERS = {"-h": "help", "--help": "help", "-v": "version", "--version": "version"}


class Session:
    """One ipvsadm process's view of the table.

    A single command reads only the services it names and commits at once;
    ``-R`` (``batch``) works on the whole table in memory under the lock and
    commits once at the end, so the kernel sees one transaction.
    """

    def __init__(self, store: Store, backend: Backend, batch: bool = False, in_daemon: bool = False) -> None:
        self.store = store
        self.backend = backend
        self.batch = batch
        self.in_daemon = in_daemon  # the daemon carries the command out (daemon/mutate.py)
        self.out: list[str] = []
        self.snapshot: Snapshot | None = None  # batch: what was read
        self.table: Table | None = None  # batch: the table as the lines change it
        self.after_commit: list[Callable[[], None]] = []
        self.observed: set = set()  # services whose scheduler state was read
        # what each commit of mutate() wrote: (keys, generation read, the state written); the daemon
        # follows its own changes from these instead of reading the whole state file again
        self.commits: list[tuple[object, int, Snapshot]] = []

    # ---------------------------------------------------------- reading
    def full_table(self) -> Table:
        if self.batch:
            return self.table
        return self.store.read().table

    def find(self, cmd: Command):
        """The service a listing names (``No such service`` is a list error)."""
        if self.batch:
            svc = self.table.find(cmd.service.key)
        else:
            svc = self.store.read_services([cmd.service.key]).table.find(cmd.service.key)
        if svc is None:
            raise ListError("No such service")
        return svc

    # ---------------------------------------------------------- changing
    def mutate(self, keys, change: Mutation) -> None:
        """Apply ``change`` to the table (``keys``: the services it touches, None = all)."""
        if self.batch:
            self.table = change(self._observe(self.table, keys))
            return
        from ipvs2nft import ipvs

        with self.store.locked():
            if keys is None:  # -C starts afresh from an unusable state file
                old = self.store.read(fresh_if_unusable=change is ipvs.flush)
            else:
                old = self.store.read_services(keys)
            current = self._observe(old.table.copy(), keys)
            self.commits.append((keys, old.generation, self._commit(old, change(current))))

    def _observe(self, table: Table, keys) -> Table:
        """Bring the scheduler state of the touched services up to date,
        once.  A service this batch made (no sid yet) has nothing to read."""
        if keys is None:
            return table
        fresh = []
        for key in keys:
            if key in self.observed:
                continue
            svc = table.find(key)
            if svc is not None:
                self.observed.add(key)
                if svc.sid:
                    fresh.append(svc)
        return self.backend.observe(table, fresh) if fresh else table

    def _commit(self, old: Snapshot, new_table: Table) -> Snapshot:
        """Stage the new state, change the kernel, then publish the state.

        A full disk fails at the staging, a kernel refusal discards the staged
        file: either way nothing changed.  A crash after the kernel leaves the
        staged file, whose generation is the kernel's: the next command
        publishes it (``check``), so store and kernel agree again."""
        from ipvs2nft import faults

        prepared = self.store.prepare(old, new_table)
        staged = self.store.stage(prepared)
        faults.point("before-kernel")
        # --start-daemon / --stop-daemon: conntrackd runs (or stops) first,
        # so a daemon that cannot start fails the command (ipvs2nft.sync)
        syncing = self.backend.checks and old.table.daemons != prepared.table.daemons
        try:
            if syncing:
                from ipvs2nft import sync

                sync.apply(prepared.table, self.store)
            self.backend.apply(old, prepared)
        except BaseException:
            self.store.discard(staged)
            if syncing:
                _undo_sync(old.table, self.store)
            raise
        faults.point("after-kernel")
        self.store.publish(staged)
        self.store.write_trash(prepared)
        faults.point("after-store")
        self.store.record_genid(*self.backend.seal())
        if self.backend.checks and not self.in_daemon:
            from ipvs2nft.daemon import control

            control.tell("changed")  # the daemon publishes its live choices for the new table now
            _warn_approximated(self.store, prepared.table)
        return prepared

    def check(self, reader: bool = False) -> None:
        """Before any command: the kernel must do what the store says.

        Cheap when all is well (the kernel's generation element and the
        ruleset's generation id, one netlink round trip each).  When only the
        ruleset id moved -- someone committed something, anywhere -- our
        tables' fingerprint (nft/fingerprint.py, a few milliseconds) tells a
        change elsewhere from a hand on ours.  Otherwise, under the lock:
        publish a state file a crashed command staged for the kernel's
        generation, drop other staged files, and rebuild our tables from the
        store if they still differ (also after a hand edit inside them).

        A ``reader`` (``-L``, ``-S``) does not queue behind the writers: when
        the lock is taken it answers from the store, which is the truth the
        listing shows, and leaves the repair to the writer or the next call."""
        if not self.backend.checks:
            return
        staged = self.store.staged()
        kernel_gen = self.backend.generation()
        genid = self.backend.ruleset_genid()
        try:
            head = self.store.read_services([])
        except StoreError:
            return  # an unusable state file: the command reports it (or -C starts afresh)
        if head.table.daemons:
            from ipvs2nft import sync

            sync.ensure(head.table, self.store)
        if not staged and kernel_gen == head.generation and genid is not None:
            seen, recorded = self.store.seen()
            if genid == seen or self.in_daemon or _daemon_watches():
                return
            if recorded is not None and self.backend.fingerprint() == recorded:
                self.store.record_genid(genid, recorded)  # a change elsewhere: ours are intact
                return
        try:
            with self.store.locked(wait=0 if reader else None):
                self._repair()
        except LockTimeout:
            if not reader:
                raise

    def _repair(self) -> None:
        kernel_gen = self.backend.generation()
        for gen, path in self.store.staged():
            if gen == kernel_gen:
                self.store.publish(path)  # roll forward: the kernel already has it
            else:
                self.store.discard(path)
        current = self.store.read()
        if current.generation == 0 and not current.raw:
            return  # no state yet: nothing of ours should be in the kernel
        if kernel_gen != current.generation or not self.backend.verify(current):
            self.backend.rebuild(current.table, current.generation)
        self.store.record_genid(*self.backend.seal(verified=True))

    def begin_batch(self, replace_all: bool = False) -> None:
        """``replace_all`` (ipvsadm-restore): the table is flushed first, so
        only the store's header is read and an unusable file is set aside."""
        self.batch = True
        self.snapshot = self.store.read_header(True) if replace_all else self.store.read()
        self.table = self.snapshot.table.copy()

    def end_batch(self) -> None:
        if self.snapshot.header_only or self.table != self.snapshot.table:
            self.commits.append((None, self.snapshot.generation, self._commit(self.snapshot, self.table)))
        for action in self.after_commit:
            action()


def _undo_sync(table: Table, store: Store) -> None:
    """The sync daemons as they were, after a commit that failed."""
    from ipvs2nft import sync

    try:
        sync.apply(table, store)
    except IpvsadmError:
        pass  # the command's own error is the one to report


def _daemon_watches() -> bool:
    """A daemon runs in this namespace: its own writes move the ruleset's
    generation id all the time, and it watches our tables for foreign
    changes itself, so a moved id alone is no reason to verify them."""
    from ipvs2nft.daemon import control

    return control.running_pid() is not None


def _warn_approximated(store, table: Table) -> None:
    """Once per scheduler and state directory (notice.once), when no daemon
    runs: lc, wlc (ipvsadm's default), sed, nq, ovf, lblc, lblcr and
    thresholds follow live connection counts only while ``ipvs2nft daemon``
    keeps them; without it the data plane keeps the choices ipvsadm wrote."""
    from ipvs2nft import dynsched, notice

    names = sorted({s.scheduler if s.scheduler in dynsched.LIVE else "thresholds"
                    for s in table.services if dynsched.managed(s)})
    if not names or _daemon_watches():
        return
    for name in names:
        notice.once(store, name, f"{name} follows live connection counts only while `ipvs2nft daemon` "
                    "runs; until it does, new connections follow the choices ipvsadm wrote "
                    "(see compat-matrix.md)")


def _list(cmd: Command, session: Session) -> None:
    from ipvs2nft import listing

    fmt = cmd.fmt
    if "connection" in cmd.options:
        session.out.append(listing.list_conn(session.backend.connections(session.full_table()), fmt))
    elif "service-address" in cmd.options:
        svc = session.find(cmd)
        from ipvs2nft.model import Table

        session.out.append(listing.list_service(svc, fmt, session.backend.counters(Table([svc]))))
    elif "timeout" in cmd.options:
        session.out.append(listing.list_timeout(session.full_table()))
    elif "daemon" in cmd.options:
        session.out.append(listing.list_daemon(session.full_table()))
    else:
        table = session.full_table()
        session.out.append(listing.list_all(table, fmt, session.backend.counters(table)))


def _zero(cmd: Command, session: Session) -> None:
    """``-Z``: the service must exist; the counters live in the kernel."""
    from ipvs2nft import ipvs

    if "service-address" in cmd.options:
        key = cmd.service.key
        table = session.table if session.batch else session.store.read_services([key]).table
        ipvs.check_zero(table, key)
        services = [table.find(key)]
    else:
        services = list(session.full_table().services)
    if session.batch:
        session.after_commit.append(lambda: session.backend.zero(services))
    else:
        session.backend.zero(services)


def execute(cmd: Command, session: Session) -> None:
    """Carry out one parsed command; raises on failure."""
    from ipvs2nft.ipvsadm.apply import mutation

    if cmd.name == "list":
        _list(cmd, session)
    elif cmd.name == "save":
        from ipvs2nft import listing
        from ipvs2nft.ipvsadm.cmdline import Format

        session.out.append(listing.list_all(session.full_table(), Format(numeric=cmd.fmt.numeric),
                                            rule=True))
    elif cmd.name == "zero":
        _zero(cmd, session)
    else:
        change = mutation(cmd)
        if change is None:  # pragma: no cover - the parser returns no other command
            raise UsageError(f"unknown command {cmd.name}")
        session.mutate(*change)


def _help_or_version(cmd: Command, argv0: str) -> str | None:
    """What ``-h`` or ``-v`` prints (they need no table), else None."""
    return _answer(cmd.name, argv0)


def _answer(name: str, argv0: str) -> str | None:
    if name == "help":
        from ipvs2nft.ipvsadm.help import usage

        return usage(argv0)
    if name == "version":
        return VERSION_LINE + "\n"
    return None


def run_line(argv: list[str], argv0: str, session: Session, stdin) -> int:
    """One ipvsadm invocation (or one -R line).  Returns the exit status of a
    line that failed in a way -R survives; raises on the fatal ones."""
    from ipvs2nft.ipvsadm import cmdline

    return run_command(cmdline.parse(argv, argv0), argv0, session, stdin)


def run_command(cmd: Command, argv0: str, session: Session, stdin) -> int:
    """A parsed invocation (see run_line)."""
    text = _help_or_version(cmd, argv0)
    if text is not None:
        session.out.append(text)
        raise Exit(0)
    if cmd.name == "restore":
        if session.batch:
            raise TryHelp(argv0)  # restore_table() refuses to nest
        from ipvs2nft.ipvsadm import restore

        return _restore(argv0, session, restore.lines(stdin.read()))
    if not session.batch:
        session.check(reader=cmd.name in ("list", "save"))
    execute(cmd, session)
    return 0


def _restore(argv0: str, session: Session, lines: Iterable[list[str]], flush_first: bool = False) -> int:
    """``-R`` of the lines' words (ipvsadm/restore.py splits them): each line
    like its own invocation; kernel and popt errors are reported and
    skipped, validation errors end the restore; the status is that of the
    last line.  Committed as one transaction at the end.  The lines
    ipvsadm-save writes take a short cut (ipvsadm/quick.py)."""
    from ipvs2nft import ipvs
    from ipvs2nft.ipvsadm.quick import Lines

    session.check()
    with session.store.locked():
        session.begin_batch(replace_all=flush_first)
        quick = Lines(session)
        try:
            if flush_first:
                session.table = ipvs.flush(session.table)
            result = 0
            for words in lines:
                if not words:
                    continue
                if quick.take(words):
                    result = 0
                    continue
                try:
                    result = run_line(words, argv0, session, None)
                except (KernelError, PoptError) as exc:
                    _stderr(exc.message)
                    result = 255
            return result
        finally:
            quick.flush()
            session.end_batch()


def _stderr(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def _argv0() -> str:
    """ipvsadm prints argv[0] in its ``Try`` line.  A Python console script only
    sees its own path there (the kernel hands the interpreter the script's
    path), so the base name is used: what a PATH lookup of ``ipvsadm`` shows."""
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "ipvsadm"


def open_session() -> Session:
    """A session on the configured store and back end, for a caller with
    the privilege the back end needs (PermissionError otherwise)."""
    _require_privilege()
    return _session()


def _session() -> Session:
    """open_session() for a caller that has already checked the privilege."""
    from ipvs2nft.backend import open_backend
    from ipvs2nft.store import Store

    store = Store()
    return Session(store=store, backend=open_backend(store))


def _require_privilege() -> None:
    """ipvsadm stops at ipvs_init() without CAP_NET_ADMIN, before reading
    its arguments; so does the nftables back end (not the store-only one)."""
    if os.environ.get("IPVS2NFT_BACKEND", "nft") != "none" and not may_administer_network():
        raise PermissionError(1, "Operation not permitted")


def _init_failure(exc: OSError) -> UsageError:
    reason = "Permission denied (you must be root)" if isinstance(exc, PermissionError) else os.strerror(
        exc.errno or 0)
    return UsageError(INIT_FAILURE.format(reason=reason))


# Sessions kept alive until os._exit when run as a console script (see
# _exit_now): freeing libnftables' cache of a 10,000-service table costs more
# than the process's exit does.
_KEEP: list[Session] | None = None


def _finish(session: Session | None, status: int) -> int:
    if _KEEP is not None and session is not None:
        _KEEP.append(session)
    if session is not None and session.out:
        try:
            sys.stdout.write("".join(session.out))
            sys.stdout.flush()
        except BrokenPipeError:
            return status
    return status


def main(argv: list[str] | None = None) -> int:
    """``ipvsadm``: the daemon carries the call out when it runs and serves
    it (daemon/mutate.py), else this process does (``serve``)."""
    _signal.signal(_signal.SIGPIPE, _signal.SIG_DFL)  # die quietly like C when piped to head
    argv = sys.argv[1:] if argv is None else argv
    argv0 = _argv0()
    try:
        _require_privilege()
    except PermissionError as exc:
        _stderr(_init_failure(exc).message)
        return 2
    if argv and argv[0] not in QUICK_ANSWERS:
        from ipvs2nft.daemon import mutate

        try:
            done = mutate.ask(argv, argv0)
        except mutate.NoAnswer as exc:
            _stderr(f"ipvs2nft: the daemon took the command and did not answer ({exc})")
            return 2
        if done is not None:
            status, out, err = done
            _write(out, err)
            return status
    stdin = sys.stdin.buffer if sys.stdin else None
    return serve(argv, argv0, _session, stdin)


def _write(out: str, err: str) -> None:
    try:
        if out:
            sys.stdout.write(out)
            sys.stdout.flush()
    except BrokenPipeError:
        return
    if err:
        sys.stderr.write(err)
        sys.stderr.flush()


def serve(argv: list[str], argv0: str, new_session: Callable[[], Session], stdin) -> int:
    """ipvsadm once its caller may administer the network: parse, carry
    out, print; the exit status.  ``new_session`` makes the session (the
    daemon's, in the daemon)."""
    session = None
    try:
        if not argv:
            from ipvs2nft import listing
            from ipvs2nft.ipvsadm.cmdline import Format

            session = new_session()
            session.check(reader=True)
            session.out.append(listing.list_all(session.full_table(), Format()))
            return _finish(session, 0)
        if argv[0] in QUICK_ANSWERS:  # what the parser answers for them, without it
            text = _answer(QUICK_ANSWERS[argv[0]], argv0)
            sys.stdout.write(text)
            return 0
        from ipvs2nft.ipvsadm import cmdline

        cmd = cmdline.parse(argv, argv0)
        text = _help_or_version(cmd, argv0)
        if text is not None:
            sys.stdout.write(text)
            return 0
        session = new_session()
        status = run_command(cmd, argv0, session, stdin)
        return _finish(session, status)
    except Exit as exc:
        return _finish(session, exc.status)
    except IpvsadmError as exc:
        _finish(session, exc.status)
        _stderr(exc.message)
        return exc.status
    except PermissionError as exc:
        _finish(session, 2)
        _stderr(_init_failure(exc).message)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: no traceback for users
        return internal_error(exc)


def save_main(argv: list[str] | None = None) -> int:
    """``ipvsadm-save [-n]``: ``ipvsadm -S``, with the script's own usage text."""
    argv = sys.argv[1:] if argv is None else argv
    numeric = False
    for arg in argv:
        if arg == "-n":
            numeric = True
        elif arg.startswith("-"):
            name = _argv0() or "ipvsadm-save"
            sys.stderr.write(f"{name}: Script to save the IPVS table to stdout.\n"
                             "   With the -n option, prints out the table in numeric format.\n")
            return 1
    return main(["-S", "-n"] if numeric else ["-S"])


def restore_main(argv: list[str] | None = None) -> int:
    """``ipvsadm-restore``: drop ``#`` lines, flush, then ``-R`` -- as one
    transaction here, so the table is never seen empty in between."""
    _signal.signal(_signal.SIGPIPE, _signal.SIG_DFL)
    from ipvs2nft.ipvsadm import restore

    data = sys.stdin.buffer.read() if sys.stdin else b""
    argv0 = "ipvsadm"
    session = None
    try:
        session = open_session()
        lines = (words for _, words in restore.script_lines(data))
        status = _restore(argv0, session, lines, flush_first=True)
        return _finish(session, status)
    except Exit as exc:
        return _finish(session, exc.status)
    except IpvsadmError as exc:
        _finish(session, exc.status)
        _stderr(exc.message)
        return exc.status
    except PermissionError as exc:
        _finish(session, 2)
        _stderr(_init_failure(exc).message)
        return 2
    except Exception as exc:  # noqa: BLE001
        return internal_error(exc)


def _exit_now(entry: Callable[[], int]) -> Callable[[], None]:
    """A console-script entry: run ``entry``, flush, and leave at once.

    Tearing down ten thousand services object by object (and libnftables'
    cache of them) costs more than a listing's formatting; the kernel frees
    a process's memory in one go.  Only the console scripts do this; the
    functions themselves return normally (tests call them in-process).

    The cyclic garbage collector is off for the same reason: decoding ten
    thousand services makes some 300,000 objects that all stay alive, and
    the collections their allocation triggers walked them again and again
    (more than the decoding itself); a command makes next to no cycles and
    its memory goes back in one go at the end."""
    def run() -> None:
        global _KEEP
        gc.disable()
        _KEEP = []
        status = entry()
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BrokenPipeError:
            pass
        os._exit(status if isinstance(status, int) else 1)
    return run


run = _exit_now(main)
run_save = _exit_now(save_main)
run_restore = _exit_now(restore_main)


if __name__ == "__main__":
    sys.exit(main())
