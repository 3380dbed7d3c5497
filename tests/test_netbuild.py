"""Our services written over raw netlink are what libnftables writes.

``netbuild`` mirrors ``build``/``direct`` message by message.  Here both are
loaded into fresh namespaces -- the nft text with ``nft -f``, the skeleton
with ``nft -f`` and the services with one netlink transaction -- and the two
rulesets must list the same, in nft's text and in its JSON (what the drift
check compares).  Then a run of changes goes through the back end with
rebuilds forbidden, so every one of them is the netlink path, and after
each the kernel must be what the store says.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from ipvs2nft import ids
from ipvs2nft.cli import ipvsadm as cli
from ipvs2nft.cli.ipvs2nft import translate_ipvsadm
from ipvs2nft.lab import inside, unique_prefix
from ipvs2nft.model import Table
from ipvs2nft.nft import build, direct, netbuild, scratch
from ipvs2nft.nft.backend import NftBackend
from ipvs2nft.nft.nfnetlink import Nfnetlink
from ipvs2nft.store import Store
from tests import oracle
from tests.conftest import NETNS_SKIP

pytestmark = [pytest.mark.netns]

CORPUS = {
    "every-shape": """\
-A -t 10.0.0.1:80 -s rr
-a -t 10.0.0.1:80 -r 192.168.100.10:80 -m -w 1
-a -t 10.0.0.1:80 -r 192.168.100.11:8080 -m -w 2
-A -t 10.0.0.2:80 -s wrr -p 60 -M 255.255.255.0
-a -t 10.0.0.2:80 -r 192.168.100.12:80 -m -w 2
-a -t 10.0.0.2:80 -r 192.168.100.13 -m -w 1
-A -u 10.0.0.3:53 -s wlc
-a -u 10.0.0.3:53 -r 192.168.100.14:53 -m
-A -t 10.0.0.4:443 -s sh -b sh-port
-a -t 10.0.0.4:443 -r 192.168.100.15:443 -m
-a -t 10.0.0.4:443 -r 192.168.100.16:443 -m
-A -t 10.0.0.5:0 -s dh -p 300
-a -t 10.0.0.5:0 -r 192.168.100.17:0 -m
-A -f 7 -s rr
-a -f 7 -r 192.168.100.18:0 -m
-a -f 7 -r 192.168.100.19:81 -m
-A -t [2001:db8::1]:80 -s rr -p 30 -M 64
-a -t [2001:db8::1]:80 -r [2001:db8:1::10]:80 -m
-a -t [2001:db8::1]:80 -r [2001:db8:1::11]:0 -m
-A -t 10.0.0.6:80 -s rr
-a -t 10.0.0.6:80 -r 192.168.100.20:80 -g
-a -t 10.0.0.6:80 -r 192.168.100.21:80 -m
-A -u 10.0.0.7:53 -s rr -o
-a -u 10.0.0.7:53 -r 192.168.100.22:53 -g
-A -t 10.0.0.8:80 -s lblc
-a -t 10.0.0.8:80 -r 192.168.100.23:80 -m -x 10 -y 5
-A -t 10.0.0.9:80 -s rr -p 120
-a -t 10.0.0.9:80 -r 192.168.100.24:80 -g
-a -t 10.0.0.9:80 -r 192.168.100.25:80 -i
-A -f 8 -6 -s rr -o
-a -f 8 -6 -r [2001:db8:1::12]:0 -g
-A -t 10.0.0.10:80 -s mh
-a -t 10.0.0.10:80 -r 192.168.100.26:80 -m
-A -t 10.0.0.11:80 -s rr
--set 600 60 200
""",
    "more": """\
-A --sctp-service 10.0.1.1:5000 -s nq
-a --sctp-service 10.0.1.1:5000 -r 192.168.100.30:5000 -m -w 3
-a --sctp-service 10.0.1.1:5000 -r 192.168.100.31:5000 -m -w 0
-A -t [2001:db8::2]:443 -s lblcr
-a -t [2001:db8::2]:443 -r [2001:db8:1::20]:443 -g
-a -t [2001:db8::2]:443 -r 192.168.100.32 -i
-A -f 9 -s sh -b sh-fallback -p 600 -M 255.255.0.0
-a -f 9 -r 192.168.100.33 -g
-a -f 9 -r 192.168.100.34:8080 -m
-A -u 10.0.1.2:0 -s rr -p 10
-a -u 10.0.1.2:0 -r 192.168.100.35 -m
-a -u 10.0.1.2:0 -r 127.0.0.1 -g
-A -t 10.0.1.3:80 -s wrr
-a -t 10.0.1.3:80 -r 192.168.100.36:80 -m -w 3 -x 4
-a -t 10.0.1.3:80 -r 192.168.100.37:80 -m -w 2
-A -t 10.0.1.4:80 -s fo
-a -t 10.0.1.4:80 -r 192.168.100.38:80 -m -w 2
-a -t 10.0.1.4:80 -r 192.168.100.39:80 -m -w 5
""",
}


def _netns(devices) -> str:
    name = unique_prefix("nb")
    subprocess.run(["ip", "netns", "add", name], check=True)
    for device in devices:  # tunnel devices: only their names (ifindex) matter to a listing
        subprocess.run(["ip", "-n", name, "link", "add", device, "type", "veth", "peer", "name",
                        f"p{device}"], check=True)
    return name


def _listings(name: str) -> tuple[str, list[str]]:
    def nft(*args):
        return subprocess.run(["ip", "netns", "exec", name, "nft", *args], capture_output=True, text=True,
                              check=True).stdout
    return nft("list", "ruleset"), scratch.normalize(json.loads(nft("-j", "list", "ruleset")))


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_netlink_services_list_as_libnftables_writes_them(name):
    if NETNS_SKIP:
        pytest.skip(NETNS_SKIP)
    table, errors, _ = translate_ipvsadm(CORPUS[name].encode())
    assert not errors
    table, _ = ids.assign(table)
    table = direct.local_nodes(table, lambda addr: str(addr) == "127.0.0.1")
    devices = sorted(direct.tunnels(table.services))
    text_ns, wire_ns = _netns(devices), _netns(devices)
    try:
        subprocess.run(["ip", "netns", "exec", text_ns, "nft", "-f", "-"], input=build.full(table, 1).text(),
                       text=True, check=True)
        skeleton = Table([], table.timeouts, table.daemons, table.snat)
        subprocess.run(["ip", "netns", "exec", wire_ns, "nft", "-f", "-"],
                       input=build.full(skeleton, 0).text(), text=True, check=True)
        with inside(wire_ns), Nfnetlink() as nfnl:
            nfnl.commit(netbuild.replace_all({}, table, 0, 1))
        text, wired = _listings(text_ns), _listings(wire_ns)
        assert "svc_1" in text[0] and "drs_" in text[0]
        assert wired[0] == text[0]
        assert wired[1] == text[1]
    finally:
        for ns in (text_ns, wire_ns):
            subprocess.run(["ip", "netns", "del", ns], check=False)


def test_snat_tables_are_left_to_libnftables():
    table, _ = ids.assign(Table([], snat="masquerade"))
    with pytest.raises(netbuild.Unsupported):
        netbuild.replace_all({}, table, 0, 1)


CHANGES = [
    "-A -t 10.0.0.1:80 -s rr", "-a -t 10.0.0.1:80 -r 192.168.100.10:80 -m",
    "-a -t 10.0.0.1:80 -r 192.168.100.11:80 -m -w 3", "-E -t 10.0.0.1:80 -s wrr",
    "-e -t 10.0.0.1:80 -r 192.168.100.10:80 -m -w 0", "-E -t 10.0.0.1:80 -s wlc -p 30",
    "-a -t 10.0.0.1:80 -r 192.168.100.12:80 -g", "-d -t 10.0.0.1:80 -r 192.168.100.11:80",
    "-A -f 5 -6 -s sh", "-a -f 5 -6 -r [2001:db8::5]:0 -m", "-a -f 5 -6 -r [2001:db8::6]:8080 -m",
    "-A -u 10.0.0.2:53 -s lc -o", "-a -u 10.0.0.2:53 -r 192.168.100.13:53 -g",
    "-E -u 10.0.0.2:53 -s rr", "-D -t 10.0.0.1:80", "-e -f 5 -6 -r [2001:db8::6]:8080 -m -x 9",
    "-C", "-A -t 10.0.0.3:80 -s dh", "-a -t 10.0.0.3:80 -r 192.168.100.14:80 -m",
]


def test_changes_go_over_netlink_and_leave_the_kernel_as_the_store_says(tmp_path, monkeypatch):
    """Every change of a sequence through the back end, rebuilds forbidden
    once the tables exist; the kernel checked against the store after each."""
    if NETNS_SKIP:
        pytest.skip(NETNS_SKIP)
    monkeypatch.setenv("IPVS2NFT_STATE", str(tmp_path / "state.json"))
    monkeypatch.setenv("IPVS2NFT_BACKEND", "nft")
    rebuilds = []
    real = NftBackend.rebuild
    monkeypatch.setattr(NftBackend, "rebuild", lambda self, *a: rebuilds.append(a) or real(self, *a))
    with oracle.vm_like_netns(tmp_path):
        status, _, err = oracle.call(cli.restore_main, [], b"-A -t 10.9.9.9:80 -s rr\n", "ipvsadm-restore")
        assert status == 0, err
        assert len(rebuilds) == 1  # the first load made the tables
        for line in CHANGES:
            status, _, err = oracle.call(cli.main, line.split(), None, "ipvsadm")
            assert status == 0, (line, err)
            store = Store()
            assert NftBackend(store).verify(store.read()), f"the kernel differs from the store after {line}"
        assert len(rebuilds) == 1, "a change was not carried out over netlink"
