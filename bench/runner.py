"""A timing helper that lives inside one namespace (started with ``ip netns exec``).

Control-plane costs are whole processes (what a script calling ipvsadm
waits for), timed from the moment a small parent spawns them until they
exit.  Spawning them from this helper, already inside the director
namespace, keeps ``ip netns exec``'s own set-up (a mount namespace, a
sysfs remount: milliseconds) out of every measurement, and forks from a
small process rather than from the benchmark.

Protocol: one JSON request per line on stdin, ``{"argv": [...], "env":
{...}, "stdin": path or null, "keep": bool}``; one JSON answer per line:
``{"rc", "wall", "cpu", "out", "err"}`` (wall and CPU seconds of the child;
``out``, and all of ``err``, only with ``keep``).  Standard library only.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run(req: dict) -> dict:
    stdin = open(req["stdin"], "rb") if req.get("stdin") else subprocess.DEVNULL
    try:
        cpu0 = _children_cpu()
        t0 = time.perf_counter()
        p = subprocess.Popen(req["argv"], stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=req.get("env"))
        out, err = p.communicate()
        wall = time.perf_counter() - t0
        cpu = _children_cpu() - cpu0
    finally:
        if stdin is not subprocess.DEVNULL:
            stdin.close()
    return {"rc": p.returncode, "wall": wall, "cpu": cpu,
            "out": out.decode(errors="replace") if req.get("keep") else len(out),
            "err": err.decode(errors="replace")[None if req.get("keep") else -2000:]}


def main() -> int:
    for line in sys.stdin:
        try:
            answer = run(json.loads(line))
        except OSError as exc:
            answer = {"rc": -1, "wall": 0.0, "cpu": 0.0, "out": "", "err": str(exc)}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
