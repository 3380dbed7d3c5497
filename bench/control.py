"""Goals 2-5: whole processes of the control plane, timed side by side.

Every command runs inside a director namespace (bench/runner.py spawns and
times it there) with its own IPVS2NFT_STATE.  Each goal compares commands
measured round by round, in an order rotated by one per round, so a noisy
moment on the shared machine hits every side alike.

Our commands and the bare ``nft`` calls they are compared with run in
separate namespaces loaded with the same table: a foreign nft change in our
namespace would (rightly) make the next ipvsadm verify the whole table
against its store, which is not the cost of a mutating call.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import rulesets
from benchlab import BIN, Runner, disk, open_lab

NEW_RS = "192.168.100.200"  # the real server goal 3 adds (and removes again)
PYTHON = "/usr/bin/python3"  # what the venv's python is made from


@dataclass
class Series:
    """One command's timings, one per round (seconds)."""

    name: str
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


@dataclass
class Step:
    """A timed command, with untimed set-up before it and clean-up after it."""

    series: Series
    runner: Runner
    argv: list[str]
    stdin: Path | None = None
    before: Callable[[], None] = lambda: None
    after: Callable[[], None] = lambda: None
    env: dict[str, str] | None = None  # instead of the runner's

    def once(self, record: bool = True) -> None:
        self.before()
        answer = self.runner.run(self.argv, stdin=self.stdin, env=self.env)
        self.after()
        if record:
            self.series.wall.append(answer["wall"])
            self.series.cpu.append(answer["cpu"])


def interleave(steps: list[Step], rounds: int) -> None:
    """A warm-up of each step (caches, .pyc), then ``rounds`` rounds, rotated."""
    for step in steps:
        step.once(record=False)
    for r in range(rounds):
        k = r % len(steps)
        for step in steps[k:] + steps[:k]:
            step.once()


def _rules_file(workdir: Path, kind: str, n: int, scheduler: str = "rr") -> Path:
    path = workdir / f"{kind}-{scheduler}-{n}.rules"
    if not path.exists():
        path.write_text(rulesets.ipvsadm_rules(n, scheduler=scheduler) if kind == "ipvsadm"
                        else rulesets.iptables_rules(n))
    return path


def _loaded_runner(stack: ExitStack, tag: str, n: int, workdir: Path, scheduler: str = "rr",
                   state_in: str | None = None) -> Runner:
    """A director holding our table of ``n`` services (loaded with ipvsadm-restore)."""
    runner = Runner(stack, open_lab(stack, tag, servers=0, state_in=state_in))
    runner.ipvsadm([], prog="ipvsadm-restore", stdin=_rules_file(workdir, "ipvsadm", n, scheduler))
    return runner


def with_daemon(stack: ExitStack, runner: Runner) -> None:
    """``ipvs2nft daemon`` in the runner's director: ipvsadm hands it its changes."""
    daemon = runner.lab.daemon()
    stack.callback(daemon.stop)


# ---------------------------------------------------------------- goal 5: start-up

UNCACHED = "ipvsadm -h, PYTHONDONTWRITEBYTECODE=1"


def startup(stack: ExitStack, rounds: int, uncached: bool = False) -> tuple[dict[str, Series], Runner]:
    """``ipvsadm -h`` and ``-v`` (no table work) against the bare interpreter.  With
    ``uncached``, also ``-h`` as the caller's environment would run it: our modules'
    bytecode never cached, so compiled at every call."""
    runner = Runner(stack, open_lab(stack, "sO", servers=0))
    out = {k: Series(k) for k in ("ipvsadm -h", "ipvsadm -v", "python3 -c pass")}
    steps = [Step(out["ipvsadm -h"], runner, [str(BIN / "ipvsadm"), "-h"]),
             Step(out["ipvsadm -v"], runner, [str(BIN / "ipvsadm"), "-v"]),
             Step(out["python3 -c pass"], runner, [PYTHON, "-c", "pass"])]
    if uncached:
        env = {k: v for k, v in runner.env.items() if k != "PYTHONPYCACHEPREFIX"}
        out[UNCACHED] = Series(UNCACHED)
        steps.append(Step(out[UNCACHED], runner, [str(BIN / "ipvsadm"), "-h"],
                          env=env | {"PYTHONDONTWRITEBYTECODE": "1"}))
    interleave(steps, rounds)
    return out, runner


# ---------------------------------------------------------------- goal 2: whole-table load

def restore(stack: ExitStack, sizes: tuple[int, int], workdir: Path,
            rounds: int) -> tuple[dict[str, Series], Runner, Runner]:
    """ipvsadm-restore onto an empty table (``ipvsadm -C`` first, untimed) against
    iptables-legacy-restore of the same services (an empty nat table first, untimed).
    Returns the series and the runners of our namespace and of iptables'."""
    ours = Runner(stack, open_lab(stack, "rO", servers=0))
    theirs = Runner(stack, open_lab(stack, "rI", servers=0))
    empty = workdir / "iptables-empty.rules"
    empty.write_text(rulesets.iptables_empty())
    out, steps = {}, []
    for n in sizes:
        a, b = Series(f"ipvsadm-restore @{n}"), Series(f"iptables-legacy-restore @{n}")
        out[a.name], out[b.name] = a, b
        steps.append(Step(a, ours, [str(BIN / "ipvsadm-restore")],
                          stdin=_rules_file(workdir, "ipvsadm", n),
                          before=lambda: ours.ipvsadm(["-C"])))
        steps.append(Step(b, theirs, ["iptables-legacy-restore"], stdin=_rules_file(workdir, "iptables", n),
                          before=lambda: theirs.run(["iptables-legacy-restore"], stdin=empty)))
    interleave(steps, rounds)
    for step in steps[-2:]:  # the largest size once more, untimed, to check what it loads
        step.once(record=False)
    _check_loaded(ours, theirs, sizes[-1])
    return out, ours, theirs


def _check_loaded(ours: Runner, theirs: Runner, n: int) -> None:
    """The restores really load n services (4 n real servers, 4 n rules)."""
    saved = ours.ipvsadm(["-S", "-n"], keep=True)["out"]
    rules = theirs.run(["iptables-legacy-save", "-t", "nat"], keep=True)["out"]
    got = (saved.count("\n-a "), rules.count("\n-A PREROUTING"))
    if got != (4 * n, 4 * n):
        raise RuntimeError(f"restore loaded {got} real servers/rules, expected {4 * n}")


# ---------------------------------------------------------------- goal 3: one mutating call

def _sid(runner: Runner, n: int) -> int:
    """The last service's id, from the kernel's dispatch map (it names the slot keys)."""
    key = f"{rulesets.VIP} . tcp . {rulesets.port(n - 1)}"
    out = runner.run(["nft", "get", "element", "inet", "ipvs2nft", "svc4", f"{{ {key} }}"], keep=True)["out"]
    found = re.search(r"goto svc_(\d+)", out)
    if not found:
        raise RuntimeError(f"no dispatch element for {key}: {out}")
    return int(found.group(1))


def add_args(n: int) -> tuple[list[str], list[str]]:
    """(the -a that goal 3 times, the -d that undoes it) for a table of n services."""
    svc = f"{rulesets.VIP}:{rulesets.port(n - 1)}"
    return (["-a", "-t", svc, "-r", f"{NEW_RS}:80", "-m"], ["-d", "-t", svc, "-r", f"{NEW_RS}:80"])


DAEMON = " (daemon)"  # series of ipvsadm calls carried out by a running daemon
WLC = ", wlc"  # of calls on a table of wlc services (ipvsadm's default: each -a reads live counts)


def add(stack: ExitStack, sizes: tuple[int, int], workdir: Path,
        rounds: int) -> tuple[dict[str, Series], dict[str, Runner]]:
    """``ipvsadm -a`` of a fifth real server to the last service (``ipvsadm -d`` after it,
    untimed) against ``nft add element`` of the equivalent slot into the nat map (deleted
    after it, untimed), on tables of each size; ipvsadm in-process and with a daemon
    running (which then carries the change out), and on a wlc table of the larger size.
    Returns the series and our runner per series name."""
    nft = shutil.which("nft") or "nft"
    out, steps, runners = {}, [], {}

    def ours(name: str, runner: Runner, n: int) -> None:
        series = out[name] = Series(name)
        runners[name] = runner
        do, undo = add_args(n)
        steps.append(Step(series, runner, [str(BIN / "ipvsadm"), *do],
                          after=lambda: runner.ipvsadm(undo)))

    for n in sizes:
        ours(f"ipvsadm -a @{n}", _loaded_runner(stack, "aO", n, workdir), n)
        served = _loaded_runner(stack, "aD", n, workdir)
        with_daemon(stack, served)
        ours(f"ipvsadm -a @{n}{DAEMON}", served, n)
        bare = _loaded_runner(stack, "aN", n, workdir)
        slot = f"{_sid(bare, n):x}:{rulesets.SERVERS:x}"  # classid major:minor = sid:slot (build.py)
        b = out[f"nft add element @{n}"] = Series(f"nft add element @{n}")
        steps.append(Step(b, bare, [nft, "add", "element", "inet", "ipvs2nft", "nat4",
                                    f"{{ {slot} : {NEW_RS} . 80 }}"],
                          after=lambda bare=bare, slot=slot: bare.run(
                              [nft, "delete", "element", "inet", "ipvs2nft", "nat4", f"{{ {slot} }}"])))
    big = sizes[-1]
    ours(f"ipvsadm -a @{big}{WLC}", _loaded_runner(stack, "aW", big, workdir, scheduler="wlc"), big)
    interleave(steps, rounds)
    return out, runners


# ---------------------------------------------------------------- goal 6: a foreign change elsewhere

FOREIGN = " after a foreign change"
# someone else's table, made, given a chain and a rule, and deleted: the generation moves, ours stay
FOREIGN_CHANGE = ("add table inet bench_foreign; add chain inet bench_foreign c; "
                  "add rule inet bench_foreign c counter; delete table inet bench_foreign")


def foreign_change(runner: Runner) -> None:
    runner.run([shutil.which("nft") or "nft", FOREIGN_CHANGE])


def foreign(stack: ExitStack, n: int, workdir: Path, rounds: int) -> tuple[dict[str, Series], Runner]:
    """``ipvsadm -a`` (``-d`` after it, untimed) right after someone else changed the
    ruleset outside our tables (a table of theirs made and deleted, untimed) against the
    same call with no change in between; no daemon (it would follow the change itself)."""
    runner = _loaded_runner(stack, "fO", n, workdir)
    do, undo = add_args(n)
    quiet, after = Series(f"ipvsadm -a @{n}"), Series(f"ipvsadm -a @{n}{FOREIGN}")
    steps = [Step(quiet, runner, [str(BIN / "ipvsadm"), *do], after=lambda: runner.ipvsadm(undo)),
             Step(after, runner, [str(BIN / "ipvsadm"), *do], before=lambda: foreign_change(runner),
                  after=lambda: runner.ipvsadm(undo))]
    interleave(steps, rounds)
    return {quiet.name: quiet, after.name: after}, runner


# ---------------------------------------------------------------- goal 4: listings

LISTINGS = ("-L -n", "-S -n")


def listing(stack: ExitStack, n: int, workdir: Path, rounds: int) -> tuple[dict[str, Series], Runner, str]:
    """``ipvsadm -L -n`` and ``-S -n`` of a table of n services (output read through a
    pipe), the state file on a disk (the goal) and on tmpfs.  Returns the series (keyed
    by flags, and flags + " (tmpfs)"), the disk runner and the disk's file system."""
    where, fs = disk()
    on_disk = _loaded_runner(stack, "lD", n, workdir, state_in=where)
    in_memory = _loaded_runner(stack, "lO", n, workdir)
    out, steps = {}, []
    for key, runner, label in [(k, on_disk, f" (state on {fs})") for k in LISTINGS] + [
            (f"{k} (tmpfs)", in_memory, " (state on tmpfs)") for k in LISTINGS]:
        flags = key.split(" (")[0]
        out[key] = Series(f"ipvsadm {flags} @{n}{label}")
        steps.append(Step(out[key], runner, [str(BIN / "ipvsadm"), *flags.split()]))
    interleave(steps, rounds)
    return out, on_disk, fs
