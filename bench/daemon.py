"""Goal 6: ``ipvs2nft daemon`` under load (issue 10).

One lab with 10,000 services x 4 real servers scheduled by wlc (ipvsadm's
default, so every service is one the daemon keeps choices for), loaded by
ipvsadm-restore; short connections spread over 64 of them.  Side by side in
the same lab, the same load:

* with the daemon stopped: connections per second and the machine's busy
  time per connection (what the kernel and the generator cost);
* with the daemon running, unpaced (as fast as 32 connections in flight
  go): the same, the daemon's own CPU per connection, events it lost
  (ENOBUFS) and how far its counts were off when the next conntrack dump
  came (``drift``: 0 means every connection was counted from events alone);
* with the daemon running, paced at 5,000 connections per second: the lag
  from reading a batch of conntrack events to the data plane holding the
  choices they lead to (p50, p99), as the daemon measures it.

No test depends on this; ``make bench`` runs it with the other phases.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import rulesets
from benchlab import Runner, open_lab
from dataplane import _machine_busy_s

SERVICES = 10_000
SPREAD = 64  # services the load is spread over (netload takes at most 64 destinations)
CONCURRENCY = 32
PACED = 5_000  # connections per second for the lag
SECS = 4.0


def wlc_rules(n: int) -> str:
    """rulesets.ipvsadm_rules with ipvsadm's default scheduler."""
    return rulesets.ipvsadm_rules(n).replace(" -s rr", " -s wlc")


def _ask(lab, op: str) -> dict:
    """A control request; the daemon may still be working through a backlog of
    events after an unpaced load, so it gets time (and a few tries)."""
    code = ("import json; from ipvs2nft.daemon import control; control.CLIENT_TIMEOUT = 30; "
            f"print(json.dumps(control.ask({op!r})))")
    p = lab.ns(lab.director, sys.executable, "-c", code, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"daemon did not answer {op!r}: {p.stderr.strip()[-500:]}")
    return json.loads(p.stdout)


def _conntrack_count(lab) -> int:
    """Our connections in the director's conntrack table (conntrack -L, our mark bit)."""
    out = lab.ns(lab.director, "conntrack", "-L", "-m", "0x80000000/0x80000000").stdout
    return sum(1 for line in out.splitlines() if line.strip())


def _off_by(known: int, first: int, second: int) -> int:
    """How far ``known`` lies outside the range of two readings (0: inside)."""
    lo, hi = sorted((first, second))
    return max(lo - known, known - hi, 0)


def _settle(lab, limit: float = 30.0) -> None:
    """Until the daemon has read every event the load produced."""
    import time

    deadline = time.monotonic() + limit
    last = -1
    while time.monotonic() < deadline:
        events = _ask(lab, "status")["events"]
        if events == last:
            return
        last = events
        time.sleep(0.5)


def _load(lab, netload: list[str], targets: list[str], secs: float, rate: float | None = None) -> dict:
    cmd = ["ip", "netns", "exec", lab.client, *netload, "load", str(secs), str(CONCURRENCY),
           ",".join(lab.client_addresses()), ",".join(targets)]
    if rate:
        cmd.append(str(rate))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 60)
    if p.returncode != 0:
        raise RuntimeError(f"load generator failed: {p.stderr}")
    return json.loads(p.stdout)


def _sample(lab, netload, targets, secs, rate=None) -> dict:
    lab.ns(lab.director, "conntrack", "-F", check=False)
    busy0 = _machine_busy_s()
    result = _load(lab, netload, targets, secs, rate)
    result["busy"] = _machine_busy_s() - busy0
    result["rate"] = result["conns"] / result["wall"]
    return result


def measure(workdir: Path, netload: list[str], log, services: int = SERVICES, rounds: int = 3,
            secs: float = SECS) -> dict:
    """The numbers of the section below, from one lab."""
    with ExitStack() as stack:
        lab = open_lab(stack, "bd", servers=rulesets.SERVERS, server_cmd=netload)
        rules = workdir / f"wlc-{services}.rules"
        rules.write_text(wlc_rules(services))
        log(f"daemon: loading {services} wlc services x {rulesets.SERVERS}")
        runner = Runner(stack, lab)
        runner.ipvsadm([], prog="ipvsadm-restore", stdin=rules)
        runner.close()
        step = max(1, services // SPREAD)
        targets = [f"{rulesets.VIP}:{rulesets.port(i)}" for i in range(0, services, step)][:SPREAD]
        out: dict = {"services": services, "without": [], "with": [], "paced": [], "daemon_cpu_us": [],
                     "lost": [], "drift": [], "exact": [], "lag_p50": [], "lag_p99": [], "ready_s": []}
        for r in range(rounds):
            out["without"].append(_sample(lab, netload, targets, secs))
            import time

            started = time.monotonic()
            daemon = lab.daemon(timeout=120)
            out["ready_s"].append(time.monotonic() - started)
            try:
                before = _ask(lab, "status")
                run = _sample(lab, netload, targets, secs)
                after = _ask(lab, "status")
                out["with"].append(run)
                out["daemon_cpu_us"].append((after["cpu"] - before["cpu"]) / max(run["conns"], 1) * 1e6)
                out["lost"].append(after["lost"] - before["lost"])
                _settle(lab)  # events still queued are not drift: let the daemon read them
                out["drift"].append(_ask(lab, "resync")["drift"])
                # entries expire while we look: the daemon's count must lie between two
                # readings of the kernel's table taken just before and just after it
                first = _conntrack_count(lab)
                known = _ask(lab, "status")["connections"]
                out["exact"].append(_off_by(known, first, _conntrack_count(lab)))
                _ask(lab, "lag")  # forget the unpaced run's batches
                paced = _sample(lab, netload, targets, secs, PACED)
                lag = _ask(lab, "lag")
                out["paced"].append(paced | {"batches": lag.get("batches", 0)})
                out["lag_p50"].append(lag.get("p50_ms", float("nan")))
                out["lag_p99"].append(lag.get("p99_ms", float("nan")))
            finally:
                daemon.stop(timeout=10)
            log(f"  round {r + 1}/{rounds}: without {out['without'][-1]['rate']:.0f}/s, "
                f"with {out['with'][-1]['rate']:.0f}/s, daemon {out['daemon_cpu_us'][-1]:.1f} µs/conn, "
                f"lost {out['lost'][-1]}, drift {out['drift'][-1]}, lag p99 {out['lag_p99'][-1]} ms")
        return out


def median(values) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def summary(out: dict) -> list[str]:
    """Markdown lines of the section."""
    w = out["without"]
    d = out["with"]
    p = out["paced"]
    kernel_us = median([s["busy"] / max(s["conns"], 1) * 1e6 for s in w])
    lines = [f"{out['services']:,} services x 4 real servers, wlc; load spread over {SPREAD} services, "
             f"{CONCURRENCY} connections in flight; {len(w)} rounds, medians (min-max).", "",
             "| | daemon stopped | daemon running | daemon running, paced |", "|---|---|---|---|",
             f"| connections per second | {_mm([s['rate'] for s in w])} | {_mm([s['rate'] for s in d])} | "
             f"{_mm([s['rate'] for s in p])} |",
             f"| machine busy µs per connection | {_mm([s['busy'] / s['conns'] * 1e6 for s in w])} | "
             f"{_mm([s['busy'] / s['conns'] * 1e6 for s in d])} | "
             f"{_mm([s['busy'] / s['conns'] * 1e6 for s in p])} |",
             f"| failed connections | {sum(s['errors'] for s in w)} | {sum(s['errors'] for s in d)} | "
             f"{sum(s['errors'] for s in p)} |", "",
             f"- the daemon's own CPU per connection (unpaced): {_mm(out['daemon_cpu_us'])} µs, against "
             f"{kernel_us:.1f} µs of machine busy time per connection with the daemon stopped",
             f"- conntrack event losses (ENOBUFS) during the unpaced runs: {out['lost']}",
             f"- how far the counts from events alone were off when the next dump came (lost events): "
             f"{out['drift']}; after it, how far the daemon's count lay outside two `conntrack -L` taken "
             f"just before and after it: {out['exact']}",
             f"- lag from reading a batch of events to the data plane holding its choices, paced "
             f"at {PACED:,}/s: p50 {_mm(out['lag_p50'])} ms, p99 {_mm(out['lag_p99'])} ms",
             f"- the daemon's start-up to READY=1 with the table loaded: {_mm(out['ready_s'])} s"]
    return lines


def _mm(values: list[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    return f"{median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def goals(out: dict) -> list:
    """The issue's targets as report.Goal rows (item 6)."""
    from report import Goal

    kernel_us = median([s["busy"] / max(s["conns"], 1) * 1e6 for s in out["without"]])
    return [
        Goal(7, "daemon: conntrack events lost (ENOBUFS) under the fastest load this lab makes",
             max(out["lost"], default=0), 0, unit="n", per_round=list(out["lost"])),
        Goal(7, "daemon: its connection count outside two conntrack readings around it after a dump",
             max(out["exact"], default=0), 0, unit="n", per_round=list(out["exact"])),
        Goal(7, f"daemon: p99 lag, events to data plane, at {PACED:,} conn/s", median(out["lag_p99"]) / 1000,
             0.020, unit="s", per_round=[v / 1000 for v in out["lag_p99"]]),
        Goal(7, "daemon CPU per connection ÷ machine busy per connection without it",
             median(out["daemon_cpu_us"]) / kernel_us, 0.5,
             per_round=[v / kernel_us for v in out["daemon_cpu_us"]]),
    ]


def main() -> int:
    """``python bench/daemon.py [SERVICES]``: this section alone."""
    import tempfile

    import traffic

    services = int(sys.argv[1]) if len(sys.argv) > 1 else SERVICES
    with tempfile.TemporaryDirectory(prefix="ipvs2nft-bench-") as tmp:
        netload, desc = traffic.build(Path(tmp))
        out = measure(Path(tmp), netload, lambda m: print(m, file=sys.stderr), services)
    print("\n".join(summary(out) + burst_lines(burst_spread(lambda m: print(m, file=sys.stderr)))))
    print(json.dumps(out, default=str)[:2000], file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ---------------------------------------------------------------- bursts

BURST_CLIENT = r"""
import selectors, socket, sys, json
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sel = selectors.DefaultSelector()
socks = []
for _ in range(n):  # every connection started before any answer is read: a burst
    s = socket.socket(); s.setblocking(False)
    s.connect_ex((host, port)); socks.append(s)
    sel.register(s, selectors.EVENT_READ, b"")
answers, left = {}, n
import time
deadline = time.monotonic() + 30
while left and sel.get_map() and time.monotonic() < deadline:
    for key, _ in sel.select(1):
        s = key.fileobj
        try:
            data = s.recv(200)
        except OSError:
            data = b""
        buf = key.data + data
        if b"\n" in buf or not data:
            answers[s.fileno()] = buf.split(b"\n")[0].decode() or None
            sel.unregister(s); left -= 1
        else:
            sel.modify(s, selectors.EVENT_READ, buf)
print(json.dumps(sorted(v for v in answers.values() if v)))
"""


def burst_spread(log, sizes=(8, 32, 128), weights=(3, 1)) -> list[dict]:
    """How far a burst's spread departs from IPVS's.  N connections are
    started at once to a wlc service (weights 3:1) whose servers keep them
    open; IPVS schedules each in turn in the kernel, so its spread is the
    sequence of N choices with every earlier connection still open -- what
    ``dynsched.predict`` computes (proven against the oracle).  Ours: the
    data plane walks the published prediction while the daemon catches up."""
    import tempfile as _tempfile

    from ipvs2nft import dynsched
    from ipvs2nft.lab import VIP4, Lab, rs4, unique_prefix
    from ipvs2nft.store import Store

    out = []
    with _tempfile.TemporaryDirectory(prefix="ipvs2nft-burst-") as tmp:
        lab = Lab(unique_prefix("bb"), servers=len(weights), state_dir=Path(tmp)).build()
        try:
            daemon = lab.daemon()
            try:
                for n in sizes:
                    lab.ipvsadm("-C")
                    lab.ns(lab.director, "conntrack", "-F", check=False)
                    lab.ipvsadm(f"-A -t {VIP4}:7777 -s wlc")
                    for i, w in enumerate(weights):
                        lab.ipvsadm(f"-a -t {VIP4}:7777 -r {rs4(i)}:7777 -m -w {w}")
                    import time

                    time.sleep(0.3)
                    svc = next(iter(Store(str(Path(tmp) / "state.json")).read().table.services))
                    ipvs = [str(d.addr) for d in dynsched.predict(svc, {}, n)]
                    p = lab.ns(lab.client, sys.executable, "-c", BURST_CLIENT, VIP4, "7777", str(n))
                    ours = json.loads(p.stdout)
                    expect = {a: ipvs.count(a) for a in set(ipvs)}
                    got = {a: ours.count(a) for a in set(ours)}
                    moved = sum(abs(expect.get(a, 0) - got.get(a, 0)) for a in set(expect) | set(got)) // 2
                    out.append({"n": n, "ipvs": expect, "ours": got, "answered": len(ours), "moved": moved})
                    log(f"  burst of {n}: IPVS {expect}, ours {got}")
            finally:
                daemon.stop()
        finally:
            lab.close()
    return out


def burst_lines(bursts: list[dict]) -> list[str]:
    lines = ["", "Bursts: N connections started at once (before any answer), wlc 3:1, servers keep them "
             "open; IPVS's spread is the sequence of N choices with the earlier ones open.", "",
             "| N | IPVS | ours | connections on another server than IPVS's spread |", "|---|---|---|---|"]
    for b in bursts:
        ipvs = ", ".join(f"{a.rsplit('.', 1)[-1]}: {c}" for a, c in sorted(b["ipvs"].items()))
        ours = ", ".join(f"{a.rsplit('.', 1)[-1]}: {c}" for a, c in sorted(b["ours"].items()))
        lines.append(f"| {b['n']} | {ipvs} | {ours} | {b['moved']} ({b['moved'] / b['n']:.0%}) |")
    return lines
