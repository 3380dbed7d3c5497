"""Goal 1: CPU per new connection through the director, by ruleset and table size.

One lab per configuration (ours and iptables-legacy at each size, plus plain
forwarding), all built and loaded first, so the configurations can be
interleaved round by round (A, B, C, A, B, C, ...) without reloading and the
project's table and the iptables rules never share a namespace.

A sample: flush the director's conntrack table, run the generator in the
client namespace for a fixed time (connections aimed at the LAST service
added), and count the CPU the connections cost.  CPU is counted per task:
the generator's own user+system time (getrusage, over its load loop) plus
the real servers' and the ksoftirqd threads' run time (/proc/PID/schedstat,
nanoseconds).  With veth pairs the whole path of a packet -- client stack,
the director's forwarding, conntrack, NAT and our rules, the bridge, the
server's stack -- runs in the softirq of the sending task and is charged to
it (this kernel has no IRQ_TIME_ACCOUNTING), so other tenants' work on this
shared machine stays out of the number.  The machine-wide busy time from
/proc/stat is recorded beside it for comparison.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import rulesets
from benchlab import BenchLab, Runner, open_lab

from ipvs2nft.lab import rs4

CONCURRENCY = 32
MAX_ERRORS = 0.001  # a sample with more failed connections than this share is not a measurement


@dataclass
class Config:
    """One data-plane configuration: a lab, what is loaded in it, where the load goes."""

    kind: str  # "ours", "iptables", "plain"
    n: int  # services (0 for plain forwarding)
    lab: BenchLab
    targets: list[str]
    cpu_us: list[float] = field(default_factory=list)  # per round: CPU µs per connection
    rate: list[float] = field(default_factory=list)  # per round: connections per second
    machine_us: list[float] = field(default_factory=list)  # per round: machine-wide busy µs per connection

    @property
    def name(self) -> str:
        return "plain forwarding" if self.kind == "plain" else f"{self.kind} @{self.n}"


def pinned(netload: list[str]) -> tuple[list[str], str]:
    """The generator and server command, pinned to one CPU (the last this process may use),
    and a description.  On one CPU every hop of every packet runs there: the cost per
    connection no longer depends on where the scheduler put the servers, which changes with
    what the other tenants of a shared machine are doing (cross-CPU wake-ups, idle exits).
    Measured here: five samples of one configuration ranged 70-78 µs unpinned, 58-62 pinned."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or not shutil.which("taskset"):
        return netload, "not pinned"
    return ["taskset", "-c", str(cpus[-1]), *netload], f"pinned to CPU {cpus[-1]} (taskset)"


# ---------------------------------------------------------------- CPU counters

def _schedstat_ns(pid: int) -> int:
    """Run time of every thread of ``pid`` (nanoseconds); 0 once it is gone."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            total += int((task / "schedstat").read_text().split()[0])
    except (OSError, ValueError):
        pass
    return total


def _ksoftirqd_pids() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "comm").read_text().startswith("ksoftirqd/"):
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def _machine_busy_s() -> float:
    """Non-idle time of all CPUs (user nice system irq softirq; steal is another VM's)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / 100.0  # USER_HZ


# ---------------------------------------------------------------- loading

def _load_ours(stack: ExitStack, cfg: Config, workdir: Path) -> None:
    path = workdir / f"ipvsadm-{cfg.n}.rules"
    if not path.exists():
        path.write_text(rulesets.ipvsadm_rules(cfg.n))
    runner = Runner(stack, cfg.lab)
    runner.ipvsadm([], prog="ipvsadm-restore", stdin=path)
    runner.close()


def _load_iptables(cfg: Config, workdir: Path) -> None:
    path = workdir / f"iptables-{cfg.n}.rules"
    if not path.exists():
        path.write_text(rulesets.iptables_rules(cfg.n))
    with path.open("rb") as f:
        subprocess.run(["ip", "netns", "exec", cfg.lab.director, "iptables-legacy-restore"], stdin=f,
                       check=True)


def build(stack: ExitStack, sizes: list[int], netload: list[str], workdir: Path, log) -> list[Config]:
    """Every configuration's lab, loaded and checked with traffic."""
    configs = []
    last = lambda n: [f"{rulesets.VIP}:{rulesets.port(n - 1)}"]  # noqa: E731
    for n in sizes:
        for kind in ("ours", "iptables"):
            lab = open_lab(stack, f"b{kind[0]}", servers=rulesets.SERVERS, server_cmd=netload)
            configs.append(Config(kind, n, lab, last(n)))
    lab = open_lab(stack, "bp", servers=rulesets.SERVERS, server_cmd=netload)
    configs.append(Config("plain", 0, lab, [f"{rs4(i)}:80" for i in range(rulesets.SERVERS)]))
    for cfg in configs:
        log(f"  loading {cfg.name}")
        if cfg.kind == "ours":
            _load_ours(stack, cfg, workdir)
        elif cfg.kind == "iptables":
            _load_iptables(cfg, workdir)
    for cfg in configs:
        check(cfg, netload)
    return configs


# ---------------------------------------------------------------- measuring

def _generate(cfg: Config, netload: list[str], secs: float) -> dict:
    lab = cfg.lab
    sources = ",".join(lab.client_addresses())
    cmd = ["ip", "netns", "exec", lab.client, *netload, "load", str(secs), str(CONCURRENCY), sources,
           ",".join(cfg.targets)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 30)
    if p.returncode != 0:
        raise RuntimeError(f"load generator failed in {lab.client}: {p.stderr}")
    return json.loads(p.stdout)


def check(cfg: Config, netload: list[str]) -> None:
    """A short run that must reach all four real servers evenly with no error: proof that
    the rule for the last service is the one that matched (nothing listens on the VIP
    itself, so a miss would be refused), and a warm-up."""
    result = _generate(cfg, netload, 0.3)
    counts = result["replies"]
    expected = {rs4(i) for i in range(rulesets.SERVERS)}
    share = min(counts.values(), default=0) / max(result["conns"], 1)
    if result["errors"] or set(counts) != expected or share < 0.2:
        raise RuntimeError(f"{cfg.name}: traffic check failed: {result}")


def sample(cfg: Config, netload: list[str], secs: float, softirqd: list[int]) -> dict:
    """One measurement; appends to the configuration's series and returns the raw numbers."""
    lab = cfg.lab
    lab.ns(lab.director, "conntrack", "-F", check=False)  # every sample starts from the same table
    pids = lab.server_pids() + softirqd
    before = [_schedstat_ns(p) for p in pids]
    busy0 = _machine_busy_s()
    result = _generate(cfg, netload, secs)
    busy = _machine_busy_s() - busy0
    others_s = sum(_schedstat_ns(p) - b for p, b in zip(pids, before, strict=True)) / 1e9
    conns = result["conns"]
    if conns == 0 or result["errors"] > conns * MAX_ERRORS:
        raise RuntimeError(f"{cfg.name}: {result['errors']} failed connections: {result}")
    cpu = result["cpu"] + others_s
    cfg.cpu_us.append(cpu / conns * 1e6)
    cfg.rate.append(conns / result["wall"])
    cfg.machine_us.append(busy / conns * 1e6)
    return {"config": cfg.name, "conns": conns, "wall": result["wall"], "generator_cpu": result["cpu"],
            "servers_softirqd_cpu": others_s, "machine_busy": busy, "errors": result["errors"]}


def measure(configs: list[Config], netload: list[str], rounds: int, secs: float, log) -> list[dict]:
    """``rounds`` rounds; each runs every configuration once, in an order rotated by one per
    round so no configuration always follows the same neighbour."""
    softirqd = _ksoftirqd_pids()
    raw = []
    for r in range(rounds):
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        for cfg in order:
            raw.append(sample(cfg, netload, secs, softirqd) | {"round": r})
        log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{c.name} {c.cpu_us[-1]:.1f}" for c in configs))
    return raw


def breakdown(raw: list[dict], names: list[str]) -> str:
    """Where each configuration's CPU per connection goes (medians over the rounds): the
    generator's process (client stack and, in its softirqs, the director's forwarding)
    against the real servers' processes and the ksoftirqd threads."""
    lines = []
    for name in names:
        rows = [r for r in raw if r["config"] == name]
        gen = statistics.median(r["generator_cpu"] / r["conns"] * 1e6 for r in rows)
        rest = statistics.median(r["servers_softirqd_cpu"] / r["conns"] * 1e6 for r in rows)
        lines.append(f"{name:>20}: generator {gen:7.1f} µs, servers + ksoftirqd {rest:7.1f} µs")
    return "CPU per connection by task (medians):\n\n```\n" + "\n".join(lines) + "\n```\n"


def perf_profile(cfg: Config, netload: list[str], secs: float, workdir: Path, top: int = 15) -> str:
    """The kernel and user symbols with the most samples, machine-wide (``perf record -a``),
    while one configuration carries the load: where its CPU per connection goes."""
    if not shutil.which("perf"):
        return ""
    data = workdir / f"perf-{cfg.kind}-{cfg.n}.data"
    lab = cfg.lab
    lab.ns(lab.director, "conntrack", "-F", check=False)
    sources = ",".join(lab.client_addresses())
    subprocess.run(["ip", "netns", "exec", lab.client, "perf", "record", "-q", "-a", "-o", str(data), "--",
                    *netload, "load", str(secs), str(CONCURRENCY), sources, ",".join(cfg.targets)],
                   capture_output=True, timeout=secs + 60)
    p = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", "sym",
                        "--percent-limit", "0.5"], capture_output=True, text=True, timeout=120)
    lines = [line for line in p.stdout.splitlines() if line.strip() and not line.startswith("#")][:top]
    return (f"`perf record -a` while {cfg.name} carries the load ({secs:g} s), top {top} symbols:\n\n"
            "```\n" + "\n".join(lines) + "\n```\n")
