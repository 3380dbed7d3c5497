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


def test_compat_matrix_names_every_command_and_option():
    """compat-matrix.md has a row for each ipvsadm command and option (by its
    short form where it has one, else its long form), and every scheduler."""
    from ipvs2nft.dynsched import LIVE
    from ipvs2nft.ipvsadm.options import COMMANDS, OPTIONS

    text = (Path(__file__).resolve().parent.parent / "compat-matrix.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("|")]
    missing = []
    for spec in (*COMMANDS, *OPTIONS):
        forms = ([f"`-{spec.short}`", f"`-{spec.short} ", f"/ `-{spec.short}", f"-{spec.short}`"]
                 if spec.short else []) + [f"--{spec.long}"]
        if not any(form in row for row in rows for form in forms):
            missing.append(spec.long)
    for name in ("rr", "wrr", "sh", "dh", "mh", "fo", *sorted(LIVE)):
        if not any(f"`{name}`" in row for row in rows):
            missing.append(name)
    assert not missing, missing


def test_compat_matrix_names_only_tests_that_exist():
    """Every test the matrix cites as proof is a test function or module."""
    import re

    root = Path(__file__).resolve().parent.parent
    text = (root / "compat-matrix.md").read_text()
    sources = "\n".join(p.read_text() for p in (root / "tests").glob("test_*.py"))
    modules = {p.stem for p in (root / "tests").glob("test_*.py")}
    cited = set(re.findall(r"\btest_[a-z0-9_]+", text))
    missing = sorted(n for n in cited if not n.endswith("_")  # test_traffic_*: a family of modules
                     and n not in modules and f"def {n}(" not in sources)
    assert not missing, missing
