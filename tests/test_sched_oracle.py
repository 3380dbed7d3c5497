"""The scheduler port against the real IPVS, connection by connection.

tests/fixtures/oracle/traffic-*.jsonl hold what the real kernel chose for
sequential connections (``@connect``) between ipvsadm commands.  Here the same
commands run on the model, and before each ``@connect`` the slot table that
the nftables back end would load is computed from the model's scheduler
state: its first N entries must be the servers IPVS chose, in order.  This is
what makes ``numgen inc mod N`` reproduce rr and wrr exactly, also after
servers are added, removed, quiesced or re-weighted mid-stream.
"""

from __future__ import annotations

import shlex
from dataclasses import replace

import pytest

from ipvs2nft import sched
from ipvs2nft.errors import IpvsadmError
from ipvs2nft.ipvsadm import cmdline
from ipvs2nft.ipvsadm.apply import mutation
from ipvs2nft.model import Table
from ipvs2nft.netaddr import parse_service
from tests import oracle

SEQUENCE_FIXTURES = ["traffic-rr.jsonl", "traffic-wrr.jsonl"]


def _service_for(table: Table, target: str):
    parsed = parse_service(target, 6)
    for svc in table.services:
        if svc.addr == parsed.addr and svc.port == parsed.port and svc.protocol == 6:
            return svc
    raise AssertionError(f"no service {target}")


def replay_sequences(records):
    """Yield (record, expected backends, predicted backends) per @connect."""
    table = Table()
    for rec in records:
        if rec["kind"] == "reset":
            table = Table()
        elif rec["kind"] == "ipvsadm":
            try:
                change = mutation(cmdline.parse(rec["argv"]))
            except IpvsadmError:
                continue
            if change is not None:
                try:
                    table = change[1](table)
                except IpvsadmError:
                    pass
        elif rec["kind"] == "connect":
            words = shlex.split(rec["cmd"])
            svc = _service_for(table, words[1])
            expected = [c["backend"] for c in rec["conns"]]
            st, predicted = svc.sched, []
            for _ in expected:
                d, st = sched.pick(svc, st)
                predicted.append(None if d is None else str(d.addr))
            # what the back end does when it next rebuilds: advance by the
            # connections the data plane scheduled (refused ones do not count)
            table.put(replace(svc, sched=st))
            yield rec, expected, predicted


@pytest.mark.parametrize("name", SEQUENCE_FIXTURES)
def test_sequence_matches_ipvs(name):
    records = oracle.load(name)
    bad = []
    count = 0
    for rec, expected, predicted in replay_sequences(records):
        count += 1
        if expected != predicted:
            bad.append(f"line {rec['line']} {rec['cmd']}\n  ipvs: {expected}\n  ours: {predicted}")
    assert count, "no @connect records"
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("name", SEQUENCE_FIXTURES)
def test_slot_table_is_the_sequence(name):
    """The table loaded into nft (one period from the state) replays the
    same servers as picking one by one, for as many connections as recorded."""
    table = Table()
    for rec in oracle.load(name):
        if rec["kind"] == "reset":
            table = Table()
        elif rec["kind"] == "ipvsadm":
            try:
                change = mutation(cmdline.parse(rec["argv"]))
                if change is not None:
                    table = change[1](table)
            except IpvsadmError:
                pass
        elif rec["kind"] == "connect":
            svc = _service_for(table, shlex.split(rec["cmd"])[1])
            slots = sched.slots(svc, svc.sched).table
            expected = [c["backend"] for c in rec["conns"]]
            if not slots:
                assert all(b is None for b in expected), rec["cmd"]
                continue
            got = [str(slots[i % len(slots)].addr) for i in range(len(expected))]
            assert got == expected, f"line {rec['line']}: {got} != {expected}"
            st = sched.advance(svc, svc.sched, len(expected))
            table.put(replace(svc, sched=st))


def test_rr_closed_form_is_the_walk():
    """rr's slot table is computed in closed form (a restore computes
    10,000); it must be the period that picking one by one walks, from any
    pointer, with any servers quiesced."""
    import random

    from ipvs2nft.model import Dest, SchedState, Service
    from ipvs2nft.netaddr import address

    rng = random.Random(5)
    for _ in range(2000):
        dests = tuple(Dest(address(f"10.0.0.{i}"), 80, weight=rng.choice([0, 1, 1, 3]))
                      for i in rng.sample(range(1, 9), rng.randint(1, 6)))
        pointer = rng.choice([None, *(d.key for d in dests), (2, address("10.9.9.9"), 80)])
        svc = Service(scheduler="rr", dests=dests)
        st = SchedState(cl=pointer)
        period = sched._period(svc)
        walked = tuple(sched.trajectory(svc, st, period)[0][:period]) if period else ()
        assert sched.slots(svc, st).table == walked, (dests, pointer)
