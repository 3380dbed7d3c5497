"""``make demo``: the seed talk's LVS examples on nftables, with real traffic.

Builds a lab of network namespaces (client, director, three real servers),
starts ``ipvs2nft daemon`` in the director (as systemd would: it says
READY=1 on NOTIFY_SOCKET), runs the ipvsadm commands of "Load Balancing
with nftables" (Netdev 1.1, slides 18, 21, 24, 27 and 30) through ipvs2nft's
ipvsadm in the director, opens real connections from the client, prints who
answered and what ``ipvsadm -L -n`` counts (ActiveConn, InActConn,
``--stats``, ``--rate``), and shows the nft ruleset of one example.  The lab
is removed at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ipvs2nft.lab import VIP4, Lab, unique_prefix

EXAMPLES = [
    ("Slide 18: round robin with LVS", [
        "-A -t 192.168.0.40:80 -s rr",
        "-a -t 192.168.0.40:80 -r 192.168.100.10:80 -m",
        "-a -t 192.168.0.40:80 -r 192.168.100.11:80 -m",
    ], [(80, 10, None)]),
    ("Slide 21: weighted round robin (100 / 50)", [
        "-A -t 192.168.0.40:80 -s wrr",
        "-a -t 192.168.0.40:80 -r 192.168.100.10:80 -m -w 100",
        "-a -t 192.168.0.40:80 -r 192.168.100.11:80 -m -w 50",
    ], [(80, 12, None)]),
    ("Slide 24: multiport (80 and 443) as one fwmark service", [
        "!iptables -t mangle -A PREROUTING -d 192.168.0.40 -p tcp -m multiport --dports 80,443 "
        "-j MARK --set-mark 1",
        "-A -f 1 -s wrr",
        "-a -f 1 -r 192.168.100.10:0 -m -w 100",
        "-a -f 1 -r 192.168.100.11:0 -m -w 50",
    ], [(80, 6, None), (443, 6, None)]),
    ("Slide 27: weighted, with source-IP persistence (300 s)", [
        "-A -t 192.168.0.40:80 -s wrr -p 300",
        "-a -t 192.168.0.40:80 -r 192.168.100.10:80 -m -w 100",
        "-a -t 192.168.0.40:80 -r 192.168.100.11:80 -m -w 50",
    ], [(80, 12, ["198.51.100.2", "198.51.100.3", "198.51.100.4", "198.51.100.5"])]),
]


def _show_connections(lab: Lab, port: int, count: int, sources) -> None:
    results = lab.connect(VIP4, port, count, sources=sources or [], timeout=2.0)
    print(f"  {count} connections to {VIP4}:{port}" + (f" from {len(sources)} clients" if sources else ""))
    per_client = collections.defaultdict(list)
    for r in results:
        per_client[r["source"] or "198.51.100.2"].append(r["backend"] or f"failed ({r['error']})")
    if sources:
        for client, answers in per_client.items():
            print(f"    client {client}: {' '.join(a.rsplit('.', 1)[-1] for a in answers)}")
    else:
        seq = [r["backend"] or "-" for r in results]
        print(f"    sequence: {' '.join(s.rsplit('.', 1)[-1] for s in seq)}")
    counts = collections.Counter(r["backend"] for r in results)
    print("    spread:   " + ", ".join(f"{b}: {n}" for b, n in sorted(counts.items(), key=str)))


def _show_listing(lab: Lab, *args: str) -> None:
    print(f"  ipvsadm {' '.join(['-L', '-n', *args])}:")
    for line in lab.ipvsadm(["-L", "-n", *args]).stdout.splitlines():
        print(f"    {line}")


def _least_connections(lab: Lab) -> None:
    """Slide 30: weighted least connections, which needs live counts: long
    connections stay open (the lab's servers echo on port 7777), and wlc
    sends new ones where 257 x active + inactive per weight is lowest."""
    import time

    print("=== Slide 30: weighted least connections (3 / 1), connections that stay open")
    for command in ("-A -t 192.168.0.40:7777 -s wlc",
                    "-a -t 192.168.0.40:7777 -r 192.168.100.10:7777 -m -w 3",
                    "-a -t 192.168.0.40:7777 -r 192.168.100.11:7777 -m -w 1"):
        print(f"  ipvsadm {command}")
        lab.ipvsadm(command)
    held = []
    for _ in range(8):
        held.append(lab.session(VIP4, 7777))
        time.sleep(0.05)
    print(f"  8 connections held open: {' '.join(s.backend.rsplit('.', 1)[-1] for s in held)}")
    _show_listing(lab)
    for s in held[:4]:
        s.close()
    time.sleep(0.3)
    print("  the first 4 closed (TIME_WAIT: inactive, still counted):")
    _show_listing(lab)
    more = []
    for _ in range(4):
        more.append(lab.session(VIP4, 7777))
        time.sleep(0.05)
    print(f"  4 new connections: {' '.join(s.backend.rsplit('.', 1)[-1] for s in more)}")
    time.sleep(2.2)  # the estimator ticks every 2 s, as IPVS's
    _show_listing(lab)
    _show_listing(lab, "--stats")
    _show_listing(lab, "--rate")
    for s in held[4:] + more:
        s.close()
    print()


def run() -> int:
    if os.geteuid() != 0:
        print("make demo builds network namespaces: run it as root", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="ipvs2nft-demo-") as tmp, \
            Lab(unique_prefix("demo"), servers=3, state_dir=Path(tmp)) as lab:
        print(f"Lab: client {lab.client}, director {lab.director} (VIP {VIP4} on lo), "
              f"real servers 192.168.100.10-12 (each answers with its address)")
        daemon = lab.daemon()
        print(f"ipvs2nft daemon started in the director ({daemon.notices[0].splitlines()[0]})\n")
        for title, commands, traffic in EXAMPLES:
            print(f"=== {title}")
            lab.ipvsadm("-C")
            # a fresh start for each example (the earlier ones' closed
            # connections would still count, as in IPVS's table)
            lab.ns(lab.director, "conntrack", "-F", check=False)
            lab.sh(lab.director, "iptables -t mangle -F 2>/dev/null || true", check=False)
            for command in commands:
                if command.startswith("!"):
                    print(f"  # {command[1:]}")
                    lab.sh(lab.director, command[1:])
                else:
                    print(f"  ipvsadm {command}")
                    lab.ipvsadm(command)
            for port, count, sources in traffic:
                _show_connections(lab, port, count, sources)
            print("  ipvsadm -L -n:")
            for line in lab.ipvsadm("-L -n").stdout.splitlines():
                print(f"    {line}")
            print()
        print("=== The nft ruleset of the last example (nft list table inet ipvs2nft)")
        print(lab.nft("list", "table", "inet", "ipvs2nft"))
        lab.ipvsadm("-C")
        lab.ns(lab.director, "conntrack", "-F", check=False)
        _least_connections(lab)
        took = daemon.stop()
        print(f"ipvs2nft daemon stopped (SIGTERM, {took:.2f} s); the ruleset keeps forwarding:")
        print(f"  {' '.join(b.rsplit('.', 1)[-1] for b in lab.backends(VIP4, 7777, 3))}")
        lab.ipvsadm("-C")
    print("Lab removed.")
    return 0


def main() -> int:
    """``make demo``: the lab, or one line saying why it could not be built."""
    try:
        return run()
    except subprocess.CalledProcessError as exc:
        why = (exc.stderr or "").strip().splitlines()
        command = " ".join(map(str, exc.cmd))
        sys.stderr.write(f"ipvs2nft demo: `{command}' failed"
                         f"{': ' + why[-1] if why else ''} (the demo needs root and network namespaces)\n")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
