"""Health-check cost (issue 11): N real servers checked every second.

A lab with one real server namespace that accepts TCP on ports 20000 ..
20000+N-1 (an nft ``redirect`` sends them all to one listener, a small
asyncio acceptor), and a keepalived configuration of N/100 virtual servers
with 100 real servers each, ``TCP_CHECK`` every second (``delay_loop 1``,
``connect_timeout 1``).  The daemon's check engine (ipvs2nft/health/engine.py)
runs in this process, in the director namespace, for ``seconds``: the real
probes and state machine, with table changes counted instead of applied
(every check passes, so there are none after start).  Reported:

* how late probes start against their plan (median, p99, max): drift would
  show as lateness that grows with time;
* probes per second against N (the schedule is kept);
* the process's CPU time over the run, as a share of one CPU.

``python3 bench/health.py [N] [SECONDS]`` runs it alone (as root).
"""

from __future__ import annotations

import asyncio
import resource
import subprocess
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from ipvs2nft.lab import Lab, inside, rs4, unique_prefix

FIRST_PORT = 20000
PER_VS = 100

ACCEPTOR = f"""
import asyncio
async def main():
    async def take(r, w):
        w.close()
    server = await asyncio.start_server(take, "0.0.0.0", {FIRST_PORT}, backlog=4096)
    print("ready", flush=True)
    await server.serve_forever()
asyncio.run(main())
"""


@dataclass
class HealthResult:
    servers: int
    seconds: float
    probes: int
    median_late: float
    p99_late: float
    max_late: float
    cpu_share: float
    late_first_half: float  # median lateness in the first and second half: drift shows as growth
    late_second_half: float
    failures: int

    @property
    def rate(self) -> float:
        return self.probes / self.seconds


def configuration(servers: int) -> str:
    out = []
    for v in range((servers + PER_VS - 1) // PER_VS):
        out.append(f"virtual_server 192.168.0.40 {10000 + v} {{\n delay_loop 1\n lb_algo rr\n lb_kind NAT\n"
                   " protocol TCP\n")
        for k in range(v * PER_VS, min(servers, (v + 1) * PER_VS)):
            out.append(f" real_server {rs4(0)} {FIRST_PORT + k} {{\n"
                       "  TCP_CHECK {\n   connect_timeout 1\n  }\n }\n")
        out.append("}\n")
    return "".join(out)


def build(stack: ExitStack, workdir: Path, servers: int) -> Lab:
    lab = Lab(unique_prefix("i2nh"), servers=1, ports_tcp=(80,), ports_udp=(), ports_hold=(),
              state_dir=workdir)
    lab.build()
    stack.callback(lab.close)
    last = FIRST_PORT + servers - 1
    rule = f"tcp dport {FIRST_PORT + 1}-{last} redirect to :{FIRST_PORT}"
    lab.ns(lab.rs(0), "nft", "add table ip h; add chain ip h pre { type nat hook prerouting priority -100; };"
                             f" add rule ip h pre {rule}")
    lab.ns(lab.rs(0), "sysctl", "-qw", "net.core.somaxconn=4096")
    p = subprocess.Popen(["ip", "netns", "exec", lab.rs(0), sys.executable, "-c", ACCEPTOR],
                         stdout=subprocess.PIPE, text=True)
    lab.procs.append(p)
    assert p.stdout.readline().strip() == "ready"
    return lab


def run_engine(lab: Lab, servers: int, seconds: float) -> HealthResult:
    from ipvs2nft.health.engine import Engine
    from ipvs2nft.keepalived.parse import loads

    cfg = loads(configuration(servers))
    applied: list[int] = []
    late_at: list[tuple[float, float]] = []

    async def main() -> tuple[Engine, float, float]:
        engine = Engine(cfg, lambda states: applied.append(len(states)), log=lambda text: None)
        original = engine.lateness.add
        loop = asyncio.get_running_loop()

        def record(late: float) -> None:
            original(late)
            late_at.append((loop.time(), late))

        engine.lateness.add = record
        engine.start()
        await asyncio.sleep(1.5)  # the first probes are spread over warmup (= delay_loop)
        engine.lateness.samples.clear()
        engine.lateness.probes = 0
        late_at.clear()
        cpu0, t0 = _cpu(), loop.time()
        await asyncio.sleep(seconds)
        cpu, wall = _cpu() - cpu0, loop.time() - t0
        engine.running = False
        for task in engine.tasks:
            task.cancel()
        await asyncio.gather(*engine.tasks, return_exceptions=True)
        engine.prober.close()
        return engine, cpu, wall

    with inside(lab.director):
        engine, cpu, wall = asyncio.run(main())
    summary = engine.lateness.summary()
    middle = late_at[0][0] + wall / 2 if late_at else 0
    first = sorted(late for at, late in late_at if at < middle) or [0.0]
    second = sorted(late for at, late in late_at if at >= middle) or [0.0]
    failures = sum(1 for st in engine.states for s in st.servers if not s.alive)
    return HealthResult(servers, wall, summary["probes"], summary["median"], summary["p99"], summary["max"],
                        cpu / wall, first[len(first) // 2], second[len(second) // 2], failures)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(workdir: Path, servers: int, seconds: float) -> HealthResult:
    with ExitStack() as stack:
        lab = build(stack, workdir, servers)
        return run_engine(lab, servers, seconds)


def describe(r: HealthResult) -> str:
    return (f"{r.servers} real servers, TCP_CHECK every 1 s, {r.seconds:.1f} s: {r.probes} probes "
            f"({r.rate:.0f}/s); start lateness median {r.median_late * 1000:.1f} ms, p99 "
            f"{r.p99_late * 1000:.1f} ms, max {r.max_late * 1000:.1f} ms (median first half "
            f"{r.late_first_half * 1000:.1f} ms, second half {r.late_second_half * 1000:.1f} ms); "
            f"CPU {r.cpu_share * 100:.0f} % of one core; servers seen down: {r.failures}")


if __name__ == "__main__":
    import tempfile

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    secs = float(sys.argv[2]) if len(sys.argv) > 2 else 20.0
    with tempfile.TemporaryDirectory(prefix="ipvs2nft-health-") as tmp:
        print(describe(measure(Path(tmp), n, secs)))
