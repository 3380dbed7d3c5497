"""``ipvs2nft daemon`` in a namespace lab: started as systemd would start it,
proven by real connections and by what ipvsadm lists afterwards.

The scheduling algorithms themselves are proven against the real IPVS in
test_dynsched_oracle.py (and, transcript by transcript, in
test_daemon_oracle.py); here the daemon must make the data plane follow
them as connections open and close, keep the listings' numbers, survive
kill -9, a foreign ``nft flush ruleset`` and garbage on its socket.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from pathlib import Path

import pytest

from ipvs2nft import dynsched
from ipvs2nft.lab import VIP4, rs4
from tests.conftest import make_lab

pytestmark = pytest.mark.netns

HOLD = 7777  # the lab's servers keep connections to this port open (echo)
V = f"{VIP4}:{HOLD}"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = make_lab(tmp_path_factory.mktemp("daemon"))
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture(autouse=True)
def clean(lab):
    """Every test starts with no services, no connections, no daemon."""
    yield
    for p in lab.procs:
        if p.args and "daemon" in p.args and p.poll() is None:
            p.kill()
            p.wait()
    lab.ipvsadm("-C")
    lab.ns(lab.director, "conntrack", "-F", check=False)


def wlc_service(lab, weights=(3, 1), scheduler="wlc"):
    lab.ipvsadm(f"-A -t {V} -s {scheduler}")
    for i, w in enumerate(weights):
        lab.ipvsadm(f"-a -t {V} -r {rs4(i)}:{HOLD} -m -w {w}")


def rows(lab, *args) -> dict[str, tuple[int, int]]:
    """Real server -> (ActiveConn, InActConn) from ``ipvsadm -L -n``."""
    out = lab.ipvsadm(["-L", "-n", *args]).stdout
    found = {}
    for line in out.splitlines():
        m = re.match(r"  -> (\S+):\d+\s+\S+\s+\d+\s+(\d+)\s+(\d+)", line)
        if m:
            found[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return found


def ask(lab, op: str, **args) -> dict:
    code = ("import json,sys; from ipvs2nft.daemon import control; "
            f"print(json.dumps(control.ask({op!r}, **json.loads(sys.argv[1]))))")
    out = lab.ns(lab.director, sys.executable, "-c", code, json.dumps(args)).stdout
    return json.loads(out)


def settle(seconds: float = 0.15) -> None:
    """Connections a few tens of milliseconds apart, as the issue asks:
    time for conntrack's events to reach the daemon."""
    time.sleep(seconds)


def open_sessions(lab, n: int) -> list:
    out = []
    for _ in range(n):
        out.append(lab.session(VIP4, HOLD))
        settle(0.03)
    return out


# ---------------------------------------------------------------- life cycle

def test_ready_single_instance_and_sigterm(lab):
    daemon = lab.daemon()
    assert any(n.startswith("READY=1") for n in daemon.notices)
    second = lab.ns(lab.director, str(Path(sys.executable).parent / "ipvs2nft"), "daemon", check=False)
    assert second.returncode == 1
    assert "another ipvs2nft daemon is running in this network namespace (pid" in second.stderr
    wlc_service(lab)
    took = daemon.stop()
    assert daemon.proc.returncode == 0 and took < 2.0
    assert None not in lab.backends(VIP4, HOLD, 3, timeout=2)  # the ruleset keeps forwarding


def test_wlc_follows_connections_that_open_and_close(lab):
    """wlc 3:1 -- held connections, then some closed (inactive: TIME_WAIT),
    then new ones: every choice is what the kernel's wlc makes from the
    counts the earlier connections left (257 x active + inactive)."""
    wlc_service(lab)
    daemon = lab.daemon()
    try:
        svc = _service(lab)
        loads: dict = {}
        expected, got = [], []
        held = []
        for _ in range(6):
            expected.append(_next(svc, loads))
            held.append(lab.session(VIP4, HOLD))
            got.append(held[-1].backend)
            settle()
        for s in held[:4]:
            s.close()
            _close(svc, loads, s.backend)
        settle(0.5)
        assert rows(lab) == {a: (ld.active, ld.inactive) for a, ld in _by_addr(svc, loads).items()}
        for _ in range(5):
            expected.append(_next(svc, loads))
            held.append(lab.session(VIP4, HOLD))
            got.append(held[-1].backend)
            settle()
        assert got == expected
    finally:
        daemon.stop()


def _service(lab):
    from ipvs2nft.store import Store

    return next(iter(Store(str(lab.state_dir / "state.json")).read().table.services))


def _next(svc, loads) -> str:
    dest, _ = dynsched.schedule(svc, loads)
    dynsched.bind(dest, dynsched.load_of(loads, dest), True)
    return str(dest.addr)


def _close(svc, loads, addr) -> None:
    dest = next(d for d in svc.dests if str(d.addr) == addr)
    dynsched.set_activity(dynsched.load_of(loads, dest), True, False)


def _by_addr(svc, loads) -> dict:
    return {str(d.addr): dynsched.load_of(loads, d) for d in svc.dests}


def test_lc_sequential_closed_connections(lab):
    """Each connection closed before the next opens (the oracle's plain
    @connect): lc walks the servers newest first, as IPVS did in
    traffic-lc-wlc-others."""
    lab.ipvsadm(f"-A -t {VIP4}:80 -s lc")
    for i in range(3):
        lab.ipvsadm(f"-a -t {VIP4}:80 -r {rs4(i)}:80 -m")
    daemon = lab.daemon()
    try:
        got = []
        for _ in range(9):
            got += lab.backends(VIP4, 80, 1)
            settle()
        assert got == [rs4(2), rs4(1), rs4(0)] * 3
    finally:
        daemon.stop()


def test_thresholds_take_a_full_server_out(lab):
    """-x 2 -y 1 on the heavier server: at two connections it is overloaded
    and gets no new ones; two closed connections (TIME_WAIT) still count
    towards its total, so it stays out."""
    lab.ipvsadm(f"-A -t {V} -s wlc")
    lab.ipvsadm(f"-a -t {V} -r {rs4(0)}:{HOLD} -m -w 5 -x 2 -y 1")
    lab.ipvsadm(f"-a -t {V} -r {rs4(1)}:{HOLD} -m -w 1")
    daemon = lab.daemon()
    try:
        svc = _service(lab)
        loads: dict = {}
        expected = [_next(svc, loads) for _ in range(5)]
        # wlc: the newer .11 first (tie), then .10 until its -x, then .11 only
        assert expected == [rs4(1), rs4(0), rs4(0), rs4(1), rs4(1)]
        held = open_sessions(lab, 5)
        assert [s.backend for s in held] == expected
        out = lab.ipvsadm("-L -n --thresholds").stdout
        assert re.search(rf"{rs4(0)}:{HOLD}\s+2\s+1\s+2\s+0", out), out
        for s in held[1:3]:
            s.close()
        settle(0.5)
        assert open_sessions(lab, 1)[0].backend == rs4(1)
    finally:
        daemon.stop()


# ---------------------------------------------------------------- listings

def test_active_and_inactive_counts_with_and_without_the_daemon(lab):
    wlc_service(lab, (1, 1))
    held = open_sessions(lab, 4)
    held[0].close()
    settle(0.3)
    without = rows(lab)
    daemon = lab.daemon()
    try:
        assert rows(lab) == without
        assert sum(a for a, _ in without.values()) == 3
        assert sum(i for _, i in without.values()) == 1
    finally:
        daemon.stop()


def test_stats_rates_and_zero(lab):
    lab.ipvsadm(f"-A -t {VIP4}:80 -s rr")
    for i in range(3):
        lab.ipvsadm(f"-a -t {VIP4}:80 -r {rs4(i)}:80 -m")
    assert None not in lab.backends(VIP4, 80, 6)
    kernel = lab.ipvsadm("-L -n --stats --exact").stdout  # no daemon: the kernel's counters now
    assert re.search(rf"TCP  {VIP4}:80\s+6\s+\d+\s+\d+", kernel), kernel
    daemon = lab.daemon()
    try:
        time.sleep(2.3)  # one estimator tick
        stats = lab.ipvsadm("-L -n --stats").stdout
        for i in range(3):
            m = re.search(rf"{rs4(i)}:80\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", stats)
            assert m and int(m.group(1)) == 2 and int(m.group(2)) >= 6 and int(m.group(3)) >= 4, stats
        assert None not in lab.backends(VIP4, 80, 6)
        time.sleep(2.2)
        rate = lab.ipvsadm("-L -n --rate").stdout
        m = re.search(rf"TCP  {VIP4}:80\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", rate)
        assert m and int(m.group(2)) > 0 and int(m.group(4)) > 0, rate
        lab.ipvsadm("-Z")
        zeroed = lab.ipvsadm("-L -n --stats").stdout
        assert re.search(rf"TCP  {VIP4}:80\s+0\s+0\s+0\s+0\s+0", zeroed), zeroed
        time.sleep(2.2)
        assert re.search(rf"TCP  {VIP4}:80\s+0\s+0\s+0\s+0\s+0", lab.ipvsadm("-L -n --stats").stdout)
    finally:
        daemon.stop()
    assert re.search(rf"TCP  {VIP4}:80\s+0\s+0\s+0\s+0\s+0", lab.ipvsadm("-L -n --stats").stdout)


def test_connection_list_and_persistence_templates(lab):
    lab.ipvsadm(f"-A -t {V} -s rr -p 300")
    for i in range(2):
        lab.ipvsadm(f"-a -t {V} -r {rs4(i)}:{HOLD} -m")
    held = open_sessions(lab, 2)
    out = lab.ipvsadm("-L -c -n").stdout.splitlines()
    assert out[:2] == ["IPVS connection entries",
                       "pro expire state       source             virtual            destination"]
    established = [line for line in out if "ESTABLISHED" in line]
    assert len(established) == 2
    templates = [line for line in out if re.match(r"TCP \d\d:\d\d  ASSURED     198\.51\.100\.2:0 ", line)]
    assert len(templates) == 1, out
    pc = lab.ipvsadm("-L -n --persistent-conn").stdout
    assert re.search(rf"{held[0].backend}:{HOLD}\s+1\s+1\s+2\s+0", pc), pc


def test_a_template_lives_while_it_controls_connections(lab):
    """rr -p 2: a client with a connection still open keeps its server
    after the persistence timeout, as IPVS re-arms the template (60 s at a
    time) while it controls connections; rr alone would move it on."""
    lab.ipvsadm(f"-A -t {V} -s rr -p 2")
    for i in range(2):
        lab.ipvsadm(f"-a -t {V} -r {rs4(i)}:{HOLD} -m")
    daemon = lab.daemon()
    try:
        first = lab.session(VIP4, HOLD)
        time.sleep(4)  # twice the persistence timeout
        pc = lab.ipvsadm("-L -n --persistent-conn").stdout
        assert re.search(rf"{first.backend}:{HOLD}\s+1\s+1\s+1\s+0", pc), pc
        assert lab.session(VIP4, HOLD).backend == first.backend
    finally:
        daemon.stop()


# ---------------------------------------------------------------- failures

def test_kill_9_keeps_forwarding_and_a_restart_counts_from_a_dump(lab):
    wlc_service(lab, (1, 1))
    daemon = lab.daemon()
    held = open_sessions(lab, 2)
    daemon.kill()
    assert None not in lab.backends(VIP4, HOLD, 2, timeout=2)
    held += open_sessions(lab, 2)  # created while no listener exists: no events ever
    restarted = lab.daemon()
    try:
        counts = rows(lab)
        assert sum(a for a, _ in counts.values()) == 4
        svc = _service(lab)
        loads = {d.key: dynsched.Load(active=counts[str(d.addr)][0], inactive=counts[str(d.addr)][1])
                 for d in svc.dests}
        expected = _next(svc, loads)
        assert open_sessions(lab, 1)[0].backend == expected
    finally:
        restarted.stop()


def test_foreign_flush_is_repaired_with_the_live_choices(lab):
    wlc_service(lab)
    daemon = lab.daemon()
    try:
        open_sessions(lab, 3)
        lab.ns(lab.director, "nft", "flush", "ruleset")
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and "svc_" not in lab.nft("list", "ruleset"):
            time.sleep(0.1)
        assert "svc_" in lab.nft("list", "ruleset")
        settle(0.3)
        svc = _service(lab)
        counts = rows(lab)
        loads = {d.key: dynsched.Load(active=counts[str(d.addr)][0]) for d in svc.dests}
        assert open_sessions(lab, 1)[0].backend == _next(svc, loads)
    finally:
        daemon.stop()


def test_a_value_replaced_by_hand_is_repaired(lab):
    """An element's value replaced under its key (a slot sent to another
    server) is what ipvsadm's fingerprint cannot see; the daemon sees the
    transaction touch our table and repairs it."""
    lab.ipvsadm(f"-A -t {VIP4}:80 -s rr")
    lab.ipvsadm(f"-a -t {VIP4}:80 -r {rs4(0)}:80 -m")
    daemon = lab.daemon()
    try:
        slots = ("list", "map", "inet", "ipvs2nft", "nat4")
        key = 65536  # the first slot of sid 1 (build.slot_base)
        lab.ns(lab.director, "nft", f"delete element inet ipvs2nft nat4 {{ {key} }}; "
                             f"add element inet ipvs2nft nat4 {{ {key} : {rs4(1)} . 80 }}")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and rs4(1) in lab.nft(*slots):
            time.sleep(0.1)
        assert rs4(1) not in lab.nft(*slots) and rs4(0) in lab.nft(*slots)
        assert lab.backends(VIP4, 80, 2) == [rs4(0)] * 2
    finally:
        daemon.stop()


def test_hand_edit_inside_our_table_is_repaired(lab):
    """A rule added by hand inside our table (here one that drops every
    new connection) is noticed through nftables' notifications and the
    table rebuilt from the store; a foreign table loaded next to it is left
    alone."""
    lab.ipvsadm(f"-A -t {VIP4}:80 -s rr")
    lab.ipvsadm(f"-a -t {VIP4}:80 -r {rs4(0)}:80 -m")
    daemon = lab.daemon()
    try:
        lab.ns(lab.director, "nft", "add table inet foreign; add chain inet foreign c; "
                             "add rule inet foreign c counter")
        lab.ns(lab.director, "nft", "insert rule inet ipvs2nft dispatch drop")
        deadline = time.monotonic() + 5
        dispatch = ("list", "chain", "inet", "ipvs2nft", "dispatch")
        while time.monotonic() < deadline and "drop" in lab.nft(*dispatch):
            time.sleep(0.1)
        assert "drop" not in lab.nft(*dispatch)
        assert lab.backends(VIP4, 80, 2) == [rs4(0)] * 2
        assert "counter" in lab.nft("list", "table", "inet", "foreign")
    finally:
        daemon.stop()
        lab.ns(lab.director, "nft", "delete table inet foreign", check=False)


def test_garbage_on_the_control_socket(lab):
    daemon = lab.daemon()
    try:
        code = ("import socket\n"
                "junk = (b'', b'x' * 70000, b'{', b'[]', b'{\"op\": 5}',\n"
                "        b'{\"op\": \"zeroed\", \"sids\": \"a\"}')\n"
                "for junk in junk:\n"
                "    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
                "    s.connect('\\0ipvs2nft/daemon')\n"
                "    s.send(junk)\n"
                "    s.settimeout(2)\n"
                "    try:\n"
                "        print(s.recv(1000))\n"
                "    except OSError as e:\n"
                "        print(e)\n"
                "    s.close()\n")
        out = lab.ns(lab.director, sys.executable, "-c", code).stdout
        assert out.count("malformed request") + out.count("must be") >= 4, out
        assert ask(lab, "ping")["ok"]
        assert daemon.proc.poll() is None
    finally:
        daemon.stop()


def test_without_conntrack_the_daemon_says_so(monkeypatch, tmp_path):
    """No nf_conntrack (or no ctnetlink): one clear line, status 1, nothing
    changed -- simulated, since this host's conntrack cannot be unloaded."""
    from ipvs2nft import conntrack
    from ipvs2nft.daemon import main as daemon_main
    from ipvs2nft.store import Store

    def unavailable(*a, **k):
        raise conntrack.ConntrackUnavailable("Protocol not supported")

    monkeypatch.setattr(conntrack, "Events", unavailable)
    monkeypatch.setenv("IPVS2NFT_STATE", str(tmp_path / "state.json"))
    monkeypatch.setattr(daemon_main.control, "ADDRESS", f"\0ipvs2nft-test/{tmp_path.name}")
    daemon = daemon_main.Daemon(Store())
    with pytest.raises(daemon_main.DaemonError, match="nf_conntrack"):
        asyncio.run(daemon.run())
    assert not (tmp_path / "state.json").exists()


# ---------------------------------------------------------------- direct routing

def test_direct_routing_counts_stats_and_wlc(lab):
    """-g: conntrack never sees these flows; the direct tables' flow memory
    gives ActiveConn/InActConn, their counters the statistics (In only: the
    director does not see a real server's replies), and the daemon reads
    them to schedule wlc."""
    lab.direct_routing()
    lab.ipvsadm(f"-A -t {V} -s wlc")
    for i, w in enumerate((3, 1)):
        lab.ipvsadm(f"-a -t {V} -r {rs4(i)}:{HOLD} -g -w {w}")
    daemon = lab.daemon()
    try:
        svc = _service(lab)
        loads: dict = {}
        expected, held = [], []
        for _ in range(5):
            expected.append(_next(svc, loads))
            held.append(lab.session(VIP4, HOLD))
            settle(0.4)  # direct flows are read every 0.25 s
        assert [s.backend for s in held] == expected
        assert rows(lab) == {a: (ld.active, 0) for a, ld in _by_addr(svc, loads).items()}
        out = lab.ipvsadm("-L -c -n").stdout
        assert out.count("ESTABLISHED") == 5 and f"{VIP4}:{HOLD}" in out, out
        kernel = lab.ipvsadm("-L -n --stats --exact").stdout
        m = re.search(rf"TCP  {V}\s+(\d+)\s+(\d+)\s+(\d+)", kernel)
        assert m and int(m.group(1)) == 5 and int(m.group(2)) >= 10 and int(m.group(3)) == 0, kernel
        for s in held[:2]:
            s.close()
        settle(0.6)
        counts = rows(lab)
        assert sum(a for a, _ in counts.values()) == 3 and sum(i for _, i in counts.values()) == 2
    finally:
        daemon.stop()
        lab.ipvsadm("-C")
        lab.ns(lab.director, "sysctl", "-qw", "net.ipv4.conf.all.accept_local=0")
