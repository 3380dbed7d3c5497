"""The benchmark's real server and load generator, and how to get the fast ones.

``netload.c`` is the real thing: a Python generator spends more CPU per
connection than the director's netfilter work, which would dilute every
data-plane ratio.  This module compiles it when a C compiler exists and
otherwise offers a Python stand-in with the same command line and output
(``python3 traffic.py serve PORT NAME`` / ``load SECONDS CONC SRCS DSTS``);
RESULTS.md says which one ran.
"""

from __future__ import annotations

import errno
import json
import select
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
IP_BIND_ADDRESS_NO_PORT = 24  # <linux/in.h>
CONN_TIMEOUT = 3.0
DRAIN_TIMEOUT = 4.0


def build(workdir: Path, use_cc: bool = True) -> tuple[list[str], str]:
    """(argv prefix of the server/generator, description).  C when a compiler exists."""
    cc = use_cc and (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"))
    if cc:
        exe = workdir / "netload"
        p = subprocess.run([cc, "-O2", "-o", str(exe), str(HERE / "netload.c")], capture_output=True,
                           text=True)
        if p.returncode == 0:
            return [str(exe)], f"bench/netload.c compiled with {Path(cc).name} -O2"
        print(f"bench: compiling netload.c failed, using the Python stand-in:\n{p.stderr}", file=sys.stderr)
    why = "no C compiler" if use_cc else "--no-cc"
    return [sys.executable, str(HERE / "traffic.py")], f"bench/traffic.py (the Python stand-in: {why})"


# ---------------------------------------------------------------- the Python stand-in

def serve(port: int, name: str) -> None:
    reply = (name + "\n").encode()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(4096)
    print("ready", flush=True)
    while True:
        try:
            c, _ = s.accept()
        except OSError:
            continue
        try:
            c.send(reply)
        except OSError:
            pass
        c.close()


def _open(srcs: list[str], dsts: list[tuple[str, int]], k: int) -> socket.socket | None:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    try:
        s.bind((srcs[k % len(srcs)], 0))
        rc = s.connect_ex(dsts[k % len(dsts)])
    except OSError:
        s.close()
        return None
    if rc not in (0, errno.EINPROGRESS):
        s.close()
        return None
    return s


def load(secs: float, conc: int, srcs: list[str], dsts: list[tuple[str, int]]) -> dict:
    """Same loop as netload.c: ``conc`` connections in flight, read one reply each, RST."""
    ep = select.epoll()
    live: dict[int, tuple[socket.socket, float]] = {}
    conns = errors = k = 0
    replies: dict[str, int] = {}
    t0, cpu0 = time.monotonic(), time.process_time()
    deadline = t0 + secs

    def start() -> None:
        nonlocal k, errors
        s = _open(srcs, dsts, k)
        k += 1
        if s is None:
            errors += 1
            return
        ep.register(s.fileno(), select.EPOLLIN)
        live[s.fileno()] = (s, time.monotonic())

    for _ in range(conc):
        start()
    last_scan = t0
    while live and time.monotonic() < deadline + DRAIN_TIMEOUT:
        for fd, _ev in ep.poll(0.1):
            s, _ = live.pop(fd)
            try:
                data = s.recv(128)
            except BlockingIOError:
                live[fd] = (s, _)
                continue
            except OSError:
                data = b""
            if data:
                conns += 1
                name = data.split(b"\n")[0].decode(errors="replace")
                replies[name] = replies.get(name, 0) + 1
            else:
                errors += 1
            ep.unregister(fd)
            s.close()
            if time.monotonic() < deadline:
                start()
        t = time.monotonic()
        if t - last_scan > 0.5:
            last_scan = t
            for fd, (s, started) in list(live.items()):
                if t - started > CONN_TIMEOUT:
                    del live[fd]
                    ep.unregister(fd)
                    s.close()
                    errors += 1
                    if t < deadline:
                        start()
    errors += len(live)
    return {"conns": conns, "errors": errors, "wall": time.monotonic() - t0,
            "cpu": time.process_time() - cpu0, "replies": replies}


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "serve":
        serve(int(argv[1]), argv[2])
        return 0
    if len(argv) == 5 and argv[0] == "load":
        dsts = [(d.rsplit(":", 1)[0], int(d.rsplit(":", 1)[1])) for d in argv[4].split(",")]
        print(json.dumps(load(float(argv[1]), int(argv[2]), argv[3].split(","), dsts)))
        return 0
    print("usage: traffic.py serve PORT NAME | traffic.py load SECONDS CONCURRENCY SRCS DSTS",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
