"""Foreign rules (issue 5): other owners' tables are never touched.

A firewalld-like ``inet firewalld`` filter table, a Docker-like ``ip nat``
table (DOCKER chain, masquerade), a kube-proxy-like ``ip kube-proxy`` table
with verdict maps, and tables made by the ``iptables-nft`` command stay
byte-identical (``nft list table``) across every kind of ipvsadm command,
across failing commands and across the rebuild that repairs drift.  In a lab,
traffic through our service works with those tables present, and theirs
keeps working: the DNATs of Docker and kube-proxy still answer, and the
firewall's drop rules keep dropping.
"""

from __future__ import annotations

import fcntl
import os

import pytest

from ipvs2nft.lab import VIP4, rs4
from tests.reliability_helpers import (
    FOREIGN,
    Director,
    add_foreign_tables,
    foreign_listing,
    module_director,
    no_traceback,
)

pytestmark = [pytest.mark.netns]

V = "10.0.0.1:80"
# (program, arguments, stdin, expected status); every kind of command
COMMANDS = [
    ("ipvsadm", f"-A -t {V} -s rr", None, 0),
    ("ipvsadm", f"-a -t {V} -r 192.168.100.10:80 -m", None, 0),
    ("ipvsadm", f"-a -t {V} -r 192.168.100.11:80 -m -w 3", None, 0),
    ("ipvsadm", f"-e -t {V} -r 192.168.100.11:80 -m -w 1", None, 0),
    ("ipvsadm", f"-E -t {V} -s wrr -p 60", None, 0),
    ("ipvsadm", "-A -u 10.0.0.1:53 -s sh -b sh-port", None, 0),
    ("ipvsadm", "-a -u 10.0.0.1:53 -r 192.168.100.12 -g", None, 0),
    ("ipvsadm", "-A -f 7 -s mh", None, 0),
    ("ipvsadm", "-a -f 7 -r 192.168.100.12:0 -m", None, 0),
    ("ipvsadm", "-A -t [2001:db8::1]:80 -s lc", None, 0),
    ("ipvsadm", "-a -t [2001:db8::1]:80 -r [2001:db8:100::10]:80 -m", None, 0),
    ("ipvsadm", "-L -n", None, 0),
    ("ipvsadm", "-L -n --stats", None, 0),
    ("ipvsadm", "-L -n -c", None, 0),
    ("ipvsadm", "-S -n", None, 0),
    ("ipvsadm", "-Z", None, 0),
    ("ipvsadm", f"-Z -t {V}", None, 0),
    ("ipvsadm", "--set 100 20 30", None, 0),
    ("ipvsadm", "--start-daemon master --mcast-interface lo", None, 0),
    ("ipvsadm", "-L --daemon", None, 0),
    ("ipvsadm", "--stop-daemon master", None, 0),
    ("ipvs2nft", "snat masquerade", None, 0),
    ("ipvs2nft", "snat off", None, 0),
    ("ipvsadm", f"-d -t {V} -r 192.168.100.10:80", None, 0),
    ("ipvsadm", "-R", "-A -t 10.0.0.2:80 -s rr\n-a -t 10.0.0.2:80 -r 192.168.100.10:80 -m\n", 0),
    ("ipvsadm", "-D -t 10.0.0.2:80", None, 0),
    ("ipvsadm-save", "-n", None, 0),
    ("ipvsadm-restore", "", "-A -t 10.0.0.3:80 -s rr\n-a -t 10.0.0.3:80 -r 192.168.100.10:80 -m\n", 0),
    # failing commands
    ("ipvsadm", "-A -t 10.0.0.3:80 -s rr", None, 255),  # exists
    ("ipvsadm", "-A -t 10.0.0.4:80 -s bogus", None, 255),
    ("ipvsadm", "-d -t 10.0.0.3:80 -r 192.168.100.99:80", None, 255),
    ("ipvsadm", "-a -t 10.0.0.3:80 -r 192.168.100.10:80 -m -x 1 -y 2", None, 255),
    ("ipvsadm", "-A -u 10.0.0.1:53 -w 2", None, 2),
    ("ipvsadm", "--bogus", None, 255),
    ("ipvsadm", "-R", "-A -t 10.0.0.5:80 -s rr\n-A -t 10.0.0.5:80\n", 255),
    ("ipvsadm", "-C", None, 0),
]


@pytest.fixture(scope="module")
def director(tmp_path_factory):
    for d in module_director(tmp_path_factory, "frn"):
        add_foreign_tables(d)
        yield d


def _unchanged(d: Director, before: dict[str, str], what: str) -> None:
    after = foreign_listing(d)
    changed = [t for t in before if before[t] != after[t]]
    assert not changed, f"{what} changed {changed}:\n{after[changed[0]]}"


def test_foreign_tables_exist(director):
    listing = foreign_listing(director)
    for fam, name in FOREIGN:
        assert listing[f"{fam} {name}"].startswith(f"table {fam} {name}"), listing[f"{fam} {name}"]


def test_every_command_leaves_foreign_tables_byte_identical(director):
    director.reset()
    before = foreign_listing(director)
    for prog, args, stdin, status in COMMANDS:
        p = director.ipvsadm(args, stdin=stdin, prog=prog)
        assert p.returncode == status, (prog, args, p.returncode, p.stderr)
        assert no_traceback(p.stderr), p.stderr
        _unchanged(director, before, f"{prog} {args}")


@pytest.mark.parametrize("drift", [["delete", "table", "inet", "ipvs2nft"],
                                   ["delete", "element", "inet", "ipvs2nft", "gen", "{", "1", "}"]])
def test_rebuild_after_drift_leaves_foreign_tables_alone(director, drift):
    director.reset()
    director.restore("-A -t 10.0.0.1:80 -s rr\n-a -t 10.0.0.1:80 -r 192.168.100.10:80 -m\n")
    before = foreign_listing(director)
    director.nft(*drift, check=False)
    director.ipvsadm("-a -t 10.0.0.1:80 -r 192.168.100.11:80 -m", check=True)
    _unchanged(director, before, "the rebuild")
    assert director.kernel_equals_store() is None


def test_failures_of_ipvs2nft_itself_leave_foreign_tables_alone(director):
    """Lock timeout, broken state file, crash: still nothing of theirs moves."""
    director.reset()
    director.restore("-A -t 10.0.0.1:80 -s rr\n")
    before = foreign_listing(director)
    fd = os.open(str(director.state) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert director.ipvsadm("-C", IPVS2NFT_LOCK_WAIT="0.2").returncode == 4
    finally:
        os.close(fd)
    _unchanged(director, before, "a lock timeout")
    for point in ("before-kernel", "after-kernel", "after-store"):
        director.ipvsadm("-a -t 10.0.0.1:80 -r 192.168.100.10:80 -m", IPVS2NFT_FAULT=point)
        _unchanged(director, before, f"a crash at {point}")
    saved = director.state.read_bytes()
    director.state.write_bytes(b"{broken")
    try:
        assert director.ipvsadm("-A -t 10.0.0.2:80").returncode == 2
        _unchanged(director, before, "a broken state file")
    finally:
        director.state.write_bytes(saved)


# ---------------------------------------------------------------- traffic

def _counter(lab, fam: str, table: str, needle: str) -> int:
    for line in lab.nft("list", "table", fam, table).splitlines():
        if needle in line and "counter packets" in line:
            return int(line.split("counter packets")[1].split()[0])
    raise AssertionError(f"no counter rule with {needle!r} in {fam} {table}")


def _traffic_checks(lab) -> None:
    ours = lab.backends(VIP4, 80, 4, timeout=1.0)
    assert ours == [rs4(1), rs4(0), rs4(1), rs4(0)] or ours == [rs4(0), rs4(1), rs4(0), rs4(1)], ours
    # theirs: Docker's and kube-proxy's DNATs
    assert lab.backends("192.168.0.42", 8080, 2, timeout=1.0) == [rs4(2)] * 2
    assert lab.backends("192.168.0.41", 443, 2, timeout=1.0) == [rs4(1)] * 2
    # the firewall drops: firewalld-like forward rule and an iptables-nft rule
    dropped = _counter(lab, "inet", "firewalld", "40404")
    assert lab.backends(VIP4, 80, 1, sport=40404, timeout=0.5) == [None]
    assert _counter(lab, "inet", "firewalld", "40404") > dropped
    assert lab.backends(VIP4, 80, 1, sport=40405, timeout=0.5) == [None]
    # and a port they do not drop goes through
    assert lab.backends(VIP4, 80, 1, sport=40406, timeout=1.0)[0] in (rs4(0), rs4(1))


def test_traffic_through_ours_and_theirs(lab):
    add_foreign_tables(Director(lab.state_dir), ns=lab.director)
    lab.ipvsadm(f"-A -t {VIP4}:80 -s rr")
    lab.ipvsadm(f"-a -t {VIP4}:80 -r {rs4(0)}:80 -m")
    lab.ipvsadm(f"-a -t {VIP4}:80 -r {rs4(1)}:80 -m")
    _traffic_checks(lab)
    # a full rebuild (new timeouts) and a repair after drift keep both sides working
    lab.ipvsadm("--set 900 120 300")
    lab.nft("delete", "table", "inet", "ipvs2nft")
    lab.ipvsadm(f"-e -t {VIP4}:80 -r {rs4(0)}:80 -m -w 1")
    _traffic_checks(lab)
    # without our service their tables still do their work
    lab.ipvsadm("-C")
    assert lab.backends("192.168.0.42", 8080, 1, timeout=1.0) == [rs4(2)]
    assert lab.backends("192.168.0.41", 443, 1, timeout=1.0) == [rs4(1)]
