"""The iptables rules and their translation, side by side, under real traffic.

Two labs (each: client, director with the VIP on lo, real servers): the
original rules are loaded with iptables-legacy into one director, our
translation with ``nft -f`` into the other, and the same sequence of
connections goes through each.

* nth cascades are deterministic: the backend of every connection must be
  the same on both sides, connection by connection (a connection the rules
  leave un-NATed reaches the director itself and is refused on both).
* random cascades: per backend (and "not NATed"), each side's count must be
  within 4.5 standard deviations of the binomial expectation n*p computed by
  shares.py, and the two sides within 4.5 sd of each other (sd of a
  difference: sqrt(2 n p (1-p))).  One check fails by chance with
  probability ~7e-6; the ~60 checks of this file, ~4e-4 per run.  With 400
  connections that still tells 33% from 50% (4.5 sd = 10.6 points).
* persistence: every client must stick to one backend on both sides, and the
  clients per backend are compared like the random counts.
"""

from __future__ import annotations

import collections
import math
import shutil
import subprocess
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import pytest

from ipvs2nft.iptables import translate
from ipvs2nft.iptables.lift import backend_of
from ipvs2nft.lab import VIP4, VIP6, Lab, rs4, rs6, unique_prefix
from tests.conftest import NETNS_SKIP

pytestmark = [pytest.mark.netns]

FIXTURES = Path(__file__).parent / "fixtures" / "iptables"
SIGMAS = 4.5


def _skip_reason() -> str | None:
    if NETNS_SKIP:
        return NETNS_SKIP
    for tool in ("iptables-legacy", "iptables-legacy-restore", "ip6tables-legacy",
                 "iptables-restore-translate"):
        if shutil.which(tool) is None:
            return f"needs {tool} (Debian package iptables)"
    return None


class SideBySide:
    """Lab ``a`` runs iptables-legacy, lab ``b`` our nft translation."""

    def __init__(self, servers: int = 3, clients: int = 4) -> None:
        why = _skip_reason()
        if why:
            pytest.skip(why)
        self.a = Lab(unique_prefix("ia"), servers=servers, clients=clients)
        self.b = Lab(unique_prefix("ib"), servers=servers, clients=clients)
        self.translation = None
        self.a.build()
        try:
            self.b.build()
            for lab in (self.a, self.b):
                self._warm_up(lab, servers)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _warm_up(lab: Lab, servers: int) -> None:
        """Resolve every neighbour first: a first SYN that waits for IPv6
        neighbour discovery can miss a 1 s connect timeout on one side only."""
        pings = " ".join(f"ping -c1 -W2 {rs4(i)} >/dev/null & ping -6 -c1 -W2 {rs6(i)} >/dev/null &"
                         for i in range(servers))
        lab.sh(lab.director, pings + " wait", check=False)
        for i in range(servers):
            lab.sh(lab.rs(i), "ping -c1 -W2 192.168.100.1 >/dev/null; "
                              "ping -6 -c1 -W2 2001:db8:100::1 >/dev/null", check=False)

    def close(self) -> None:
        self.a.close()
        self.b.close()

    def load(self, name: str) -> translate.Translation:
        path = FIXTURES / name
        if path.suffix == ".sh":
            script = ('iptables() { iptables-legacy "$@"; }; '
                      'ip6tables() { ip6tables-legacy "$@"; }; . ' + str(path))
            self.a.sh(self.a.director, script)
        else:
            tool = "ip6tables-legacy-restore" if path.suffix == ".rules6" else "iptables-legacy-restore"
            p = subprocess.run(["ip", "netns", "exec", self.a.director, tool], input=path.read_text(),
                               capture_output=True, text=True)
            assert p.returncode == 0, p.stderr
        self.translation = translate.run(path.read_text())
        with tempfile.NamedTemporaryFile("w", suffix=".nft") as f:
            f.write("".join(line + "\n" for line in self.translation.script_lines))
            f.flush()
            got = self.b.ns(self.b.director, "nft", "-f", f.name, check=False)
            assert got.returncode == 0, got.stderr
        return self.translation

    def both(self, host: str, port: int, count: int, **kw) -> tuple[list[dict], list[dict]]:
        kw.setdefault("timeout", 2.0)
        return self.a.connect(host, port, count, **kw), self.b.connect(host, port, count, **kw)

    def expected(self, port: int | None = None) -> dict:
        """Backend name (None: not NATed) -> share, from the one lifted service."""
        lifted = self.translation.lifted.lifted
        if port is not None:
            lifted = [lf for lf in lifted if lf.service.port == port]
        (lf,) = lifted
        out: dict = {}
        for step, share in zip(lf.steps, lf.analysis.shares, strict=True):
            name = str(step.dest.addr) if step.dest is not None else None
            out[name] = out.get(name, Fraction(0)) + share
        if lf.analysis.leftover:
            out[None] = out.get(None, Fraction(0)) + lf.analysis.leftover
        return out


@pytest.fixture
def sbs():
    pair = SideBySide()
    try:
        yield pair
    finally:
        pair.close()


@pytest.fixture
def sbs5():
    pair = SideBySide(servers=5)
    try:
        yield pair
    finally:
        pair.close()


def _backends(results: list[dict]) -> list[str | None]:
    return [r["backend"] for r in results]


def _within(count: int, n: int, p: float, k: float = 1.0) -> bool:
    sd = math.sqrt(k * n * p * (1 - p))
    return abs(count - (0 if k == 2 else n * p)) <= SIGMAS * sd + 1e-9


def _check_random(expected: dict, a: list, b: list) -> None:
    n = len(a)
    ca, cb = collections.Counter(a), collections.Counter(b)
    assert set(ca) | set(cb) <= set(expected), (ca, cb, expected)
    for name, share in expected.items():
        p = float(share)
        assert _within(ca[name], n, p), f"iptables: {name} {ca[name]}/{n}, expected {p:.4f}"
        assert _within(cb[name], n, p), f"nft: {name} {cb[name]}/{n}, expected {p:.4f}"
        assert _within(ca[name] - cb[name], n, p, k=2), f"{name}: iptables {ca[name]}, nft {cb[name]}"


# ---------------------------------------------------------------- the seed talk

def test_slide19_nth_sequence(sbs):
    sbs.load("slide19.sh")
    a, b = sbs.both(VIP4, 80, 40)
    assert _backends(a) == _backends(b)
    # 10, -, 10, 11: the second rule only sees every other connection
    assert _backends(a)[:4] == ["192.168.100.10", None, "192.168.100.10", "192.168.100.11"]


def test_slide22_probability_one_takes_everything(sbs):
    sbs.load("slide22.sh")
    a, b = sbs.both(VIP4, 80, 60)
    assert _backends(a) == _backends(b) == ["192.168.100.10"] * 60


def test_slide25_multiport(sbs):
    sbs.load("slide25.sh")
    for port in (80, 443):
        a, b = sbs.both(VIP4, port, 30)
        assert _backends(a) == _backends(b) == ["192.168.100.10"] * 30
    a, b = sbs.both(VIP4, 8080, 5)  # not in --dports: not NATed on either side
    assert _backends(a) == _backends(b) == [None] * 5


def _sticky(pair: SideBySide, host: str, port: int, rounds: int) -> dict[str, list]:
    """Every client connects ``rounds`` times on both sides and must get
    one backend each time; the backend of each client, per side."""
    sources = pair.a.client_addresses()
    a, b = pair.both(host, port, rounds * len(sources), sources=sources)
    firsts = {}
    for side, results in (("iptables", a), ("nft", b)):
        per_client = collections.defaultdict(set)
        for r in results:
            per_client[r["source"]].add(r["backend"])
        assert all(len(s) == 1 for s in per_client.values()), (side, per_client)
        firsts[side] = [next(iter(per_client[c])) for c in sources]
    return firsts


def test_slide28_persistence():
    pair = SideBySide(servers=3, clients=40)
    try:
        pair.load("slide28.sh")
        firsts = _sticky(pair, VIP4, 80, 5)
        _check_random(pair.expected(), firsts["iptables"], firsts["nft"])
    finally:
        pair.close()


def test_persistence_expires_after_its_timeout():
    """--seconds 2: a client keeps its backend within 2 s, and is scheduled
    afresh after; it then changes backend with probability 2p(1-p)."""
    pair = SideBySide(servers=3, clients=60)
    try:
        pair.load("slide28-short.sh")
        sources = pair.a.client_addresses()
        first = pair.both(VIP4, 80, len(sources), sources=sources)
        soon = pair.both(VIP4, 80, len(sources), sources=sources)
        time.sleep(3.5)
        later = pair.both(VIP4, 80, len(sources), sources=sources)
        p = float(pair.expected()["192.168.100.11"])
        for side in (0, 1):
            assert _backends(soon[side]) == _backends(first[side])
            changed = sum(x != y for x, y in zip(_backends(first[side]), _backends(later[side]),
                                                 strict=True))
            assert changed > 0 and _within(changed, len(sources), 2 * p * (1 - p)), (side, changed)
    finally:
        pair.close()


# ---------------------------------------------------------------- cascades of 3-5

@pytest.mark.parametrize("name", ["nth3.sh", "nth4.sh", "nth5.sh", "nth-semicolons.sh"])
def test_nth_cascades(sbs5, name):
    t = sbs5.load(name)
    (lf,) = t.lifted.lifted
    n = 2 * len(lf.period) if len(lf.period) < 64 else 300
    a, b = sbs5.both(VIP4, 80, n)
    assert _backends(a) == _backends(b)
    expected = [str(d.addr) if d is not None else None for d in lf.period]
    assert _backends(b) == (expected * (n // len(expected) + 1))[:n]


@pytest.mark.parametrize("name", ["random3.sh", "random4.sh", "mark-random.sh"])
def test_random_cascades(sbs5, name):
    sbs5.load(name)
    a, b = sbs5.both(VIP4, 80, 400)
    _check_random(sbs5.expected(), _backends(a), _backends(b))


def test_multiport_nth_counter_is_shared_by_both_ports(sbs):
    sbs.load("multiport-nth.sh")
    seq_a, seq_b = [], []
    for port in (80, 443, 443, 80, 80, 80, 443, 80, 443, 443, 80, 443):
        a, b = sbs.both(VIP4, port, 1)
        seq_a += _backends(a)
        seq_b += _backends(b)
    assert seq_a == seq_b == ["192.168.100.10", "192.168.100.11", "192.168.100.12"] * 4


def test_fwmark_cascade_on_the_users_mark(sbs):
    sbs.load("fwmark-nth.sh")
    seq_a, seq_b = [], []
    for port in (80, 443, 443, 80, 443, 80):
        a, b = sbs.both(VIP4, port, 1)
        seq_a += _backends(a)
        seq_b += _backends(b)
    assert seq_a == seq_b == ["192.168.100.10", "192.168.100.11"] * 3


# ---------------------------------------------------------------- IPv6, dumps

def test_ip6tables_nth(sbs):
    sbs.load("ip6-nth.sh")
    a, b = sbs.both(VIP6, 80, 54)
    assert _backends(a) == _backends(b)
    assert None in _backends(a)  # --every 3 --packet 0/1/2: the cascade leaks


def test_iptables_save_dump_mixing_lb_and_filter_rules(sbs):
    sbs.load("mixed.rules")
    a, b = sbs.both(VIP4, 80, 30)
    assert _backends(a) == _backends(b) == ["192.168.100.10", "192.168.100.11", "192.168.100.12"] * 10
    a, b = sbs.both(VIP4, 443, 400)
    _check_random(sbs.expected(443), _backends(a), _backends(b))
    # port 8080: DNAT in a user chain, then the FORWARD filter rejects it
    a, b = sbs.both(VIP4, 8080, 5)
    assert _backends(a) == _backends(b) == [None] * 5
    assert all(r["error"] for r in a + b)


# ---------------------------------------------------------------- kube-proxy

KUBE_WEB, KUBE_API, KUBE_DNS, KUBE_ADMIN, KUBE_EMPTY = ("10.96.12.80", "10.96.12.81", "10.96.0.10",
                                                        "10.96.12.82", "10.96.12.83")
NODE = "198.51.100.1"  # the director's address on the client's side: NodePorts answer there


def _kube_shares(t: translate.Translation, chain_prefix: str) -> dict:
    (lift,) = [j for j in t.jumps.lifted if j.chain.startswith(chain_prefix)]
    return {(str(backend_of(ep.dnat).addr) if ep is not None else None): x for ep, x in lift.shares.items()}


def _reply_addresses(lab: Lab, vip: str) -> set[str]:
    """Where the endpoints answered the connections to ``vip`` (conntrack's
    reply destination: the client, or the node when masqueraded)."""
    out = lab.ns(lab.director, "conntrack", "-L", "-p", "tcp", "--orig-dst", vip, check=False).stdout
    return {line.split("dst=")[2].split()[0] for line in out.splitlines() if line.count("dst=") == 2}


def test_kube_proxy_dump():
    """A kube-proxy iptables-save: iptables-legacy runs the dump in one
    director, our translation (one map per service chain) the other.
    ClusterIP and NodePort of a 3-endpoint service in the proportions of
    the dump, session affinity holding per client, a UDP service, a
    one-endpoint service, and a service without endpoints, the same way."""
    pair = SideBySide(servers=3, clients=30)
    try:
        for lab in (pair.a, pair.b):  # a node routes the service range somewhere: FORWARD sees it
            lab.sh(lab.director, "ip route add 10.96.0.0/12 dev cli0")
        t = pair.load("kube-proxy.rules")
        assert len(t.jumps.lifted) == 3
        web = _kube_shares(t, "KUBE-SVC-WEB")
        for host, port in ((KUBE_WEB, 80), (NODE, 30080)):
            a, b = pair.both(host, port, 300)
            _check_random(web, _backends(a), _backends(b))
        # KUBE-MARK-MASQ (client outside the pod network) -> KUBE-POSTROUTING
        # masquerades: the endpoints see the node's address on both sides
        assert _reply_addresses(pair.a, KUBE_WEB) == _reply_addresses(pair.b, KUBE_WEB) == {"192.168.100.1"}
        firsts = _sticky(pair, KUBE_API, 8080, 4)
        assert None not in firsts["iptables"] + firsts["nft"]
        _check_random(_kube_shares(t, "KUBE-SVC-API"), firsts["iptables"], firsts["nft"])
        a, b = pair.both(KUBE_DNS, 53, 200, proto="udp")
        _check_random(_kube_shares(t, "KUBE-SVC-DNS"), _backends(a), _backends(b))
        a, b = pair.both(KUBE_ADMIN, 443, 5)
        assert _backends(a) == _backends(b) == ["192.168.100.12"] * 5
        a, b = pair.both(KUBE_EMPTY, 80, 2, timeout=1.0)  # rejected in FORWARD on both sides
        assert _backends(a) == _backends(b) == [None] * 2
        assert [r["error"] for r in a] == [r["error"] for r in b], (a, b)
    finally:
        pair.close()
