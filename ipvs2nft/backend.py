"""The back-end interface: what the CLI asks of the kernel side.

``open_backend`` picks the implementation.  ``none`` keeps only the store
(translation and tests without root); ``nft`` programs nftables through
libnftables (``ipvs2nft.nft``), the only code that imports ``nftables``.
"""

from __future__ import annotations

import os

from ipvs2nft.listing import ConnRow, Counters
from ipvs2nft.model import Service, Table


class Backend:
    """Does nothing: the state file is the whole table."""

    name = "none"

    def apply(self, old: Table, new: Table, full: bool) -> None:
        """Make the kernel follow ``new`` (``old`` is what it follows now).

        ``full``: ``old`` is the whole table; otherwise it holds only the
        services this change touches.  One transaction; raise BackendError
        and change nothing if the kernel refuses.
        """

    def counters(self) -> Counters:
        return Counters()

    def connections(self, table: Table) -> list[ConnRow]:
        return []

    def zero(self, services: list[Service]) -> None:
        """Reset the counters of these services and their real servers."""


def open_backend(store) -> Backend:
    """The back end named by ``IPVS2NFT_BACKEND`` (``nft`` by default)."""
    kind = os.environ.get("IPVS2NFT_BACKEND", "none")
    if kind == "none":
        return Backend()
    from ipvs2nft.nft.backend import NftBackend

    return NftBackend(store)
