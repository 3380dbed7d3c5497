"""The back-end interface: what the CLI asks of the kernel side.

``open_backend`` picks the implementation.  ``none`` keeps only the store
(translation and tests without root); ``nft`` programs nftables through
libnftables (``ipvs2nft.nft``), the only code that imports ``nftables``.
"""

from __future__ import annotations

import os

from ipvs2nft.model import Service, Table

if False:  # typing.TYPE_CHECKING: listing is imported only by the commands that list
    from ipvs2nft.listing import ConnRow, Counters


class Backend:
    """Does nothing: the state file is the whole table."""

    checks = False  # nothing in a kernel to check against the store

    def observe(self, table: Table, services: list[Service]) -> Table:
        """``table`` with the scheduler state of ``services`` brought up to
        date with what the kernel scheduled since it was last written."""
        return table

    def apply(self, old, new) -> None:
        """Make the kernel follow snapshot ``new`` (it follows ``old`` now).

        A partial snapshot holds only the services the change touches.  One
        transaction; raise BackendError and change nothing if the kernel refuses.
        """

    def generation(self) -> int | None:
        """The store generation the kernel's tables were last written for."""
        return None

    def ruleset_genid(self) -> int | None:
        """The kernel's nftables ruleset generation id (changes with any commit)."""
        return None

    def fingerprint(self) -> dict | None:
        """A fingerprint of our kernel tables (nft/fingerprint.py), None if
        there is none to take."""
        return None

    def seal(self, verified: bool = False) -> tuple[int | None, dict | None]:
        """(ruleset generation id, fingerprint) to record after a change of
        ours or a repair (``verified``)."""
        return None, None

    def verify(self, snapshot) -> bool:
        """True if our kernel tables are exactly what ``snapshot`` describes."""
        return True

    def rebuild(self, table: Table, generation: int) -> None:
        """Replace our kernel tables by ``table`` in one transaction."""

    def counters(self, table: Table) -> Counters:
        """What the data plane counted for the services of ``table``."""
        from ipvs2nft.listing import Counters

        return Counters()

    def connections(self, table: Table) -> list[ConnRow]:
        return []

    def zero(self, services: list[Service]) -> None:
        """Reset the counters of these services and their real servers."""


def open_backend(store) -> Backend:
    """The back end named by ``IPVS2NFT_BACKEND`` (``nft`` by default)."""
    kind = os.environ.get("IPVS2NFT_BACKEND", "nft")
    if kind == "none":
        return Backend()
    from ipvs2nft.nft.backend import NftBackend

    return NftBackend(store)
