"""The sync daemon's pieces without a kernel: which conntrackd instances the
started daemons need and how each is configured (``sync/conf.py``), and how
set elements travel from one director's rids to another's (``sync/sets.py``)."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from ipvs2nft.lab import unique_prefix
from ipvs2nft.model import Dest, Forward, Service, SyncDaemon, Table
from ipvs2nft.netaddr import AF_INET
from ipvs2nft.nft.nfnetlink import Element
from ipvs2nft.sync import conf, sets
from ipvs2nft.twinlab import kill_namespace_processes
from tests.conftest import NETNS_SKIP

CH = dict(mcast_af=AF_INET, mcast_group="224.0.0.81", mcast_port=8848, mcast_ttl=1)


def daemon(state: str, ifname: str = "eth1", syncid: int = 0, **kw) -> SyncDaemon:
    return SyncDaemon(state, ifname, syncid, 1472, **{**CH, **kw})


def table(*dests: tuple[str, Forward, int], vip: str = "192.0.2.40") -> Table:
    svc = Service(af=AF_INET, protocol=6, addr=ipaddress.ip_address(vip), port=80, sid=1,
                  dests=tuple(Dest(addr=ipaddress.ip_address(a), port=80, fwd=f, rid=r)
                              for a, f, r in dests))
    return Table([svc])


# ---------------------------------------------------------------- conntrackd instances

def test_master_and_backup_on_one_channel_share_one_conntrackd():
    [one] = conf.instances((daemon("master", syncid=3), daemon("backup", syncid=0)))
    assert (one.master, one.backup, one.send_id, one.accept_id) == (True, True, 3, 0)


def test_master_and_backup_on_two_channels_run_two():
    found = conf.instances((daemon("master"), daemon("backup", mcast_port=9000)))
    assert [(i.master, i.backup, i.channel.port) for i in found] == [(True, False, 8848), (False, True, 9000)]


def test_config_of_a_master_and_backup():
    t = table(("10.1.0.1", Forward.MASQ, 1), ("10.1.0.2", Forward.ROUTE, 2), ("10.1.0.3", Forward.MASQ, 3))
    [inst] = conf.instances((daemon("master"), daemon("backup")))
    text = conf.render(inst, t, Path("/run/x"), "10.0.0.1", 524288)
    for line in ("Mode FTFW {", "DisableExternalCache yes", "StartupResync yes", "IPv4_address 224.0.0.81",
                 "Group 8848", "IPv4_interface 10.0.0.1", "Interface eth1", "LockFile /run/x/lock",
                 "UNIX { Path /run/x/ctl }", "HashLimit 524288", "Protocol Accept { TCP UDP SCTP }",
                 "IPv4_address 10.1.0.1", "IPv4_address 10.1.0.3", "Systemd no"):
        assert line in text, line
    assert "10.1.0.2" not in text  # direct routing leaves no conntrack state to send


def test_a_master_alone_keeps_what_it_receives_out_of_the_kernel():
    [inst] = conf.instances((daemon("master"),))
    text = conf.render(inst, table(("10.1.0.1", Forward.MASQ, 1)), Path("/run/x"), "10.0.0.1", 1)
    assert "DisableExternalCache no" in text and "StartupResync no" in text


def test_a_backup_alone_sends_nothing_of_its_own():
    [inst] = conf.instances((daemon("backup"),))
    text = conf.render(inst, table(("10.1.0.1", Forward.MASQ, 1)), Path("/run/x"), "10.0.0.1", 1)
    assert "Protocol Accept { }" in text and "10.1.0.1" not in text


# ---------------------------------------------------------------- set replication

class FakeNfnl:
    """set_elements from a dict; commit records what it was given."""

    def __init__(self, sets_: dict | None = None) -> None:
        self.sets = sets_ or {}
        self.commits = []

    def set_elements(self, family, table_, name):
        return self.sets.get((family, table_, name), [])

    def commit(self, batch):
        self.commits.append(batch)


def key(prefix: bytes, rid: int) -> bytes:
    return prefix + rid.to_bytes(4, sys.byteorder)


CLIENT = bytes([198, 51, 100, 2]) + (40000).to_bytes(2, "big") + b"\0\0"  # addr . port (padded)


def test_flow_travels_with_the_server_identity_not_the_rid():
    master = table(("10.1.0.1", Forward.ROUTE, 7), ("10.1.0.2", Forward.ROUTE, 8))
    backup = table(("10.1.0.1", Forward.ROUTE, 21), ("10.1.0.2", Forward.ROUTE, 22))
    flow = Element(key(CLIENT, 8), timeout=900000, expiration=899000)
    nfnl = FakeNfnl({("ip", "ipvs2nft", "flows"): [flow]})
    sender = sets.Sender(syncid=5, maxlen=1472)
    [data] = sender.collect(nfnl, master, now=100.0)
    msg = json.loads(data)
    svc = next(iter(master.services))
    assert msg["id"] == 5 and msg["ids"] == [f"{svc.key}|{svc.dests[1].key}"]
    receiver = sets.Receiver(accept_id=0)
    assert receiver._decode(data, backup) == [(4, key(CLIENT, 22), 899000)]
    assert sets.Receiver(accept_id=6)._decode(data, backup) == []  # another cluster's syncid
    assert sets.Receiver(accept_id=5)._decode(data, backup) != []


def test_a_server_the_backup_lacks_is_dropped():
    master = table(("10.1.0.1", Forward.ROUTE, 7))
    nfnl = FakeNfnl({("ip", "ipvs2nft", "persist"): [Element(key(CLIENT[:4], 7), timeout=360000,
                                                             expiration=300000)]})
    [data] = sets.Sender(0, 1472).collect(nfnl, master, now=1.0)
    assert sets.Receiver(0)._decode(data, table(("10.1.0.9", Forward.ROUTE, 7))) == []


def test_only_what_changed_is_sent_again_until_the_full_resend():
    t = table(("10.1.0.1", Forward.MASQ, 7))
    elements = [Element(key(CLIENT[:4], 7), timeout=360000, expiration=360000)]
    nfnl = FakeNfnl({("inet", "ipvs2nft", "persist4"): elements})
    sender = sets.Sender(0, 1472)
    assert len(sender.collect(nfnl, t, now=1000.0)) == 1
    elements[0] = replace_expiration(elements[0], 359000)  # one second later, not refreshed
    assert sender.collect(nfnl, t, now=1001.0) == []
    elements[0] = replace_expiration(elements[0], 360000)  # refreshed 40 s later: beyond the slack
    assert len(sender.collect(nfnl, t, now=1040.0)) == 1
    assert len(sender.collect(nfnl, t, now=1040.0 + sets.RESEND_EVERY)) == 1  # everything again


def replace_expiration(e: Element, ms: int) -> Element:
    return Element(e.key, timeout=e.timeout, expiration=ms)


def test_datagrams_stay_within_maxlen():
    t = table(*((f"10.1.{i // 250}.{i % 250 + 1}", Forward.ROUTE, i + 1) for i in range(40)))
    prefixes = [bytes([198, 51, 100, i % 250]) + (i + 1024).to_bytes(2, "big") + b"\0\0" for i in range(3000)]
    elements = [Element(key(p, i % 40 + 1), timeout=900000, expiration=800000)
                for i, p in enumerate(prefixes)]
    nfnl = FakeNfnl({("ip", "ipvs2nft", "flows"): elements})
    out = sets.Sender(0, 1000).collect(nfnl, t, now=5.0)
    assert all(len(d) <= 1000 for d in out)
    assert sum(len(json.loads(d)["e"]) for d in out) == 3000


def test_receiver_replaces_an_element_it_added_before():
    t = table(("10.1.0.1", Forward.MASQ, 7))
    elements = [Element(key(CLIENT[:4], 7), timeout=360000, expiration=300000)]
    [data] = sets.Sender(0, 1472).collect(FakeNfnl({("inet", "ipvs2nft", "persist4"): elements}), t, now=1.0)
    nfnl = FakeNfnl()
    receiver = sets.Receiver(0)
    assert receiver.apply(nfnl, t, data, now=1.0) == 1
    assert receiver.apply(nfnl, t, data, now=2.0) == 1
    assert [len(b) for b in nfnl.commits] == [1, 2]  # add; then delete + add (an add keeps the old timeout)


def test_garbage_is_ignored():
    t = table(("10.1.0.1", Forward.MASQ, 7))
    for data in (b"", b"\x00\x01", b"[]", b'{"v":1,"id":0,"ids":[],"e":[[0,"zz",0,1000]]}', b'{"v":2}'):
        assert sets.Receiver(0).apply(FakeNfnl(), t, data) == 0


def test_services_differ_only_by_rid_in_the_table():
    """The identity is the service and the server, so a backup whose
    history gave other rids still finds them (see the tests above)."""
    t = table(("10.1.0.1", Forward.MASQ, 7))
    u = Table([replace(s, dests=tuple(replace(d, rid=99) for d in s.dests)) for s in t.services])
    assert set(sets.identities(t).values()) == set(sets.identities(u).values())


# ---------------------------------------------------------------- ipvsadm in a namespace

@pytest.fixture
def netns(tmp_path):
    """A namespace with lo and one more interface; ipvsadm runs there with
    the nftables back end and a private state file."""
    if NETNS_SKIP:
        pytest.skip(NETNS_SKIP)
    name = unique_prefix("i2s")

    def ipvsadm(args: str, **env) -> subprocess.CompletedProcess:
        full = dict(os.environ, IPVS2NFT_STATE=str(tmp_path / "state.json"), IPVS2NFT_BACKEND="nft", **env)
        return subprocess.run(["ip", "netns", "exec", name, str(Path(sys.executable).parent / "ipvsadm"),
                               *args.split()], capture_output=True, text=True, env=full)
    ipvsadm.name = name
    ipvsadm.dir = tmp_path
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "sh", "-ec",
                        "ip link set lo up; ip link add s0 type veth peer name s1; "
                        "ip addr add 10.9.0.1/24 dev s0; ip link set s1 up; ip link set s0 up"], check=True)
        yield ipvsadm
    finally:
        for state in ("master", "backup"):
            ipvsadm(f"--stop-daemon {state}")
        kill_namespace_processes(name)
        subprocess.run(["ip", "netns", "del", name], check=False)


def _processes(name: str) -> list[tuple[int, str]]:
    """(pid, command line) of every process in namespace ``name``."""
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
    out = []
    for pid in pids:
        try:
            out.append((int(pid), Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()))
        except OSError:
            continue
    return out


def _conntrackds(name: str) -> list[str]:
    return [cmd for _, cmd in _processes(name) if cmd and cmd.split()[0].endswith("conntrackd")]


def _supervisor(name: str) -> int | None:
    return next((pid for pid, cmd in _processes(name) if "ipvs2nft.sync.supervisor" in cmd), None)


def _wait(check, what: str, deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while not check():
        assert time.monotonic() < end, f"not within {deadline:.0f} s: {what}"
        time.sleep(0.05)


@pytest.mark.netns
def test_without_conntrackd_start_daemon_names_the_package_and_records_nothing(netns):
    p = netns("--start-daemon master --mcast-interface s0", IPVS2NFT_CONNTRACKD="/nonexistent/conntrackd")
    assert (p.returncode, p.stdout) == (2, "")
    assert p.stderr == ("ipvs2nft: --start-daemon runs conntrackd, which is not installed: install the "
                        "Debian package conntrackd (apt-get install conntrackd)\n")
    assert netns("-L --daemon").stdout == ""


@pytest.mark.netns
def test_start_and_stop_run_and_end_conntrackd(netns):
    assert netns("--start-daemon master --mcast-interface s0 --syncid 7").returncode == 0
    assert netns("--start-daemon backup --mcast-interface lo --mcast-port 9000").returncode == 0
    running = _conntrackds(netns.name)
    assert len(running) == 2  # two channels: two conntrackd
    conf_dir = netns.dir / "sync"
    assert sorted(p.name for p in conf_dir.iterdir() if p.is_dir()) == ["lo_224.0.0.81_9000",
                                                                       "s0_224.0.0.81_8848"]
    text = (conf_dir / "s0_224.0.0.81_8848" / "conntrackd.conf").read_text()
    assert "IPv4_interface 10.9.0.1" in text and "DisableExternalCache no" in text
    assert netns("-L --daemon").stdout == (
        "master sync daemon (mcast=s0, syncid=7, maxlen=1472, group=224.0.0.81, port=8848, ttl=1)\n"
        "backup sync daemon (mcast=lo, syncid=0, maxlen=65507, group=224.0.0.81, port=9000, ttl=1)\n")
    p = netns("--start-daemon backup --mcast-interface nosuch0")  # the kernel checks the interface first
    assert (p.returncode, p.stderr) == (255, "No such device\n")
    p = netns("--start-daemon backup --mcast-interface s0")
    assert (p.returncode, p.stderr) == (255, "Daemon has already run\n")
    # A new masquerading real server: the master's conntrackd is restarted with it in its filter.
    assert netns("-A -t 10.9.0.40:80 -s rr").returncode == 0
    assert netns("-a -t 10.9.0.40:80 -r 10.9.0.5 -m").returncode == 0
    conf = conf_dir / "s0_224.0.0.81_8848" / "conntrackd.conf"
    _wait(lambda: "IPv4_address 10.9.0.5" in conf.read_text() and len(_conntrackds(netns.name)) == 2,
          "conntrackd restarted with the new real server")
    # A sync daemon killed by hand takes its conntrackd with it, and the next command starts both again.
    supervisor = _supervisor(netns.name)
    os.kill(supervisor, 9)
    _wait(lambda: not _conntrackds(netns.name), "conntrackd ends with its sync daemon")
    assert netns("-L --daemon").returncode == 0
    assert _supervisor(netns.name) not in (None, supervisor) and len(_conntrackds(netns.name)) == 2
    assert netns("--stop-daemon master").returncode == 0
    assert len(_conntrackds(netns.name)) == 1
    assert netns("--stop-daemon backup").returncode == 0
    assert _conntrackds(netns.name) == []
    p = netns("--stop-daemon backup")
    assert (p.returncode, p.stderr) == (255, "No daemon is running\n")


def test_events_caused_by_a_netlink_request_can_be_left_out():
    """What the sync daemon stops window tracking on: connections a packet
    made (nlmsg_pid 0), not the states conntrackd wrote from the peer (its
    port id).  Recorded events, one of them given a requester's port id."""
    import struct

    from ipvs2nft import conntrack
    from tests.test_netlink_parse import _Recorded, datagrams, fixture

    raw = datagrams(fixture("conntrack_events")["datagrams"])
    first = bytearray(raw[0])
    struct.pack_into("=I", first, 12, 4242)  # nlmsg_pid of the datagram's first message
    tampered = [bytes(first), *raw[1:]]

    def read(datagrams_: list[bytes], packets_only: bool) -> list:
        events = object.__new__(conntrack.Events)
        events._nl = _Recorded(datagrams_, False)
        events.packets_only = packets_only
        return events.read()

    assert len(read(tampered, False)) == len(read(raw, False)) == 31
    assert len(read(tampered, True)) == len(read(raw, True)) - 1


@pytest.mark.netns
def test_a_removed_state_file_ends_the_sync_daemon(netns):
    """As after a reboot: no state, no sync daemon (and none left running)."""
    assert netns("--start-daemon master --mcast-interface s0").returncode == 0
    assert len(_conntrackds(netns.name)) == 1
    (netns.dir / "state.json").unlink()
    _wait(lambda: not _conntrackds(netns.name) and _supervisor(netns.name) is None, "the sync daemon ends")
    assert netns("-L --daemon").stdout == ""
