"""``ipvs2nft daemon --keepalived`` in a namespace lab: real checks against real
servers that go down and come back, and what ``ipvsadm -L -n`` and real
connections then show.

Each test waits for an outcome with a generous deadline (the machine is
shared); the configurations use delay_loop 1 and connect_timeout 1, so
keepalived's semantics (delay_loop + timeout + retries) settle in a few
seconds.  No test asserts a duration.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ipvs2nft.lab import VIP4, rs4
from tests.conftest import make_lab

pytestmark = pytest.mark.netns

BACKEND = str(Path(__file__).parent / "health_backend.py")
DEADLINE = 20.0
FIXTURES = Path(__file__).parent / "fixtures" / "keepalived"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = make_lab(tmp_path_factory.mktemp("keepalived"))
    lab.health = {}
    try:
        for i in range(lab.servers):
            start_health(lab, i, tmp_path_factory.mktemp(f"rs{i}"))
        yield lab
    finally:
        lab.close()


@pytest.fixture(autouse=True)
def clean(lab):
    yield
    for p in lab.procs:
        if p.args and "daemon" in p.args and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
    lab.ipvsadm("-C")
    for i, where in lab.health.items():
        for name in ("status", "delay", "exit"):
            (where / name).unlink(missing_ok=True)
        lab.ns(lab.rs(i), "nft", "flush", "ruleset", check=False)
    for i in range(lab.servers):
        if lab.procs[i].poll() is not None:
            restart_server(lab, i)


def start_health(lab, i: int, where: Path) -> None:
    p = subprocess.Popen(["ip", "netns", "exec", lab.rs(i), sys.executable, BACKEND, str(where), rs4(i)],
                         stdout=subprocess.PIPE, text=True)
    lab.procs.append(p)
    assert p.stdout.readline().strip() == "ready"
    lab.health[i] = where


def kill_server(lab, i: int) -> None:
    """The lab's own server of real server i (ports 80, 443, 8080, 53)."""
    lab.procs[i].kill()
    lab.procs[i].wait()


def restart_server(lab, i: int) -> None:
    lab.start_server(i)
    new = lab.procs.pop()
    assert new.stdout.readline().strip() == "ready"
    lab.procs[i] = new


def control(lab, i: int, name: str, value: str) -> None:
    (lab.health[i] / name).write_text(value)


def weights(lab, vip: str = VIP4, port: int = 80) -> dict[str, int]:
    """Real server -> weight of one service in ``ipvsadm -L -n``."""
    out = lab.ipvsadm("-L -n").stdout
    found, inside = {}, False
    for line in out.splitlines():
        if re.match(r"(TCP|UDP|SCTP|FWM)\s", line):
            inside = line.split()[1] == f"{vip}:{port}"
        m = re.match(r"  -> (\S+):(\d+)\s+\S+\s+(\d+)", line)
        if inside and m:
            found[m.group(1)] = int(m.group(3))
    return found


def wait_for(what, deadline: float = DEADLINE):
    """Poll ``what()`` until it returns something true; the last value otherwise."""
    end = time.monotonic() + deadline
    while True:
        value = what()
        if value or time.monotonic() > end:
            return value
        time.sleep(0.2)


def until_weights(lab, expected: dict[str, int], **kw) -> dict[str, int]:
    last = {}

    def check():
        nonlocal last
        last = weights(lab, **kw)
        return last == expected

    wait_for(check)
    return last


def conf(tmp_path, servers: str, head: str = "", vip: str = VIP4, port: int = 80) -> str:
    path = tmp_path / "keepalived.conf"
    path.write_text(f"""! test configuration
global_defs {{
    router_id lab
}}
virtual_server {vip} {port} {{
    delay_loop 1
    lb_algo rr
    lb_kind NAT
    protocol TCP
{head}
{servers}
}}
""")
    return str(path)


def real(i: int, checker: str, extra: str = "", port: int = 80) -> str:
    return f"""    real_server {rs4(i)} {port} {{
        weight 1
{extra}
        {checker}
    }}
"""


TCP = "TCP_CHECK {\n            connect_timeout 1\n        }"
HTTP = ("HTTP_GET {\n            connect_port 8000\n            connect_timeout 1\n"
        "            url {\n                path /health\n                status_code 200\n"
        "            }\n        }")


def answered(lab, count: int = 6) -> set:
    return set(lab.backends(VIP4, 80, count, timeout=2))


# ---------------------------------------------------------------- checkers

def test_tcp_check_follows_a_stopped_server_and_its_return(lab, tmp_path):
    daemon = lab.daemon("--keepalived", conf(tmp_path, "".join(real(i, TCP) for i in range(3))))
    all3 = {rs4(i): 1 for i in range(3)}
    assert weights(lab) == all3
    kill_server(lab, 1)
    assert until_weights(lab, {rs4(0): 1, rs4(2): 1}) == {rs4(0): 1, rs4(2): 1}
    assert answered(lab) == {rs4(0), rs4(2)}  # every connection answered, none by the stopped server
    restart_server(lab, 1)
    assert until_weights(lab, all3) == all3
    assert answered(lab) == {rs4(0), rs4(1), rs4(2)}
    daemon.stop()
    assert weights(lab) == {}  # keepalived removes its virtual servers at stop


def test_http_503_takes_a_server_out_and_200_brings_it_back(lab, tmp_path):
    lab.daemon("--keepalived", conf(tmp_path, "".join(real(i, HTTP) for i in range(3))))
    control(lab, 0, "status", "503")
    assert until_weights(lab, {rs4(1): 1, rs4(2): 1}) == {rs4(1): 1, rs4(2): 1}
    assert answered(lab) == {rs4(1), rs4(2)}
    control(lab, 0, "status", "200")
    assert until_weights(lab, {rs4(i): 1 for i in range(3)}) == {rs4(i): 1 for i in range(3)}


def test_http_retry_keeps_a_server_through_one_bad_answer(lab, tmp_path):
    """retry 3 with delay_before_retry 3: one 503 between good answers is not
    enough to remove the server (after the first good check)."""
    http = HTTP.replace("connect_timeout 1", "connect_timeout 1\n            retry 3\n"
                                             "            delay_before_retry 3")
    lab.daemon("--keepalived", conf(tmp_path, real(0, http) + real(1, TCP)))
    time.sleep(2.5)  # the first checks have run
    control(lab, 0, "status", "503")
    time.sleep(1.5)
    control(lab, 0, "status", "200")
    seen = [weights(lab) for _ in range(10) if not time.sleep(0.3)]
    assert all(s == {rs4(0): 1, rs4(1): 1} for s in seen), seen


def test_misc_check_exit_codes_and_misc_dynamic_weights(lab, tmp_path):
    script = tmp_path / "check.sh"
    script.write_text("#!/bin/sh\nexit $(cat \"$1\" 2>/dev/null || echo 0)\n")
    script.chmod(0o755)
    codes = [tmp_path / f"code{i}" for i in range(2)]
    # misc_timeout 5: the scripts' time limit is delay_loop (1 s) otherwise, tight on a busy machine
    misc = ("MISC_CHECK {{\n            misc_path \"{} {}\"\n            misc_timeout 5\n"
            "            misc_dynamic\n        }}")
    servers = "".join(real(i, misc.format(script, codes[i]), "        weight 3") for i in range(2))
    lab.daemon("--keepalived", conf(tmp_path, servers))
    assert weights(lab) == {rs4(0): 3, rs4(1): 3}
    codes[0].write_text("1")  # down
    assert until_weights(lab, {rs4(1): 3}) == {rs4(1): 3}
    codes[1].write_text("7")  # up, weight 7 - 2
    assert until_weights(lab, {rs4(1): 5}) == {rs4(1): 5}
    codes[0].write_text("2")  # up again, weight 0: listed, no new connections
    assert until_weights(lab, {rs4(0): 0, rs4(1): 5}) == {rs4(0): 0, rs4(1): 5}
    assert answered(lab) == {rs4(1)}
    codes[0].write_text("0")  # back to its configured weight
    assert until_weights(lab, {rs4(0): 3, rs4(1): 5}) == {rs4(0): 3, rs4(1): 5}


def test_misc_check_killed_at_misc_timeout_counts_as_a_failure(lab, tmp_path):
    script = tmp_path / "slow.sh"
    script.write_text("#!/bin/sh\nsleep 30\n")
    script.chmod(0o755)
    misc = f"MISC_CHECK {{\n            misc_path {script}\n            misc_timeout 1\n        }}"
    servers = real(0, misc) + real(1, TCP)
    lab.daemon("--keepalived", conf(tmp_path, servers))
    assert until_weights(lab, {rs4(1): 1}) == {rs4(1): 1}


def test_smtp_dns_udp_and_ping_checks(lab, tmp_path):
    smtp = "SMTP_CHECK {\n            connect_port 2525\n            connect_timeout 1\n        }"
    dns = ("DNS_CHECK {\n            connect_port 5353\n            connect_timeout 1\n"
           "            retry 0\n        }")
    udp = "UDP_CHECK {\n            connect_port 53\n            connect_timeout 1\n        }"
    ping = "PING_CHECK {\n            connect_timeout 1\n        }"
    path = conf(tmp_path, real(0, smtp) + real(1, dns) + real(2, udp + "\n        " + ping))
    lab.daemon("--keepalived", path)
    time.sleep(2.5)
    assert weights(lab) == {rs4(i): 1 for i in range(3)}
    lab.ns(lab.rs(2), "nft", "add table inet t; add chain inet t in { type filter hook input priority 0; }; "
                            "add rule inet t in icmp type echo-request drop")
    assert until_weights(lab, {rs4(0): 1, rs4(1): 1}) == {rs4(0): 1, rs4(1): 1}
    lab.ns(lab.rs(2), "nft", "flush ruleset")
    lab.ns(lab.rs(1), "nft", "add table inet t; add chain inet t in { type filter hook input priority 0; }; "
                            "add rule inet t in udp dport 5353 drop")
    lab.ns(lab.rs(0), "nft", "add table inet t; add chain inet t in { type filter hook input priority 0; }; "
                            "add rule inet t in tcp dport 2525 reject with tcp reset")
    assert until_weights(lab, {rs4(2): 1}) == {rs4(2): 1}


# ---------------------------------------------------------------- keepalived's semantics

def test_inhibit_on_failure_sets_weight_zero_instead_of_removing(lab, tmp_path):
    servers = real(0, TCP, "        inhibit_on_failure") + real(1, TCP)
    lab.daemon("--keepalived", conf(tmp_path, servers))
    kill_server(lab, 0)
    assert until_weights(lab, {rs4(0): 0, rs4(1): 1}) == {rs4(0): 0, rs4(1): 1}
    assert answered(lab) == {rs4(1)}
    restart_server(lab, 0)
    assert until_weights(lab, {rs4(0): 1, rs4(1): 1}) == {rs4(0): 1, rs4(1): 1}


def test_sorry_server_stands_in_when_no_real_server_is_left(lab, tmp_path):
    head = f"    sorry_server {rs4(2)} 80"
    lab.daemon("--keepalived", conf(tmp_path, real(0, TCP) + real(1, TCP), head))
    assert weights(lab) == {rs4(0): 1, rs4(1): 1}
    kill_server(lab, 0)
    kill_server(lab, 1)
    assert until_weights(lab, {rs4(2): 1}) == {rs4(2): 1}
    assert answered(lab) == {rs4(2)}
    restart_server(lab, 1)
    assert until_weights(lab, {rs4(1): 1}) == {rs4(1): 1}
    assert answered(lab) == {rs4(1)}


def test_sorry_server_inhibit_keeps_it_listed_at_weight_zero(lab, tmp_path):
    head = f"    sorry_server {rs4(2)} 80\n    sorry_server_inhibit"
    lab.daemon("--keepalived", conf(tmp_path, real(0, TCP), head))
    assert weights(lab) == {rs4(0): 1, rs4(2): 0}
    kill_server(lab, 0)
    assert until_weights(lab, {rs4(2): 1}) == {rs4(2): 1}


def test_alpha_quorum_hysteresis_and_their_scripts(lab, tmp_path):
    """alpha: only the sorry server until the checks pass; quorum 2 hysteresis
    1: gained at 3 live servers, lost below 1 (2-1); quorum_up/quorum_down and
    notify_down run."""
    marks = tmp_path / "marks"
    marks.mkdir()
    note = tmp_path / "note.sh"
    note.write_text(f"#!/bin/sh\ntouch {marks}/$1\n")
    note.chmod(0o755)
    head = (f"    alpha\n    quorum 2\n    hysteresis 1\n    quorum_up \"{note} up\"\n"
            f"    quorum_down \"{note} down\"\n    sorry_server 192.168.100.1 80")
    servers = "".join(real(i, TCP, f"        notify_down \"{note} rs{i}down\"") for i in range(3))
    lab.daemon("--keepalived", conf(tmp_path, servers, head))
    all3 = {rs4(i): 1 for i in range(3)}
    assert until_weights(lab, all3) == all3
    assert wait_for(lambda: (marks / "up").exists())
    assert (marks / "down").exists()  # at start: "Starting with quorum down" runs quorum_down
    (marks / "down").unlink()
    kill_server(lab, 0)
    kill_server(lab, 1)  # 1 live: still >= 2-1
    assert until_weights(lab, {rs4(2): 1}) == {rs4(2): 1}
    assert wait_for(lambda: (marks / "rs0down").exists() and (marks / "rs1down").exists())
    assert not (marks / "down").exists()
    kill_server(lab, 2)  # 0 live: lost, the sorry server stands in
    assert until_weights(lab, {"192.168.100.1": 1}) == {"192.168.100.1": 1}
    assert wait_for(lambda: (marks / "down").exists())


def test_keepalived_sample_runs_and_falls_back_to_its_sorry_server(lab, tmp_path):
    """doc/samples/keepalived.conf.sample as is (addresses in the lab): nothing
    answers on port 1358, so its HTTP_GET fails and its sorry server goes in."""
    daemon = lab.daemon("--keepalived", str(FIXTURES / "sample.conf"))
    assert until_weights(lab, {"192.168.100.19": 1}, port=1358) == {"192.168.100.19": 1}
    daemon.stop()
    err = daemon.proc.stderr.read()
    assert "vrrp_instance VI_1 ignored" in err
    # the real server was in at start (its first check may come at once: warmup is random)
    assert "Starting with quorum up 1+0=1 <= 1" in err
    removed = err.index("Removing service 192.168.100.10:1358")
    assert removed < err.index("Adding sorry server 192.168.100.19:1358")


def test_a_configuration_keepalived_refuses_does_not_start(lab, tmp_path):
    path = tmp_path / "bad.conf"
    path.write_text("virtual_server 192.168.0.40 80 {\n  delay_loop soon\n}\n")
    exe = str(Path(sys.executable).parent / "ipvs2nft")
    p = lab.ns(lab.director, exe, "daemon", "--keepalived", str(path), check=False)
    assert p.returncode == 1
    assert p.stderr == (f"ipvs2nft daemon: keepalived configuration refused: ({path}: Line 2) virtual server "
                        "delay loop 'soon' invalid - ignoring\n")
    assert weights(lab) == {}


# ---------------------------------------------------------------- feedback weights

def test_least_response_feedback_weights(lab, tmp_path):
    """rs0 answers its health page 150 ms late: its weight falls to about a
    tenth of the fast servers' (fast ~15 ms at most here) and comes back when
    it is fast again."""
    head = "    ipvs2nft_feedback response {\n        interval 1\n        smoothing 1\n    }"
    servers = "".join(real(i, HTTP, "        weight 100") for i in range(2))
    control(lab, 0, "delay", "0.15")
    lab.daemon("--keepalived", conf(tmp_path, servers, head))
    slow = wait_for(lambda: (w := weights(lab)) and w[rs4(1)] == 100 and w[rs4(0)] <= 30 and w)
    assert slow and slow[rs4(0)] >= 1, weights(lab)
    control(lab, 0, "delay", "0")
    fast = wait_for(lambda: (w := weights(lab)) and min(w.values()) >= 50 and w)
    assert fast, weights(lab)


LA_LOAD = ".1.3.6.1.4.1.2021.10.1.3.1"  # UCD-SNMP-MIB::laLoad.1
HR_PROCESSOR_LOAD = ".1.3.6.1.2.1.25.3.3.1.2"  # HOST-RESOURCES-MIB::hrProcessorLoad, indexed from 196608


def snmpd(lab, i: int, where: Path, overrides: dict[str, str]) -> subprocess.Popen:
    """Debian's snmpd in real server i's namespace, answering community "lab"
    from the lab's network, with ``override`` values (net-snmp's way to
    pin what an OID says)."""
    state = where / "snmp"
    state.mkdir(exist_ok=True)
    lines = ["agentAddress udp:161", "rocommunity lab 192.168.100.0/24"]
    lines += [f"override {oid} {value}" for oid, value in overrides.items()]
    (where / "snmpd.conf").write_text("\n".join(lines) + "\n")
    p = subprocess.Popen(["ip", "netns", "exec", lab.rs(i), "env", f"SNMP_PERSISTENT_DIR={state}", "MIBS=",
                          "/usr/sbin/snmpd", "-f", "-Lf", "/dev/null", "-C", "-c", str(where / "snmpd.conf")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lab.procs.append(p)
    ok = wait_for(lambda: lab.ns(lab.director, "snmpget", "-v2c", "-clab", "-t1", "-r0", rs4(i), LA_LOAD
                                 if LA_LOAD in overrides else HR_PROCESSOR_LOAD + ".196608",
                                 check=False).returncode == 0)
    assert ok, f"snmpd in {lab.rs(i)} does not answer"
    return p


def hr_rows(percent: int) -> dict[str, str]:
    import os

    return {f"{HR_PROCESSOR_LOAD}.{196608 + cpu}": f"integer {percent}" for cpu in range(os.cpu_count())}


def test_least_cpu_load_feedback_from_a_real_snmpd(lab, tmp_path):
    """rs0 reports laLoad 0.20 (capacity 1: 80 % idle), rs1 hrProcessorLoad
    80 % (20 % idle): weights 100 and 25; with the loads swapped, 25 and 100."""
    if not Path("/usr/sbin/snmpd").exists():
        pytest.skip("needs snmpd (make setup installs it)")
    head = "    ipvs2nft_feedback load {\n        interval 1\n        smoothing 1\n    }"
    snmp0 = "        ipvs2nft_snmp {\n            community lab\n        }"
    snmp1 = "        ipvs2nft_snmp {\n            community lab\n            oid hrProcessorLoad\n        }"
    servers = real(0, TCP, "        weight 100\n" + snmp0) + real(1, TCP, "        weight 100\n" + snmp1)
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    agents = [snmpd(lab, 0, tmp_path / "a", {LA_LOAD: 'octet_str "0.20"'}),
              snmpd(lab, 1, tmp_path / "b", hr_rows(80))]
    try:
        lab.daemon("--keepalived", conf(tmp_path, servers, head))
        assert until_weights(lab, {rs4(0): 100, rs4(1): 25}) == {rs4(0): 100, rs4(1): 25}
        for agent in agents:
            agent.terminate()
            agent.wait()
        agents = [snmpd(lab, 0, tmp_path / "a", {LA_LOAD: 'octet_str "0.80"'}),
                  snmpd(lab, 1, tmp_path / "b", hr_rows(20))]
        assert until_weights(lab, {rs4(0): 25, rs4(1): 100}) == {rs4(0): 25, rs4(1): 100}
    finally:
        for agent in agents:
            agent.terminate()
            agent.wait()


def test_the_daemons_table_is_what_translate_prints(lab, tmp_path):
    """At start the daemon sets up what `translate --from keepalived` prints:
    ordinary services, listed by `ipvsadm -S -n` like any other."""
    head = "    persistence_timeout 120\n    persistence_granularity 255.255.255.0"
    servers = "".join(real(i, TCP, f"        weight {i + 2}") for i in range(3))
    path = conf(tmp_path, servers, head)
    Path(path).write_text(Path(path).read_text().replace("lb_algo rr", "lb_algo wrr"))
    exe = str(Path(sys.executable).parent / "ipvs2nft")
    expected = subprocess.run([exe, "translate", "--from", "keepalived", path], capture_output=True,
                              text=True, check=True).stdout
    lab.daemon("--keepalived", path)
    assert lab.ipvsadm("-S -n").stdout == expected
    assert "-s wrr -p 120 -M 255.255.255.0" in expected
