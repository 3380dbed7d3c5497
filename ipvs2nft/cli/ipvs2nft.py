"""The ``ipvs2nft`` command: translation without a kernel, and the tools
that have no ipvsadm counterpart.

``ipvs2nft translate [FILE|-]`` reads ipvsadm command lines (the form of an
``ipvsadm -S`` / ``/etc/ipvsadm.rules`` file; a leading ``ipvsadm`` word is
allowed, ``#`` lines and blank lines are skipped) and prints the complete
nft script that the ipvsadm drop-in would load.  It needs no root, no
kernel and no state file.  Warnings go to stderr; a line ipvsadm would
refuse is reported with its number and no script is printed (exit 2).
"""

from __future__ import annotations

import argparse
import sys

from ipvs2nft import __version__
from ipvs2nft.errors import IpvsadmError, internal_error
from ipvs2nft.ipvsadm import cmdline
from ipvs2nft.ipvsadm.apply import mutation
from ipvs2nft.model import Table
from ipvs2nft.nft import build, direct, tunnels
from ipvs2nft.store import Snapshot, Store

IGNORED = {"list": "listing", "save": "save", "zero": "zero", "help": "help", "version": "version"}


def build_parser() -> argparse.ArgumentParser:
    """The ``ipvs2nft`` parser (also what argparse-manpage documents)."""
    ap = argparse.ArgumentParser(
        prog="ipvs2nft",
        description="Linux Virtual Server on nftables: translate ipvsadm (and iptables) "
                    "load-balancing rules into one nftables table.",
        allow_abbrev=False,
    )
    ap.add_argument("--version", action="version", version=f"ipvs2nft {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="command", required=True)
    tr = sub.add_parser("translate", help="print the nft script for ipvsadm (or iptables) rules",
                        description="Read rules from FILE (or standard input) and print the nft "
                                    "script that loads them into table inet ipvs2nft.")
    tr.add_argument("file", nargs="?", default="-", metavar="FILE",
                    help="ipvsadm command lines, as ipvsadm-save writes them (default: stdin)")
    tr.add_argument("--from", dest="source", choices=("ipvsadm", "iptables"), default="ipvsadm",
                    help="input language (default ipvsadm)")
    tr.add_argument("--to", dest="target", choices=("nft", "ipvsadm"), default="nft",
                    help="output: an nft script (default) or, for --from iptables, ipvsadm "
                         "commands for the lifted services")
    tr.add_argument("--strict", action="store_true",
                    help="fail instead of warning when a feature is only approximated")
    sn = sub.add_parser("snat", help="source-NAT balanced connections (one-arm setups)",
                        description="When real servers do not route their replies back through "
                                    "the director, source-NAT the connections ipvs2nft balances: "
                                    "masquerade (the director's outgoing address) or fixed source "
                                    "addresses, one per family.  ipvsadm has no such option.")
    sn.add_argument("mode", nargs="?", metavar="off|masquerade|ADDRESS[,ADDRESS6]",
                    help="the new setting; without it, print the current one")
    dm = sub.add_parser("daemon", help="live connection counts, dynamic schedulers, statistics",
                        description="Run in the foreground (one per network namespace, systemd "
                                    "Type=notify): follow the table ipvsadm keeps and the connections "
                                    "conntrack reports, so that lc, wlc, sed, nq, ovf, lblc, lblcr and "
                                    "the -x/-y thresholds choose what IPVS would choose, and keep IPVS's "
                                    "rate estimator for ipvsadm -L --stats/--rate.  SIGTERM stops it; "
                                    "the ruleset keeps forwarding with the last choices.")
    dm.add_argument("--resync", type=float, default=10.0, metavar="SECONDS",
                    help="full conntrack dump every SECONDS (events are only hints; default 10)")
    dm.add_argument("--metrics", type=_listen_address, metavar="ADDRESS:PORT",
                    help="serve Prometheus metrics on http://ADDRESS:PORT/metrics: node_exporter's ipvs "
                         "collector (node_ipvs_*, same names and labels) and ipvs2nft_* "
                         "(e.g. 127.0.0.1:9120, [::1]:9120, :9120 for every address)")
    dm.add_argument("--metrics-textfile", metavar="PATH",
                    help="write the same metrics (without process_*) to PATH every 2 seconds for "
                         "node_exporter's textfile collector (PATH must end in .prom); removed at exit")
    return ap


def _listen_address(text: str):
    from ipvs2nft.daemon.metrics import listen_address

    try:
        return listen_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _snat_value(mode: str) -> str:
    """Validate the snat setting; raise ValueError with a message."""
    if mode == "off":
        return ""
    if mode == "masquerade":
        return mode
    import ipaddress

    addrs = [ipaddress.ip_address(a) for a in mode.split(",")]
    if len({a.version for a in addrs}) != len(addrs):
        raise ValueError("at most one address per family")
    return ",".join(str(a) for a in addrs)


def cmd_snat(args) -> int:
    from ipvs2nft.cli.ipvsadm import open_session
    try:
        session = open_session()
        if args.mode is None:
            sys.stdout.write((session.store.read_services([]).table.snat or "off") + "\n")
            return 0
        try:
            value = _snat_value(args.mode)
        except ValueError as exc:
            sys.stderr.write(f"ipvs2nft: snat: {args.mode!r}: {exc}\n")
            return 2

        def change(table):
            table.snat = value
            return table

        session.mutate([], change)
    except IpvsadmError as exc:
        sys.stderr.write(exc.message + "\n")
        return exc.status
    except PermissionError:
        sys.stderr.write("ipvs2nft: snat: Permission denied (you must be root)\n")
        return 2
    return 0


def _read(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    with open(path, "rb") as f:
        return f.read()


def translate_ipvsadm(data: bytes) -> tuple[Table, list[str], list[str]]:
    """(table, errors, warnings) for ipvsadm command lines."""
    table, errors, warnings = Table(), [], []
    for lineno, raw in enumerate(data.decode("utf-8", "surrogateescape").splitlines(), 1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        words = [w for w in text.split() if w != "ipvsadm"]
        if not words:
            continue
        try:
            cmd = cmdline.parse(words)
            if cmd.name in IGNORED or cmd.name == "restore":
                warnings.append(f"line {lineno}: {cmd.name} ignored (nothing to translate)")
                continue
            if cmd.name in ("start-daemon", "stop-daemon"):
                warnings.append(f"line {lineno}: the sync daemon is not part of the ruleset "
                                "(see compat-matrix.md: sync daemon)")
            change = mutation(cmd)
            if change is not None:
                table = change[1](table)
        except IpvsadmError as exc:
            errors.append(f"line {lineno}: {exc.message.strip()}")
    return table, errors, warnings


def cmd_translate(args) -> int:
    try:
        data = _read(args.file)
    except OSError as exc:
        sys.stderr.write(f"ipvs2nft: {args.file}: {exc.strerror}\n")
        return 2
    if args.source == "iptables":
        from ipvs2nft.iptables.translate import translate as translate_iptables

        return translate_iptables(data, strict=args.strict, target=args.target)
    if args.target != "nft":
        sys.stderr.write("ipvs2nft: --to ipvsadm is for --from iptables input\n")
        return 2
    table, errors, warnings = translate_ipvsadm(data)
    if errors:
        sys.stderr.write("".join(f"ipvs2nft: {e}\n" for e in errors))
        return 2
    # ids as the store would give them, without a store
    prepared = Store("/nonexistent/ipvs2nft-translate").prepare(Snapshot(Table()), table)
    script = build.full(prepared.table, generation=1)
    warnings += script.warnings
    devices = direct.tunnels(prepared.table.services)
    if devices:
        warnings.append("tunnelled real servers need their tunnel devices before `nft -f`: "
                        + "; ".join(tunnels.script_lines(devices)))
    for w in warnings:
        sys.stderr.write(f"ipvs2nft: warning: {w}\n")
    if args.strict and script.warnings:
        return 3
    sys.stdout.write(script.text())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "translate":
            return cmd_translate(args)
        if args.command == "snat":
            return cmd_snat(args)
        if args.command == "daemon":
            from ipvs2nft.daemon.main import main as daemon_main
            from ipvs2nft.daemon.metrics import extensions

            return daemon_main(args, extensions(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: no traceback for users
        return internal_error(exc)
    return 2  # pragma: no cover - argparse requires a command


if __name__ == "__main__":
    sys.exit(main())
