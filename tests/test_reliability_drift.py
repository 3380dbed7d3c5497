"""Drift (issue 5): someone changed our table behind ipvsadm's back.

``nft flush ruleset``, ``nft delete table inet ipvs2nft``, a rule added by
hand inside our table, an element deleted or added by hand: the next
ipvsadm command must notice and rebuild from the store, so that afterwards
the kernel table equals what the store says.  ``ipvsadm-restore`` after a
reboot (empty /run: no state file, not even its directory) works.

Without the daemon a command notices through our tables' fingerprint
(nft/fingerprint.py), which cannot see an element's value replaced under
the same key: that drift is repaired by the next command that rewrites the
service, and at once by the daemon (tests/test_daemon.py).
"""

from __future__ import annotations

import os
import stat

import pytest

from tests.reliability_helpers import (
    Director,
    kernel_servers,
    module_director,
    netns_skip,
    saved_servers,
    store_document,
)

pytestmark = [pytest.mark.netns]

BASE = """\
-A -t 10.0.0.1:80 -s rr
-a -t 10.0.0.1:80 -r 192.168.100.10:80 -m
-a -t 10.0.0.1:80 -r 192.168.100.11:80 -m
-A -t 10.0.0.2:80 -s wrr -p 60
-a -t 10.0.0.2:80 -r 192.168.100.12:80 -m -w 2
"""

# (name, nft commands run by hand); most of them leave the gen set alone
DRIFTS = [
    ("flush-ruleset", [["flush", "ruleset"]]),
    ("delete-table", [["delete", "table", "inet", "ipvs2nft"]]),
    ("flush-table", [["flush", "table", "inet", "ipvs2nft"]]),
    ("hand-added-rule", [["insert", "rule", "inet", "ipvs2nft", "dispatch", "tcp", "dport", "22", "drop"]]),
    ("hand-added-chain-rule", [["add", "rule", "inet", "ipvs2nft", "svc_1", "counter", "accept"]]),
    ("deleted-slot", [["delete", "element", "inet", "ipvs2nft", "nat4", "{", "65536", "}"]]),
    ("deleted-dispatch", [["delete", "element", "inet", "ipvs2nft", "svc4", "{", "10.0.0.1", ".", "tcp",
                           ".", "80", "}"]]),
    ("hand-added-element", [["add", "element", "inet", "ipvs2nft", "svc4", "{", "10.6.6.6", ".", "tcp",
                             ".", "80", ":", "goto", "svc_1", "}"]]),
    ("flushed-chain", [["flush", "chain", "inet", "ipvs2nft", "svc_2"]]),
    ("changed-slot-value", [["delete", "element", "inet", "ipvs2nft", "nat4", "{", "65536", "}"],
                            ["add", "element", "inet", "ipvs2nft", "nat4", "{", "65536", ":", "10.6.6.6",
                             ".", "80", "}"]]),
]
UNSEEN = {"changed-slot-value"}  # the fingerprint's blind spot (see above)
NEXT = [("other-service", "-A -t 10.0.0.9:80 -s rr"),
        ("same-service", "-a -t 10.0.0.1:80 -r 192.168.100.13:80 -m"),
        ("listing", "-L -n")]


@pytest.fixture(scope="module")
def director(tmp_path_factory):
    yield from module_director(tmp_path_factory, "dft")


def _setup(director: Director) -> None:
    director.reset()
    director.restore(BASE)
    assert director.kernel_equals_store() is None


def _cases():
    for name, cmds in DRIFTS:
        for next_name, next_cmd in NEXT:
            if name not in UNSEEN or next_name == "same-service":
                yield pytest.param(cmds, next_cmd, id=f"{name}-{next_name}")


@pytest.mark.parametrize("cmds,next_cmd", list(_cases()))
def test_next_command_repairs_drift(director, cmds, next_cmd):
    _setup(director)
    for cmd in cmds:
        director.nft(*cmd)
    assert director.kernel_equals_store() is not None, "the drift did not change the table"
    p = director.ipvsadm(next_cmd)
    assert p.returncode == 0, p.stderr
    diff = director.kernel_equals_store()
    assert diff is None, diff
    assert kernel_servers(director.table_json()) == saved_servers(director.save())


def test_restore_after_reboot_into_empty_run(tmp_path):
    """/run is empty after a reboot: no state directory, no table in the kernel."""
    if netns_skip():
        pytest.skip(netns_skip())
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with Director(run_dir / "ipvs2nft", tag="rbt") as d:
        assert not d.state_dir.exists()
        p = d.restore(BASE, check=False)
        assert p.returncode == 0 and p.stderr == "", p.stderr
        assert stat.S_IMODE(os.stat(d.state_dir).st_mode) == 0o700
        store_document(d.state)
        assert d.save() == BASE.replace("-m\n", "-m -w 1\n")
        assert d.kernel_equals_store() is None
        # and the next command goes on incrementally from there
        d.ipvsadm("-a -t 10.0.0.1:80 -r 192.168.100.14:80 -m", check=True)
        assert d.kernel_equals_store() is None


def test_restore_after_run_was_wiped_but_kernel_kept_an_old_table(tmp_path):
    """The state file is gone but the kernel still has an older table of ours
    (a tmpfs remounted, a container restarted): restore replaces it."""
    if netns_skip():
        pytest.skip(netns_skip())
    with Director(tmp_path / "s", tag="wip") as d:
        d.restore("-A -t 10.5.5.5:80 -s rr\n-a -t 10.5.5.5:80 -r 192.168.100.99:80 -m\n")
        for p in d.state_dir.iterdir():
            p.unlink()
        d.restore(BASE)
        assert d.kernel_equals_store() is None
        assert "-t 10.5.5.5:80" not in kernel_servers(d.table_json())


def test_first_command_after_wipe_with_stale_kernel_table(tmp_path):
    """Same, but the first command is a plain ``-A``, not a restore."""
    if netns_skip():
        pytest.skip(netns_skip())
    with Director(tmp_path / "s", tag="wip2") as d:
        d.restore(BASE)
        for p in d.state_dir.iterdir():
            p.unlink()
        d.ipvsadm("-A -t 10.0.0.7:80 -s rr", check=True)
        assert d.kernel_equals_store() is None
