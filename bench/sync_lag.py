"""How far behind its master a backup director is (issue 15).

Two directors (``ipvs2nft.twinlab``) with master and backup sync daemons on
both; connections opened one at a time through A.

* masquerading: conntrack events are read in A's and in B's namespace by
  this one process (same clock): the lag of a state is the time between A's
  kernel reaching it and B's kernel having it, written there by conntrackd;
* direct routing: no conntrack; the time from the client having its
  connection to B's ``flows`` set holding the flow (polled every 2 ms).

Run as root: ``.venv/bin/python bench/sync_lag.py [--count N]``.  Prints
median, 90th percentile and maximum in milliseconds.  Nothing depends on
these numbers; they are for compat-matrix.md.
"""

from __future__ import annotations

import argparse
import random
import select
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ipvs2nft.conntrack import Event, Events, TcpState  # noqa: E402
from ipvs2nft.lab import inside, unique_prefix  # noqa: E402
from ipvs2nft.nft.build import CT_MARK_OURS  # noqa: E402
from ipvs2nft.nft.nfnetlink import Nfnetlink  # noqa: E402
from ipvs2nft.twinlab import DIRECTORS, SYNC_IF, VIP, TwinLab, rs  # noqa: E402


def summary(name: str, lags: list[float]) -> str:
    ms = sorted(x * 1000 for x in lags)
    if not ms:
        return f"{name}: nothing measured"
    p90 = ms[min(len(ms) - 1, int(len(ms) * 0.9))]
    return (f"{name}: n={len(ms)} median {statistics.median(ms):.1f} ms, p90 {p90:.1f} ms, "
            f"max {ms[-1]:.1f} ms")


def _watch(events: list[Events], seen: list[dict], stop: threading.Event) -> None:
    """Each event's arrival time, per director, until ``stop``."""
    while not stop.is_set():
        ready, _, _ = select.select(events, [], [], 0.05)
        for ev in ready:
            now = time.monotonic()
            found = seen[events.index(ev)]
            for kind, flow in ev.read():
                if kind is not Event.DESTROY and flow.tcp_state is not None:
                    found.setdefault((flow.orig, flow.tcp_state), now)


def masquerading(lab: TwinLab, count: int) -> list[float]:
    found = []
    for which in ("a", "b"):
        with inside(lab.director(which)):
            found.append(Events(kinds=(Event.NEW, Event.UPDATE), mark=CT_MARK_OURS, mask=CT_MARK_OURS))
    seen: list[dict] = [{}, {}]
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(found, seen, stop))
    watcher.start()
    try:
        sessions = [lab.session() for _ in range(count)]
        time.sleep(1.0)
    finally:
        stop.set()
        watcher.join()
    for s in sessions:
        s.close()
    seen_a, seen_b = seen
    return [seen_b[k] - t for k, t in seen_a.items() if k[1] == TcpState.ESTABLISHED and k in seen_b]


def direct_routing(lab: TwinLab, count: int) -> list[float]:
    with inside(lab.director("b")):
        nfnl = Nfnetlink()
    lags = []
    for _ in range(count):
        time.sleep(random.random() * 0.2)  # not in step with the sender's 0.2 s look at the sets
        before = {e.key for e in nfnl.set_elements("ip", "ipvs2nft", "flows")}
        lab.session()
        opened = time.monotonic()
        end = opened + 5.0
        while time.monotonic() < end:
            if {e.key for e in nfnl.set_elements("ip", "ipvs2nft", "flows")} - before:
                lags.append(time.monotonic() - opened)
                break
            time.sleep(0.002)
    return lags


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=30)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, TwinLab(unique_prefix("i2l"), Path(tmp)) as lab:
        for which in DIRECTORS:
            for state in ("master", "backup"):
                lab.ipvsadm(which, f"--start-daemon {state} --mcast-interface {SYNC_IF}")
        lab.both(f"-A -t {VIP}:7777 -s rr", *(f"-a -t {VIP}:7777 -r {rs(i)}:7777 -m" for i in range(3)))
        print(summary("masquerading, ESTABLISHED in B's kernel after A's", masquerading(lab, args.count)))
        lab.both("-C", f"-A -t {VIP}:7777 -s rr", *(f"-a -t {VIP}:7777 -r {rs(i)}:7777 -g" for i in range(3)))
        print(summary("direct routing, flow in B's set after the client connected",
                      direct_routing(lab, args.count)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
