"""The raw netlink parsers and builders, without root or a kernel.

The fixtures in tests/fixtures/netlink/ are datagrams recorded from a 6.18
kernel by tests/record_netlink.py, each beside what an independent tool
printed for the same traffic at the same moment (conntrack-tools'
``conntrack -E`` / ``-L``, ``nft -j list``, ``nft monitor``): the parsers must
agree with those tools field by field.
"""

from __future__ import annotations

import errno
import json
import re
import socket
import struct
import sys
from pathlib import Path

import pytest

from ipvs2nft import conntrack, netlink
from ipvs2nft.conntrack import Event, EventsLost, Flow, TcpState
from ipvs2nft.nft import nfnetlink
from ipvs2nft.nft.nfnetlink import Batch, Verdict, join_key, split_key
from tests.netlink_lab import LABEL, ZONE

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "netlink"


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def datagrams(hexes: list[str]) -> list[bytes]:
    return [bytes.fromhex(h) for h in hexes]


# ---------------------------------------------------------------- conntrack-tools' text as the oracle

_KIND = {"NEW": Event.NEW, "UPDATE": Event.UPDATE, "DESTROY": Event.DESTROY}
_LINE = re.compile(r"^\s*(?:\[(?P<kind>\w+)\]\s+)?(?P<l3>ipv[46])\s+(?P<family>\d+)\s+(?P<proto>\w+)\s+"
                   r"(?P<protonum>\d+)\s+(?P<timeout>\d+)\s+(?P<rest>.*)$")


def tool_line(line: str) -> dict:
    """One line of ``conntrack -o id,extended`` as a dict."""
    m = _LINE.match(line)
    assert m, line
    out = {"kind": m["kind"], "family": int(m["family"]), "proto": int(m["protonum"]),
           "timeout": int(m["timeout"]), "state": None, "flags": set(), "tuples": [[]], "counters": []}
    for token in m["rest"].split():
        if token.startswith("["):
            out["flags"].add(token.strip("[]"))
        elif "=" not in token:
            out["state"] = token
        else:
            key, value = token.split("=", 1)
            if key in ("src", "dst", "sport", "dport"):
                if key == "src" and out["tuples"][-1]:
                    out["tuples"].append([])
                out["tuples"][-1].append(value)
            elif key == "packets":
                out["counters"].append([int(value)])
            elif key == "bytes":
                out["counters"][-1].append(int(value))
            else:
                out[key] = value
    return out


def tuple_text(t: conntrack.Tuple) -> list[str]:
    text = [conntrack.addr_text(t.src), conntrack.addr_text(t.dst)]
    return text + ([str(t.sport), str(t.dport)] if t.proto in (6, 17) else [])


def assert_same_flow(flow: Flow, line: dict, exact_timeout: bool = True) -> None:
    assert flow.id == int(line["id"])
    assert flow.family == line["family"]
    assert flow.orig.proto == flow.reply.proto == line["proto"]
    assert [tuple_text(flow.orig), tuple_text(flow.reply)] == line["tuples"]
    assert flow.mark == int(line.get("mark", 0))
    assert flow.zone == int(line.get("zone", 0))
    state = TcpState(flow.tcp_state).name if flow.tcp_state is not None else None
    if line["proto"] == 6 and line["kind"] != "DESTROY":
        assert state == line["state"]
    assert bool(flow.status & conntrack.IPS_ASSURED) == ("ASSURED" in line["flags"])
    assert bool(flow.status & conntrack.IPS_SEEN_REPLY) == ("UNREPLIED" not in line["flags"])
    if exact_timeout:
        assert flow.timeout == line["timeout"]
    else:  # the tool listed a moment after our dump
        assert 0 <= flow.timeout - line["timeout"] <= 2
    if line["counters"]:
        counters = [[flow.orig_packets, flow.orig_bytes], [flow.reply_packets, flow.reply_bytes]]
        assert counters == line["counters"]


def parse_events(raw: list[bytes], lost: bool = False) -> list[tuple[Event, Flow]]:
    """Events.read over recorded datagrams (a socket stand-in)."""
    events = object.__new__(conntrack.Events)
    events._nl = _Recorded(raw, lost)
    return events.read()


class _Recorded:
    def __init__(self, raw: list[bytes], lost: bool) -> None:
        self.raw, self.lost = raw, lost

    def drain(self, limit: int = 0) -> tuple[list[bytes], bool]:
        return self.raw, self.lost


def test_events_match_conntrack_E():
    rec = fixture("conntrack_events")
    ours = parse_events(datagrams(rec["datagrams"]))
    theirs = [tool_line(line) for line in rec["conntrack_E"].splitlines() if line.lstrip().startswith("[")]
    assert len(ours) == len(theirs) == 31
    for (kind, flow), line in zip(ours, theirs, strict=True):
        assert kind == _KIND[line["kind"]]
        assert_same_flow(flow, line)


def test_event_sequence_of_a_short_tcp_connection():
    """NEW(SYN_SENT) then SYN_RECV, ESTABLISHED, FIN_WAIT, LAST_ACK, TIME_WAIT:
    daemon.md section 1.1's 7 events minus the late DESTROY."""
    ours = parse_events(datagrams(fixture("conntrack_events")["datagrams"]))
    to_80 = [(k, f) for k, f in ours if f.orig.dport == 80 and f.family == socket.AF_INET]
    assert [k for k, _ in to_80] == [Event.NEW] + [Event.UPDATE] * 5
    assert [TcpState(f.tcp_state) for _, f in to_80] == [
        TcpState.SYN_SENT, TcpState.SYN_RECV, TcpState.ESTABLISHED, TcpState.FIN_WAIT,
        TcpState.LAST_ACK, TcpState.TIME_WAIT]


def test_labels_zone_and_destroy_counters():
    ours = parse_events(datagrams(fixture("conntrack_events")["datagrams"]))
    by_port = {}
    for kind, flow in ours:
        by_port.setdefault(flow.orig.dport, []).append((kind, flow))
    https = [(k, f) for k, f in by_port[443]]
    assert all(f.zone == ZONE for _, f in https)
    # ctnetlink sends labels in events only when they change (the NEW event here)
    assert [(k, f.label(LABEL), f.label(0)) for k, f in https if f.labels is not None] == [
        (Event.NEW, True, False)]
    assert not any(f.label(LABEL) for _, f in by_port[80])
    destroy = [(k, f) for k, f in ours if k == Event.DESTROY]
    assert len(destroy) == 1
    flow = destroy[0][1]
    assert flow.orig.proto == 17 and flow.orig_packets == 1 and flow.reply_packets == 1
    assert flow.mark == 0x201


def dumped_flows(hexes: list[str]) -> list[Flow]:
    """The flows of a recorded dump, as Conntrack.dump parses them."""
    flows = []
    for data in datagrams(hexes):
        for kind, _, _, buf, pos, end in netlink.split(data):
            if kind >> 8 == conntrack.NFNL_SUBSYS_CTNETLINK:
                flows.append(conntrack.parse_flow(buf, pos + 4, end, buf[pos]))
    return flows


def test_dump_matches_conntrack_L():
    rec = fixture("conntrack_dump")
    flows = dumped_flows(rec["datagrams"])
    lines = {int(line["id"]): line for line in map(tool_line, rec["conntrack_L"].splitlines()[:-1])}
    assert sorted(f.id for f in flows) == sorted(lines)
    for flow in flows:
        assert_same_flow(flow, lines[flow.id], exact_timeout=False)


def test_fast_tuple_path_agrees_with_the_attribute_walk():
    """parse_flow reads IPv4/IPv6 tuples with ports in one unpack when their
    layout is the kernel's usual one; the general walk must read the same."""
    seen = {4: 0, 16: 0}
    for name in ("conntrack_dump", "conntrack_events"):
        for data in datagrams(fixture(name)["datagrams"]):
            for _, _, _, buf, pos, end in netlink.split(data):
                for akind, value in netlink.attrs(buf, pos + 4, end):
                    if akind in (conntrack.CTA_TUPLE_ORIG, conntrack.CTA_TUPLE_REPLY):
                        fast = conntrack._tuple(value, 0, len(value))
                        assert fast == conntrack._tuple_walk(value, 0, len(value))
                        seen[len(fast.src)] += fast.proto in (6, 17)
    assert seen[4] > 20 and seen[16] >= 12


def test_mark_filtered_dump_holds_only_the_masked_marks():
    rec = fixture("conntrack_dump")
    marks = [f.mark for f in dumped_flows(rec["marked_0x100_0xff00"])]
    all_marks = [int(tool_line(line).get("mark", 0)) for line in rec["conntrack_L"].splitlines()[:-1]]
    assert sorted(marks) == sorted(m for m in all_marks if m & 0xFF00 == 0x100)
    assert len(marks) >= 3


def test_events_lost_carries_what_was_read():
    raw = datagrams(fixture("conntrack_events")["datagrams"])[:3]
    with pytest.raises(EventsLost) as lost:
        parse_events(raw, lost=True)
    assert len(lost.value.events) == 3 and lost.value.events[0][0] == Event.NEW


# ---------------------------------------------------------------- conntrack requests

def _parse_attrs(data: bytes) -> dict[int, bytes]:
    return dict(netlink.attrs(data))


def test_tuple_request_layout():
    t = conntrack.flow_tuple("tcp", "10.0.0.1", "192.168.0.40", 1234, 80)
    outer = _parse_attrs(conntrack._tuple_attr(conntrack.CTA_TUPLE_ORIG, t))
    inner = _parse_attrs(outer[conntrack.CTA_TUPLE_ORIG])
    ip = _parse_attrs(inner[conntrack.CTA_TUPLE_IP])
    proto = _parse_attrs(inner[conntrack.CTA_TUPLE_PROTO])
    assert ip == {conntrack.CTA_IP_V4_SRC: socket.inet_aton("10.0.0.1"),
                  conntrack.CTA_IP_V4_DST: socket.inet_aton("192.168.0.40")}
    assert proto == {conntrack.CTA_PROTO_NUM: b"\x06", conntrack.CTA_PROTO_SRC_PORT: b"\x04\xd2",
                     conntrack.CTA_PROTO_DST_PORT: b"\x00\x50"}
    assert conntrack._tuple(outer[conntrack.CTA_TUPLE_ORIG], 0, len(outer[conntrack.CTA_TUPLE_ORIG])) == t
    v6 = conntrack.flow_tuple(17, "2001:db8::1", "2001:db8::40", 5, 53)
    assert conntrack._family(v6) == socket.AF_INET6
    assert str(v6) == "17 2001:db8::1:5 -> 2001:db8::40:53"


class _FakeSocket:
    def __init__(self, fail: Exception | None = None, answer: Exception | None = None) -> None:
        if fail:
            raise fail
        self.answer = answer
        self.closed = False

    def request(self, *args, **kw):
        if self.answer:
            raise self.answer
        return iter(())

    def join(self, group):
        pass

    def close(self):
        self.closed = True


@pytest.mark.parametrize("fail, answer", [
    (OSError(errno.EPROTONOSUPPORT, "Protocol not supported"), None),
    (None, netlink.NetlinkError(errno.EINVAL)),
    (None, netlink.NetlinkError(errno.EOPNOTSUPP)),
])
def test_missing_ctnetlink_is_a_clear_error(monkeypatch, fail, answer):
    monkeypatch.setattr(conntrack, "NetlinkSocket", lambda **kw: _FakeSocket(fail, answer))
    with pytest.raises(conntrack.ConntrackUnavailable, match="nf_conntrack_netlink"):
        conntrack.Conntrack()
    with pytest.raises(conntrack.ConntrackUnavailable, match="ctnetlink"):
        conntrack.Events()


def test_no_permission_is_not_disguised_as_missing(monkeypatch):
    denied = netlink.NetlinkError(errno.EPERM)
    monkeypatch.setattr(conntrack, "NetlinkSocket", lambda **kw: _FakeSocket(None, denied))
    with pytest.raises(PermissionError, match="CAP_NET_ADMIN"):
        conntrack.Conntrack()


def test_delete_marked_refuses_a_zero_mask():
    ct = object.__new__(conntrack.Conntrack)
    ct._nl = None
    with pytest.raises(ValueError, match="whole conntrack table"):
        ct.delete_marked(0, 0)


def test_bpf_program_shape():
    """Jumps land inside the program and every path returns (the kernel
    refuses anything else; the netns tests run it on real events)."""
    program = conntrack.mark_filter_program(0x101, 0xFFFF)
    for i, (code, jt, jf, _) in enumerate(program):
        if code & 0x07 == 0x05:  # BPF_JMP
            assert i + 1 + max(jt, jf) < len(program)
    assert program[-1][0] == 0x06 and program[-2][0] == 0x06
    absent = program[8]
    assert absent == (0x06, 0, 0, 0)  # mark 0x101: a message without CTA_MARK is dropped
    assert conntrack.mark_filter_program(0, 0xFF00)[8] == (0x06, 0, 0, 0xFFFFFFFF)


# ---------------------------------------------------------------- set elements vs nft -j

def dumped(name: str) -> list[nfnetlink.Element]:
    out: list[nfnetlink.Element] = []
    for data in datagrams(fixture("set_elements")["sets"][name]["datagrams"]):
        for kind, _, _, buf, pos, end in netlink.split(data):
            if kind == (nfnetlink.NFNL_SUBSYS_NFTABLES << 8) | nfnetlink.NFT_MSG_NEWSETELEM:
                nfnetlink.parse_elements(buf, pos + 4, end, out)
    return out


def listed(name: str) -> list:
    body = fixture("set_elements")["sets"][name]["nft_j"]["nftables"][1]
    return next(iter(body.values()))["elem"]


def _mark(value: int) -> bytes:
    return value.to_bytes(4, sys.byteorder)  # marks live in registers in host order


def test_counted_concatenation_matches_nft():
    """``mark . ct_dir`` with per-element counters: the per-backend In/Out
    packets and bytes of daemon.md section 4.1."""
    ours = {tuple(split_key(e.key, [4, 1])): (e.packets, e.bytes) for e in dumped("bestat")}
    theirs = {}
    for item in listed("bestat"):
        mark, direction = item["elem"]["val"]["concat"]
        key = (_mark(mark), bytes([{"original": 0, "reply": 1}[direction]]))
        theirs[key] = (item["elem"]["counter"]["packets"], item["elem"]["counter"]["bytes"])
    assert ours == theirs and len(ours) == 8


def test_service_set_keys_and_counters_match_nft():
    ours = {tuple(split_key(e.key, [4, 1, 2])): (e.packets, e.bytes) for e in dumped("svc")}
    theirs = {}
    for item in listed("svc"):
        addr, proto, port = item["elem"]["val"]["concat"]
        key = (socket.inet_aton(addr), bytes([socket.getprotobyname(proto)]), port.to_bytes(2, "big"))
        theirs[key] = (item["elem"]["counter"]["packets"], item["elem"]["counter"]["bytes"])
    assert ours == theirs
    assert sum(p for p, _ in ours.values()) >= 3  # the nat chain looked each connection up


def test_data_map_matches_nft():
    ours = {e.key: split_key(e.data, [4, 2]) for e in dumped("backend")}
    theirs = {_mark(k): [socket.inet_aton(v["concat"][0]), v["concat"][1].to_bytes(2, "big")]
              for k, v in listed("backend")}
    assert ours == theirs
    assert all(e.packets is None and e.verdict is None for e in dumped("backend"))


def test_verdict_map_matches_nft():
    ours = {e.key: (e.verdict, e.chain) for e in dumped("slots")}
    theirs = {}
    for key, value in listed("slots"):
        if "accept" in value:
            theirs[_mark(key)] = (nfnetlink.NF_ACCEPT, None)
        else:
            theirs[_mark(key)] = (nfnetlink.NFT_GOTO, value["goto"]["target"])
    assert ours == theirs


def test_timeouts_match_nft():
    [element] = dumped("recent")
    [item] = listed("recent")
    assert element.key == socket.inet_aton(item["elem"]["val"])
    assert element.timeout == item["elem"]["timeout"] * 1000
    assert abs(element.expiration / 1000 - item["elem"]["expires"]) <= 1


def test_fast_counter_path_agrees_with_the_attribute_walk():
    checked = 0
    for name in ("bestat", "svc"):
        for data in datagrams(fixture("set_elements")["sets"][name]["datagrams"]):
            for _, _, _, buf, pos, end in netlink.split(data):
                for kind, elements in netlink.attrs(buf, pos + 4, end):
                    if kind != nfnetlink.NFTA_SET_ELEM_LIST_ELEMENTS:
                        continue
                    for _, element in netlink.attrs(elements):
                        for akind, expr in netlink.attrs(element):
                            if akind == nfnetlink.NFTA_SET_ELEM_EXPR:
                                slow = nfnetlink._counter(expr, 0, len(expr))
                                assert nfnetlink._counter_fast(expr, 0, len(expr)) == slow
                                checked += slow is not None
    assert checked == 11


def test_split_and_join_key():
    key = join_key(socket.inet_aton("10.0.0.1"), b"\x06", b"\x00\x50")
    assert key == bytes.fromhex("0a000001" "06000000" "00500000")
    assert split_key(key, [4, 1, 2]) == [socket.inet_aton("10.0.0.1"), b"\x06", b"\x00\x50"]
    with pytest.raises(ValueError):
        split_key(key, [4, 1])


# ---------------------------------------------------------------- monitor vs nft monitor

def _monitor_line(line: str) -> tuple:
    """``nft monitor`` text as (kind, family, table, name) or NEWGEN's (genid, pid, proc)."""
    if line.startswith("# new generation"):
        m = re.match(r"# new generation (\d+) by process (\d+) \((.*)\)", line)
        return ("NEWGEN", int(m[1]), int(m[2]), m[3])
    words = line.split()
    verb = {"add": "NEW", "delete": "DEL"}[words[0]]
    what = {"element": "SETELEM", "rule": "RULE", "set": "SET", "chain": "CHAIN", "table": "TABLE"}[words[1]]
    name = words[4] if what != "TABLE" else None
    return (verb + what, words[2], words[3], name)


def test_monitor_matches_nft_monitor():
    rec = fixture("nft_monitor")
    events = []
    for data in datagrams(rec["datagrams"]):
        for kind, _, _, buf, pos, end in netlink.split(data):
            events.append(nfnetlink.parse_event(kind & 0xFF, buf[pos], buf, pos + 4, end))
    ours = [("NEWGEN", e.genid, e.pid, e.proc) if e.kind == nfnetlink.NFT_MSG_NEWGEN
            else (e.kind_name, e.family_name, e.table, e.name) for e in events]
    theirs = [_monitor_line(line) for line in rec["nft_monitor"].splitlines() if line.strip()]
    assert ours == theirs
    assert ("NEWGEN", rec["our_genid"], rec["our_pid"], "python") in ours


def test_monitor_groups_transactions_across_reads():
    rec = fixture("nft_monitor")
    raw = datagrams(rec["datagrams"])
    monitor = object.__new__(nfnetlink.Monitor)
    monitor._pending = []
    monitor._nl = _Recorded(raw[:1], False)
    first = monitor.transactions()
    monitor._nl = _Recorded(raw[1:], False)
    rest = monitor.transactions()
    done = first + rest
    assert [(t.genid, t.proc) for t in done] == [(rec["our_genid"], "python"), (rec["our_genid"] + 1, "nft")]
    ours, flush = done
    assert [e.kind_name for e in ours.events] == ["NEWSETELEM", "DELSETELEM", "NEWSETELEM"]
    assert flush.touches("inet", "ctlab") and not flush.touches("ip", "ctlab")
    assert flush.events[-1].kind_name == "DELTABLE"


# ---------------------------------------------------------------- batches

def _messages(payload: bytes) -> list[tuple[int, int, int, dict[int, bytes]]]:
    return [(kind, flags, seq, _parse_attrs(buf[pos + 4:end])) for kind, flags, seq, buf, pos, end
            in netlink.split(payload)]


def test_batch_messages():
    batch = Batch("inet", "ipvs2nft")
    for i in range(3):
        batch.add("slots", _mark(i), Verdict.goto(f"rs_{i}"))
    batch.delete("pick4", _mark(7)).add("persist4", b"\x0a\x00\x00\x01", timeout=60000)
    payload, described = batch.messages(100)
    msgs = _messages(payload)
    new = (nfnetlink.NFNL_SUBSYS_NFTABLES << 8) | nfnetlink.NFT_MSG_NEWSETELEM
    dele = (nfnetlink.NFNL_SUBSYS_NFTABLES << 8) | nfnetlink.NFT_MSG_DELSETELEM
    assert [(k, s) for k, _, s, _ in msgs] == [(new, 101), (new, 102), (dele, 103), (new, 104)]
    assert [d for _, d in described] == [
        "NEWSETELEM inet ipvs2nft slots", "NEWSETELEM inet ipvs2nft slots",
        "DELSETELEM inet ipvs2nft pick4", "NEWSETELEM inet ipvs2nft persist4"]
    flags = [f for _, f, _, _ in msgs]
    assert flags[0] & netlink.NLM_F_ECHO and not any(f & netlink.NLM_F_ECHO for f in flags[1:])
    assert flags[0] & netlink.NLM_F_CREATE and not flags[2] & netlink.NLM_F_CREATE
    assert len(batch) == 5 and batch.message_count() == 4
    first = msgs[0][3]
    assert netlink.text(first[nfnetlink.NFTA_SET_ELEM_LIST_TABLE]) == "ipvs2nft"
    elements = []
    nfnetlink.parse_elements(payload, 20, struct.unpack_from("=I", payload)[0], elements)
    assert [(e.key, e.verdict, e.chain) for e in elements] == [(_mark(0), nfnetlink.NFT_GOTO, "rs_0")]
    last = []
    nfnetlink.parse_elements(payload, _last_message(payload) + 20, len(payload), last)
    assert [(e.key, e.timeout) for e in last] == [(b"\x0a\x00\x00\x01", 60000)]


def _last_message(payload: bytes) -> int:
    return [pos - netlink.HEADER_LEN for *_, pos, _ in netlink.split(payload)][-1]


def test_big_batches_split_under_the_attribute_limit():
    batch = Batch("ip", "ipvs2nft")
    for i in range(20000):
        batch.add("slots", i.to_bytes(4, "big"), Verdict.goto(f"rs_{i % 7}"))
    payload, described = batch.messages(0)
    msgs = list(netlink.split(payload))
    assert len(msgs) == len(described) == batch.message_count() > 3
    count = []
    for *_, buf, pos, end in msgs:
        assert end - pos < 0x10000
        nfnetlink.parse_elements(buf, pos + 4, end, count)
    assert len(count) == 20000
    assert [e.key for e in count[:3]] == [i.to_bytes(4, "big") for i in range(3)]


def test_empty_batch_sends_nothing():
    nl = object.__new__(nfnetlink.Nfnetlink)
    nl._nl = None  # would fail if used
    assert nl.commit(Batch()) is None


# ---------------------------------------------------------------- the socket's request loop

class _ScriptedKernel:
    """Stands in for the socket: answers each send with datagrams built by
    ``script(seq)``."""

    def __init__(self, script) -> None:
        self.script, self.queue = script, []

    def send(self, data: bytes) -> None:
        seq = netlink.HEADER.unpack_from(data)[3]
        self.queue.extend(self.script(seq))

    def recv(self, size: int) -> bytes:
        return self.queue.pop(0)


def _answer(kind: int, seq: int, flags: int = netlink.NLM_F_MULTI, payload: bytes = b"\x02\0\0\0") -> bytes:
    return netlink.HEADER.pack(16 + len(payload), kind, flags, seq, 0) + payload


def _scripted(script) -> netlink.NetlinkSocket:
    sock = object.__new__(netlink.NetlinkSocket)
    sock._sock, sock._seq = _ScriptedKernel(script), 0
    return sock


def test_request_skips_stale_answers_and_ends_at_done():
    sock = _scripted(lambda seq: [_answer(0x101, seq - 1) + _answer(0x101, seq), _answer(0x101, seq)
                                  + _answer(netlink.NLMSG_DONE, seq, payload=b"\0\0\0\0")])
    got = list(sock.request(0x101, netlink.NLM_F_DUMP, 0))
    assert [m[2] for m in got] == [1, 1] and sock.next_seq() == 2


def test_request_errors():
    eintr = struct.pack("=i", -errno.EINTR)
    failed = _scripted(lambda seq: [_answer(netlink.NLMSG_DONE, seq, payload=eintr)])
    with pytest.raises(netlink.NetlinkError) as done_error:
        list(failed.request(0x101, netlink.NLM_F_DUMP, 0))
    assert done_error.value.errno == errno.EINTR and not isinstance(done_error.value, netlink.DumpInterrupted)
    interrupted = _scripted(lambda seq: [_answer(0x101, seq, netlink.NLM_F_MULTI | netlink.NLM_F_DUMP_INTR),
                                         _answer(netlink.NLMSG_DONE, seq, payload=b"\0\0\0\0")])
    with pytest.raises(netlink.DumpInterrupted):
        list(interrupted.request(0x101, netlink.NLM_F_DUMP, 0))
    enoent = struct.pack("=i", -errno.ENOENT)
    refused = _scripted(lambda seq: [_answer(netlink.NLMSG_ERROR, seq, payload=enoent)])
    with pytest.raises(netlink.NetlinkError) as error:
        list(refused.request(0x101, 0, 0))
    assert error.value.errno == errno.ENOENT
    acked = _scripted(lambda seq: [_answer(netlink.NLMSG_ERROR, seq, payload=b"\0\0\0\0")])
    assert list(acked.request(0x101, netlink.NLM_F_ACK, 0)) == []
