"""The same N virtual services, written for ipvsadm-restore and for iptables-legacy-restore.

Service i is TCP ``VIP:BASE_PORT+i`` with four real servers on port 80,
round robin, masquerading (-m): the LVS-NAT set-up.  The iptables version is
the LVS-to-iptables idiom as people wrote it: per service, one nat
PREROUTING rule per real server, a ``statistic --mode nth`` cascade (every 4,
every 3, every 2, then unconditional) that gives each server a quarter of
the connections -- a linear chain of 4 N rules.
"""

from __future__ import annotations

VIP = "192.168.0.40"
BASE_PORT = 10000
SERVERS = 4


def real_server(j: int) -> str:
    """Address of real server j: ipvs2nft.lab.rs4 (the lab's bridge)."""
    return f"192.168.100.{10 + j}"


def port(i: int) -> int:
    return BASE_PORT + i


def ipvsadm_rules(n: int, servers: int = SERVERS, scheduler: str = "rr") -> str:
    """What ``ipvsadm-save -n`` would print for the table (the input of ipvsadm-restore)."""
    lines = []
    for i in range(n):
        svc = f"-t {VIP}:{port(i)}"
        lines.append(f"-A {svc} -s {scheduler}")
        lines += [f"-a {svc} -r {real_server(j)}:80 -m -w 1" for j in range(servers)]
    return "\n".join(lines) + "\n"


def iptables_rules(n: int, servers: int = SERVERS) -> str:
    """What ``iptables-legacy-save -t nat`` would print for the same services."""
    lines = ["*nat", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
             ":POSTROUTING ACCEPT [0:0]"]
    for i in range(n):
        match = f"-A PREROUTING -d {VIP}/32 -p tcp -m tcp --dport {port(i)}"
        for j in range(servers):
            left = servers - j
            nth = f" -m statistic --mode nth --every {left} --packet 0" if left > 1 else ""
            lines.append(f"{match}{nth} -j DNAT --to-destination {real_server(j)}:80")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def iptables_empty() -> str:
    return iptables_rules(0)
