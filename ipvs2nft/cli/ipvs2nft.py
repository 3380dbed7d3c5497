"""The ``ipvs2nft`` command: translation without a kernel, and the tools
that have no ipvsadm counterpart.

``ipvs2nft translate [FILE|-]`` reads ipvsadm command lines (the form of an
``ipvsadm -S`` / ``/etc/ipvsadm.rules`` file, split as ipvsadm-restore
splits it: ``ipvsadm`` words dropped, lines beginning with ``#`` and blank
lines skipped) and prints the complete
nft script that the ipvsadm drop-in would load.  It needs no root, no
kernel and no state file.  Warnings go to stderr; a line ipvsadm would
refuse is reported with its number and no script is printed (exit 2).
"""

from __future__ import annotations

import argparse
import sys

from ipvs2nft import __version__, host, ids
from ipvs2nft.errors import IpvsadmError, internal_error
from ipvs2nft.ipvsadm import cmdline, restore
from ipvs2nft.ipvsadm.apply import mutation
from ipvs2nft.model import Table
from ipvs2nft.nft import build, check, direct, tunnels
from ipvs2nft.unsupported import Report

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
    tr.add_argument("--from", dest="source", choices=("ipvsadm", "iptables", "keepalived"),
                    default="ipvsadm",
                    help="input language (default ipvsadm); keepalived: the virtual_server part of a "
                         "keepalived.conf, as keepalived sets it up at start")
    tr.add_argument("--to", dest="target", choices=("nft", "ipvsadm"), default=None,
                    help="output: an nft script (the default, except for --from keepalived) or ipvsadm "
                         "commands: the lifted services of --from iptables, the ipvsadm -S -n form of "
                         "--from keepalived (its default)")
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
    dm.add_argument("--keepalived", metavar="FILE",
                    help="also run the virtual_server part of keepalived's configuration FILE: its "
                         "services, health checkers, quorum and sorry servers, notify scripts, and "
                         "ipvs2nft's feedback weights (least response time, least CPU load over SNMP); "
                         "VRRP stays with `keepalived --vrrp`")
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


def translate_ipvsadm(data: bytes) -> tuple[Table, list[str], list[tuple[int, str]]]:
    """(table, errors, (line, warning)s) for ipvsadm command lines, split
    into words exactly as ipvsadm-restore would split them."""
    table: Table = Table()
    errors: list[str] = []
    warnings: list[tuple[int, str]] = []
    for lineno, words in restore.script_lines(data):
        if not words:
            continue
        try:
            cmd = cmdline.parse(words)
            if cmd.name in IGNORED or cmd.name == "restore":
                warnings.append((lineno, f"{cmd.name} ignored (nothing to translate)"))
                continue
            if cmd.name in ("start-daemon", "stop-daemon"):
                warnings.append((lineno, "the sync daemon is not part of the ruleset "
                                         "(see compat-matrix.md: sync daemon)"))
            change = mutation(cmd)
            if change is not None:
                table = change[1](table)
        except IpvsadmError as exc:
            errors.append(f"line {lineno}: {exc.message.strip()}")
    return table, errors, warnings


def _ipvsadm_script(data: bytes, report: Report) -> tuple[str, list[str]]:
    """(nft script, errors) for ipvsadm lines; what it meets goes to ``report``."""
    table, errors, warnings = translate_ipvsadm(data)
    for line, warning in warnings:
        report.warn(warning, line)
    if errors:
        return "", errors
    return table_script(table, report), []


def table_script(table: Table, report: Report) -> str:
    """The nft script of a table built in memory (ipvsadm lines, keepalived)."""
    table, _ = ids.assign(table)  # as the store would give them
    # a -g/-i server that is this host is delivered locally, as the drop-in does
    carried = direct.local_nodes(table, host.is_local)
    script = build.full(carried, generation=1)
    for warning in script.warnings:
        report.unsupported(warning)
    devices = direct.tunnels(carried.services)
    if devices:
        report.warn("tunnelled real servers need their tunnel devices before `nft -f`: "
                    + "; ".join(tunnels.script_lines(devices)))
    return script.text()


def _prefix(data: bytes, lines: int) -> bytes:
    return b"".join(line + b"\n" for line in data.split(b"\n")[:lines])


def cmd_translate(args) -> int:
    report = Report(strict=args.strict)
    if args.source == "keepalived":
        from ipvs2nft.keepalived.translate import translate as translate_keepalived

        return translate_keepalived(args.file, args.target or "ipvsadm", report, table_script)
    try:
        data = _read(args.file)
    except OSError as exc:
        sys.stderr.write(f"ipvs2nft: {args.file}: {exc.strerror}\n")
        return 2
    if args.source == "iptables":
        return translate_iptables(data, report, target=args.target or "nft")
    if args.target not in (None, "nft"):
        sys.stderr.write("ipvs2nft: --to ipvsadm is for --from iptables and --from keepalived input\n")
        return 2
    script, errors = _ipvsadm_script(data, report)
    if not errors:
        error = _checked(script, len(data.split(b"\n")),
                         lambda k: _ipvsadm_script(_prefix(data, k), Report())[0] or None, report)
        errors += [error] if error else []
    if errors:
        sys.stderr.write("".join(f"ipvs2nft: {e}\n" for e in errors))
        return 2
    return report.finish(script)


def _checked(script: str, lines: int, script_of, report: Report) -> str:
    """nft -c of the script about to be printed: the error naming the input
    line nft's refusal comes from, or "" (a loss reported if unchecked)."""
    error, unchecked = check.verify(script, lines, script_of)
    if unchecked:
        report.unsupported(unchecked)
    return error


def translate_iptables(data: bytes, report: Report, target: str = "nft") -> int:
    """``--from iptables``: the translation, what it found on stderr; 2 if
    the input cannot be parsed or nft refuses the script."""
    from ipvs2nft.iptables import translate
    from ipvs2nft.iptables.rules import ParseError

    text = data.decode("utf-8", "surrogateescape")
    try:
        t = translate.run(text)
    except ParseError as exc:
        sys.stderr.write(f"ipvs2nft: line {exc.line}: {exc.message}\n")
        return 2
    for line, note in t.notes:
        report.note(note, line)
    for line, warning in t.warnings:
        report.warn(warning, line)
    report.losses += t.approximations  # counted where they are met (lift, passthrough)
    for lf in t.lifted.lifted:
        if lf.suggestion:
            report.suggest(lf.suggestion)
    if target == "ipvsadm":
        out, notes, extra = translate.ipvsadm_rules(t)
        for line, note in notes:
            report.note(note, line)
        report.losses += extra
        return report.finish(out)
    out = "".join(line + "\n" for line in t.script_lines)
    error = _checked(out, len(text.splitlines()), lambda k: translate.script_of(text, k), report)
    if error:
        sys.stderr.write(f"ipvs2nft: {error}\n")
        return 2
    return report.finish(out)


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
            from ipvs2nft.health.extension import extensions as keepalived

            return daemon_main(args, [*extensions(args), *keepalived(args)])
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: no traceback for users
        return internal_error(exc)
    return 2  # pragma: no cover - argparse requires a command


if __name__ == "__main__":
    sys.exit(main())
