"""Crash points for testing crash safety.

``IPVS2NFT_FAULT=<point>`` makes the process kill itself with SIGKILL when
it reaches that point of a change: ``before-kernel``, ``after-kernel``
(the nftables transaction is applied, the state file not yet written),
``before-rename`` (the new state file is written but not yet in place) and
``after-store``.  Unset (always, outside tests) it costs one dict lookup.
"""

from __future__ import annotations

import os

POINTS = ("before-kernel", "after-kernel", "before-rename", "after-store")


def point(name: str) -> None:
    if os.environ.get("IPVS2NFT_FAULT") == name:
        import signal  # only here: every change passes these points

        os.kill(os.getpid(), signal.SIGKILL)
