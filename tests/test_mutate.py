"""ipvsadm's changes carried out by the daemon (daemon/mutate.py), issue 14.

With ``ipvs2nft daemon`` running in the namespace, a mutating ipvsadm call
hands its argv to the daemon over the control socket; its exit status,
stdout and stderr must be the in-process path's, byte for byte -- here the
oracle fixtures replay through it -- and the socket must serve root alone
and refuse a malformed request without changing anything.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ipvs2nft.daemon import control, mutate
from ipvs2nft.store import Store
from tests import oracle
from tests.conftest import NETNS_SKIP

pytestmark = [pytest.mark.netns]

BIN = Path(sys.executable).parent


@pytest.fixture
def daemon(tmp_path, monkeypatch):
    """A namespace of our own (the oracle VM's /etc/hosts) with a daemon
    following tmp_path/state.json; yields its served-request counter."""
    if NETNS_SKIP:
        pytest.skip(NETNS_SKIP)
    monkeypatch.setenv("IPVS2NFT_STATE", str(tmp_path / "state.json"))
    monkeypatch.setenv("IPVS2NFT_BACKEND", "nft")
    with oracle.vm_like_netns(tmp_path):
        proc = subprocess.Popen([str(BIN / "ipvs2nft"), "daemon"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 20
            while control.running_pid() is None:
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, "the daemon did not start"
                time.sleep(0.1)
            yield lambda: control.ask("status").get("served", 0)
        finally:
            proc.terminate()
            proc.wait(timeout=10)


@pytest.mark.parametrize("name", ["golden-basic.jsonl", "edit-semantics.jsonl"])
def test_fixtures_through_the_daemon_answer_as_ipvsadm(name, tmp_path, daemon):
    records = oracle.load(name)
    outcomes = oracle.replay(records, tmp_path, backend="nft")
    bad = [oracle.describe(o) for o in outcomes if not o.matches()]
    assert not bad, f"{len(bad)} of {len(outcomes)} records differ:\n" + "\n".join(bad[:20])
    assert daemon() > 50  # the daemon did carry the changes out


def _raw(payload: bytes, uid: int | None = None) -> bytes:
    """Send one record to the control socket (as ``uid``) and return the answer."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read)
            if uid is not None:
                os.setgid(uid)
                os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
                sock.settimeout(5)
                sock.connect(control.ADDRESS)
                sock.send(payload)
                os.write(write, sock.recv(65536))
        except BaseException as exc:
            os.write(write, f"child failed: {exc!r}".encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        answer = f.read()
    os.waitpid(pid, 0)
    return answer


def test_only_root_and_only_well_formed_requests_change_anything(tmp_path, daemon):
    path = str(tmp_path / "state.json")
    add = mutate.REQUEST + "\0".join([path, "ipvsadm", "-A", "-t", "10.0.0.1:80"]).encode()
    assert b"root only" in _raw(add, uid=65534)
    for bad in (mutate.REQUEST, mutate.REQUEST + b"\0\0-A", mutate.REQUEST + path.encode() + b"\0\0-A",
                mutate.REQUEST + b"\xff\xfe"):
        assert b"malformed" in _raw(bad)
    assert list(Store().read().table.services) == []
    assert daemon() == 0
    answer = _raw(add)
    assert answer.startswith(mutate.DONE)
    assert [str(s.addr) for s in Store().read().table.services] == ["10.0.0.1"]


def test_a_call_the_daemon_does_not_serve_stays_in_process(tmp_path, daemon):
    path = str(tmp_path / "state.json")
    for argv in (["-L", "-n"], ["-Z"], ["-R"], ["-S"]):
        assert _raw(mutate.REQUEST + "\0".join([path, "ipvsadm", *argv]).encode()) == mutate.DECLINE
    other = mutate.REQUEST + "\0".join([str(tmp_path / "other.json"), "ipvsadm", "-C"]).encode()
    assert _raw(other) == mutate.DECLINE
    assert daemon() == 0


def test_a_locked_store_is_left_to_the_caller(tmp_path, daemon, monkeypatch):
    """Another ipvsadm holds the lock: the daemon does not wait in its
    loop; the caller does, as without a daemon (here it gives up: status 4)."""
    from ipvs2nft.cli import ipvsadm as cli

    monkeypatch.setenv("IPVS2NFT_LOCK_WAIT", "0.3")
    with Store().locked():
        status, _, err = oracle.call(cli.main, ["-A", "-t", "10.0.0.1:80"], None, "ipvsadm")
    assert status == 4 and "held" in err
    assert daemon() == 0
    status, _, _ = oracle.call(cli.main, ["-A", "-t", "10.0.0.1:80"], None, "ipvsadm")
    assert status == 0 and daemon() == 1


def test_the_daemon_follows_its_own_changes_without_reading_the_file(tmp_path, daemon, monkeypatch):
    """Carried-out calls are taken in from their commits (no reload of the
    whole state file, tests/test_daemon_absorb.py); a call made beside the
    daemon is still followed, and after both the daemon holds the store's
    generation and services."""
    from ipvs2nft.cli import ipvsadm as cli

    def served(argv):
        before = daemon()
        status, _, err = oracle.call(cli.main, argv, None, "ipvsadm")
        assert status == 0, err
        assert daemon() == before + 1

    served(["-A", "-t", "10.0.0.1:80", "-s", "wlc"])
    reloads = control.ask("status")["reloads"]
    served(["-a", "-t", "10.0.0.1:80", "-r", "10.0.1.1", "-m"])
    served(["-A", "-t", "10.0.0.2:80"])
    served(["-D", "-t", "10.0.0.1:80"])
    status = control.ask("status")
    assert status["reloads"] == reloads and status["absorbed"] >= 3 and status["stale"] == 0, status
    assert (status["generation"], status["services"]) == (Store().read().generation, 1)

    monkeypatch.setenv("IPVS2NFT_DAEMON", "no")
    assert oracle.call(cli.main, ["-A", "-t", "10.0.0.3:80"], None, "ipvsadm")[0] == 0
    monkeypatch.delenv("IPVS2NFT_DAEMON")
    served(["-A", "-t", "10.0.0.4:80"])
    deadline = time.monotonic() + 5
    while (status := control.ask("status"))["generation"] != Store().read().generation:
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
    assert status["services"] == 3 and status["reloads"] > reloads
