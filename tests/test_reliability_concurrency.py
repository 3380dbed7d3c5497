"""Concurrent callers (issue 5): health checkers, cron jobs and failover
scripts run ipvsadm at the same time; nothing may be lost or seen torn.

* 200 ``ipvsadm -a`` processes at once on one service, each a different real
  server, with the nftables back end: all 200 land in the store, in
  ``-S -n`` and in the kernel's slot map, and the kernel equals the store.
* Readers running meanwhile (``-L -n``, ``-S -n``) always get a complete,
  well-formed table, and since the writers only add, what one reader sees
  only grows.
* A lock held longer than ``IPVS2NFT_LOCK_WAIT`` ends the command with a
  clear message and status 4 (like ``iptables -w``), in bounded time, and
  changes nothing; readers do not need the lock.
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import threading
import time

import pytest

from tests.reliability_helpers import (
    LIST_HEADER,
    Director,
    kernel_servers,
    netns_skip,
    no_traceback,
    saved_servers,
)

pytestmark = [pytest.mark.netns]

SERVICE = "-t 10.0.0.1:80"
WRITERS = 200


def rs(i: int) -> str:
    return f"10.1.{i // 250}.{i % 250 + 1}:80"


@pytest.fixture
def director(tmp_path):
    if netns_skip():
        pytest.skip(netns_skip())
    with Director(tmp_path, tag="cc") as d:
        yield d


_SAVE_SERVICE = re.compile(r"^-A -t 10\.0\.0\.1:80 -s rr$")
_SAVE_SERVER = re.compile(r"^-a -t 10\.0\.0\.1:80 -r (10\.1\.\d+\.\d+:80) -m -w 1$")
_LIST_SERVICE = re.compile(r"^TCP  10\.0\.0\.1:80 rr\s*$")
_LIST_SERVER = re.compile(r"^  -> (10\.1\.\d+\.\d+:80)\s+Masq\s+1\s+\d+\s+\d+\s*$")


def parse_save(text: str) -> list[str]:
    """The real servers of a ``-S -n`` output; asserts it is well formed."""
    lines = text.splitlines()
    assert lines and _SAVE_SERVICE.match(lines[0]), text[:300]
    servers = []
    for line in lines[1:]:
        m = _SAVE_SERVER.match(line)
        assert m, f"torn -S line {line!r}"
        servers.append(m.group(1))
    assert len(set(servers)) == len(servers), "a real server listed twice"
    return servers


def parse_list(text: str) -> list[str]:
    lines = text.splitlines()
    assert lines[:3] == LIST_HEADER, text[:300]
    assert len(lines) > 3 and _LIST_SERVICE.match(lines[3]), text[:400]
    servers = []
    for line in lines[4:]:
        m = _LIST_SERVER.match(line)
        assert m, f"torn -L line {line!r}"
        servers.append(m.group(1))
    assert len(set(servers)) == len(servers), "a real server listed twice"
    return servers


def _reader(director: Director, args: str, parse, stop: threading.Event, seen: list, errors: list):
    last: set[str] = set()
    while not stop.is_set():
        # the bound is raised for readers too: whether a reader may have to
        # wait at all is test_readers_do_not_wait_when_the_ruleset_changed
        p = director.ipvsadm(args, IPVS2NFT_LOCK_WAIT="300")
        try:
            assert p.returncode == 0 and no_traceback(p.stderr), (p.returncode, p.stderr)
            now = set(parse(p.stdout))
            assert last <= now, f"{args}: servers disappeared: {sorted(last - now)[:5]}"
            last = now
            seen.append(len(now))
        except AssertionError as exc:
            errors.append(str(exc))
            return


def test_200_concurrent_adds_all_land_and_readers_never_see_a_torn_table(director):
    # The wait bound is raised: each -a holds the lock ~40 ms here (2 CPUs), so
    # the last of 200 writers queue for about the default 10 s, and with the
    # readers competing for CPU 0-26 of 200 gave up (status 4) in four runs
    # (reported to the core: the default bound is too tight for this load).
    # What is checked here is that the lock loses nothing.
    director.ipvsadm(f"-A {SERVICE} -s rr", check=True)
    stop = threading.Event()
    seen: list[int] = []
    errors: list[str] = []
    readers = [threading.Thread(target=_reader, args=(director, args, parse, stop, seen, errors))
               for args, parse in (("-S -n", parse_save), ("-L -n", parse_list))]
    for t in readers:
        t.start()
    try:
        procs = [subprocess.Popen(director.argv("ipvsadm", f"-a {SERVICE} -r {rs(i)} -m"),
                                  env=director.env(IPVS2NFT_LOCK_WAIT="300"),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for i in range(WRITERS)]
        results = [(p.wait(timeout=300), p.stderr.read().decode()) for p in procs]
    finally:
        stop.set()
        for t in readers:
            t.join(timeout=60)
    failed = [(i, rc, err) for i, (rc, err) in enumerate(results) if rc != 0]
    assert not failed, f"{len(failed)} of {WRITERS} adds failed, e.g. {failed[:3]}"
    assert not errors, errors[0]
    assert len(seen) >= 4, "the readers did not run during the writes"

    want = {rs(i) for i in range(WRITERS)}
    assert set(parse_save(director.save())) == want
    assert set(parse_list(director.ipvsadm("-L -n", check=True).stdout)) == want
    assert saved_servers(director.save())[SERVICE] == want
    assert kernel_servers(director.table_json())[SERVICE] == want
    diff = director.kernel_equals_store()
    assert diff is None, diff


def _hold_lock(director: Director):
    director.state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(director.state) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


@pytest.mark.parametrize("prog,args,stdin", [
    ("ipvsadm", f"-a {SERVICE} -r 10.9.9.9:80 -m", None),
    ("ipvsadm", "-C", None),
    ("ipvsadm", "-R", f"-a {SERVICE} -r 10.9.9.9:80 -m\n"),
    ("ipvsadm-restore", "", f"-A {SERVICE} -s wrr\n"),
], ids=["add", "flush", "R", "restore"])
def test_lock_held_too_long_gives_status_4_and_changes_nothing(director, prog, args, stdin):
    director.restore(f"-A {SERVICE} -s rr\n-a {SERVICE} -r {rs(0)} -m\n")
    state, table = director.state_bytes(), director.table_text()
    fd = _hold_lock(director)
    try:
        start = time.monotonic()
        p = director.ipvsadm(args, stdin=stdin, prog=prog, IPVS2NFT_LOCK_WAIT="0.5")
        took = time.monotonic() - start
    finally:
        os.close(fd)
    assert p.returncode == 4, (p.returncode, p.stderr)
    assert no_traceback(p.stderr)
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and "IPVS2NFT_LOCK_WAIT" in lines[0] and ".lock" in lines[0], p.stderr
    assert p.stdout == ""
    assert took < 5, f"the lock wait is not bounded: {took:.1f} s"
    assert director.state_bytes() == state
    assert director.table_text() == table


def test_lock_released_within_the_wait_lets_the_command_through(director):
    director.restore(f"-A {SERVICE} -s rr\n")
    fd = _hold_lock(director)
    try:
        proc = subprocess.Popen(director.argv("ipvsadm", f"-a {SERVICE} -r {rs(1)} -m"),
                                env=director.env(IPVS2NFT_LOCK_WAIT="20"), stderr=subprocess.PIPE)
        time.sleep(1.0)
        assert proc.poll() is None, "did not wait for the lock"
    finally:
        os.close(fd)
    assert proc.wait(timeout=30) == 0, proc.stderr.read()
    assert saved_servers(director.save())[SERVICE] == {rs(1)}
    assert kernel_servers(director.table_json())[SERVICE] == {rs(1)}


def test_readers_do_not_wait_for_the_lock(director):
    director.restore(f"-A {SERVICE} -s rr\n-a {SERVICE} -r {rs(0)} -m\n")
    fd = _hold_lock(director)
    try:
        for args in ("-L -n", "-S -n", f"-L -n {SERVICE}", "-L --timeout"):
            start = time.monotonic()
            p = director.ipvsadm(args, IPVS2NFT_LOCK_WAIT="30")
            assert p.returncode == 0, (args, p.stderr)
            assert time.monotonic() - start < 10, f"{args} waited for the writers' lock"
    finally:
        os.close(fd)


def test_readers_do_not_wait_when_the_ruleset_changed(director):
    """Someone else's nft change bumps the ruleset id; a writer holds the
    lock; a listing must still answer at once, from the store."""
    director.restore(f"-A {SERVICE} -s rr\n-a {SERVICE} -r {rs(0)} -m\n")
    director.nft("add", "table", "inet", "someone_else")
    fd = _hold_lock(director)
    try:
        for args in ("-L -n", "-S -n"):
            p = director.ipvsadm(args, IPVS2NFT_LOCK_WAIT="0.5")
            assert p.returncode == 0, (args, p.returncode, p.stderr)
    finally:
        os.close(fd)


def test_nan_lock_wait_is_still_bounded(director):
    """A garbage wait value (nan compares false with everything) must fall
    back to a finite bound: the default, 10 s."""
    director.restore(f"-A {SERVICE} -s rr\n")
    fd = _hold_lock(director)
    try:
        proc = subprocess.Popen(director.argv("ipvsadm", f"-a {SERVICE} -r {rs(2)} -m"),
                                env=director.env(IPVS2NFT_LOCK_WAIT="nan"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            rc = proc.wait(timeout=13)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
    finally:
        os.close(fd)
    assert rc == 4, "still waiting after 13 s"
