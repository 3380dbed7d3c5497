"""Connections that outlive a change of the table, IPVS's way (issue 14).

IPVS keeps every connection in its table until it expires.  A real server
removed with ``-d`` (or with its service, ``-D``, ``-C``) goes to the
kernel's "trash": with ``expire_nodest_conn=0`` its connections' packets are
dropped -- not sent to another server -- and flow again if the server is
added back before they expire; ``-C`` + ``ipvsadm-restore`` and
``ipvsadm-restore`` alone re-add the same servers, so their connections go
on.  Each test holds a TCP connection open across one change and shows what
becomes of it: for direct routing exactly that; for masquerading conntrack
keeps the connection flowing to its server throughout (where IPVS would
drop it while the server is gone) -- compat-matrix.md, "Connections across
changes".
"""

from __future__ import annotations

import pytest

from ipvs2nft.lab import VIP4, rs4
from tests.conftest import make_lab

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PORT = 7777  # the lab's servers hold connections on it (echo)
SVC = f"-t {VIP4}:{PORT}"
DROPPED = 1.5  # seconds an echo is waited for when the packet should be dropped


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = make_lab(tmp_path_factory.mktemp("lab"), servers=2)
    try:
        lab.direct_routing()
        yield lab
    finally:
        lab.close()


def _rules(fwd: str) -> str:
    return "".join([f"-A {SVC} -s rr\n"] + [f"-a {SVC} -r {rs4(i)}:{PORT} {fwd} -w 1\n" for i in range(2)])


@pytest.fixture
def table(lab):
    """Restore the two-server service with the forwarding method asked for."""
    def load(fwd: str) -> None:
        lab.ipvsadm("-C")
        lab.ipvsadm([], stdin=_rules(fwd), prog="ipvsadm-restore")
    yield load
    lab.ipvsadm("-C")


def _open(lab):
    session = lab.session(VIP4, PORT, timeout=DROPPED)
    assert session.backend in (rs4(0), rs4(1))
    assert session.echo("hello") == "hello"
    return session


def _held_across(lab, fwd: str, remove: list[str], restore: list[tuple[list[str], str | None, str]]) -> None:
    """A connection is open; ``remove`` runs (ipvsadm argument lists, "{rs}"
    standing for the connection's server); then ``restore`` (argument list,
    stdin, program).  Direct routing: the connection's packets are dropped
    in between and it goes on, same server, afterwards.  Masquerading: it
    never stops."""
    session = _open(lab)
    server = session.backend
    for args in remove:
        lab.ipvsadm([a.replace("{rs}", server) for a in args])
    if fwd == "-g":
        assert session.echo("while-gone") is None, "a packet of the removed server's connection got an answer"
        assert session.error == "timed out", f"the connection was not dropped but {session.error}"
    else:
        assert session.echo("while-gone") == "while-gone"  # conntrack keeps the NAT (IPVS would drop)
    for args, stdin, prog in restore:
        lab.ipvsadm([a.replace("{rs}", server) for a in args], stdin=stdin, prog=prog)
    if fwd == "-g":
        assert session.wait(10) == "while-gone", "the dropped segment never arrived once the server was back"
    assert session.echo("again") == "again"
    session.close()
    assert session.backend == server


@pytest.mark.parametrize("fwd", ["-g", "-m"])
def test_server_removed_and_added_back(lab, table, fwd):
    table(fwd)
    _held_across(lab, fwd, [["-d", *SVC.split(), "-r", f"{{rs}}:{PORT}"]],
                 [(["-a", *SVC.split(), "-r", f"{{rs}}:{PORT}", fwd], None, "ipvsadm")])


@pytest.mark.parametrize("fwd", ["-g", "-m"])
def test_service_deleted_and_added_again(lab, table, fwd):
    table(fwd)
    again = [(["-A", *SVC.split(), "-s", "rr"], None, "ipvsadm")]
    again += [(["-a", *SVC.split(), "-r", f"{rs4(i)}:{PORT}", fwd], None, "ipvsadm") for i in range(2)]
    _held_across(lab, fwd, [["-D", *SVC.split()]], again)


@pytest.mark.parametrize("fwd", ["-g", "-m"])
def test_flush_then_restore(lab, table, fwd):
    table(fwd)
    _held_across(lab, fwd, [["-C"]], [([], _rules(fwd), "ipvsadm-restore")])


@pytest.mark.parametrize("fwd", ["-g", "-m"])
def test_restore_keeps_every_connection(lab, table, fwd):
    """A routine ipvsadm-restore of the same rules: no packet is lost."""
    table(fwd)
    sessions = [_open(lab) for _ in range(4)]
    assert {s.backend for s in sessions} == {rs4(0), rs4(1)}
    lab.ipvsadm([], stdin=_rules(fwd), prog="ipvsadm-restore")
    # the last first: were the flows scheduled afresh, round robin would
    # start again from the first server and send them elsewhere
    for s in reversed(sessions):
        assert s.echo("after") == "after", s.error
        s.close()


def test_removed_server_gets_no_new_connection_and_the_others_carry_on(lab, table):
    table("-g")
    session = _open(lab)
    lab.ipvsadm(["-d", *SVC.split(), "-r", f"{session.backend}:{PORT}"])
    other = rs4(1) if session.backend == rs4(0) else rs4(0)
    assert lab.backends(VIP4, PORT, 3) == [other] * 3
    session.close()
