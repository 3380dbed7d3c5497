"""The ``ipvs2nft`` command (translation and daemon); filled in by the back-end work."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    sys.stderr.write("ipvs2nft: not implemented yet\n")
    return 2
