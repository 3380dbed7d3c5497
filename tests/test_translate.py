"""``ipvs2nft translate``: ipvsadm lines in, a complete nft script out.

Every fixture's ipvsadm commands are translated and the script is checked
by the kernel through libnftables in dry-run mode (nothing is committed), in
a namespace of its own.  The CLI contract (no root, no store, errors with
line numbers, warnings on stderr) is checked without the kernel.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from ipvs2nft.cli import ipvs2nft as cli
from ipvs2nft.cli.ipvs2nft import translate_ipvsadm
from ipvs2nft.nft import build
from ipvs2nft.store import Snapshot, Store
from tests import oracle
from tests.conftest import NETNS_SKIP

ALL = sorted(p.name for p in oracle.FIXTURES.glob("*.jsonl"))


def _script(records) -> str:
    lines = [" ".join(r["argv"]) for r in records if r["kind"] == "ipvsadm" and r["rc"] == 0
             and r["argv"] and r["argv"][0] not in ("-R", "--restore")]
    table, _, _ = translate_ipvsadm("\n".join(lines).encode())
    prepared = Store("/nonexistent/x").prepare(Snapshot(table.copy()), table)
    return build.full(prepared.table, generation=1).text()


@pytest.mark.skipif(bool(NETNS_SKIP), reason=str(NETNS_SKIP))
@pytest.mark.parametrize("name", ALL)
def test_fixture_translation_passes_kernel_dry_run(name, tmp_path):
    import nftables

    text = _script(oracle.load(name))
    with oracle.vm_like_netns(tmp_path):
        # tunnel devices are made by the back end before the transaction;
        # this host kernel has no ipip (nor dummy), so veth ends stand in
        for n, device in enumerate(sorted(set(re.findall(r'device "(i2n\d+)"', text)))):
            subprocess.run(["ip", "link", "add", device, "type", "veth", "peer", "name", f"x{n}"],
                           check=True)
        nft = nftables.Nftables()
        nft.set_dry_run(True)
        rc, _, err = nft.cmd(text)
    assert rc == 0, err


def test_translate_needs_no_root_no_store(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("IPVS2NFT_STATE", str(tmp_path / "nope" / "state.json"))
    src = tmp_path / "rules"
    src.write_text("# comment\n\nipvsadm -A -t 10.0.0.1:80 -s rr\n-a -t 10.0.0.1:80 -r 10.0.1.1 -m\n"
                   "-A -t 10.0.0.2:80 -s wlc\n")
    assert cli.main(["translate", str(src)]) == 0
    out = capsys.readouterr()
    assert "add element inet ipvs2nft svc4 { 10.0.0.1 . tcp . 80 : goto svc_1" in out.out
    assert "wlc needs live connection counts" in out.err
    assert not (tmp_path / "nope").exists()


def test_translate_reports_bad_lines_with_numbers(tmp_path, capsys):
    src = tmp_path / "rules"
    src.write_text("-A -t 10.0.0.1:80 -s rr\n-a -t 10.0.0.1:80 -r 10.0.1.1 -m -w -3\n-A -t 10.0.0.1\n")
    assert cli.main(["translate", str(src)]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == ("ipvs2nft: line 2: illegal weight specified\n"
                       "ipvs2nft: line 3: Zero port specified for non-persistent service\n")
