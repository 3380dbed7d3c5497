"""Director failover through the sync daemons (issue 15), with real conntrackd.

Two directors in front of the same real servers (``ipvs2nft.twinlab``), the
same table on both, and on both ``--start-daemon master`` and ``backup`` on
the sync link, as Debian's ``DAEMON=both`` does.  The client's traffic goes
through A while a connection is held open; A is cut off and the floating
addresses move to B (what VRRP does: nothing else is done), with
``nf_conntrack_tcp_loose=0`` in both directors, so only a connection B
learnt from A can go on there.  The held connection keeps answering (a TCP
connection that reached another real server would be reset), new
connections are balanced by B; then the addresses move back to A, and both
the held connection and one opened through B go on.

Every wait is for an outcome (the peer has the state), with a generous
deadline; nothing is timed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from ipvs2nft.lab import unique_prefix
from ipvs2nft.twinlab import DIRECTORS, SYNC_IF, VIP, TwinLab, rs
from tests.conftest import NETNS_SKIP

pytestmark = [pytest.mark.netns, pytest.mark.slow]

SERVERS = {rs(i) for i in range(3)}
DEADLINE = 20.0


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    if NETNS_SKIP:
        pytest.skip(NETNS_SKIP)
    lab = TwinLab(unique_prefix("i2f"), tmp_path_factory.mktemp("twin"), clients=3).build()
    try:
        start_daemons(lab)
        yield lab
    finally:
        lab.close()


def start_daemons(lab: TwinLab) -> None:
    for which in DIRECTORS:
        for state in ("master", "backup"):
            lab.ipvsadm(which, f"--start-daemon {state} --mcast-interface {SYNC_IF}")


@pytest.fixture(autouse=True)
def fresh(twin):
    twin.reconnect("a")
    twin.move_to("a")
    for which in DIRECTORS:
        twin.ipvsadm(which, "-C")
    yield


def service(lab: TwinLab, spec: str, fwd: str, port: int) -> None:
    """The same service on both directors, three real servers."""
    proto = spec.split()[0]
    vip = f"{VIP}:{port}"
    lab.both(f"-A {proto} {vip} {' '.join(spec.split()[1:])}",
             *(f"-a {proto} {vip} -r {rs(i)}:{port} {fwd}" for i in range(3)))


def wait_for(what: str, check, deadline: float = DEADLINE):
    end = time.monotonic() + deadline
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > end:
            raise AssertionError(f"not within {deadline:.0f} s: {what}")
        time.sleep(0.05)


def entries(lab: TwinLab, which: str, proto: str, port: int, state: str = "") -> list[str]:
    out = lab.conntrack(which, "-L", "-p", proto, "--dport", str(port), "-d", VIP)
    return [line for line in out.splitlines() if state in line]


def set_keys(lab: TwinLab, which: str, family: str, name: str) -> set[str]:
    out = lab.sh(lab.director(which), f"nft -j list set {family} ipvs2nft {name}").stdout
    found = set()
    for item in json.loads(out)["nftables"]:
        for e in item.get("set", {}).get("elem", []):
            found.add(json.dumps(e["elem"]["val"] if isinstance(e, dict) and "elem" in e else e))
    return found


def synced_sets(lab: TwinLab, source: str, target: str, family: str, name: str) -> bool:
    have = set_keys(lab, source, family, name)
    return bool(have) and have <= set_keys(lab, target, family, name)


def conntrackds(lab: TwinLab, which: str) -> list[int]:
    """The conntrackd processes in a director's namespace."""
    pids = lab.sh(lab.switch, f"ip netns pids {lab.director(which)}").stdout.split()
    found = []
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "conntrackd":
                found.append(int(pid))
        except OSError:
            continue
    return found


def fail_over(lab: TwinLab) -> None:
    lab.cut_off("a")
    lab.move_to("b")


def fail_back(lab: TwinLab) -> None:
    lab.reconnect("a")
    lab.move_to("a")


# ---------------------------------------------------------------- TCP, masquerading

def test_tcp_masquerading_connection_survives_failover_and_failback(twin):
    service(twin, "-t -s rr", "-m", 7777)
    # A connection to the director itself, not to a service: never sent.
    twin.sh(twin.client, f"{sys.executable} -c \"import socket; "
                         f"socket.socket(2, 2).sendto(b'x', ('{DIRECTORS['a'][0]}', 9))\"")
    first = twin.session().backend  # B's own first choice will be this one too
    held = twin.session()
    assert held.backend not in (None, first)
    wait_for("B has the held connection, ESTABLISHED",
             lambda: len(entries(twin, "b", "tcp", 7777, "ESTABLISHED")) >= 2)
    assert DIRECTORS["a"][0] not in twin.conntrack("b", "-L")

    fail_over(twin)
    assert held.echo("through B") == "through B"
    via_b = [twin.session() for _ in range(3)]
    assert {s.backend for s in via_b} == SERVERS  # B balances new connections itself

    wait_for("A learnt B's connections", lambda: len(entries(twin, "a", "tcp", 7777, "ESTABLISHED")) >= 5)
    fail_back(twin)
    assert held.echo("back through A") == "back through A"
    assert via_b[0].echo("opened on B") == "opened on B"


# ---------------------------------------------------------------- TCP, direct routing

def test_tcp_direct_routing_connection_survives_failover_and_failback(twin):
    """No conntrack state here: the flow memory of the ``flows`` set is what
    the sync daemon carries to the peer."""
    service(twin, "-t -s rr", "-g", 7777)
    first = twin.session().backend
    held = twin.session()
    assert held.backend not in (None, first)
    wait_for("B has A's flows", lambda: synced_sets(twin, "a", "b", "ip", "flows"))

    fail_over(twin)
    assert held.echo("through B") == "through B"
    via_b = [twin.session() for _ in range(3)]
    assert {s.backend for s in via_b} == SERVERS

    wait_for("A has B's flows", lambda: synced_sets(twin, "b", "a", "ip", "flows"))
    fail_back(twin)
    assert held.echo("back through A") == "back through A"
    assert via_b[0].echo("opened on B") == "opened on B"


# ---------------------------------------------------------------- UDP

def test_udp_flow_keeps_its_real_server_across_failover(twin):
    service(twin, "-u -s rr", "-m", 53)
    first = twin.backends(53, 1, proto="udp", sport=4000)[0]
    [server] = twin.backends(53, 1, proto="udp", sport=5353)
    assert server not in (None, first)
    wait_for("B has the UDP flow", lambda: any("sport=5353" in e for e in entries(twin, "b", "udp", 53)))

    fail_over(twin)
    assert twin.backends(53, 3, proto="udp", sport=5353) == [server] * 3
    assert set(twin.backends(53, 3, proto="udp")) == SERVERS  # new flows: B's round robin

    fail_back(twin)
    assert twin.backends(53, 2, proto="udp", sport=5353) == [server] * 2


# ---------------------------------------------------------------- persistence

def test_persistent_client_keeps_its_real_server_across_failover(twin):
    """Persistence lives in the ``persist4`` set, which the sync daemon
    carries: a client's next connection through B goes to the server A
    chose for it, not to B's own next choice."""
    service(twin, "-t -s rr -p 300", "-m", 80)
    c1, c2, c3 = twin.client_addresses()
    first = twin.backends(80, 1, source=c1)[0]
    chosen = twin.backends(80, 2, source=c2)
    assert chosen[0] == chosen[1] and chosen[0] not in (None, first)
    wait_for("B has A's persistence", lambda: synced_sets(twin, "a", "b", "inet", "persist4"))

    fail_over(twin)
    assert twin.backends(80, 3, source=c2) == chosen[:1] * 3
    assert twin.backends(80, 2, source=c1) == [first] * 2
    fresh_client = twin.backends(80, 2, source=c3)
    assert fresh_client[0] == fresh_client[1] and fresh_client[0] is not None


# ---------------------------------------------------------------- listing and errors

def test_listing_and_errors_are_ipvsadm_s(twin):
    out = twin.ipvsadm("b", "-L --daemon").stdout
    line = f"sync daemon (mcast={SYNC_IF}, syncid=0, maxlen=1472, group=224.0.0.81, port=8848, ttl=1)\n"
    assert out == f"master {line}backup {line}"
    again = twin.ipvsadm("b", f"--start-daemon master --mcast-interface {SYNC_IF}", check=False)
    assert (again.returncode, again.stderr) == (255, "Daemon has already run\n")
    # One conntrackd per director: master and backup share the channel.
    assert len(conntrackds(twin, "b")) == 1


# ---------------------------------------------------------------- without the sync daemons

def test_without_sync_daemons_the_held_connection_breaks(twin):
    """The control: the same failover with no sync daemon running, and the
    held connection does not survive it (``nf_conntrack_tcp_loose=0``)."""
    for which in DIRECTORS:
        for state in ("master", "backup"):
            twin.ipvsadm(which, f"--stop-daemon {state}")
    try:
        assert conntrackds(twin, "a") == conntrackds(twin, "b") == []
        service(twin, "-t -s rr", "-m", 7777)
        held = twin.session()
        assert held.echo("through A") == "through A"
        fail_over(twin)
        assert held.echo("through B") is None
    finally:
        fail_back(twin)
        start_daemons(twin)

