"""Transcripts of real IPVS replayed in the oracle-like lab (tests/oracle_lab.py).

Three groups, one test per ``@reset`` block so a failure names its case:

* **harness validation** (runs now, no daemon): deterministic traffic
  fixtures ipvs2nft already follows (rr, wrr, persistence) replayed with the
  live columns masked.  Equal connection sequences prove the lab sends what
  the oracle's lab sent.
* **daemon transcripts** (``daemon-*.jsonl``, tests/fixtures/oracle/DAEMON.md):
  compared in full -- servers chosen, ActiveConn/InActConn, thresholds,
  PersistConn, ``-c`` rows, ``--stats``/``--rate`` within their tolerances --
  with ``ipvs2nft daemon`` running in the director.  Skipped while
  ``ipvs2nft daemon --help`` fails (no daemon yet).
* the harness's own checks: comparison helpers, script parsing, and the
  daemon start/stop machinery driven by a stand-in daemon.

Environment: ``IPVS2NFT_ORACLE_SLOW=1`` adds the blocks that wait long (more
than 15 s of ``!sleep``: the threshold hysteresis waits for connection
entries to expire) and traffic-counters;
``IPVS2NFT_ORACLE_TRANSCRIPTS=DIR`` adds every ``*.jsonl`` of DIR to the
daemon transcripts (a held-out set); ``IPVS2NFT_ORACLE_GAP`` sets the pause
between connections (seconds, default 0.03); ``IPVS2NFT_DAEMON`` replaces the
daemon command (default: the venv's ``ipvs2nft daemon``).
"""

from __future__ import annotations

import os
import re
import sys
import textwrap
from pathlib import Path

import pytest

from tests import oracle_lab
from tests.conftest import NETNS_SKIP

FIXTURES = Path(__file__).parent / "fixtures" / "oracle"
SLOW = os.environ.get("IPVS2NFT_ORACLE_SLOW") == "1"
GAP = float(os.environ.get("IPVS2NFT_ORACLE_GAP", oracle_lab.DEFAULT_GAP))
LONG_SLEEP = 15.0  # seconds of !sleep in one block above which it waits for SLOW

VALIDATION = ["traffic-rr.jsonl", "traffic-wrr.jsonl", "traffic-persistence.jsonl"]
VALIDATION_SLOW = ["traffic-counters.jsonl"]


def _transcripts() -> list[Path]:
    paths = sorted(FIXTURES.glob("daemon-*.jsonl"))
    extra = os.environ.get("IPVS2NFT_ORACLE_TRANSCRIPTS")
    if extra:
        paths += sorted(Path(extra).glob("*.jsonl"))
    return paths


HASHED = re.compile(r"(^|\s)-s\s+(sh|dh|mh)(\s|$)")


def _unreplayable(block: list[dict]) -> str | None:
    """Blocks whose shell lines change IPVS itself (its sysctls): nothing here
    stands for them, so the replay would test something else.  And the
    documented deviation of compat-matrix.md: sh/dh/mh hash clients with
    nft's jhash (nftables cannot multiply, so not with the kernel's
    hash_32), so which clients a threshold refuses differs."""
    commands = [" ".join(r["argv"]) for r in block if r["kind"] == "ipvsadm"]
    if any(HASHED.search(c) for c in commands) and any(re.search(r"(^|\s)-x\s", c) for c in commands):
        return "sh/dh/mh with thresholds: the client hash is nft's (compat-matrix.md)"
    for r in block:
        line = r["argv"][-1] if r["kind"] == "sh" else ""
        writes = "/proc/sys/net/ipv4/vs/" in line and ">" in line
        if writes or re.search(r"sysctl .*net\.ipv4\.vs\.\S*=", line):
            return f"line {r['line']} sets an IPVS sysctl ({line.strip()[:60]})"
    return None


def _cases(paths: list[Path], slow_only: bool = False) -> list:
    params = []
    for path in paths:
        for k, block in enumerate(oracle_lab.blocks(oracle_lab.load(path)), 1):
            marks = []
            reason = _unreplayable(block)
            if reason:
                marks.append(pytest.mark.skip(reason=reason))
            elif (slow_only or oracle_lab.sleep_seconds(block) > LONG_SLEEP) and not SLOW:
                marks.append(pytest.mark.skip(reason="waits long; IPVS2NFT_ORACLE_SLOW=1 runs it"))
            params.append(pytest.param(path, k, id=f"{path.stem}-{k:02d}-line{block[0]['line']}",
                                       marks=marks))
    return params


def _block(path: Path, k: int) -> list[dict]:
    return oracle_lab.blocks(oracle_lab.load(path))[k - 1]


def _need_netns() -> None:
    if NETNS_SKIP:
        pytest.skip(NETNS_SKIP)


@pytest.fixture(scope="session")
def ipvs2nft_daemon():
    """A factory of Daemon runners, or a skip while there is no daemon."""
    reason = oracle_lab.daemon_available()
    if reason:
        pytest.skip(f"{reason} (tests/fixtures/oracle/DAEMON.md: how to enable)")
    return oracle_lab.Daemon


# ---------------------------------------------------------------- validation

@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.parametrize(("path", "k"), _cases([FIXTURES / n for n in VALIDATION])
                         + _cases([FIXTURES / n for n in VALIDATION_SLOW], slow_only=True))
def test_lab_replays_recorded_decisions(path, k, tmp_path):
    """Without a daemon: every connection goes where IPVS sent it, and every
    ipvsadm answer matches except the live counters (masked)."""
    _need_netns()
    steps = oracle_lab.replay(_block(path, k), tmp_path, gap=GAP)
    assert len(steps) == len(_block(path, k))
    bad = oracle_lab.report(steps, live=False)
    assert not bad, "\n".join(bad)


# ---------------------------------------------------------------- the daemon

@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.oracle
@pytest.mark.parametrize(("path", "k"), _cases(_transcripts()))
def test_daemon_matches_ipvs(path, k, tmp_path, ipvs2nft_daemon):
    """With ``ipvs2nft daemon`` running: same servers, same listings."""
    _need_netns()
    steps = oracle_lab.replay(_block(path, k), tmp_path, daemon=ipvs2nft_daemon(), gap=GAP)
    bad = oracle_lab.report(steps, live=True)
    assert not bad, f"{len(bad)} steps differ:\n" + "\n".join(bad)


# ---------------------------------------------------------------- the harness itself

def _rec(cmd: str, stdout: str, kind: str = "ipvsadm", rc: int = 0) -> dict:
    argv = cmd.split() if kind == "ipvsadm" else ["oracle-traffic", *cmd[1:].split()]
    return {"n": 0, "line": 1, "kind": kind, "cmd": cmd, "argv": argv, "stdin": None, "rc": rc,
            "stdout": stdout, "stderr": ""}


STATS = textwrap.dedent("""\
    IP Virtual Server version 1.2.1 (size=4096)
    Prot LocalAddress:Port               Conns   InPkts  OutPkts  InBytes OutBytes
      -> RemoteAddress:Port
    TCP  192.168.0.40:80                     8       56       56     3120     4760
      -> 192.168.100.10:80                   8       56       56     3120     4760
    """)
RATE = STATS.replace("Conns   InPkts  OutPkts  InBytes OutBytes", "  CPS    InPPS   OutPPS    InBPS   OutBPS")
CONNS = textwrap.dedent("""\
    IPVS connection entries
    pro expire state       source             virtual            destination
    TCP 04:59  ASSURED     198.51.100.11:0    192.168.0.40:80    192.168.100.11:80
    TCP 14:59  ESTABLISHED 198.51.100.11:47492 192.168.0.40:80    192.168.100.11:80
    TCP 01:59  TIME_WAIT   198.51.100.2:58404 192.168.0.40:80    192.168.100.11:80
    """)
LIST = textwrap.dedent("""\
    IP Virtual Server version 1.2.1 (size=4096)
    Prot LocalAddress:Port Scheduler Flags
      -> RemoteAddress:Port           Forward Weight ActiveConn InActConn
    TCP  192.168.0.40:80 lc
    """) + "  -> %-28s %-7s %-6d %-10d %-10d\n" % ("192.168.100.10:80", "Masq", 1, 1, 3)  # noqa: UP031


def _diff(rec: dict, ours: str, live: bool = True) -> list[str]:
    return oracle_lab.differences(oracle_lab.Step(rec, rec["rc"], ours, ""), live)


def test_connections_compare_backend_by_backend():
    rec = _rec("@connect 192.168.0.40:80 2", "conn 1 198.51.100.2 192.168.100.12\n"
               "conn 2 198.51.100.2 192.168.100.11\nsummary 192.168.100.11=1 192.168.100.12=1\n", "connect")
    assert _diff(rec, rec["stdout"]) == []
    swapped = ("conn 1 198.51.100.2 192.168.100.11\nconn 2 198.51.100.2 192.168.100.12\n"
               "summary 192.168.100.11=1 192.168.100.12=1\n")
    bad = _diff(rec, swapped)
    assert bad and "ours: ['192.168.100.11', '192.168.100.12']" in bad[0]


def test_stats_tolerate_one_packet_per_connection_and_ten_percent_of_bytes():
    rec = _rec("-L -n --stats", STATS)
    # one connection of eight with 6 packets instead of 7 (seen between two oracle runs)
    assert _diff(rec, STATS.replace("56     3120", "55     3068")) == []
    assert _diff(rec, STATS.replace("     8       56", "     7       56", 1))  # Conns are exact
    assert _diff(rec, STATS.replace("3120", "3900", 1))  # 25 % more bytes
    assert _diff(rec, STATS.replace("       56       56", "       66       56", 1))  # 10 packets off
    assert _diff(rec, STATS.replace("TCP  192.168.0.40:80 ", "TCP  192.168.0.40:81 "))


def test_rates_tolerate_the_estimators_phase_only():
    rec = _rec("-L -n --rate", RATE)
    assert _diff(rec, RATE.replace("3120", "2340")) == []  # one tick later: x 3/4
    assert _diff(rec, RATE.replace("     8       56", "     9       56", 1)) == []  # rounding: 1
    assert _diff(rec, RATE.replace("3120", " 999"))  # a factor 3
    assert _diff(rec, RATE.replace("     8       56", "     0       56", 1))  # nothing vs something


def test_connection_rows_are_a_multiset_with_expire_and_client_port_masked():
    rec = _rec("-L -c -n", CONNS)
    lines = CONNS.splitlines(keepends=True)
    shuffled = "".join(lines[:2] + lines[:1:-1]).replace("14:59", "14:40").replace(":58404", ":40000")
    assert _diff(rec, shuffled) == []
    assert _diff(rec, CONNS.replace("ESTABLISHED", "CLOSE_WAIT "))
    assert _diff(rec, "".join(lines[:3] + lines[4:]))  # a row missing
    assert _diff(rec, CONNS.replace("198.51.100.11:0 ", "198.51.100.11:1 "))  # a template's port 0 counts
    assert _diff(rec, CONNS.replace("ASSURED     198", "ASSURED    198"))  # layout


def test_static_mode_masks_only_the_live_columns():
    rec = _rec("-L -n", LIST)
    zeros = LIST.replace("1          3", "0          0")
    assert _diff(rec, zeros, live=False) == []
    assert _diff(rec, zeros, live=True)
    assert _diff(rec, zeros.replace("Masq    1", "Masq    2"), live=False)
    assert _diff(_rec("-L -n --stats", STATS), STATS.replace(" 8 ", " 0 "), live=False) == []


def test_listing_kinds():
    kind = oracle_lab.listing_kind
    assert kind(["-L", "-n"]) == "plain" and kind(["-Ln"]) == "plain"
    assert kind(["-L", "-c", "-n"]) == kind(["-lcn"]) == "conn"
    assert kind(["-L", "-n", "--rate", "--exact"]) == "rate"
    assert kind(["-L", "-n", "--stats", "-t", "192.168.0.40:80"]) == "stats"
    assert kind(["-L", "--persistent-conn"]) == "persistent"
    assert kind(["-Z"]) is None and kind(["-a", "-t", "1.2.3.4:80", "-r", "1.2.3.5"]) is None


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("daemon-*.jsonl")), ids=lambda p: p.stem)
def test_script_and_recording_agree(path):
    """Each daemon-*.jsonl is the oracle's output for exactly its .txt, and
    complete: every record has a status, every connection a line."""
    records = oracle_lab.load(path)
    parsed = oracle_lab.parse_script(path.with_suffix(".txt").read_text())
    keys = ("n", "line", "kind", "argv", "stdin")
    assert [[r[k] for k in keys] for r in records] == [[p[k] for k in keys] for p in parsed]
    assert all(r["rc"] is not None and "error" not in r for r in records)
    for r in records:
        if r["kind"] == "connect":
            count = oracle_lab._connect_args(r["argv"])["count"]
            assert [c["i"] for c in r["conns"]] == list(range(1, count + 1))
            assert oracle_lab.parse_conns(r["stdout"]) == r["conns"]
            assert r["stdout"].endswith(oracle_lab.summary(r["stdout"].splitlines()) + "\n")


def test_blocks_that_set_ipvs_sysctls_are_not_replayed():
    for line in ("!echo 1 > /proc/sys/net/ipv4/vs/expire_quiescent_template",
                 "!sysctl -w net.ipv4.vs.expire_nodest_conn=1"):
        assert _unreplayable(oracle_lab.parse_script(line + "\n"))
    reading = "!cat /proc/sys/net/ipv4/vs/am_droprate\n!sleep 1\n"
    assert _unreplayable(oracle_lab.parse_script(reading)) is None


def test_blocks_split_at_reset():
    recs = oracle_lab.parse_script("-A -t 1.2.3.4:80\n@reset\n\n@reset\n# c\n-C\n!sleep 2.5\n@release\n")
    kinds = [[r["kind"] for r in b] for b in oracle_lab.blocks(recs)]
    assert kinds == [["ipvsadm"], ["ipvsadm", "sh", "release"]]
    assert oracle_lab.sleep_seconds(recs) == 2.5


# A stand-in daemon: ready at once, notes each start and its SIGTERM in a file.
FAKE_DAEMON = textwrap.dedent("""\
    import os, signal, socket, sys, time
    log = open(sys.argv[1], "a")
    mode = sys.argv[2]
    print("start", os.environ["IPVS2NFT_STATE"], file=log, flush=True)
    def term(*_):
        print("term", file=log, flush=True)
        if mode != "stubborn":
            sys.exit(0)
    signal.signal(signal.SIGTERM, term)
    if mode != "mute":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.sendto(b"STATUS=starting\\nREADY=1", os.environ["NOTIFY_SOCKET"])
    while True:
        time.sleep(0.1)
    """)


def _fake(tmp_path: Path, mode: str = "ok", **kw) -> tuple[oracle_lab.Daemon, Path]:
    script, log = tmp_path / "fake_daemon.py", tmp_path / "fake.log"
    script.write_text(FAKE_DAEMON)
    return oracle_lab.Daemon([sys.executable, str(script), str(log), mode], **kw), log


@pytest.mark.netns
def test_daemon_is_started_in_the_director_and_restarted_at_reset(tmp_path):
    _need_netns()
    daemon, log = _fake(tmp_path)
    records = oracle_lab.parse_script("-A -t 192.168.0.40:80 -s rr\n@reset\n-L -n\n")
    steps = oracle_lab.replay(records, tmp_path / "run", daemon=daemon)
    assert [s.rc for s in steps] == [0, 0, 0]
    events = [line.split()[0] for line in log.read_text().splitlines()]
    assert events == ["start", "term", "start", "term"]
    states = [line.split()[1] for line in log.read_text().splitlines() if line.startswith("start")]
    assert len(set(states)) == 2  # @reset: a fresh state file
    assert "TCP  192.168.0.40:80" not in steps[2].stdout


@pytest.mark.netns
@pytest.mark.parametrize("mode", ["mute", "stubborn"])
def test_daemon_failures_are_reported(tmp_path, mode):
    """No READY=1, or no exit on SIGTERM: the replay fails and says why."""
    _need_netns()
    daemon, _ = _fake(tmp_path, mode, ready_timeout=2, stop_timeout=2)
    with pytest.raises(oracle_lab.DaemonError, match="READY=1" if mode == "mute" else "SIGTERM"):
        oracle_lab.replay(oracle_lab.parse_script("-L -n\n"), tmp_path / "run", daemon=daemon)


@pytest.mark.netns
def test_held_connections_stay_established_until_release(tmp_path):
    """@connect ... hold keeps the connections open (conntrack ESTABLISHED)
    and @release closes them from the client (CLOSE_WAIT), as in the VM."""
    _need_netns()
    with oracle_lab.OracleLab(tmp_path) as lab:
        for cmd in ("-A -t 192.168.0.40:80 -s rr", "-a -t 192.168.0.40:80 -r 192.168.100.10 -m",
                    "-a -t 192.168.0.40:80 -r 192.168.100.11 -m"):
            assert lab.ipvsadm(cmd.split()).returncode == 0
        text = lab.connect("192.168.0.40:80", 3, hold=True)
        assert [c["backend"] for c in oracle_lab.parse_conns(text)] == [
            "192.168.100.11", "192.168.100.10", "192.168.100.11"]
        conntrack = ["ip", "netns", "exec", lab.director, "conntrack", "-L", "-p", "tcp"]

        def states() -> list[str]:
            out = oracle_lab._run(conntrack, check=False).stdout
            return sorted(w for line in out.splitlines() for w in line.split()[3:4])

        assert states() == ["ESTABLISHED"] * 3
        lab.release()
        assert states() == ["CLOSE_WAIT"] * 3
