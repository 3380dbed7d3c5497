"""Disk full and read-only state directory (issue 5).

The state directory is a 16 KiB tmpfs filled to the last byte, or a
read-only bind mount.  A mutating command must then give a clear error, a
non-zero status, no traceback, and change neither the state file nor the
kernel table; reading commands keep working.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from tests.reliability_helpers import Director, netns_skip, no_traceback

pytestmark = [pytest.mark.netns]

BASE = """\
-A -t 10.0.0.1:80 -s rr
-a -t 10.0.0.1:80 -r 192.168.100.10:80 -m
"""
MUTATIONS = [
    ("add-server", "ipvsadm", "-a -t 10.0.0.1:80 -r 192.168.100.11:80 -m", None),
    ("add-service", "ipvsadm", "-A -t 10.0.0.2:80 -s wrr", None),
    ("delete-service", "ipvsadm", "-D -t 10.0.0.1:80", None),
    ("flush", "ipvsadm", "-C", None),
    ("set", "ipvsadm", "--set 10 20 30", None),
    ("R", "ipvsadm", "-R", "-A -t 10.0.0.3:80 -s rr\n"),
    ("restore", "ipvsadm-restore", "", "-A -t 10.0.0.4:80 -s rr\n"),
]


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


def _umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(directory: Path) -> None:
    """Write until ENOSPC."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 512)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)


@pytest.fixture
def full_director(tmp_path):
    """A director whose state directory is a full 16 KiB tmpfs."""
    if netns_skip():
        pytest.skip(netns_skip())
    mnt = tmp_path / "run"
    mnt.mkdir()
    _mount("-t", "tmpfs", "-o", "size=16k,mode=0700", "tmpfs", str(mnt))
    try:
        with Director(mnt, tag="dfl") as d:
            d.restore(BASE)
            _fill(mnt)
            yield d
    finally:
        _umount(mnt)


@pytest.fixture
def ro_director(tmp_path):
    """A director whose state directory became a read-only bind mount."""
    if netns_skip():
        pytest.skip(netns_skip())
    state = tmp_path / "run"
    state.mkdir(mode=0o700)
    with Director(state, tag="dro") as d:
        d.restore(BASE)
        _mount("--bind", str(state), str(state))
        try:
            _mount("-o", "remount,bind,ro", str(state))
            yield d
        finally:
            _umount(state)


def _check_refused(d: Director, prog: str, args: str, stdin: str | None, wording: str) -> None:
    state, table = d.state_bytes(), d.table_text()
    p = d.ipvsadm(args, stdin=stdin, prog=prog)
    assert p.returncode != 0, "a mutation succeeded without a store"
    assert p.returncode in (2, 4), p.returncode
    assert no_traceback(p.stderr), p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and wording in lines[0], p.stderr
    assert d.state_bytes() == state, "the state file changed"
    assert d.table_text() == table, "the kernel table changed although the command failed"
    assert d.kernel_equals_store() is None


@pytest.mark.parametrize("name,prog,args,stdin", [pytest.param(*m, id=m[0]) for m in MUTATIONS])
def test_disk_full_changes_nothing(full_director, name, prog, args, stdin):
    _check_refused(full_director, prog, args, stdin, "No space left on device")


@pytest.mark.parametrize("name,prog,args,stdin", [pytest.param(*m, id=m[0]) for m in MUTATIONS])
def test_read_only_state_directory_changes_nothing(ro_director, name, prog, args, stdin):
    _check_refused(ro_director, prog, args, stdin, "Read-only file system")


def test_reading_still_works_when_full_or_read_only(full_director):
    for args in ("-L -n", "-S -n", "-L --timeout"):
        p = full_director.ipvsadm(args)
        assert p.returncode == 0 and p.stderr == "", (args, p.stderr)
    assert "-a -t 10.0.0.1:80 -r 192.168.100.10:80 -m -w 1" in full_director.save()


def test_space_freed_then_commands_work_again(full_director):
    """After the disk is full (and whatever a failed command left), freeing
    space makes the next command work and kernel == store."""
    full_director.ipvsadm("-a -t 10.0.0.1:80 -r 192.168.100.11:80 -m")
    (full_director.state_dir / "filler").unlink()
    p = full_director.ipvsadm("-a -t 10.0.0.1:80 -r 192.168.100.12:80 -m")
    assert p.returncode == 0, p.stderr
    assert full_director.kernel_equals_store() is None
    assert not [q.name for q in full_director.state_dir.iterdir() if q.name.startswith(".state-")]
