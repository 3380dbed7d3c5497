"""Tunnelling (-i), proven on a kernel that has ipip.

This host's kernel has no ipip, so the proof was recorded with the oracle VM
(tests/fixtures/oracle/tunnel-ours.txt explains how): our translation of
tests/fixtures/tunnel-rules, loaded with its tunnel devices while IPVS held
no service, answered every connection in IPVS's round-robin order.  Here the
recording is checked, and the builder must still print the very script that
was recorded -- if it changes, re-record (the fixture says how).
"""

from __future__ import annotations

from pathlib import Path

from ipvs2nft import ids
from ipvs2nft.cli.ipvs2nft import translate_ipvsadm
from ipvs2nft.nft import build, direct, tunnels
from tests import oracle

FIXTURES = Path(__file__).parent / "fixtures"


def _translation():
    table, errors, _ = translate_ipvsadm((FIXTURES / "tunnel-rules").read_bytes())
    assert not errors
    table, _ = ids.assign(table)
    return build.full(table, 1).text(), tunnels.script_lines(direct.tunnels(table.services))


def test_recorded_script_is_what_the_builder_prints():
    records = oracle.load("tunnel-ours.jsonl")
    loaded = next(r for r in records if r["cmd"].startswith("!sh -c 'cat > /tmp/t.nft'"))
    script, devices = _translation()
    assert loaded["stdin"].rstrip("\n") == script.rstrip("\n")
    recorded_devices = [r["argv"][-1] for r in records if r["cmd"].startswith("!ip link add")]
    assert recorded_devices == devices


def test_recorded_connections_went_through_our_tunnels_only():
    records = oracle.load("tunnel-ours.jsonl")
    assert all(r["rc"] == 0 for r in records if r["kind"] != "connect"), "a recorded step failed"
    connect = [r for r in records if r["kind"] == "connect" and r["conns"]][-1]
    answers = [c["backend"] for c in connect["conns"]]
    assert answers == ["192.168.100.12", "192.168.100.11", "192.168.100.10"] * 2
    stats = records[-1]
    assert stats["cmd"] == "-L -n --stats" and "TCP" not in stats["stdout"]  # IPVS had no service
