"""ipvs2nft: Linux Virtual Server administration (ipvsadm) on nftables.

Kept import-free on purpose: every ipvsadm call is a new process, and what this
module imports is paid on each one (see ../shared/reference/nftables-at-scale.md).
"""

__version__ = "0.1.0"
