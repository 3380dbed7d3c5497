"""Removed direct-routed servers keep their rid while their flows may live.

IPVS takes a real server added back to its service out of its trash
(ip_vs_trash_get_dest): the same server, with its connections.  Here that
is the same rid, so the server's entries in the direct tables' ``flows``
match again (tests/test_flows_outlive.py shows the traffic).  Store only, no
kernel: the rids are read from the state file.
"""

from __future__ import annotations

import json
import time

from ipvs2nft.cli import ipvsadm as cli
from ipvs2nft.store import Store
from tests import oracle

SVC = ["-t", "10.0.0.1:80"]


def _run(*argv: str, stdin: str | None = None, prog: str = "ipvsadm") -> None:
    func = cli.restore_main if prog == "ipvsadm-restore" else cli.main
    status, _, err = oracle.call(func, list(argv), stdin, prog)
    assert status == 0, err


def _rids() -> dict[tuple[str, str], int]:
    """(service, server) -> rid, from the state file."""
    table = Store().read().table
    return {(f"{s.addr}:{s.port}", f"{d.addr}:{d.port}"): d.rid for s in table.services for d in s.dests}


def _two_servers(fwd: str = "-g") -> dict:
    _run("-A", *SVC, "-s", "rr")
    _run("-a", *SVC, "-r", "10.1.0.1", fwd)
    _run("-a", *SVC, "-r", "10.1.0.2", fwd)
    return _rids()


def test_direct_server_added_back_gets_its_rid(state):
    before = _two_servers()
    _run("-d", *SVC, "-r", "10.1.0.1")
    _run("-a", *SVC, "-r", "10.1.0.1", "-g")
    assert _rids() == before
    assert not (state / "state.json.trash").exists()  # taken out of the trash again


def test_masqueraded_server_added_back_is_a_new_one(state):
    before = _two_servers("-m")
    _run("-d", *SVC, "-r", "10.1.0.1:80")
    _run("-a", *SVC, "-r", "10.1.0.1:80", "-m")
    after = _rids()
    key = ("10.0.0.1:80", "10.1.0.1:80")
    assert after[key] not in before.values()  # conntrack keeps masqueraded flows: no trash needed


def test_flush_then_restore_and_restore_alone_keep_the_rids(state):
    before = _two_servers()
    saved = ("-A -t 10.0.0.1:80 -s rr\n-a -t 10.0.0.1:80 -r 10.1.0.2:80 -g -w 1\n"
             "-a -t 10.0.0.1:80 -r 10.1.0.1:80 -g -w 1\n")
    _run("-C")
    assert len(json.loads((state / "state.json.trash").read_text())["servers"]) == 2
    _run(stdin=saved, prog="ipvsadm-restore")
    assert _rids() == before
    _run(stdin=saved, prog="ipvsadm-restore")
    assert _rids() == before


def test_service_deleted_and_added_again_keeps_the_rids(state):
    before = _two_servers()
    _run("-D", *SVC)
    _run("-A", *SVC, "-s", "wlc")
    _run("-a", *SVC, "-r", "10.1.0.2", "-g")
    assert _rids() == {("10.0.0.1:80", "10.1.0.2:80"): before[("10.0.0.1:80", "10.1.0.2:80")]}


def test_another_service_does_not_take_a_removed_servers_rid(state):
    before = _two_servers()
    _run("-d", *SVC, "-r", "10.1.0.1")
    _run("-A", "-t", "10.0.0.2:80", "-s", "rr")
    _run("-a", "-t", "10.0.0.2:80", "-r", "10.1.0.1", "-g")
    assert _rids()[("10.0.0.2:80", "10.1.0.1:80")] not in before.values()


def test_once_its_flows_have_expired_a_server_is_new(state, monkeypatch):
    """The trash keeps a server as long as its flows may live (the longest
    --set timeout; persistence's if longer); then it is forgotten."""
    _run("--set", "30", "10", "20")
    before = _two_servers()
    _run("-d", *SVC, "-r", "10.1.0.1")
    later = time.time() + 31
    monkeypatch.setattr(time, "time", lambda: later)
    _run("-a", *SVC, "-r", "10.1.0.1", "-g")
    assert _rids()[("10.0.0.1:80", "10.1.0.1:80")] not in before.values()
    assert not (state / "state.json.trash").exists()


def test_a_damaged_trash_file_is_an_empty_trash(state):
    before = _two_servers()
    _run("-d", *SVC, "-r", "10.1.0.1")
    damaged = '{"servers": [["tcp4/10.0.0.1/80", 2, "10.1.0.1", 80, "x", 1e99], 7]}'
    (state / "state.json.trash").write_text(damaged)
    _run("-a", *SVC, "-r", "10.1.0.1", "-g")
    assert _rids()[("10.0.0.1:80", "10.1.0.1:80")] not in before.values()
