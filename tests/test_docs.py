"""Generated documents stay in step with the code that generates them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ipvs2nft import manpages
from ipvs2nft.ipvsadm.help import usage
from ipvs2nft.ipvsadm.options import COMMANDS, OPTIONS, VERSION_LINE

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", sorted(manpages.pages()))
def test_man_page_is_regenerated_unchanged(name, tmp_path):
    """man/*.8 are committed; regenerating them must give the same bytes."""
    pytest.importorskip("argparse_manpage")
    for include in (ROOT / "man").glob("*.include"):
        shutil.copy(include, tmp_path)
    assert manpages.render(name, tmp_path) == (ROOT / "man" / f"{name}.8").read_text(), (
        f"man/{name}.8 is stale: run `make man`")


def test_help_names_every_command_and_option():
    text = usage("ipvsadm")
    for spec in COMMANDS + OPTIONS:
        assert f"--{spec.long}" in text
        if spec.short:
            assert f"-{spec.short}" in text


def test_help_is_printed_with_status_0(state, capsys):
    from ipvs2nft.cli.ipvsadm import main

    assert main(["-h"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith(VERSION_LINE + "\n") and out.err == ""
