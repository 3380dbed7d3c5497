"""Prometheus metrics: ``ipvs2nft daemon --metrics ADDR:PORT`` and
``--metrics-textfile PATH``.

Dashboards and alerts built on node_exporter's ipvs collector must keep
working, so its eight families come out as node_exporter writes them
(collector/ipvs_linux.go; names, HELP, types and labels checked against the
node_exporter 1.5.0 binary Debian ships, tests/test_metrics.py):

* ``node_ipvs_{connections,incoming_packets,outgoing_packets,incoming_bytes,
  outgoing_bytes}_total``: the totals of /proc/net/ip_vs_stats, which count
  what deleted services counted too and restart at a ``-Z`` of every service
  (``Estimator.totals``);
* ``node_ipvs_backend_{connections_active,connections_inactive,weight}`` per
  real server of each service, labelled as procfs parses /proc/net/ip_vs:
  ``local_address``/``local_port`` of the virtual service (``""`` and ``"0"``
  for a fwmark service), ``local_mark`` (the mark as the kernel prints it,
  ``%08X``, else ``""``), ``proto`` (TCP, UDP, FWM; procfs skips SCTP
  services), ``remote_address``/``remote_port`` of the real server.

What only ipvs2nft knows carries an ``ipvs2nft_`` prefix: per service and
real server the counters ``ipvsadm -L --stats`` shows, the overload flag of
the thresholds, the daemon's own work (conntrack events, losses, dumps,
publications) and how late its event loop runs.  Another extension can add
families by having a ``metrics()`` method that yields them.

Every number comes from the daemon's state -- the estimator's last 2-second
tick (what ``ipvsadm -L --stats`` lists while the daemon runs), the
connection table, the model -- so a scrape never asks the kernel.  The HTTP
server lives in the daemon's event loop (asyncio), so that state keeps its
single owner; prometheus_client writes the exposition formats.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os

from ipvs2nft import __version__
from ipvs2nft.daemon.estimator import TICK
from ipvs2nft.daemon.main import DaemonError, Extension, _log
from ipvs2nft.netaddr import IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP

# node_exporter's HELP texts, word for word (collector/ipvs_linux.go)
TOTALS = (
    ("node_ipvs_connections_total", "The total number of connections made."),
    ("node_ipvs_incoming_packets_total", "The total number of incoming packets."),
    ("node_ipvs_outgoing_packets_total", "The total number of outgoing packets."),
    ("node_ipvs_incoming_bytes_total", "The total amount of incoming data."),
    ("node_ipvs_outgoing_bytes_total", "The total amount of outgoing data."),
)
BACKEND_ACTIVE = ("node_ipvs_backend_connections_active",
                  "The current active connections by local and remote address.")
BACKEND_INACTIVE = ("node_ipvs_backend_connections_inactive",
                    "The current inactive connections by local and remote address.")
BACKEND_WEIGHT = ("node_ipvs_backend_weight", "The current backend weight by local and remote address.")
# sorted, as node_exporter's exposition writes them
SERVICE_LABELS = ("local_address", "local_mark", "local_port", "proto")
BACKEND_LABELS = ("local_address", "local_mark", "local_port", "proto", "remote_address", "remote_port")
PROC_PROTO = {IPPROTO_TCP: "TCP", IPPROTO_UDP: "UDP", IPPROTO_SCTP: "SCTP"}
# the five counters of ipvsadm --stats, in Estimate order
STATS = (("connections", "Connections scheduled"), ("incoming_packets", "Packets in (client to server)"),
         ("outgoing_packets", "Packets out (server to client)"),
         ("incoming_bytes", "Bytes in (client to server, IP length)"),
         ("outgoing_bytes", "Bytes out (server to client, IP length)"))
# Daemon.counters -> (name, help)
DAEMON_COUNTERS = {
    "events": ("ipvs2nft_conntrack_events_total", "Conntrack events read."),
    "lost": ("ipvs2nft_conntrack_event_losses_total",
             "Times the conntrack event socket overflowed (ENOBUFS); each is followed by a dump."),
    "resyncs": ("ipvs2nft_conntrack_dumps_total", "Full conntrack dumps (at start, periodic, after a loss)."),
    "pushes": ("ipvs2nft_publish_total", "Publications of live choices (lc, wlc... and thresholds)."),
    "elements": ("ipvs2nft_publish_elements_total", "nftables set elements written by publications."),
    "stale": ("ipvs2nft_publish_stale_total",
              "Publications that met a newer table generation and were redone."),
}
LAG_EVERY = 1.0  # seconds between looks at the event loop's lateness


def listen_address(text: str) -> tuple[str | None, int]:
    """``HOST:PORT``, ``[IPV6]:PORT`` or ``:PORT`` (every address, like
    node_exporter's --web.listen-address) -> (host or None, port).
    ValueError with a message otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not ADDRESS:PORT (e.g. 127.0.0.1:9120, [::1]:9120, :9120)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, [ADDRESS]:PORT")
    return host or None, int(port)


def _address(addr) -> str:
    """As Go's net.IP.String() writes it (an IPv4-mapped IPv6 address as
    IPv4), which is what node_exporter's labels hold."""
    if addr is None:
        return ""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def service_labels(svc) -> tuple[str, str, str, str]:
    """local_address, local_mark, local_port, proto of one virtual service."""
    if svc.fwmark:
        return "", f"{svc.fwmark:08X}", "0", "FWM"
    return _address(svc.addr), "", str(svc.port), PROC_PROTO.get(svc.protocol, str(svc.protocol))


def families(daemon, lag: float = 0.0) -> list:
    """Every family, from the daemon's state now."""
    return node_families(daemon) + own_families(daemon, lag) + _extension_families(daemon)


def node_families(daemon) -> list:
    """node_exporter's ipvs collector, over the daemon's state."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    out = []
    for (name, text), value in zip(TOTALS, daemon.estimator.totals, strict=True):
        family = CounterMetricFamily(name, text)
        family.add_metric([], value)
        out.append(family)
    rows: dict[tuple, list[int]] = {}  # rows with equal labels are summed (ipvs_linux.go)
    for svc in daemon.table.services:
        if svc.protocol == IPPROTO_SCTP and not svc.fwmark:
            continue  # procfs reads TCP, UDP and FWM lines only
        local = service_labels(svc)
        loads = daemon.live.counts(svc.key)
        for d in svc.dests:
            load = loads.get(d.key)
            row = rows.setdefault((*local, _address(d.addr), str(d.port)), [0, 0, 0])
            row[0] += load.active if load else 0
            row[1] += load.inactive if load else 0
            row[2] += d.weight
    for index, (name, text) in enumerate((BACKEND_ACTIVE, BACKEND_INACTIVE, BACKEND_WEIGHT)):
        family = GaugeMetricFamily(name, text, labels=BACKEND_LABELS)
        for labels, values in rows.items():
            family.add_metric(labels, values[index])
        out.append(family)
    return out


def own_families(daemon, lag: float) -> list:
    """What only ipvs2nft knows."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    from ipvs2nft.nft.readback import dest_tag

    services = [CounterMetricFamily(f"ipvs2nft_service_{n}_total", f"{t} by this virtual service "
                                    "(ipvsadm -L --stats).", labels=SERVICE_LABELS) for n, t in STATS]
    backends = [CounterMetricFamily(f"ipvs2nft_backend_{n}_total", f"{t} by this real server of this "
                                    "virtual service (ipvsadm -L --stats).", labels=BACKEND_LABELS)
                for n, t in STATS]
    overloaded = GaugeMetricFamily("ipvs2nft_backend_overloaded", "1 while the -x/-y thresholds keep this "
                                   "real server out of scheduling.", labels=BACKEND_LABELS)
    estimator = daemon.estimator
    for svc in daemon.table.services:
        local = service_labels(svc)
        est = estimator.services.get(str(svc.sid))
        for family, value in zip(services, est.shown if est else [0] * 5, strict=True):
            family.add_metric(local, value)
        loads = daemon.live.counts(svc.key)
        for d in svc.dests:
            labels = (*local, _address(d.addr), str(d.port))
            est = estimator.dests.get(dest_tag(svc.sid, d.key))
            for family, value in zip(backends, est.shown if est else [0] * 5, strict=True):
                family.add_metric(labels, value)
            load = loads.get(d.key)
            overloaded.add_metric(labels, 1 if load is not None and load.overloaded else 0)
    out = [*services, *backends, overloaded]
    for key, (name, text) in DAEMON_COUNTERS.items():
        family = CounterMetricFamily(name, text)
        family.add_metric([], daemon.counters.get(key, 0))
        out.append(family)
    for name, text, value in (
            ("ipvs2nft_services", "Virtual services in the table.", sum(1 for _ in daemon.table.services)),
            ("ipvs2nft_connections", "Connections of ours the daemon follows (active and inactive).",
             len(daemon.live.conns)),
            ("ipvs2nft_table_generation", "Generation of the table the daemon follows (the state file's).",
             daemon.generation),
            ("ipvs2nft_daemon_loop_lag_seconds", "How late the daemon's event loop last ran a timer.", lag)):
        family = GaugeMetricFamily(name, text)
        family.add_metric([], value)
        out.append(family)
    info = GaugeMetricFamily("ipvs2nft_build_info", "ipvs2nft's version.", labels=["version"])
    info.add_metric([__version__], 1)
    out.append(info)
    return out


def _extension_families(daemon) -> list:
    out = []
    for ext in daemon.extensions:
        produce = getattr(ext, "metrics", None)
        if produce is not None:
            out.extend(produce())
    return out


class Metrics(Extension):
    """The daemon's metrics: served over HTTP, written for node_exporter's
    textfile collector, or both."""

    def __init__(self, listen: tuple[str | None, int] | None = None, textfile: str | None = None,
                 every: float = TICK) -> None:
        self.listen = listen
        self.textfile = textfile
        self.every = every
        self.daemon = None
        self.lag = 0.0
        self.server: asyncio.AbstractServer | None = None
        self.tasks: list[asyncio.Task] = []

    # ------------------------------------------------------------ life cycle
    async def start(self, daemon) -> None:
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            raise DaemonError("--metrics needs the prometheus_client library "
                              "(Debian: apt-get install python3-prometheus-client)") from None
        self.daemon = daemon
        try:
            await self._open()
        except DaemonError:
            await self.stop()
            raise
        self.tasks.append(asyncio.create_task(self._watch_lag()))

    async def _open(self) -> None:
        if self.textfile is not None:
            if not self.textfile.endswith(".prom"):
                raise DaemonError(f"--metrics-textfile {self.textfile}: node_exporter's textfile "
                                  "collector reads only files named *.prom")
            try:
                self.write_textfile()
            except OSError as exc:
                raise DaemonError(f"--metrics-textfile {self.textfile}: {exc.strerror}") from None
            self.tasks.append(asyncio.create_task(self._every(self.every, self._write_quietly)))
        if self.listen is not None:
            host, port = self.listen
            try:
                self.server = await asyncio.start_server(self._serve, host, port)
            except OSError as exc:
                where = f"[{host}]" if host and ":" in host else (host or "")
                # asyncio words its own message; the errno's is the one users know
                reason = os.strerror(exc.errno) if exc.errno else str(exc)
                raise DaemonError(f"--metrics {where}:{port}: {reason}") from None

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.server is not None:
            self.server.close()
        if self.textfile is not None and self.textfile.endswith(".prom"):
            # a stopped daemon's numbers would look alive on every scrape
            with contextlib.suppress(OSError):
                os.unlink(self.textfile)

    async def _every(self, seconds: float, action) -> None:
        while True:
            await asyncio.sleep(seconds)
            action()

    async def _watch_lag(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(LAG_EVERY)
            self.lag = max(0.0, loop.time() - started - LAG_EVERY)

    # ------------------------------------------------------------ output
    def registry(self, process: bool = False):
        """A registry over the daemon's state; ``process`` adds the usual
        process_* families (not in the textfile: node_exporter has its own)."""
        from prometheus_client import CollectorRegistry, ProcessCollector

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self))
        if process:
            ProcessCollector(registry=registry)
        return registry

    def write_textfile(self) -> None:
        """Write and rename, so the collector never reads half a file; the
        temporary name does not end in .prom, so it is never read."""
        from prometheus_client import generate_latest

        data = generate_latest(self.registry())
        tmp = f"{self.textfile}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                os.fchmod(f.fileno(), 0o644)
                f.write(data)
            os.rename(tmp, self.textfile)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _write_quietly(self) -> None:
        try:
            self.write_textfile()
        except OSError as exc:
            _log(f"--metrics-textfile {self.textfile}: {exc.strerror}")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One HTTP/1.1 request, answered and closed."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10.0)
            status, headers, body = self._answer(head)
            lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers),
                     f"Content-Length: {len(body)}", "Connection: close", "", ""]
            writer.write("\r\n".join(lines).encode("latin-1"))
            if not head.startswith(b"HEAD "):
                writer.write(body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()

    def _answer(self, head: bytes) -> tuple[str, list, bytes]:
        from prometheus_client.exposition import choose_encoder, gzip_accepted

        request, *lines = head.decode("latin-1").split("\r\n")
        parts = request.split()
        if len(parts) != 3:
            return "400 Bad Request", [], b""
        method, target, _ = parts
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", [("Allow", "GET, HEAD")], b""
        if path == "/":
            page = b'<html><body><a href="/metrics">ipvs2nft metrics</a></body></html>\n'
            return "200 OK", [("Content-Type", "text/html")], page
        if path != "/metrics":
            return "404 Not Found", [], b""
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        body = encoder(self.registry(process=True))
        out = [("Content-Type", content_type)]
        if gzip_accepted(headers.get("accept-encoding", "")):
            import gzip

            body = gzip.compress(body)
            out.append(("Content-Encoding", "gzip"))
        return "200 OK", out, body


class _Collector:
    """prometheus_client's collector interface over the daemon; called in the
    event loop's thread only (the HTTP server and the textfile both run there)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self):
        return families(self.metrics.daemon, self.metrics.lag)


def extensions(args) -> list:
    """The metrics extension the command line asks for, if any."""
    listen = getattr(args, "metrics", None)
    textfile = getattr(args, "metrics_textfile", None)
    if listen is None and textfile is None:
        return []
    return [Metrics(listen, textfile)]
