"""``ipvs2nft daemon --metrics`` / ``--metrics-textfile``: Prometheus metrics
under node_exporter's ipvs names.

The names, HELP, types and labels are checked against the real
node_exporter (Debian's prometheus-node-exporter, 1.5.0): it reads a
/proc/net/ip_vs and /proc/net/ip_vs_stats written from our own listings,
as the kernel would print them for the same table, and its node_ipvs_*
families must equal ours sample for sample.  The numbers must be the ones
``ipvsadm -L -n --stats`` shows after real traffic; promtool (Debian's
prometheus package) must accept both outputs, and node_exporter's textfile
collector must read the file we write.
"""

from __future__ import annotations

import asyncio
import gzip
import ipaddress
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from ipvs2nft.daemon import metrics
from ipvs2nft.daemon.estimator import Estimator
from ipvs2nft.dynsched import Load
from ipvs2nft.lab import VIP4, VIP6, rs4, rs6
from ipvs2nft.model import Dest, Service, Table
from ipvs2nft.netaddr import IPPROTO_SCTP, IPPROTO_UDP, address
from tests.conftest import make_lab

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

NODE_EXPORTER = shutil.which("prometheus-node-exporter")
PROMTOOL = shutil.which("promtool")
HOLD = 7777


# ---------------------------------------------------------------- without a kernel

def test_listen_address_forms():
    assert metrics.listen_address("127.0.0.1:9120") == ("127.0.0.1", 9120)
    assert metrics.listen_address("[::1]:9120") == ("::1", 9120)
    assert metrics.listen_address(":9120") == (None, 9120)
    for bad in ("9120", "::1:9120", "host:0", "host:65536", "host:http", ""):
        with pytest.raises(ValueError):
            metrics.listen_address(bad)


def _svc(sid, addr=VIP4, port=80, protocol=6, fwmark=0, dests=()):
    return Service(af=socket.AF_INET6 if addr and ":" in addr else socket.AF_INET, protocol=protocol,
                   addr=address(addr) if addr else None, port=port, fwmark=fwmark, sid=sid,
                   scheduler="rr", dests=tuple(dests))


def _dest(addr, port=80, weight=1):
    return Dest(address(addr), port, weight=weight)


def test_labels_as_procfs_makes_them():
    assert metrics.service_labels(_svc(1)) == (VIP4, "", "80", "TCP")
    assert metrics.service_labels(_svc(1, protocol=IPPROTO_UDP, port=53)) == (VIP4, "", "53", "UDP")
    fwm = _svc(1, addr=None, port=0, fwmark=0x10001000)
    assert metrics.service_labels(fwm) == ("", "10001000", "0", "FWM")
    assert metrics.service_labels(_svc(1, addr="2001:db8::40")) == ("2001:db8::40", "", "80", "TCP")
    assert metrics._address(ipaddress.ip_address("::ffff:10.0.0.1")) == "10.0.0.1"  # Go's net.IP.String()


def _fake_daemon(services, loads=None, extensions=()):
    live = SimpleNamespace(counts=lambda key: (loads or {}).get(key, {}), conns={1: None, 2: None})
    return SimpleNamespace(table=Table(list(services)), live=live, estimator=Estimator(), generation=7,
                           counters={"events": 5, "lost": 1, "resyncs": 2, "pushes": 3, "elements": 9,
                                     "stale": 0}, extensions=list(extensions))


def _samples(families) -> dict:
    out = {}
    for fam in families:
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_families_over_the_daemon_state():
    web = _svc(1, dests=[_dest(rs4(0), weight=3), _dest(rs4(1))])
    sctp = _svc(2, protocol=IPPROTO_SCTP, dests=[_dest(rs4(0))])
    daemon = _fake_daemon([web, sctp], {web.key: {web.dests[0].key: Load(4, 2)}})
    daemon.estimator.tick({"1": [10, 20, 30, 400, 500], "2": [1, 1, 1, 1, 1]},
                          {f"1/{socket.AF_INET}/{rs4(0)}/80": [6, 12, 18, 240, 300]})
    found = _samples(metrics.families(daemon))
    assert found[("node_ipvs_connections_total", ())] == 11
    assert found[("node_ipvs_outgoing_bytes_total", ())] == 501
    labels = (("local_address", VIP4), ("local_mark", ""), ("local_port", "80"), ("proto", "TCP"),
              ("remote_address", rs4(0)), ("remote_port", "80"))
    assert found[("node_ipvs_backend_connections_active", labels)] == 4
    assert found[("node_ipvs_backend_connections_inactive", labels)] == 2
    assert found[("node_ipvs_backend_weight", labels)] == 3
    assert found[("ipvs2nft_backend_incoming_bytes_total", labels)] == 240
    assert found[("ipvs2nft_service_connections_total", labels[:4])] == 10
    # procfs reads TCP, UDP and FWM lines only: node_exporter has no SCTP backends
    node_backends = [k for k in found if k[0] == "node_ipvs_backend_weight"]
    assert len(node_backends) == 2
    assert ("ipvs2nft_service_connections_total", labels[:3] + (("proto", "SCTP"),)) in found
    assert found[("ipvs2nft_conntrack_event_losses_total", ())] == 1
    assert found[("ipvs2nft_connections", ())] == 2


def test_totals_keep_deleted_services_and_restart_on_a_full_zero():
    est = Estimator()
    est.tick({"1": [2, 4, 4, 100, 200], "2": [1, 1, 1, 10, 10]}, {})
    est.tick({"1": [3, 6, 6, 150, 300]}, {})  # service 2 deleted: what it counted stays
    assert est.totals == [4, 7, 7, 160, 310]
    est.zero({1, 7})  # ipvsadm -Z with every service: ip_vs_zero_all
    assert est.totals == [0] * 5
    est.tick({"1": [1, 1, 1, 1, 1], "3": [5, 5, 5, 5, 5]}, {})  # the kernel deleted 1's counters at -Z
    assert est.totals == [6, 6, 6, 6, 6]
    est.zero({3})  # one service of two: IPVS keeps its totals
    assert est.totals == [6, 6, 6, 6, 6]


def test_another_extension_adds_families():
    from prometheus_client.core import GaugeMetricFamily

    class Checker:
        def metrics(self):
            fam = GaugeMetricFamily("ipvs2nft_check_up", "test", labels=["real"])
            fam.add_metric(["a"], 1)
            yield fam

    found = _samples(metrics.families(_fake_daemon([], extensions=[Checker()])))
    assert found[("ipvs2nft_check_up", (("real", "a"),))] == 1


def test_http_answers():
    m = metrics.Metrics(listen=("127.0.0.1", 1))
    m.daemon = _fake_daemon([_svc(1, dests=[_dest(rs4(0))])])
    status, headers, body = m._answer(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == "200 OK" and dict(headers)["Content-Type"].startswith("text/plain; version=0.0.4")
    assert b"node_ipvs_backend_weight{" in body and b"process_cpu_seconds_total" in body
    status, headers, body = m._answer(b"GET /metrics HTTP/1.1\r\nAccept-Encoding: gzip\r\n\r\n")
    assert dict(headers)["Content-Encoding"] == "gzip" and b"node_ipvs" in gzip.decompress(body)
    status, headers, _ = m._answer(b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text\r\n\r\n")
    assert dict(headers)["Content-Type"].startswith("application/openmetrics-text")
    assert m._answer(b"GET /nothing HTTP/1.1\r\n\r\n")[0] == "404 Not Found"
    assert m._answer(b"POST /metrics HTTP/1.1\r\n\r\n")[0] == "405 Method Not Allowed"
    assert m._answer(b"garbage\r\n\r\n")[0] == "400 Bad Request"


def test_textfile_is_written_whole_and_refused_without_prom(tmp_path):
    daemon = _fake_daemon([_svc(1, dests=[_dest(rs4(0))])])
    m = metrics.Metrics(textfile=str(tmp_path / "ipvs.prom"))

    async def run():
        await m.start(daemon)
        await m.stop()

    m.daemon = daemon
    m.write_textfile()
    text = (tmp_path / "ipvs.prom").read_text()
    assert "node_ipvs_connections_total 0.0" in text and "process_" not in text
    assert [p.name for p in tmp_path.iterdir()] == ["ipvs.prom"]  # no temporary left
    asyncio.run(run())
    assert not (tmp_path / "ipvs.prom").exists()  # a stopped daemon leaves no numbers behind
    bad = metrics.Metrics(textfile=str(tmp_path / "ipvs.txt"))
    with pytest.raises(metrics.DaemonError, match=r"\*\.prom"):
        asyncio.run(bad.start(daemon))
    missing = metrics.Metrics(textfile=str(tmp_path / "no" / "ipvs.prom"))
    with pytest.raises(metrics.DaemonError, match="No such file or directory"):
        asyncio.run(missing.start(daemon))


# ---------------------------------------------------------------- in a lab, with traffic

@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = make_lab(tmp_path_factory.mktemp("metrics"))
    try:
        yield lab
    finally:
        lab.close()


def _fetch(lab, url: str) -> str:
    code = "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1]).read().decode())"
    return lab.ns(lab.director, sys.executable, "-c", code, url).stdout


def _families(text: str, prefix: str) -> dict:
    """name -> (type, help, {labels: value}) for the families starting with prefix."""
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.name.startswith(prefix):
            out[fam.name] = (fam.type, fam.documentation,
                             {tuple(sorted(s.labels.items())): s.value for s in fam.samples})
    return out


def _promtool(text: str) -> None:
    if PROMTOOL is None:
        pytest.skip("needs promtool (Debian: prometheus)")
    p = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


LISTED = re.compile(r"^(TCP|UDP|SCTP|FWM)\s+(\S+)")
DEST = re.compile(r"^  -> (\S+)\s+(\S+)\s+(\d+)\s+(\d+)\s+(\d+)")
STAT = re.compile(r"^(?:(TCP|UDP|SCTP|FWM)\s+|  -> )(\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)")


def _hexaddr(text: str) -> str:
    """addr:port as /proc/net/ip_vs prints it (ip_vs_ctl.c: %08X:%04X, [%pI6]:%04X)."""
    host, port = text.rsplit(":", 1)
    ip = ipaddress.ip_address(host.strip("[]"))
    if ip.version == 4:
        return f"{int(ip):08X}:{int(port):04X}"
    return f"[{ip.exploded}]:{int(port):04X}"


def proc_files(listing: str, stats: str) -> tuple[str, str]:
    """/proc/net/ip_vs and /proc/net/ip_vs_stats as the kernel would write them
    for what ``ipvsadm -L -n`` and ``-L -n --stats --exact`` list."""
    lines = ["IP Virtual Server version 1.2.1 (size=4096)", "Prot LocalAddress:Port Scheduler Flags",
             "  -> RemoteAddress:Port Forward Weight ActiveConn InActConn"]
    for line in listing.splitlines():
        if m := LISTED.match(line):
            proto, where = m.groups()
            vip = f"{int(where):08X}" if proto == "FWM" else _hexaddr(where)
            lines.append(f"{proto}  {vip} rr ")
        elif (m := DEST.match(line)) and m.group(1) != "RemoteAddress:Port":
            where, fwd, weight, active, inactive = m.groups()
            lines.append(f"  -> {_hexaddr(where)}      {fwd:7s} {weight:6s} {active:10s} {inactive:10s}")
    totals = [0] * 5
    for line in stats.splitlines():
        m = STAT.match(line)
        if m and m.group(1):
            totals = [t + int(v) for t, v in zip(totals, m.groups()[2:], strict=True)]
    ip_vs_stats = ("   Total Incoming Outgoing         Incoming         Outgoing\n"
                   "   Conns  Packets  Packets            Bytes            Bytes\n"
                   + "{:8X} {:8X} {:8X} {:16X} {:16X}\n\n".format(*totals)
                   + " Conns/s   Pkts/s   Pkts/s          Bytes/s          Bytes/s\n"
                   + f"{0:8X} {0:8X} {0:8X} {0:16X} {0:16X}\n")
    return "\n".join(lines) + "\n", ip_vs_stats


def _node_exporter(lab, *flags: str) -> str:
    """One scrape of the real node_exporter, run inside the director."""
    if NODE_EXPORTER is None:
        pytest.skip("needs node_exporter (Debian: prometheus-node-exporter)")
    proc = subprocess.Popen(["ip", "netns", "exec", lab.director, NODE_EXPORTER,
                             "--collector.disable-defaults", "--web.listen-address=127.0.0.1:9100", *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(100):
            up = lab.ns(lab.director, sys.executable, "-c",
                        "import socket; socket.create_connection(('127.0.0.1', 9100), 1)", check=False)
            if up.returncode == 0:
                return _fetch(lab, "http://127.0.0.1:9100/metrics")
            time.sleep(0.1)
        raise AssertionError(f"node_exporter did not listen: {proc.stderr.read() if proc.poll() else ''}")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _traffic(lab) -> list:
    """IPv4, IPv6, UDP and fwmark services; closed and held connections."""
    lab.ipvsadm(f"-A -t {VIP4}:80 -s rr")
    for i in range(3):
        lab.ipvsadm(f"-a -t {VIP4}:80 -r {rs4(i)}:80 -m -w {i + 1}")
    lab.ipvsadm(f"-A -t {VIP4}:{HOLD} -s wlc")
    for i in range(2):
        lab.ipvsadm(f"-a -t {VIP4}:{HOLD} -r {rs4(i)}:{HOLD} -m")
    lab.ipvsadm(f"-A -t [{VIP6}]:80 -s rr")
    lab.ipvsadm(f"-a -t [{VIP6}]:80 -r [{rs6(0)}]:80 -m")
    lab.ipvsadm(f"-A -u {VIP4}:53 -s rr")
    lab.ipvsadm(f"-a -u {VIP4}:53 -r {rs4(2)}:53 -m")
    lab.ipvsadm("-A -f 5 -s rr")
    lab.ipvsadm(f"-a -f 5 -r {rs4(1)}:0 -m -w 4")
    assert None not in lab.backends(VIP4, 80, 6)
    assert None not in lab.backends(VIP6, 80, 2)
    assert None not in lab.backends(VIP4, 53, 2, proto="udp")
    held = []
    for _ in range(3):
        held.append(lab.session(VIP4, HOLD))
        time.sleep(0.05)
    return held


@pytest.mark.netns
@pytest.mark.slow
def test_scrape_equals_the_listings_and_node_exporter(lab, tmp_path):
    textfile = tmp_path / "ipvs2nft.prom"
    daemon = lab.daemon("--metrics", "127.0.0.1:9120", "--metrics-textfile", str(textfile))
    held = []
    try:
        held = _traffic(lab)
        # The listing and the scrape both show the estimator's last 2-second
        # tick and the daemon's connection table: wait for the tick that saw
        # the traffic, and for the daemon to have seen every event.
        expected = {f"TCP  {VIP4}:80": 6, f"TCP  [{VIP6}]:80": 2, f"TCP  {VIP4}:{HOLD}": 3}
        for _ in range(40):
            time.sleep(0.5)
            listing = lab.ipvsadm("-L -n").stdout
            stats = lab.ipvsadm("-L -n --stats --exact").stdout
            scrape = _fetch(lab, "http://127.0.0.1:9120/metrics")
            counted = all(re.search(rf"^{re.escape(k)}\s+{v}\s", stats, re.M) for k, v in expected.items())
            if counted and _agrees(scrape, listing, stats) and lab.ipvsadm("-L -n").stdout == listing:
                break
        assert counted, stats
        assert _agrees(scrape, listing, stats, explain=True)
        _promtool(scrape)
        ours = _families(scrape, "node_ipvs_")
        # 6 + 2 + 3 TCP; the two UDP datagrams may share one conntrack entry (same source port)
        assert ours["node_ipvs_connections"][2][()] in (12, 13), stats

        # node_exporter over the /proc files the kernel would show for this table
        procfs = tmp_path / "proc"
        (procfs / "net").mkdir(parents=True)
        ip_vs, ip_vs_stats = proc_files(listing, stats)
        (procfs / "net" / "ip_vs").write_text(ip_vs)
        (procfs / "net" / "ip_vs_stats").write_text(ip_vs_stats)
        oracle = _families(_node_exporter(lab, "--collector.ipvs", f"--path.procfs={procfs}"), "node_ipvs_")
        assert oracle == ours

        # node_exporter's textfile collector reads the file we keep
        text = textfile.read_text()
        _promtool(text)
        textdir = tmp_path / "textfile"
        textdir.mkdir()
        shutil.copy(textfile, textdir / "ipvs2nft.prom")
        seen = _node_exporter(lab, "--collector.textfile", f"--collector.textfile.directory={textdir}")
        assert "node_textfile_scrape_error 0" in seen
        assert _families(seen, "node_ipvs_") == _families(text, "node_ipvs_")
        assert _families(seen, "node_ipvs_")["node_ipvs_backend_weight"] == ours["node_ipvs_backend_weight"]
    finally:
        for s in held:
            s.close()
        daemon.stop()
        lab.ipvsadm("-C")
    assert daemon.proc.returncode == 0
    assert not textfile.exists()


def _agrees(scrape: str, listing: str, stats: str, explain: bool = False) -> bool:
    """Every row of the listings has the scrape's numbers."""
    fams = _families(scrape, "")
    wrong = []

    def check(name, labels, value):
        got = fams.get(name, (None, None, {}))[2].get(tuple(sorted(labels.items())))
        if got != value:
            wrong.append(f"{name}{labels}: scrape {got}, listing {value}")

    service = None
    for line in listing.splitlines():
        if m := LISTED.match(line):
            service = _local(*m.groups())
        elif (m := DEST.match(line)) and m.group(1) != "RemoteAddress:Port" and service[3] != "SCTP":
            labels = dict(service_labels_dict(service), **_remote(m.group(1)))
            check("node_ipvs_backend_weight", labels, float(m.group(3)))
            check("node_ipvs_backend_connections_active", labels, float(m.group(4)))
            check("node_ipvs_backend_connections_inactive", labels, float(m.group(5)))
    names = ("connections", "incoming_packets", "outgoing_packets", "incoming_bytes", "outgoing_bytes")
    totals = [0] * 5
    for line in stats.splitlines():
        m = STAT.match(line)
        if not m:
            continue
        values = [int(v) for v in m.groups()[2:]]
        if m.group(1):
            service = _local(m.group(1), m.group(2))
            totals = [t + v for t, v in zip(totals, values, strict=True)]
            for n, v in zip(names, values, strict=True):
                check(f"ipvs2nft_service_{n}", service_labels_dict(service), float(v))
        else:
            labels = dict(service_labels_dict(service), **_remote(m.group(2)))
            for n, v in zip(names, values, strict=True):
                check(f"ipvs2nft_backend_{n}", labels, float(v))
    for n, v in zip(names, totals, strict=True):
        check(f"node_ipvs_{n}", {}, float(v))
    if explain and wrong:
        print("\n".join(wrong), "\n", listing, stats, scrape)
    return not wrong


def _local(proto: str, where: str) -> tuple:
    if proto == "FWM":
        return ("", f"{int(where):08X}", "0", "FWM")
    host, port = where.rsplit(":", 1)
    return (host.strip("[]"), "", port, proto)


def service_labels_dict(local: tuple) -> dict:
    return dict(zip(("local_address", "local_mark", "local_port", "proto"), local, strict=True))


def _remote(where: str) -> dict:
    host, port = where.rsplit(":", 1)
    return {"remote_address": host.strip("[]"), "remote_port": port}


@pytest.mark.netns
def test_metrics_address_in_use_is_a_clear_refusal(lab):
    blocker = subprocess.Popen(["ip", "netns", "exec", lab.director, sys.executable, "-c",
                                "import socket, sys, time; s = socket.socket(); "
                                "s.bind(('127.0.0.1', 9121)); s.listen(); print('up', flush=True); "
                                "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert blocker.stdout.readline().strip() == "up"
        exe = str(Path(sys.executable).parent / "ipvs2nft")
        p = subprocess.run(["ip", "netns", "exec", lab.director, exe, "daemon", "--metrics",
                            "127.0.0.1:9121"], capture_output=True, text=True, env=lab.env(), timeout=30)
        assert p.returncode == 1
        assert p.stderr == "ipvs2nft daemon: --metrics 127.0.0.1:9121: Address already in use\n"
        bad = subprocess.run([exe, "daemon", "--metrics", "9121"], capture_output=True, text=True)
        assert bad.returncode == 2 and "is not ADDRESS:PORT" in bad.stderr
    finally:
        blocker.kill()
        blocker.wait()
