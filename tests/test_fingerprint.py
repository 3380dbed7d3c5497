"""The fingerprint of our tables (nft/fingerprint.py), issue 14.

A change to anyone else's table must not make ipvsadm verify ours (seconds
at 10,000 services); a hand on ours must change the fingerprint; and the
fingerprint ipvsadm brings up to date after each change of its own must be
the one a full read gives, or every foreign commit would cost a needless
verification.
"""

from __future__ import annotations

import subprocess

import pytest

from ipvs2nft.cli import ipvsadm as cli
from ipvs2nft.nft import fingerprint
from ipvs2nft.nft.backend import NftBackend, _nfnl
from ipvs2nft.store import Store
from tests import oracle
from tests.conftest import NETNS_SKIP
from tests.test_netbuild import CHANGES

pytestmark = [pytest.mark.netns]

BASE = b"""-A -t 10.0.0.21:80 -s rr
-a -t 10.0.0.21:80 -r 192.168.100.10:80 -m
-A -t 10.0.0.22:80 -s wrr -p 60
-a -t 10.0.0.22:80 -r 192.168.100.12:80 -g -w 2
"""


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    """A namespace of our own with BASE restored, the nft back end in-process."""
    if NETNS_SKIP:
        pytest.skip(NETNS_SKIP)
    monkeypatch.setenv("IPVS2NFT_STATE", str(tmp_path / "state.json"))
    monkeypatch.setenv("IPVS2NFT_BACKEND", "nft")
    with oracle.vm_like_netns(tmp_path):
        status, _, err = oracle.call(cli.restore_main, [], BASE, "ipvsadm-restore")
        assert status == 0, err
        yield


def _run(*argv: str) -> None:
    status, _, err = oracle.call(cli.main, list(argv), None, "ipvsadm")
    assert status == 0, err


def _nft(*args: str) -> None:
    subprocess.run(["nft", *args], check=True)


def test_our_changes_keep_the_fingerprint_exact(kernel):
    """After each command the recorded fingerprint is what a full read gives
    (ipvsadm brought it up to date from the chains it touched)."""
    assert Store().seen()[1] == fingerprint.take(_nfnl())
    for line in CHANGES:
        _run(*line.split())
        genid, recorded = Store().seen()
        assert recorded is not None, f"no fingerprint after {line}"
        assert recorded == fingerprint.take(_nfnl()), f"the fingerprint went wrong at {line}"


def test_a_change_elsewhere_is_not_verified(kernel, monkeypatch):
    verified = []
    monkeypatch.setattr(NftBackend, "verify", lambda self, snapshot: verified.append(1) or True)
    for change in (["add", "table", "inet", "foreign"], ["add", "chain", "inet", "foreign", "c"],
                   ["add", "rule", "inet", "foreign", "c", "counter"], ["flush", "table", "inet", "foreign"]):
        _nft(*change)
        _run("-L", "-n")
        _run("-a", "-t", "10.0.0.21:80", "-r", "192.168.100.11:80", "-m")
        _run("-d", "-t", "10.0.0.21:80", "-r", "192.168.100.11:80")
    assert verified == []


@pytest.mark.parametrize("drift", [
    ["add", "rule", "inet", "ipvs2nft", "svc_1", "counter"],
    ["flush", "chain", "inet", "ipvs2nft", "svc_2"],
    ["delete", "element", "inet", "ipvs2nft", "svc4", "{", "10.0.0.21", ".", "tcp", ".", "80", "}"],
    ["add", "element", "inet", "ipvs2nft", "nat4", "{", "9999", ":", "10.6.6.6", ".", "80", "}"],
    ["add", "chain", "ip", "ipvs2nft", "extra"],
    ["flush", "map", "ip", "ipvs2nft", "dslots"],
    ["delete", "table", "ip6", "ipvs2nft"],
])
def test_a_hand_on_ours_is_verified_and_repaired(kernel, drift):
    before = fingerprint.take(_nfnl())
    _nft(*drift)
    assert fingerprint.take(_nfnl()) != before
    _run("-L", "-n")
    store = Store()
    assert NftBackend(store).verify(store.read())
    assert store.seen()[1] == fingerprint.take(_nfnl())
