"""Crash safety (issue 5): kill -9 at every point of a mutating command.

``IPVS2NFT_FAULT=<point>`` makes the command SIGKILL itself before the
kernel transaction, after it, with the new state file written but not yet
renamed, and after the store.  Afterwards:

* the state file is valid JSON of the right schema and is exactly the old
  table (killed before the store) or exactly the new one (after it);
* ``ipvsadm -S -n`` works;
* after the next command the kernel table equals what the store says (a full
  build from the store, loaded into a scratch namespace, compared object by
  object), and each service sends to the real servers ``-S -n`` lists.
"""

from __future__ import annotations

import signal

import pytest

from ipvs2nft import faults
from tests.reliability_helpers import (
    Director,
    kernel_servers,
    module_director,
    no_traceback,
    saved_servers,
    store_document,
)

pytestmark = [pytest.mark.netns]

BASE = """\
-A -t 10.0.0.1:80 -s rr
-a -t 10.0.0.1:80 -r 192.168.100.10:80 -m
-a -t 10.0.0.1:80 -r 192.168.100.11:80 -m
-A -t 10.0.0.2:80 -s wrr
-a -t 10.0.0.2:80 -r 192.168.100.12:80 -m -w 3
-A -u 10.0.0.1:53 -s sh
-a -u 10.0.0.1:53 -r 192.168.100.13:53 -m
"""

# (name, program, arguments, stdin)
COMMANDS = [
    ("add-server", "ipvsadm", "-a -t 10.0.0.1:80 -r 192.168.100.14:80 -m -w 2", None),
    ("add-service", "ipvsadm", "-A -t 10.0.0.3:80 -s rr", None),
    ("delete-service", "ipvsadm", "-D -t 10.0.0.2:80", None),
    ("edit-service", "ipvsadm", "-E -t 10.0.0.1:80 -s wrr", None),
    ("restore-R", "ipvsadm", "-R",
     "-A -t 10.0.0.4:80 -s rr\n-a -t 10.0.0.4:80 -r 192.168.100.15:80 -m\n"
     "-d -t 10.0.0.1:80 -r 192.168.100.10:80\n"),
    ("ipvsadm-restore", "ipvsadm-restore", "",
     "-A -t 10.0.0.5:443 -s wrr\n-a -t 10.0.0.5:443 -r 192.168.100.16:443 -m -w 2\n"),
    ("set-timeouts", "ipvsadm", "--set 100 20 30", None),  # a full rebuild, not incremental
]
NEXT = "-A -t 10.0.0.9:80 -s rr"  # the next command: touches none of the services above


@pytest.fixture(scope="module")
def director(tmp_path_factory):
    yield from module_director(tmp_path_factory, "crs")


def _setup(director: Director) -> str:
    director.reset()
    director.restore(BASE)
    return director.save()


_AFTER: dict[str, str] = {}


def _expected_after(director: Director, name, prog, args, stdin) -> str:
    """What -S -n shows after the command ran without a crash (store only)."""
    if name not in _AFTER:
        _setup(director)
        director.ipvsadm(args, stdin=stdin, prog=prog, check=True, IPVS2NFT_BACKEND="none")
        _AFTER[name] = director.ipvsadm("-S -n", check=True, IPVS2NFT_BACKEND="none").stdout
    return _AFTER[name]


def _check_consistent(director: Director) -> None:
    store_document(director.state)
    diff = director.kernel_equals_store()
    assert diff is None, diff
    assert kernel_servers(director.table_json()) == saved_servers(director.save())


@pytest.mark.parametrize("point", faults.POINTS)
@pytest.mark.parametrize("name,prog,args,stdin", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_kill_at_fault_point_then_next_command_repairs(director, point, name, prog, args, stdin):
    after = _expected_after(director, name, prog, args, stdin)
    before = _setup(director)

    killed = director.ipvsadm(args, stdin=stdin, prog=prog, IPVS2NFT_FAULT=point)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr)

    # the store is valid and is either the old or the new table, never a mix:
    # the old one if the kernel was not reached, the new one once the store
    # was written, either in between (roll back or roll forward)
    store_document(director.state)
    listing = director.ipvsadm("-S -n")
    assert listing.returncode == 0 and no_traceback(listing.stderr), listing.stderr
    allowed = {"before-kernel": [before], "after-store": [after]}.get(point, [before, after])
    assert listing.stdout in allowed, f"neither the old nor the new table:\n{listing.stdout}"

    nxt = director.ipvsadm(NEXT)
    assert nxt.returncode == 0, nxt.stderr
    _check_consistent(director)


def test_no_fault_baseline_is_consistent(director):
    """The oracle itself: without a crash every command leaves kernel == store."""
    _setup(director)
    _check_consistent(director)
    for _, prog, args, stdin in COMMANDS:
        director.ipvsadm(args, stdin=stdin, prog=prog, check=True)
        _check_consistent(director)


@pytest.mark.parametrize("name,prog,args,stdin", COMMANDS[:3], ids=[c[0] for c in COMMANDS[:3]])
def test_listing_after_crash_shows_what_the_kernel_does(director, name, prog, args, stdin):
    """Killed between the kernel and the store, then only a listing (a health
    checker's ``-L -n``): what it shows must be what the kernel does."""
    _setup(director)
    director.ipvsadm(args, stdin=stdin, prog=prog, IPVS2NFT_FAULT="after-kernel")
    listing = director.ipvsadm("-L -n")
    assert listing.returncode == 0, listing.stderr
    diff = director.kernel_equals_store()
    assert diff is None, diff


def test_repeated_crashes_then_recovery(director):
    """Several commands in a row all die after the kernel transaction."""
    _setup(director)
    for i in range(4):
        p = director.ipvsadm(f"-a -t 10.0.0.1:80 -r 192.168.100.{20 + i}:80 -m",
                             IPVS2NFT_FAULT="after-kernel")
        assert p.returncode == -signal.SIGKILL
    director.ipvsadm("-a -t 10.0.0.1:80 -r 192.168.100.30:80 -m", check=True)
    _check_consistent(director)
    servers = saved_servers(director.save())["-t 10.0.0.1:80"]
    keep = {"192.168.100.10:80", "192.168.100.11:80", "192.168.100.30:80"}
    assert keep <= servers <= keep | {f"192.168.100.{20 + i}:80" for i in range(4)}, servers


def test_killed_before_rename_leaves_no_temporary_files_behind(director):
    """A temporary state file of a killed command is cleaned up by the next one."""
    _setup(director)
    for _ in range(3):
        director.ipvsadm("-a -t 10.0.0.1:80 -r 192.168.100.40:80 -m", IPVS2NFT_FAULT="before-rename")
    director.ipvsadm("-a -t 10.0.0.1:80 -r 192.168.100.41:80 -m", check=True)
    left = sorted(p.name for p in director.state_dir.iterdir() if p.name.startswith(".state-"))
    assert not left, left
