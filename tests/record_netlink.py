"""Record tests/fixtures/netlink/: what the kernel really sends, beside what
the standard tools made of the same traffic.

Run as root (``.venv/bin/python tests/record_netlink.py``); it builds the
lab of tests/netlink_lab.py, removes it afterwards, and writes one JSON file
per scenario: ``datagrams`` (hex, as ``recv`` returned them) and an oracle
recorded at the same moment by an independent reader -- ``conntrack -E`` /
``conntrack -L -o extended,id`` (conntrack-tools), ``nft -j list set``,
``nft monitor``.  The unit tests (test_netlink_parse.py) parse the
datagrams with ipvs2nft's parsers and compare with the oracle, without root.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ipvs2nft import netlink  # noqa: E402
from ipvs2nft.conntrack import Conntrack, flow_tuple  # noqa: E402
from ipvs2nft.lab import VIP4, VIP6, inside  # noqa: E402
from ipvs2nft.nft import nfnetlink  # noqa: E402
from tests.netlink_lab import TABLE, connect, hold, netlink_lab  # noqa: E402

OUT = Path(__file__).resolve().parent / "fixtures" / "netlink"


def _dump_raw(sock: netlink.NetlinkSocket, kind: int, family: int, body: bytes = b"") -> list[str]:
    """A dump's datagrams as hex, up to and including NLMSG_DONE."""
    seq = sock.next_seq()
    sock.send_all(netlink.message(kind, netlink.NLM_F_REQUEST | netlink.NLM_F_DUMP, seq, family, body))
    out = []
    while True:
        data = sock._sock.recv(netlink.RECV_SIZE)
        out.append(data.hex())
        if any(m[0] == netlink.NLMSG_DONE for m in netlink.split(data)):
            return out


def _tool(lab, *argv: str) -> subprocess.Popen:
    """A tool in the director, its output line-buffered (read after SIGINT)."""
    return subprocess.Popen(["ip", "netns", "exec", lab.director, "stdbuf", "-oL", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _stop(proc: subprocess.Popen) -> str:
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=10)
    return out


def _write(name: str, **content: object) -> None:
    note = ("Recorded by tests/record_netlink.py on Linux " + os.uname().release + "; datagrams are "
            "hex as recv() returned them, the other fields what an independent tool printed.")
    (OUT / f"{name}.json").write_text(json.dumps({"note": note, **content}, indent=1) + "\n")


def record() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with netlink_lab() as lab:
        with inside(lab.director):
            events = netlink.NetlinkSocket(groups=[1, 2, 3], rcvbuf=8 << 20)
            dumper = netlink.NetlinkSocket()
            nft = nfnetlink.Nfnetlink()
            monitor = netlink.NetlinkSocket(groups=[nfnetlink.NFNLGRP_NFTABLES], rcvbuf=8 << 20)
        tool = _tool(lab, "conntrack", "-E", "-o", "id,extended")
        time.sleep(0.5)
        connect(lab, VIP4, 80)
        connect(lab, VIP4, 443)
        connect(lab, VIP4, 53, proto="udp")
        connect(lab, VIP4, 8080)
        connect(lab, VIP6, 80)
        held = hold(lab)
        time.sleep(0.3)
        with inside(lab.director):
            ct = Conntrack()
        udp = [f for f in ct.dump(0x201)][0]
        ct.delete(flow_tuple(udp.orig.proto, udp.orig.src, udp.orig.dst, udp.orig.sport, udp.orig.dport))
        time.sleep(0.3)
        datagrams, lost = events.drain()
        assert not lost
        _write("conntrack_events", datagrams=[d.hex() for d in datagrams], conntrack_E=_stop(tool))

        dump = _dump_raw(dumper, (1 << 8) | 1, socket.AF_UNSPEC)
        listing = _tool(lab, "conntrack", "-L", "-o", "id,extended").communicate(timeout=10)[0]
        marked = _dump_raw(dumper, (1 << 8) | 1, socket.AF_UNSPEC,
                           netlink.attr_be32(8, 0x100) + netlink.attr_be32(21, 0xFF00))
        _write("conntrack_dump", datagrams=dump, conntrack_L=listing, marked_0x100_0xff00=marked)
        held.stdin.close()
        held.wait(timeout=10)

        sets = {}
        for name, kind in (("bestat", "set"), ("svc", "set"), ("backend", "map"), ("slots", "map"),
                           ("recent", "set")):
            raw = _dump_raw(dumper, (10 << 8) | nfnetlink.NFT_MSG_GETSETELEM, nfnetlink.FAMILY["inet"],
                            netlink.attr_str(1, TABLE) + netlink.attr_str(2, name))
            listed = subprocess.run(["ip", "netns", "exec", lab.director, "nft", "-j", "list", kind, "inet",
                                     TABLE, name], capture_output=True, text=True, check=True).stdout
            sets[name] = {"datagrams": raw, "nft_j": json.loads(listed)}
        _write("set_elements", sets=sets)

        monitor.drain()
        watcher = _tool(lab, "nft", "monitor")
        time.sleep(0.5)
        key = nfnetlink.join_key(socket.inet_aton(VIP4), bytes([6]), (8080).to_bytes(2, "big"))
        genid = nft.commit(nfnetlink.Batch("inet", TABLE).add("svc", key)
                           .delete("slots", (0x1).to_bytes(4, sys.byteorder))
                           .add("slots", (0x1).to_bytes(4, sys.byteorder), nfnetlink.Verdict.goto("rs1")))
        subprocess.run(["ip", "netns", "exec", lab.director, "nft", "flush", "ruleset"], check=True)
        time.sleep(0.3)
        datagrams, lost = monitor.drain()
        assert not lost
        _write("nft_monitor", datagrams=[d.hex() for d in datagrams], nft_monitor=_stop(watcher),
               our_genid=genid, our_pid=os.getpid())


if __name__ == "__main__":
    record()
