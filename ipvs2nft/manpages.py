"""Write the man pages under man/ from the argparse parsers.

``python -m ipvs2nft.manpages man`` (what ``make man`` runs) regenerates
man/ipvsadm.8, man/ipvsadm-save.8, man/ipvsadm-restore.8 and man/ipvs2nft.8
with argparse-manpage: SYNOPSIS and OPTIONS come from the parsers, the prose
from man/*.include.  SOURCE_DATE_EPOCH is fixed so the output is
reproducible; a test regenerates the pages and fails if they differ from the
committed ones.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ipvs2nft import __version__

RELEASE_EPOCH = "1795824000"  # 2026-11-28, the date the pages describe


def _save_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ipvsadm-save", add_help=False,
                                 description="Save the IPVS table to standard output.")
    ap.add_argument("-n", action="store_true", help="print addresses and ports as numbers")
    return ap


def _restore_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog="ipvsadm-restore", add_help=False,
                                   description="Restore the IPVS table from standard input.")


def pages() -> dict[str, tuple[argparse.ArgumentParser, str]]:
    """page name -> (parser, one-line description)."""
    from ipvs2nft.cli.ipvs2nft import build_parser as ipvs2nft_parser
    from ipvs2nft.ipvsadm.options import build_parser as ipvsadm_parser

    return {
        "ipvsadm": (ipvsadm_parser(), "Linux Virtual Server administration, carried out with nftables"),
        "ipvsadm-save": (_save_parser(), "save the IPVS table (ipvs2nft)"),
        "ipvsadm-restore": (_restore_parser(), "restore the IPVS table (ipvs2nft)"),
        "ipvs2nft": (ipvs2nft_parser(), "translate LVS and iptables load balancing to nftables"),
    }


def render(name: str, directory: Path) -> str:
    from argparse_manpage.manpage import Manpage

    parser, description = pages()[name]
    include = directory / f"{name}.8.include"
    data = {
        "prog": name, "project_name": "ipvs2nft", "version": __version__,
        "description": description, "manual_section": "8",
        "manual_title": "System Manager's Manual", "url": None, "authors": None,
        "long_description": None, "include": str(include) if include.exists() else None,
        "manfile": None, "format": "pretty",
    }
    saved = os.environ.get("SOURCE_DATE_EPOCH")
    os.environ["SOURCE_DATE_EPOCH"] = RELEASE_EPOCH
    try:
        return str(Manpage(parser, _data=data, format="pretty"))
    finally:
        if saved is None:
            os.environ.pop("SOURCE_DATE_EPOCH", None)
        else:
            os.environ["SOURCE_DATE_EPOCH"] = saved


def main(argv: list[str]) -> int:
    directory = Path(argv[0] if argv else "man")
    for name in pages():
        (directory / f"{name}.8").write_text(render(name, directory))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
