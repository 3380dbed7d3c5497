"""The oracle fixtures replayed through the nftables back end.

tests/test_oracle_fixtures.py replays every record of the real ipvsadm with
the store only, which never touches nftables.  Here the fixtures that change
the table most replay with ``IPVS2NFT_BACKEND=nft`` in a throw-away
namespace: every answer must still be ipvsadm's, byte for byte, and after
every command the kernel's tables must be exactly what the store says
(``NftBackend.verify``: the store's script loaded in a scratch namespace and
both listings compared) -- a command nft refuses, or one that leaves the
kernel behind the store, fails here.
"""

from __future__ import annotations

import pytest

from ipvs2nft.nft.backend import NftBackend
from ipvs2nft.store import Store
from tests import oracle
from tests.conftest import NETNS_SKIP

pytestmark = [pytest.mark.netns, pytest.mark.oracle]

# Every record of these (about 450 commands, every kind of change), the
# table checked against the kernel after each one that succeeded.
SAMPLE = ["golden-basic.jsonl", "edit-semantics.jsonl", "save-restore.jsonl"]
CHANGES = {"-A", "-E", "-D", "-a", "-e", "-d", "-C", "-R", "--set", "--add-service", "--edit-service",
           "--delete-service", "--add-server", "--edit-server", "--delete-server", "--clear", "--restore"}


def _changed(record: dict) -> bool:
    argv = record.get("argv") or []
    return record["rc"] == 0 and (record["kind"] != "ipvsadm" or any(a in CHANGES for a in argv[:1]))


@pytest.mark.parametrize("name", SAMPLE)
def test_fixture_through_the_nftables_back_end(name, tmp_path):
    if NETNS_SKIP:
        pytest.skip(NETNS_SKIP)
    records = oracle.load(name)
    drifted: list[str] = []

    def kernel_follows(record: dict) -> None:
        if not _changed(record):
            return
        store = Store()
        snapshot = store.read()
        if not NftBackend(store).verify(snapshot):
            drifted.append(f"line {record['line']}: {record['cmd']}")

    with oracle.vm_like_netns(tmp_path) as isolated:
        assert isolated
        outcomes = oracle.replay(records, tmp_path, backend="nft", after=kernel_follows)
    assert len(outcomes) > 100
    bad = [oracle.describe(o) for o in outcomes if not o.matches()]
    assert not bad, f"{len(bad)} of {len(outcomes)} records differ:\n" + "\n".join(bad[:20])
    assert not drifted, "the kernel is not what the store says after:\n" + "\n".join(drifted[:20])


def test_verify_tells_an_intact_table_from_a_changed_one(tmp_path, monkeypatch):
    """The comparison the test above relies on can say no."""
    if NETNS_SKIP:
        pytest.skip(NETNS_SKIP)
    import subprocess

    from ipvs2nft.cli import ipvsadm as cli

    monkeypatch.setenv("IPVS2NFT_STATE", str(tmp_path / "state.json"))
    monkeypatch.setenv("IPVS2NFT_BACKEND", "nft")
    with oracle.vm_like_netns(tmp_path):
        status, _, err = oracle.call(cli.restore_main, [],
                                     b"-A -t 10.0.0.1:80 -s rr\n-a -t 10.0.0.1:80 -r 10.0.1.1 -m\n",
                                     "ipvsadm-restore")
        assert status == 0, err
        store = Store()
        assert NftBackend(store).verify(store.read())
        subprocess.run(["nft", "add", "rule", "inet", "ipvs2nft", "svc_1", "counter", "accept"], check=True)
        assert not NftBackend(store).verify(store.read())
