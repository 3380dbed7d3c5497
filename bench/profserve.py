"""Profile the daemon's side of one mutating call: ``profserve.py OUT DO... -- UNDO...``.

Runs ``daemon/mutate.carry_out`` in this process as the daemon would (a
store and a back end kept from call to call): ``DO`` and ``UNDO`` once to
warm it, as a running daemon is, then ``DO`` under cProfile, saved to OUT.
The caller undoes it.
"""

from __future__ import annotations

import cProfile
import os
import sys


class _Daemon:
    """What carry_out uses of daemon.main.Daemon."""

    def __init__(self) -> None:
        from ipvs2nft.store import Store

        self.store = Store()
        self.counters: dict[str, int] = {}
        self.sessions: list = []  # the sessions carry_out made (Daemon.absorb takes them in)


def main() -> None:
    out, *rest = sys.argv[1:]
    cut = rest.index("--")
    do, undo = rest[:cut], rest[cut + 1:]
    from ipvs2nft.daemon import mutate

    daemon = _Daemon()

    def request(args: list[str]) -> bytes:
        return mutate.REQUEST + "\0".join([os.path.abspath(daemon.store.path), "ipvsadm", *args]).encode()

    for args in (do, undo):
        mutate.carry_out(daemon, request(args))
    prof = cProfile.Profile()
    prof.enable()
    answer = mutate.carry_out(daemon, request(do))
    prof.disable()
    prof.dump_stats(out)
    if not answer or not answer.startswith(mutate.DONE):
        sys.exit(f"not carried out: {answer!r}")


if __name__ == "__main__":
    main()
