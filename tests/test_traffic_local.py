"""Real servers that are the director itself, under real connections.

ldirectord's stock ``fallback = 127.0.0.1:80 gate``, ctdb's LVS leader
(``-a -t VIP -r 127.0.0.1``, -g by default) and the LVS "localnode" set-up
name the director as one of its own real servers.  What IPVS does with them
was recorded on its kernel (tests/fixtures/oracle/local-servers.txt):

* ``-g`` and ``-i`` to a local address (127.0.0.1, ::1, any address of the
  director): the packet goes on to the local stack unchanged, so a server
  listening on the VIP (or the wildcard) answers -- one listening on
  127.0.0.1 only is refused;
* ``-m`` to a local address: DNAT, delivered locally; to 127.0.0.1 or ::1
  only for the director's own connections (from outside IPVS drops it,
  "stopping DNAT to loopback address").

A ``dup to 127.0.0.1`` used to send the clone back in through ``lo`` where
it was scheduled and dup-ed again: a storm.  Each test here also reads the
packet counters of the director and of our rules and requires them to stay
within a small multiple of the packets sent.
"""

from __future__ import annotations

import json

import pytest

from ipvs2nft.lab import VIP4, VIP6, rs4
from tests import oracle
from tests.conftest import make_lab

pytestmark = [pytest.mark.netns, pytest.mark.slow]

DIRECTOR4 = "192.168.100.1"  # the director's own address on the real servers' bridge
DIRECTOR6 = "2001:db8:100::1"
# (VIP, local real-server address as -r writes it) per family
LOCAL = {
    "v4-loopback": (VIP4, "127.0.0.1"),
    "v4-own-address": (VIP4, DIRECTOR4),
    "v6-loopback": (VIP6, "[::1]"),
    "v6-own-address": (VIP6, f"[{DIRECTOR6}]"),
}


def test_recorded_ipvs_behaviour():
    """What this module holds us to, as IPVS did it (each GET's answer, in
    the order of tests/fixtures/oracle/traffic-local-servers.txt)."""
    answers = [r["stdout"].strip() for r in oracle.load("traffic-local-servers.jsonl")
               if r["cmd"].startswith("!/tmp/get")]
    no = "no answer (status 143)"  # busybox timeout killed the client
    assert answers == [
        "director", "director", "director",  # -g 127.0.0.1: client twice, director
        "Connection refused",  # -g 127.0.0.1 to a port only 127.0.0.1 listens on
        "director", "director", "director",  # -g own address; -i 127.0.0.1; -i own address
        no, "director", no, "loopback-only",  # -m 127.0.0.1:8080 / :8081: client, director
        no, "director",  # -m 127.0.0.1:80 (the VIP's port); -m own address:8080
        "director", "director",  # ctdb: port-0 persistent, -r 127.0.0.1 (-g): ports 80, 8080
        "director", "director",  # v6: -g ::1, -i ::1
        no, "director",  # v6: -m [::1]:8080 from the client, from the director
        "director", "director",  # v6: -m own address:8080, -g own address
    ]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = make_lab(tmp_path_factory.mktemp("lab"), servers=2, clients=4)
    try:
        lab.direct_routing()
        with lab.serving_on_director("director"):
            yield lab
    finally:
        lab.close()


@pytest.fixture(autouse=True)
def clean(lab):
    lab.ipvsadm("-C")
    yield


def _svc(vip: str, port: int, proto: str = "tcp") -> str:
    host = f"[{vip}]" if ":" in vip else vip
    return f"{'-u' if proto == 'udp' else '-t'} {host}:{port}"


def lo_packets(lab) -> int:
    """Packets the director's loopback has received (every clone a
    ``dup to 127.0.0.1`` makes comes back in there)."""
    out = lab.ns(lab.director, "ip", "-s", "-j", "link", "show", "lo").stdout
    return json.loads(out)[0]["stats64"]["rx"]["packets"]


def rule_packets(lab) -> int:
    """Packets counted by every rule of our tables (a loop counts each turn)."""
    data = json.loads(lab.nft("-j", "list", "ruleset"))
    total = 0
    for item in data["nftables"]:
        rule = item.get("rule")
        if rule and rule["table"] == "ipvs2nft":
            total += sum(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
    return total


def bounded(lab, send) -> list:
    """Run ``send`` (a list of answers back); the director's loopback and
    our rule counters must grow by little more than the packets sent."""
    lo, rules = lo_packets(lab), rule_packets(lab)
    answers = send()
    lo_growth, rule_growth = lo_packets(lab) - lo, rule_packets(lab) - rules
    # a handful of packets per connection (handshake, data, FIN) -- a loop
    # makes thousands per second (one datagram became 3.7 million in 3 s)
    limit = 40 * len(answers) + 20
    assert lo_growth < limit and rule_growth < limit, (lo_growth, rule_growth, answers)
    return answers


@pytest.mark.parametrize("fwd", ["-g", "-i"])
@pytest.mark.parametrize("where", list(LOCAL))
@pytest.mark.parametrize("proto,port", [("tcp", 80), ("udp", 53)])
def test_local_server_direct_or_tunnel(lab, fwd, where, proto, port):
    """-g/-i to the director itself: the connection reaches the director's
    own server (with the VIP as its destination), TCP and UDP, both
    families, from the client and from the director itself; no loop."""
    vip, rip = LOCAL[where]
    svc = _svc(vip, port, proto)
    lab.ipvsadm(f"-A {svc} -s rr")
    lab.ipvsadm(f"-a {svc} -r {rip}:{port} {fwd}")
    assert bounded(lab, lambda: lab.backends(vip, port, 3, proto=proto)) == ["director"] * 3
    assert lab.backends(vip, port, 2, proto=proto, ns=lab.director) == ["director"] * 2
    assert (" Route " if fwd == "-g" else " Tunnel ") in lab.ipvsadm("-L -n").stdout


def test_local_server_keeps_the_vip_as_destination(lab):
    """As IPVS: the packet is not rewritten, so a -g server on 127.0.0.1 is
    whatever listens on the VIP's address and port; a server on
    127.0.0.1:8081 alone is not reached (refused), as on the oracle."""
    lab.ipvsadm(f"-A {_svc(VIP4, 8081)} -s rr")
    lab.ipvsadm(f"-a {_svc(VIP4, 8081)} -r 127.0.0.1 -g")
    with lab.serving_on_director("loopback-only", tcp="8081"):
        assert lab.backends("127.0.0.1", 8081, 1, ns=lab.director) == ["loopback-only"]
        results = bounded(lab, lambda: lab.connect(VIP4, 8081, 2))
    assert [r["backend"] for r in results] == [None, None]
    assert all("refused" in (r["error"] or "").lower() for r in results), results


def test_local_and_remote_direct_servers_take_turns(lab):
    """ctdb's LVS leader: the other nodes by direct routing plus itself."""
    svc = _svc(VIP4, 80)
    lab.ipvsadm(f"-A {svc} -s rr")
    lab.ipvsadm(f"-a {svc} -r {rs4(0)} -g")
    lab.ipvsadm(f"-a {svc} -r 127.0.0.1 -g")
    lab.ipvsadm(f"-a {svc} -r {rs4(1)} -g")
    assert bounded(lab, lambda: lab.backends(VIP4, 80, 6)) == [rs4(1), "director", rs4(0)] * 2


def test_ctdb_port0_persistent_service_on_loopback(lab):
    """ctdb's 91.lvs: ``-A -t VIP -p 1999999 -s lc`` then ``-a -t VIP -r
    127.0.0.1`` (forwarding left to the default, -g): every port of the VIP
    ends up at the director's own servers."""
    lab.ipvsadm(f"-A -t {VIP4} -p 1999999 -s lc")
    lab.ipvsadm(f"-a -t {VIP4} -r 127.0.0.1")
    assert "-a -t 192.168.0.40:0 -r 127.0.0.1:0 -g -w 1" in lab.ipvsadm("-S -n").stdout
    answers = bounded(lab, lambda: lab.backends(VIP4, 80, 2) + lab.backends(VIP4, 8080, 2))
    assert answers == ["director"] * 4


@pytest.mark.parametrize("vip,rip", [(VIP4, "127.0.0.1:8080"), (VIP6, "[::1]:8080")])
def test_masquerading_to_loopback_is_for_the_director_only(lab, vip, rip):
    """-m to 127.0.0.1 / ::1: as IPVS, the director's own connections are
    DNATed to it; a client's are dropped (the kernel does not route a packet
    from outside to a loopback address, and IPVS refuses to: oracle
    local-servers, "stopping DNAT to loopback address")."""
    svc = _svc(vip, 80)
    lab.ipvsadm(f"-A {svc} -s rr")
    lab.ipvsadm(f"-a {svc} -r {rip} -m")
    assert lab.backends(vip, 80, 2, ns=lab.director) == ["director"] * 2
    assert bounded(lab, lambda: lab.backends(vip, 80, 1, timeout=1.0)) == [None]


@pytest.mark.parametrize("vip,rip", [(VIP4, f"{DIRECTOR4}:8080"), (VIP6, f"[{DIRECTOR6}]:8080")])
def test_masquerading_to_an_own_address(lab, vip, rip):
    svc = _svc(vip, 80)
    lab.ipvsadm(f"-A {svc} -s rr")
    lab.ipvsadm(f"-a {svc} -r {rip} -m")
    assert bounded(lab, lambda: lab.backends(vip, 80, 2)) == ["director"] * 2
    assert lab.backends(vip, 80, 2, ns=lab.director) == ["director"] * 2
