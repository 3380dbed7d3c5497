"""Run a console script under cProfile and save the profile: ``profcmd.py OUT SCRIPT ARGS...``.

``python -m cProfile -o`` writes nothing for our console scripts, which
leave with ``os._exit`` (no interpreter teardown); this wrapper saves the
profile on that path too.
"""

from __future__ import annotations

import cProfile
import os
import runpy
import sys


def main() -> None:
    out, script, *args = sys.argv[1:]
    prof = cProfile.Profile()
    real_exit = os._exit

    def save_and_exit(code: int) -> None:
        prof.disable()
        prof.dump_stats(out)
        real_exit(code)

    os._exit = save_and_exit
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as if the script were run directly
    prof.enable()
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        prof.disable()
        prof.dump_stats(out)


if __name__ == "__main__":
    main()
