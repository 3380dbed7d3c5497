"""Whether this process may change the network configuration.

IPVS (and nf_tables) ask CAP_NET_ADMIN of every caller: without it ipvsadm
stops at ipvs_init() with "Permission denied (you must be root)".  Kept apart
and import-free because every ipvsadm command asks first.
"""

from __future__ import annotations

import os

CAP_NET_ADMIN = 12


def may_administer_network() -> bool:
    """True if CAP_NET_ADMIN is in this process's effective set."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError):
        pass
    return os.geteuid() == 0
