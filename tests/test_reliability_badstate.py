"""Broken state files, case by case (issue 5; what the fuzzer found, kept
as plain regression tests).

A state file of the right schema whose fields have the wrong JSON type must
give the store's "unusable" message (status 2), not a traceback; and the
recovery that message advertises ("'ipvsadm -C' or ipvsadm-restore starts a
new one") must work.
"""

from __future__ import annotations

import json

import pytest

from ipvs2nft.cli import ipvsadm as cli
from tests import oracle
from tests.reliability_helpers import no_traceback, store_document

BASE = "-A -t 10.0.0.1:80 -s rr\n-a -t 10.0.0.1:80 -r 192.168.100.10:80 -m\n-A -f 3 -s wrr\n"


def _valid(state) -> bytes:
    status, _, err = oracle.call(cli.restore_main, [], BASE, "ipvsadm-restore")
    assert status == 0, err
    return (state / "state.json").read_bytes()


def _edit(raw: bytes, header: dict | None = None, row: int | None = None, field: int | None = None,
          value=None) -> bytes:
    head, rest = raw.split(b"\n", 1)
    lines = rest.split(b"\n")
    if header:
        doc = json.loads(head.removesuffix(b',"services":[') + b"}")
        doc.update(header)
        head = json.dumps(doc, separators=(",", ":"))[:-1].encode() + b',"services":['
    if row is not None:
        r = json.loads(lines[row].rstrip(b","))
        r[field] = value
        lines[row] = json.dumps(r, separators=(",", ":")).encode() + b","
    return head + b"\n" + b"\n".join(lines)


TYPED = [  # (id, edit, command)
    ("generation-null", {"header": {"generation": None}}, ["-A", "-t", "10.0.0.7:80"]),
    ("next-rid-string", {"header": {"next_rid": "7"}},
     ["-a", "-t", "10.0.0.1:80", "-r", "192.168.100.11", "-m"]),
    ("timeouts-strings", {"header": {"timeouts": ["a", "b", "c"]}}, ["-L", "--timeout"]),
    ("flags-list", {"row": 0, "field": 8, "value": []}, ["-L", "-n"]),
    ("fwmark-list", {"row": 1, "field": 6, "value": []}, ["-L", "-n"]),
    ("sid-object", {"row": 0, "field": 1, "value": {}}, ["--set", "1", "2", "3"]),
    ("scheduler-object", {"row": 0, "field": 7, "value": {}}, ["-E", "-t", "10.0.0.1:80", "-s", "rr"]),
    ("flags-list-save", {"row": 0, "field": 8, "value": {}}, ["-S", "-n"]),
]


@pytest.mark.parametrize("edit,argv", [pytest.param(e, a, id=i) for i, e, a in TYPED])
def test_wrongly_typed_field_is_a_clear_error(state, edit, argv):
    raw = _edit(_valid(state), **edit)
    (state / "state.json").write_bytes(raw)
    status, out, err = oracle.call(cli.main, argv, None, "ipvsadm")
    assert isinstance(status, int) and no_traceback(err), (status, err[-800:])
    assert status == 2 and "state file" in err and len(err.splitlines()) == 1, (status, err)
    assert (state / "state.json").read_bytes() == raw


BROKEN = [b"garbage\n", b"", b'{"schema":"ipvs2nft-state/1"', b"[]", b"null]}\n"]


@pytest.mark.parametrize("data", BROKEN, ids=["garbage", "empty", "truncated", "json-list", "trailer-only"])
def test_clear_starts_a_new_state_file(state, data):
    _valid(state)
    (state / "state.json").write_bytes(data)
    status, _, err = oracle.call(cli.main, ["-C"], None, "ipvsadm")
    assert status == 0, err
    store_document(state / "state.json")
    assert oracle.call(cli.main, ["-S", "-n"], None, "ipvsadm")[:2] == (0, "")


@pytest.mark.parametrize("data", BROKEN, ids=["garbage", "empty", "truncated", "json-list", "trailer-only"])
def test_restore_starts_a_new_state_file(state, data):
    _valid(state)
    (state / "state.json").write_bytes(data)
    status, _, err = oracle.call(cli.restore_main, [], BASE, "ipvsadm-restore")
    assert status == 0, err
    store_document(state / "state.json")
    assert oracle.call(cli.main, ["-S", "-n"], None, "ipvsadm")[1].count("\n") == 3


@pytest.mark.parametrize("data", BROKEN, ids=["garbage", "empty", "truncated", "json-list", "trailer-only"])
def test_unusable_state_file_message(state, data):
    _valid(state)
    (state / "state.json").write_bytes(data)
    for argv in (["-L", "-n"], ["-A", "-t", "10.0.0.9:80"]):
        status, out, err = oracle.call(cli.main, argv, None, "ipvsadm")
        assert status == 2 and out == "" and no_traceback(err), (argv, status, err)
        assert err.startswith("ipvs2nft: the state file ") and len(err.splitlines()) == 1, err
    assert (state / "state.json").read_bytes() == data
