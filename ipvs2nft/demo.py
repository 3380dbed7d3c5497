"""``make demo``: the seed talk's LVS examples on nftables, with real traffic.

Builds a lab of network namespaces (client, director, three real servers),
runs the ipvsadm commands of "Load Balancing with nftables" (Netdev 1.1,
slides 18, 21, 24 and 27) through ipvs2nft's ipvsadm in the director, opens
real connections from the client, prints who answered, and shows the nft
ruleset each example produced.  The lab is removed at the end, also on
failure or Ctrl-C.
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


def run() -> int:
    if os.geteuid() != 0:
        print("make demo builds network namespaces: run it as root", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="ipvs2nft-demo-") as tmp, \
            Lab(unique_prefix("demo"), servers=3, state_dir=Path(tmp)) as lab:
        print(f"Lab: client {lab.client}, director {lab.director} (VIP {VIP4} on lo), "
              f"real servers 192.168.100.10-12 (each answers with its address)\n")
        for title, commands, traffic in EXAMPLES:
            print(f"=== {title}")
            lab.ipvsadm("-C")
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
