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
from ipvs2nft.nft import build, check
from tests import oracle
from tests.conftest import NETNS_SKIP

ALL = sorted(p.name for p in oracle.FIXTURES.glob("*.jsonl"))


def _script(records, tmp_path) -> str:
    """What ``ipvs2nft translate`` prints for the commands ipvsadm took.
    Replayed out of their context (an empty argument lost in the join, a
    command that relied on a ``!`` line) a few fail: translate must then
    name each one's line; those lines are dropped and it runs again."""
    lines = ["-C" if r["kind"] == "reset" else " ".join(r["argv"]) for r in records
             if r["kind"] == "reset" or (r["kind"] == "ipvsadm" and r["rc"] == 0 and r["argv"]
                                         and r["argv"][0] not in ("-R", "--restore"))]
    path = tmp_path / "rules"
    for _ in range(5):
        path.write_text("\n".join(lines) + "\n")
        status, out, err = oracle.call(cli.main, ["translate", str(path)], None, "ipvs2nft")
        if status == 0:
            return out
        assert status == 2 and out == "" and err, (status, err)
        bad = {int(m.group(1)) for m in re.finditer(r"^ipvs2nft: line (\d+): ", err, re.M)}
        assert len(bad) == len(err.splitlines()), err
        lines = [line for n, line in enumerate(lines, 1) if n not in bad]
    raise AssertionError(err)


@pytest.mark.skipif(bool(NETNS_SKIP), reason=str(NETNS_SKIP))
@pytest.mark.parametrize("name", ALL)
def test_fixture_translation_passes_kernel_dry_run(name, tmp_path):
    """Checked here by libnftables itself, not by translate's own nft -c."""
    import nftables

    text = _script(oracle.load(name), tmp_path)
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


def _sabotage(monkeypatch, port: int) -> None:
    """The builder writes a rule nft refuses for services on ``port``."""
    real = build._scheduler_rule

    def bad(svc, slots):
        return "counter goto nosuchchain" if svc.port == port else real(svc, slots)

    monkeypatch.setattr(build, "_scheduler_rule", bad)


@pytest.mark.skipif(bool(NETNS_SKIP), reason=str(NETNS_SKIP))
def test_a_script_nft_refuses_is_an_error_naming_the_input_line(tmp_path, capsys, monkeypatch):
    """Never a script nft refuses with exit 0: translate checks with nft -c
    and names the line that brought the refused part in (the -a that gave
    the service on port 8080 its first server, line 4)."""
    _sabotage(monkeypatch, 8080)
    src = tmp_path / "rules"
    src.write_text("-A -t 10.0.0.1:80 -s rr\n-A -t 10.0.0.1:8080 -s rr\n-a -t 10.0.0.1:80 -r 10.0.1.1 -m\n"
                   "-a -t 10.0.0.1:8080 -r 10.0.1.1 -m\n-a -t 10.0.0.1:80 -r 10.0.1.2 -m\n")
    assert cli.main(["translate", str(src)]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert re.fullmatch(r"ipvs2nft: line 4: nftables refuses the translation \(script line \d+: "
                        r"Could not process rule: No such file or directory\)\n", out.err), out.err


def test_an_unchecked_script_is_a_warning_and_fails_strict(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(check, "check", lambda script: check.Verdict(False, unchecked="no namespaces here"))
    src = tmp_path / "rules"
    src.write_text("-A -t 10.0.0.1:80 -s rr\n")
    assert cli.main(["translate", str(src)]) == 0
    out = capsys.readouterr()
    assert out.out
    assert out.err == "ipvs2nft: warning: the script was not checked with nft -c (no namespaces here)\n"
    assert cli.main(["translate", "--strict", str(src)]) == 3


def test_warnings_end_with_a_newline(capsys):
    """Each warning is one whole line on stderr (the tunnel devices' too)."""
    assert cli.main(["translate", str(oracle.FIXTURES.parent / "tunnel-rules")]) == 0
    err = capsys.readouterr().err
    assert err.endswith("\n") and all(line.startswith("ipvs2nft: warning: ") for line in err.splitlines())
