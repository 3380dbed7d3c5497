"""IPVS's connection-count schedulers, decision by decision, against the real kernel.

The oracle fixtures hold what IPVS chose for connections made one after
another (``@connect``), each closed before the next opens (so it lingers as
an inactive TIME_WAIT connection) or, with ``hold``, kept open (active).
Here the same commands run on the model, and every recorded connection is
scheduled by ``dynsched.schedule`` from the counts the earlier ones left:
the servers must be the ones IPVS chose.  This proves the algorithms (the
257·active + inactive overhead, newest-first ties, weight 0, lblc/lblcr's
locality); the namespace tests prove the data plane follows them.
"""

from __future__ import annotations

import shlex

import pytest

from ipvs2nft import dynsched
from ipvs2nft.errors import IpvsadmError
from ipvs2nft.ipvsadm import cmdline
from ipvs2nft.ipvsadm.apply import mutation
from ipvs2nft.model import Table
from ipvs2nft.netaddr import parse_service
from tests import oracle

FIXTURES = ["traffic-lc-wlc-others.jsonl"]


def _target(table: Table, words: list[str]):
    """The service a @connect reaches: by fwmark= if given, else by VIP:port."""
    opts = dict(w.split("=", 1) for w in words[2:] if "=" in w)
    if "fwmark" in opts:
        for svc in table.services:
            if svc.fwmark == int(opts["fwmark"]):
                return svc
    parsed = parse_service(words[1], 6)
    for svc in table.services:
        if not svc.fwmark and svc.addr == parsed.addr and svc.port == parsed.port:
            return svc
    raise AssertionError(f"no service for {words}")


def replay(records):
    """Yield (record, IPVS's backends, ours) for each @connect of a
    dynamic scheduler."""
    table = Table()
    loads: dict = {}  # (service key) -> Loads
    tables: dict = {}  # (service key) -> Locality
    for rec in records:
        if rec["kind"] == "reset":
            table, loads, tables = Table(), {}, {}
        elif rec["kind"] == "ipvsadm":
            try:
                change = mutation(cmdline.parse(rec["argv"]))
                if change is not None:
                    table = change[1](table)
            except IpvsadmError:
                continue
        elif rec["kind"] == "connect":
            words = shlex.split(rec["cmd"])
            svc = _target(table, words)
            if svc.scheduler not in dynsched.LIVE | {"fo"}:
                continue
            hold = "hold" in words
            svc_loads = loads.setdefault(svc.key, {})
            locality = tables.setdefault(svc.key, dynsched.Locality())
            daddr = parse_service(words[1], 6).addr
            got = []
            for _ in rec["conns"]:
                dest, _ = dynsched.schedule(svc, svc_loads, daddr, locality)
                got.append(None if dest is None else str(dest.addr))
                if dest is not None:
                    load = dynsched.load_of(svc_loads, dest)
                    dynsched.bind(dest, load, True)
                    if not hold:  # closed before the next one: TIME_WAIT
                        dynsched.set_activity(load, True, False)
            yield rec, [c["backend"] for c in rec["conns"]], got


@pytest.mark.parametrize("name", FIXTURES)
def test_dynamic_schedulers_choose_what_ipvs_chose(name):
    bad, count = [], 0
    for rec, expected, got in replay(oracle.load(name)):
        count += 1
        if expected != got:
            bad.append(f"line {rec['line']} {rec['cmd']}\n  ipvs: {expected}\n  ours: {got}")
    assert count > 10
    assert not bad, "\n".join(bad)


def test_overhead_is_257_active_plus_inactive():
    load = dynsched.Load(active=2, inactive=3)
    assert load.overhead == 257 * 2 + 3


def test_overload_flag_hysteresis():
    """-x 4 -y 0: set when the 4th connection binds, cleared only when the
    total falls under 3 (4 - 4//4), as __ip_vs_dest_update_overload does."""
    from ipvs2nft.model import Dest
    from ipvs2nft.netaddr import address

    dest = Dest(address("10.0.0.1"), 80, u_threshold=4)
    load = dynsched.Load()
    for _ in range(3):
        dynsched.bind(dest, load, True)
    assert not load.overloaded
    dynsched.bind(dest, load, True)
    assert load.overloaded
    dynsched.unbind(dest, load, True)  # 4 -> 3: still in the band
    assert load.overloaded
    dynsched.unbind(dest, load, True)  # 3 -> 2: under the lower threshold
    assert not load.overloaded


def test_prediction_assumes_new_connections_stay_open():
    table = Table()
    for line in ("-A -t 10.0.0.1:80 -s wlc", "-a -t 10.0.0.1:80 -r 10.1.0.1 -m -w 3",
                 "-a -t 10.0.0.1:80 -r 10.1.0.2 -m -w 1"):
        table = mutation(cmdline.parse(line.split()))[1](table)
    svc = next(iter(table.services))
    picks = [str(d.addr) for d in dynsched.predict(svc, {}, 8)]
    # 3:1 weights, newest (.2) wins the first tie
    assert picks == ["10.1.0.2", "10.1.0.1", "10.1.0.1", "10.1.0.1",
                     "10.1.0.2", "10.1.0.1", "10.1.0.1", "10.1.0.1"]
