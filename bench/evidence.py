"""Why a goal missed: profiles of our side of it, taken right after the measurement,
in the same namespace, and written into RESULTS.md under the goal."""

from __future__ import annotations

import io
import pstats
import re
import shutil
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from benchlab import BIN, HERE, Runner

TOP = 18


def cprofile(runner: Runner, prog: str, args: list[str], workdir: Path, stdin: Path | None = None,
             before: Callable[[], None] = lambda: None, after: Callable[[], None] = lambda: None) -> str:
    """One run of ``prog args`` under cProfile: the functions with the largest cumulative
    time (where the time goes) and the largest own time (what burns it)."""
    out = workdir / f"profile-{prog}-{len(list(workdir.glob('profile-*')))}.prof"
    before()
    answer = runner.run([sys.executable, str(HERE / "profcmd.py"), str(out), str(BIN / prog), *args],
                        stdin=stdin, check=False)
    after()
    if not out.exists():
        return f"(no profile: {answer['err'].strip()})"
    stats = pstats.Stats(str(out))
    head = (f"cProfile of `{prog}{''.join(' ' + a for a in args)}`{' < the rules file' if stdin else ''} "
            f"(wall {answer['wall']:.3f} s under the profiler, {stats.total_tt:.3f} s profiled).")
    return _both(head, stats)


def _both(head: str, stats: pstats.Stats) -> str:
    return (f"{head}  By cumulative time:\n\n```\n{_listing(stats, 'cumulative', TOP)}\n```\n\n"
            f"By own time:\n\n```\n{_listing(stats, 'tottime', TOP // 2)}\n```\n")


def daemon_side(runner: Runner, do: list[str], undo: list[str], workdir: Path) -> str:
    """cProfile of what the daemon does for ``ipvsadm do`` (bench/profserve.py)."""
    out = workdir / f"profile-daemon-{len(list(workdir.glob('profile-*')))}.prof"
    answer = runner.run([sys.executable, str(HERE / "profserve.py"), str(out), *do, "--", *undo], check=False)
    if not out.exists():
        return f"(no profile: {answer['err'].strip()})"
    stats = pstats.Stats(str(out))
    return _both(f"cProfile of the daemon's side of `ipvsadm {' '.join(do)}` (daemon/mutate.carry_out, "
                 f"warm, {stats.total_tt:.3f} s profiled).", stats)


# the wrappers every profile starts with: they say nothing about the command
_NOISE = re.compile(r"<frozen runpy>|builtins\.exec}|\.venv/bin/|profcmd\.py")


def _listing(stats: pstats.Stats, key: str, top: int) -> str:
    text = io.StringIO()
    stats.stream = text
    stats.sort_stats(key).print_stats(top + 8)
    body = text.getvalue()
    lines = body[body.find("   ncalls"):].splitlines() if "   ncalls" in body else body.splitlines()
    kept = [line for line in lines[1:] if line.strip() and not _NOISE.search(line)][:top]
    return _trim_paths("\n".join(lines[:1] + kept))


def _trim_paths(text: str) -> str:
    """Paths relative to the project or the Python library, to keep lines short."""
    root = str(HERE.parent) + "/"
    text = text.replace(root, "")
    return re.sub(r"/usr/lib/python3[^/]*/", "", text)


def importtime(runner: Runner, args: list[str], baseline: list[str]) -> str:
    """``python -X importtime`` of our command and of the baseline: where start-up goes."""
    ours = _imports(runner, [sys.executable, "-X", "importtime", str(BIN / "ipvsadm"), *args])
    base = _imports(runner, ["/usr/bin/python3", "-X", "importtime", *baseline])
    extra = {k: v for k, v in ours.items() if k not in base}
    top = sorted(extra.items(), key=lambda kv: -kv[1][0])[:TOP]
    lines = [f"{self_us / 1000:7.2f} ms self {cum_us / 1000:7.2f} ms cumulative  {name}"
             for name, (self_us, cum_us) in top]
    ms = lambda found: sum(v[0] for v in found.values()) / 1000  # noqa: E731
    return (f"`python -X importtime`: the baseline (`python3 {' '.join(baseline)}`) imports {len(base)} "
            f"modules in {ms(base):.1f} ms; `ipvsadm {' '.join(args)}` imports {len(ours)} in "
            f"{ms(ours):.1f} ms, {len(extra)} of them ({ms(extra):.1f} ms) not imported by the baseline.  "
            "The largest of those by self time:\n\n```\n" + "\n".join(lines) + "\n```\n")


def _imports(runner: Runner, argv: list[str]) -> dict[str, tuple[int, int]]:
    err = runner.run(argv, keep=True, check=False)["err"]
    found = {}
    for line in err.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)", line)
        if m:
            found[m.group(4)] = (int(m.group(1)), int(m.group(2)))
    return found


# Seen with perf (sched_switch stacks) on kernel 6.18: close -> netlink_release -> nft_rcv_nl_event
# -> __flush_work.  A bare ``nft add element`` deletes nothing, so it has nothing to wait for.
NETLINK_CLOSE = ("\nClosing the nfnetlink socket (libnftables' context, freed when the command "
                 "ends, or by the process exit) waits until the kernel has destroyed what the "
                 "command's transaction removed: netlink_release → nft_rcv_nl_event flushes "
                 "nf_tables' transaction-destroy work, which waits for an RCU grace period.\n")


def slow_syscalls(runner: Runner, prog: str, args: list[str], workdir: Path,
                  after: Callable[[], None] = lambda: None, at_least_ms: float = 1.0) -> str:
    """The system calls of one run that took ``at_least_ms`` or more (strace -T): the time a
    profile of Python code cannot see -- waits in the kernel, on the disk, for RCU."""
    if not shutil.which("strace"):
        return ""
    out = workdir / f"strace-{len(list(workdir.glob('strace-*')))}.txt"
    answer = runner.run(["strace", "-f", "-yy", "-T", "-o", str(out), str(BIN / prog), *args], check=False)
    after()
    slow = []
    for line in out.read_text().splitlines() if out.exists() else []:
        m = re.search(r"^(?:\d+ +)?(\w+)\((.*)<([\d.]+)>$", line)
        if m and float(m.group(3)) * 1000 >= at_least_ms:
            slow.append(f"{float(m.group(3)) * 1000:6.1f} ms  {m.group(1)}({m.group(2)[:70]}")
    note = NETLINK_CLOSE if any("close(" in s and "NETLINK" in s for s in slow) else ""
    return (f"System calls of `{prog} {' '.join(args)}` taking {at_least_ms:g} ms or more under "
            f"`strace -f -T` (wall {answer['wall']:.3f} s under strace):\n\n```\n"
            + ("\n".join(slow) or "(none)") + "\n```\n" + note)


def restore_breakdown(runner: Runner, rules: Path, workdir: Path, iptables_s: float, repeats: int = 3) -> str:
    """ipvsadm-restore's two halves, timed apart: ``ipvs2nft translate`` (parse the rules
    and build the nft script: the Python side, no kernel) and ``nft -f`` of that script
    (libnftables and the kernel, through the nft CLI).  Run in ``runner``'s namespace,
    which must not be one whose ipvs2nft state matters any more."""
    script = workdir / "translated.nft"
    translate = [runner.run([str(BIN / "ipvs2nft"), "translate", str(rules)], keep=True)
                 for _ in range(repeats)]
    script.write_text(translate[-1]["out"])
    load = [runner.run(["nft", "-f", str(script)]) for _ in range(repeats)]
    median = lambda runs: statistics.median(r["wall"] for r in runs)  # noqa: E731
    return (f"The same table loaded in two halves (medians of {repeats}): `ipvs2nft translate` of the "
            f"rules file (parse + build the nft script, no kernel) {median(translate):.3f} s; `nft -f` of "
            f"that script ({script.stat().st_size / 1e6:.1f} MB: libnftables and the kernel) "
            f"{median(load):.3f} s, by itself {median(load) / iptables_s:.2f}× iptables-legacy-restore's "
            f"median above.\n")
