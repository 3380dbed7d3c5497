"""Real connections through our nftables ruleset against what real IPVS did.

Each traffic fixture (tests/fixtures/oracle/traffic-*.jsonl, recorded with
the oracle's ``@connect`` on a real IPVS kernel) is replayed in a namespace
lab: the same ipvsadm commands run through our ipvsadm in the director, the
same sequential connections go from the client, and the real server that
answered each one is compared.  rr and wrr are deterministic in IPVS, so the
sequences must be equal, connection by connection.
"""

from __future__ import annotations

import shlex

import pytest

from tests import oracle

pytestmark = [pytest.mark.netns, pytest.mark.slow]

EXACT = ["traffic-rr.jsonl", "traffic-wrr.jsonl"]


def _reset(lab) -> None:
    """The oracle's @reset: an empty table and default timeouts."""
    lab.ipvsadm("-C")
    lab.ipvsadm("--set 900 120 300")


def replay_connects(lab, records):
    """Run a traffic fixture in the lab; yield (record, ours) per @connect."""
    for rec in records:
        if rec["kind"] == "reset":
            _reset(lab)
        elif rec["kind"] == "ipvsadm":
            got = lab.ipvsadm(rec["argv"], stdin=rec["stdin"], check=False)
            assert got.returncode == rec["rc"], (rec["cmd"], got.stderr)
        elif rec["kind"] == "connect":
            words = shlex.split(rec["cmd"])
            host, _, port = words[1].rpartition(":")
            count = int(words[2]) if len(words) > 2 and "=" not in words[2] else 1
            opts = dict(w.split("=", 1) for w in words[2:] if "=" in w)
            sources = opts["from"].split(",") if "from" in opts else []
            yield rec, lab.backends(host.strip("[]"), int(port), count, sources=sources, timeout=1.0)


@pytest.mark.parametrize("name", EXACT)
def test_sequences_equal_ipvs(lab4, name):
    bad = []
    for rec, ours in replay_connects(lab4, oracle.load(name)):
        ipvs = [c["backend"] for c in rec["conns"]]
        if ours != ipvs:
            bad.append(f"line {rec['line']} {rec['cmd']}\n  ipvs: {ipvs}\n  ours: {ours}")
    assert not bad, "\n".join(bad)
