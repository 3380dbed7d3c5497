"""Masquerading services under real connections: every scheduler, persistence,
fwmark, UDP, IPv6, local clients, quiescing, timeouts, foreign tables.

One lab (client with 48 addresses, director, 4 real servers) serves the whole
module; each test starts from ``ipvsadm -C``.  What IPVS does is taken from
the oracle's traffic fixtures (tests/fixtures/oracle/TRAFFIC.md): where IPVS
is deterministic the sequence must be equal, where it hashes the properties
(stickiness, who moves when a server goes) must hold.
"""

from __future__ import annotations

import collections
import re

import pytest

from ipvs2nft.lab import VIP4, VIP6, rs4
from tests.conftest import make_lab

pytestmark = [pytest.mark.netns, pytest.mark.slow]

V = f"{VIP4}:80"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = make_lab(tmp_path_factory.mktemp("lab"), servers=4, clients=48)
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture(autouse=True)
def clean(lab):
    lab.ipvsadm("-C")
    lab.sh(lab.director, "iptables -t mangle -F 2>/dev/null; true", check=False)
    yield


def add(lab, *commands: str) -> None:
    for c in commands:
        lab.ipvsadm(c)


def servers(lab, service: str, n: int, fwd: str = "-m", weights=None) -> None:
    for i in range(n):
        w = f" -w {weights[i]}" if weights else ""
        port = "" if service.startswith("-f") or service.endswith(":0") else ":80"
        lab.ipvsadm(f"-a {service} -r {rs4(i)}{port} {fwd}{w}")


def per_client(lab, host, port, clients, rounds, **kw) -> dict[str, list[str]]:
    results = lab.connect(host, port, len(clients) * rounds, sources=clients, timeout=2.0, **kw)
    seen = collections.defaultdict(list)
    for r in results:
        seen[r["source"]].append(r["backend"])
    return seen


# ---------------------------------------------------------------- hashing

def test_sh_sticks_and_uses_every_server(lab):
    add(lab, f"-A -t {V} -s sh")
    servers(lab, f"-t {V}", 4, weights=[2, 1, 1, 1])
    seen = per_client(lab, VIP4, 80, lab.client_addresses(), 3)
    assert all(len(set(b)) == 1 and b[0] for b in seen.values()), seen  # sticky
    counts = collections.Counter(b[0] for b in seen.values())
    assert set(counts) == {rs4(i) for i in range(4)}, counts


def test_sh_quiesced_server_without_and_with_fallback(lab):
    """IPVS refuses the clients that hash to a weight-0 server unless
    sh-fallback is set; then they go elsewhere (traffic-sh-dh-mh)."""
    add(lab, f"-A -t {V} -s sh")
    servers(lab, f"-t {V}", 3)
    clients = lab.client_addresses()
    before = {c: b[0] for c, b in per_client(lab, VIP4, 80, clients, 1).items()}
    lab.ipvsadm(f"-e -t {V} -r {rs4(0)}:80 -m -w 0")
    after = {c: b[0] for c, b in per_client(lab, VIP4, 80, clients, 1).items()}
    for c in clients:
        assert after[c] == (None if before[c] == rs4(0) else before[c]), (c, before[c], after[c])
    lab.ipvsadm(f"-E -t {V} -s sh -b sh-fallback")
    again = {c: b[0] for c, b in per_client(lab, VIP4, 80, clients, 1).items()}
    for c in clients:
        if before[c] == rs4(0):
            assert again[c] in (rs4(1), rs4(2)), (c, again[c])
        else:
            assert again[c] == before[c]


def test_sh_port_spreads_one_client(lab):
    add(lab, f"-A -t {V} -s sh -b sh-port")
    servers(lab, f"-t {V}", 4)
    answers = lab.backends(VIP4, 80, 40)
    assert len(set(answers)) >= 3, answers  # source ports differ, so buckets do


def test_dh_one_server_per_destination(lab):
    for vip in lab.vips:
        add(lab, f"-A -t {vip}:80 -s dh")
        servers(lab, f"-t {vip}:80", 4)
    for vip in lab.vips:
        seen = per_client(lab, vip, 80, lab.client_addresses()[:12], 1)
        assert len({b[0] for b in seen.values()}) == 1, (vip, seen)


def test_mh_moves_only_the_clients_of_a_removed_server(lab):
    add(lab, f"-A -t {V} -s mh")
    servers(lab, f"-t {V}", 4)
    clients = lab.client_addresses()
    before = {c: b[0] for c, b in per_client(lab, VIP4, 80, clients, 1).items()}
    assert len(set(before.values())) >= 3
    lab.ipvsadm(f"-d -t {V} -r {rs4(3)}:80")
    after = {c: b[0] for c, b in per_client(lab, VIP4, 80, clients, 1).items()}
    for c in clients:
        if before[c] != rs4(3):
            assert after[c] == before[c], c  # nobody else moves
        else:
            assert after[c] in {rs4(0), rs4(1), rs4(2)}
    lab.ipvsadm(f"-a -t {V} -r {rs4(3)}:80 -m")
    assert {c: b[0] for c, b in per_client(lab, VIP4, 80, clients, 1).items()} == before


def test_fo_takes_the_highest_weight(lab):
    add(lab, f"-A -t {V} -s fo")
    servers(lab, f"-t {V}", 3, weights=[1, 5, 3])
    assert set(lab.backends(VIP4, 80, 6)) == {rs4(1)}
    lab.ipvsadm(f"-e -t {V} -r {rs4(1)}:80 -m -w 0")
    assert set(lab.backends(VIP4, 80, 6)) == {rs4(2)}


@pytest.mark.parametrize("scheduler", ["lc", "wlc", "sed", "nq", "lblc", "lblcr", "ovf"])
def test_dynamic_schedulers_without_the_daemon(lab, scheduler):
    """Without the daemon, ipvsadm writes IPVS's next choices for
    connections that stay open, computed from a conntrack dump: held
    connections get exactly the servers the kernel's algorithm (dynsched,
    proven against the oracle in test_dynsched_oracle) gives."""
    from ipvs2nft import dynsched

    lab.ns(lab.director, "conntrack", "-F", check=False)  # earlier tests' connections would count
    add(lab, f"-A -t {VIP4}:7777 -s {scheduler}")
    for i, w in enumerate([1, 2, 1]):
        lab.ipvsadm(f"-a -t {VIP4}:7777 -r {rs4(i)}:7777 -m -w {w}")
    svc = _service(lab, 7777)
    expected = [str(d.addr) for d in dynsched.predict(svc, {}, 7, svc.addr, dynsched.Locality())]
    sessions = [lab.session(VIP4, 7777) for _ in range(7)]
    try:
        assert [s.backend for s in sessions] == expected
    finally:
        for s in sessions:
            s.close()


def _service(lab, port):
    from ipvs2nft.store import Store

    table = Store(str(lab.state_dir / "state.json")).read().table
    return next(s for s in table.services if s.port == port)


# ---------------------------------------------------------------- persistence

def test_persistence_sticks_per_client_and_per_netmask(lab):
    add(lab, f"-A -t {V} -s rr -p 300")
    servers(lab, f"-t {V}", 3)
    seen = per_client(lab, VIP4, 80, lab.client_addresses()[:6], 4)
    assert all(len(set(b)) == 1 for b in seen.values()), seen
    assert len({b[0] for b in seen.values()}) == 3  # rr gave new clients different servers
    lab.ipvsadm("-C")
    add(lab, f"-A -t {V} -s rr -p 300 -M 255.255.255.0")
    servers(lab, f"-t {V}", 3)
    seen = per_client(lab, VIP4, 80, lab.client_addresses()[:6], 2)
    assert len({b for answers in seen.values() for b in answers}) == 1  # one /24, one server


def test_persistence_quiesce_and_delete(lab):
    """IPVS: a client stuck to a weight-0 server keeps going there, new clients
    do not; when the server is deleted the client moves (traffic-persistence)."""
    add(lab, f"-A -t {V} -s rr -p 300")
    servers(lab, f"-t {V}", 3)
    a, b = lab.client_addresses()[:2]
    stuck = per_client(lab, VIP4, 80, [a], 1)[a][0]
    lab.ipvsadm(f"-e -t {V} -r {stuck}:80 -m -w 0")
    assert set(per_client(lab, VIP4, 80, [a], 3)[a]) == {stuck}
    assert stuck not in per_client(lab, VIP4, 80, [b], 3)[b]
    lab.ipvsadm(f"-d -t {V} -r {stuck}:80")
    moved = per_client(lab, VIP4, 80, [a], 3)[a]
    assert stuck not in moved and len(set(moved)) == 1


def test_port0_persistence_spans_ports(lab):
    add(lab, f"-A -t {VIP4}:0 -s rr -p 300")
    servers(lab, f"-t {VIP4}:0", 3)
    clients = lab.client_addresses()[:4]
    for c in clients:
        answers = [per_client(lab, VIP4, port, [c], 1)[c][0] for port in (80, 443, 8080)]
        assert len(set(answers)) == 1 and answers[0], (c, answers)


def test_fwmark_service_multiport_with_persistence(lab):
    """Slide 24 + 27: a mangle rule marks 80 and 443; one fwmark service."""
    lab.sh(lab.director, f"iptables -t mangle -A PREROUTING -d {VIP4} -p tcp -m multiport "
                         "--dports 80,443 -j MARK --set-mark 1")
    add(lab, "-A -f 1 -s wrr -p 300")
    servers(lab, "-f 1", 2, weights=[100, 50])
    for c in lab.client_addresses()[:4]:
        answers = [per_client(lab, VIP4, port, [c], 1)[c][0] for port in (80, 443, 80, 443)]
        assert len(set(answers)) == 1 and answers[0], (c, answers)
    # the mark stays the packet's: port 8080 is not marked, so not balanced
    assert lab.backends(VIP4, 8080, 1) == [None]


# ---------------------------------------------------------------- protocols

def test_udp_rr_schedules_each_new_flow(lab):
    add(lab, f"-A -u {VIP4}:53 -s rr")
    for i in range(3):
        lab.ipvsadm(f"-a -u {VIP4}:53 -r {rs4(i)}:53 -m")
    assert lab.backends(VIP4, 53, 6, proto="udp") == [rs4(2), rs4(1), rs4(0)] * 2


def test_ipv6_service_rr(lab):
    add(lab, f"-A -t [{VIP6}]:80 -s rr")
    for i in range(3):
        lab.ipvsadm(f"-a -t [{VIP6}]:80 -r [2001:db8:100::{10 + i:x}]:80 -m")
    assert lab.backends(VIP6, 80, 6) == [rs4(2), rs4(1), rs4(0)] * 2


def test_nat_to_another_port(lab):
    add(lab, f"-A -t {V} -s rr", f"-a -t {V} -r {rs4(0)}:8080 -m")
    lab.sh(lab.rs(0), "true")
    assert lab.backends(VIP4, 80, 3) == [rs4(0)] * 3


def test_local_client_on_the_director(lab):
    add(lab, f"-A -t {V} -s rr")
    servers(lab, f"-t {V}", 2)
    assert lab.backends(VIP4, 80, 4, ns=lab.director) == [rs4(1), rs4(0)] * 2


def test_no_server_available_is_refused(lab):
    add(lab, f"-A -t {V} -s rr")
    results = lab.connect(VIP4, 80, 2, timeout=1.0)
    assert [r["backend"] for r in results] == [None, None]
    assert all("refused" in (r["error"] or "").lower() for r in results), results


# ---------------------------------------------------------------- changes

@pytest.mark.parametrize("change", ["-e -t {V} -r {rs}:7777 -m -w 0", "-d -t {V} -r {rs}:7777",
                                    "-D -t {V}"])
def test_established_connection_survives(lab, change):
    """Weight 0, -d and -D leave established connections alone (conntrack
    keeps their NAT binding), as IPVS keeps its connection entries."""
    add(lab, f"-A -t {VIP4}:7777 -s rr", f"-a -t {VIP4}:7777 -r {rs4(0)}:7777 -m")
    session = lab.session(VIP4, 7777)
    assert session.backend == rs4(0) and session.echo("one") == "one"
    lab.ipvsadm(change.format(V=f"{VIP4}:7777", rs=rs4(0)))
    assert session.echo("two") == "two"
    session.close()


def test_set_timeouts_apply_to_our_connections_only(lab):
    add(lab, f"-A -t {VIP4}:7777 -s rr", f"-a -t {VIP4}:7777 -r {rs4(0)}:7777 -m", "--set 50 10 20")
    session = lab.session(VIP4, 7777)
    session.echo()
    out = lab.ns(lab.director, "conntrack", "-L", "-p", "tcp", "--dport", "7777").stdout
    timeouts = [int(m) for m in re.findall(r"^tcp\s+\d+\s+(\d+)\s+ESTABLISHED", out, re.M)]
    assert timeouts and all(t <= 50 for t in timeouts), out
    session.close()
    assert "ct timeout tcp4" in lab.nft("list", "table", "inet", "ipvs2nft")


def test_foreign_table_is_untouched(lab):
    lab.sh(lab.director, "nft add table inet foreign; "
                         "nft add chain inet foreign input '{ type filter hook input priority 0; }'; "
                         "nft add rule inet foreign input tcp dport 9 counter drop")
    before = lab.nft("list", "table", "inet", "foreign")
    for c in (f"-A -t {V} -s rr", f"-a -t {V} -r {rs4(0)}:80 -m", f"-e -t {V} -r {rs4(0)}:80 -m -w 2",
              f"-E -t {V} -s wrr -p 60", "--set 100 20 30", f"-d -t {V} -r {rs4(0)}:80", f"-D -t {V}",
              f"-A -t {V} -s rr", "-C"):
        lab.ipvsadm(c)
        assert lab.nft("list", "table", "inet", "foreign") == before, c
    assert lab.ipvsadm("-A -t 1.2.3.4:80 -s bogus", check=False).returncode == 255
    assert lab.nft("list", "table", "inet", "foreign") == before


def test_snat_option_for_servers_that_do_not_route_back(lab):
    """One-arm setups: the real server's default route does not go through
    the director.  Without the option the reply never returns; with
    `ipvs2nft snat masquerade` the server sees the director as the client."""
    add(lab, f"-A -t {V} -s rr", f"-a -t {V} -r {rs4(0)}:80 -m")
    lab.sh(lab.rs(0), "ip route del default; "
                      "ip route add 198.51.100.0/24 via 192.168.100.250 dev eth0 onlink")
    try:
        assert lab.backends(VIP4, 80, 1, timeout=1.0) == [None]
        exe = lab.ipvsadm("snat masquerade", prog="ipvs2nft")
        assert exe.returncode == 0, exe.stderr
        assert lab.ipvsadm("snat", prog="ipvs2nft").stdout == "masquerade\n"
        assert lab.backends(VIP4, 80, 2) == [rs4(0)] * 2
        lab.ipvsadm("snat off", prog="ipvs2nft")
        assert lab.backends(VIP4, 80, 1, timeout=1.0) == [None]
        assert lab.ipvsadm("snat 10.0.0.1,10.0.0.2", prog="ipvs2nft", check=False).returncode == 2
    finally:
        lab.sh(lab.rs(0), "ip route del 198.51.100.0/24; ip route add default via 192.168.100.1")


def test_real_server_on_the_director_itself(lab):
    """A real server whose address is the director's own (IPVS's "Local"
    forwarding): the DNAT to a local address is delivered locally, from the
    client and from the director itself, alongside remote servers."""
    add(lab, f"-A -t {V} -s rr", f"-a -t {V} -r {rs4(0)}:80 -m", f"-a -t {V} -r 192.168.100.1:8080 -m")
    assert "  -> 192.168.100.1:8080" in lab.ipvsadm("-L -n").stdout
    with lab.serving_on_director("director"):
        assert lab.backends(VIP4, 80, 4) == ["director", rs4(0)] * 2
        assert lab.backends(VIP4, 80, 2, ns=lab.director) == ["director", rs4(0)]
