"""Namespace labs for the benchmark: ipvs2nft.lab with faster real servers, and a
timing helper inside a director.

Every lab takes a unique prefix (``unique_prefix``) and is registered on an
ExitStack by the caller, so its namespaces, processes and state directory go
away on success, failure and Ctrl-C alike.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from ipvs2nft.lab import Lab, rs4, unique_prefix

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent  # the venv's console scripts


@dataclass
class BenchLab(Lab):
    """ipvs2nft.lab's topology; each real server runs ``server_cmd serve 80 <its address>``
    (netload.c), which costs far less per connection than the lab's threaded Python server."""

    server_cmd: list[str] = field(default_factory=list)

    def start_server(self, i: int) -> None:
        cmd = ["ip", "netns", "exec", self.rs(i), *self.server_cmd, "serve", "80", rs4(i)]
        self.procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))

    def server_pids(self) -> list[int]:
        """``ip netns exec`` execs the command, so the Popen pid is the server's."""
        return [p.pid for p in self.procs]


def tmpfs() -> str | None:
    """A tmpfs directory for the state files: ipvs2nft keeps its state in /run/ipvs2nft,
    a tmpfs on Debian (not on every VM: here the whole tree may be one ext4 disk, where
    each change would also wait for fsync and discard)."""
    mounts = {}
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        mounts[fields[1]] = fields[2]
    return next((d for d in ("/run", "/dev/shm") if mounts.get(d) == "tmpfs"), None)


def disk() -> tuple[str, str]:
    """(directory, file system) for state files on a disk rather than tmpfs:
    the system temporary directory if it is on one, else this project's."""
    mounts = []
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        mounts.append((fields[1], fields[2]))
    for candidate in (tempfile.gettempdir(), str(HERE.parent)):
        where = max((m for m in mounts if candidate == m[0] or candidate.startswith(m[0].rstrip("/") + "/")),
                    key=lambda m: len(m[0]))
        if where[1] not in ("tmpfs", "ramfs"):
            return candidate, where[1]
    return tempfile.gettempdir(), "tmpfs"


def open_lab(stack: ExitStack, tag: str, servers: int, server_cmd: list[str] | None = None,
             state_in: str | None = None) -> BenchLab:
    """A built lab whose removal is registered on ``stack``; its own state
    directory (on tmpfs unless ``state_in`` names where)."""
    where = state_in or tmpfs()
    state = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ipvs2nft-bench-", dir=where)))
    lab = BenchLab(unique_prefix(tag), servers=servers, state_dir=state, server_cmd=server_cmd or [])
    stack.enter_context(lab)
    # Wide tuple space for the client: every connection must be new to conntrack.
    lab.sh(lab.client, "sysctl -qw net.ipv4.ip_local_port_range='1024 65535'")
    return lab


class Runner:
    """bench/runner.py inside a lab's director: times whole processes there."""

    def __init__(self, stack: ExitStack, lab: BenchLab) -> None:
        self.lab = lab
        self.env = lab.env()
        argv = ["ip", "netns", "exec", lab.director, sys.executable, str(HERE / "runner.py")]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        stack.callback(self.close)

    def run(self, argv: list[str], stdin: Path | None = None, keep: bool = False, check: bool = True,
            env: dict[str, str] | None = None) -> dict:
        """Run ``argv`` in the director; {"rc", "wall", "cpu", "out", "err"}."""
        req = {"argv": argv, "env": env or self.env, "stdin": str(stdin) if stdin else None, "keep": keep}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        if check and answer["rc"] != 0:
            raise RuntimeError(f"{' '.join(argv)} failed in {self.lab.director} ({answer['rc']}): "
                               f"{answer['err']}")
        return answer

    def ipvsadm(self, args: list[str], prog: str = "ipvsadm", **kw) -> dict:
        return self.run([str(BIN / prog), *args], **kw)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
