"""The namespace lab the netlink tests and their fixture recorder share.

A director whose own nftables table (``inet ctlab``, not ipvs2nft's) DNATs
the client's connections to two real servers and tags them the way the
daemon will: a masked ct mark per real server, ct label 127 on one service,
conntrack zone 5 on another, plus one unmarked service.  A forward chain
counts packets per ``ct mark . ct direction`` in a dynamic set with
``counter`` (daemon.md section 4.1), and a few sets and maps of the shapes
ipvs2nft uses (concatenated keys, verdict map, timeouts) give the element
dumps something to read.  conntrack accounting is on in the director so
dumps and DESTROY events carry counters.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ipvs2nft.lab import VIP4, VIP6, Lab, rs4, rs6, unique_prefix

ROOT = Path(__file__).resolve().parent.parent
TABLE = "ctlab"
ZONE = 5
LABEL = 127
_LABEL_SET = f"ct label set {LABEL}"
_MARK_0X102 = "ct mark set ct mark and 0xffff0000 or 0x102"  # keep others' bits (daemon.md section 3)

RULESET = f"""
table inet {TABLE} {{
    set bestat {{ type mark . ct_dir; flags dynamic; counter; size 65536; }}
    set svc {{ type ipv4_addr . inet_proto . inet_service; counter;
              elements = {{ {VIP4} . tcp . 80, {VIP4} . tcp . 443, {VIP4} . udp . 53 }} }}
    map backend {{ type mark : ipv4_addr . inet_service;
                  elements = {{ 0x101 : {rs4(0)} . 80, 0x102 : {rs4(1)} . 443 }} }}
    map slots {{ type mark : verdict; elements = {{ 0x101 : goto rs0, 0x102 : goto rs1, 0x1 : accept }} }}
    set recent {{ type ipv4_addr; flags timeout; timeout 1h; elements = {{ 198.51.100.2 timeout 30m }} }}
    chain rs0 {{ counter; }}
    chain rs1 {{ counter; }}
    chain raw {{
        type filter hook prerouting priority raw; policy accept;
        ip daddr {VIP4} tcp dport 443 ct zone set {ZONE}
        ip saddr {rs4(1)} tcp sport 443 ct zone set {ZONE}
    }}
    chain pre {{
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr . meta l4proto . th dport @svc
        ip daddr {VIP4} tcp dport 80 ct mark set ct mark and 0xffff0000 or 0x101 dnat ip to {rs4(0)}
        ip daddr {VIP4} tcp dport 443 {_MARK_0X102} {_LABEL_SET} dnat ip to {rs4(1)}
        ip daddr {VIP4} udp dport 53 ct mark set 0x201 dnat ip to {rs4(0)}
        ip daddr {VIP4} tcp dport 7777 ct mark set 0x103 dnat ip to {rs4(0)}
        ip daddr {VIP4} tcp dport 8080 dnat ip to {rs4(1)}
        ip6 daddr {VIP6} tcp dport 80 ct mark set 0x101 dnat ip6 to {rs6(0)}
    }}
    chain forward {{
        type filter hook forward priority 0; policy accept;
        ct mark != 0 update @bestat {{ ct mark . ct direction }}
    }}
}}
"""


@contextmanager
def netlink_lab(servers: int = 2) -> Iterator[Lab]:
    """A built lab with RULESET in the director; removed afterwards, also
    on failure."""
    lab = Lab(unique_prefix("nlk"), servers=servers).build()
    try:
        load_ruleset(lab)
        yield lab
    finally:
        lab.close()


def load_ruleset(lab: Lab) -> None:
    subprocess.run(["ip", "netns", "exec", lab.director, "nft", "-f", "-"], input=RULESET, text=True,
                   check=True, capture_output=True)
    lab.sh(lab.director, "sysctl -qw net.netfilter.nf_conntrack_acct=1")


def connect(lab: Lab, host: str, port: int, count: int = 1, proto: str = "tcp") -> list[dict]:
    """Connections from the client; each answered by a real server."""
    return lab.connect(host, port, count, proto=proto, timeout=2.0)


def hold(lab: Lab, port: int = 7777) -> subprocess.Popen:
    """A connection that stays ESTABLISHED until the process's stdin closes."""
    env = {"PYTHONPATH": str(ROOT)}
    p = subprocess.Popen(["ip", "netns", "exec", lab.client, sys.executable, "-m", "ipvs2nft.labnode",
                          "session", VIP4, str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, env=env)
    lab.procs.append(p)
    p.stdout.readline()  # the server's greeting: the connection is up
    return p
