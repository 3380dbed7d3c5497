"""ipvsadm 1.31's commands and options, as data.

One table feeds the popt-compatible parser (``cmdline.py``), the command x
option legality check, our ``-h`` text and the argparse parser that
argparse-manpage turns into ipvsadm(8).  Names, order and the legality matrix
follow ipvsadm.c (``options_table``, ``optnames``, ``commands_v_options``):
the order of OPTIONS is the order in which ipvsadm reports violations.
"""

from __future__ import annotations

# Plain classes, not enum and dataclasses: every ipvsadm call imports this
# module, ``-h`` and ``-v`` little else, and those two cost more to import
# (inspect, ast ...) than the whole of ``python3 -c pass`` (bench/RESULTS.md).


class Arg:
    """popt argument kinds used by ipvsadm (compare with ``is``: one object each)."""

    NONE: Arg
    REQUIRED: Arg
    OPTIONAL: Arg  # POPT_ARGFLAG_OPTIONAL: takes the next word unless it starts with '-'

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Arg.{self.name}"


Arg.NONE, Arg.REQUIRED, Arg.OPTIONAL = Arg("NONE"), Arg("REQUIRED"), Arg("OPTIONAL")


class Spec:
    """One popt entry: a command or an option."""

    __slots__ = ("tag", "long", "short", "arg", "help", "metavar")

    def __init__(self, tag: str, long: str, short: str | None, arg: Arg, help: str,
                 metavar: str | None = None) -> None:
        self.tag = tag  # what the parser dispatches on
        self.long = long
        self.short = short
        self.arg = arg
        self.help = help
        self.metavar = metavar

    def __repr__(self) -> str:
        return f"Spec({self.tag!r})"


# Commands, in the order ipvsadm's help lists them.  ``tag`` is ipvsadm's
# internal command name (cmdnames[]), which error messages print.
COMMANDS: tuple[Spec, ...] = (
    Spec("add-service", "add-service", "A", Arg.NONE, "add a virtual service"),
    Spec("edit-service", "edit-service", "E", Arg.NONE, "replace a virtual service's settings"),
    Spec("delete-service", "delete-service", "D", Arg.NONE, "delete a virtual service and its real servers"),
    Spec("flush", "clear", "C", Arg.NONE, "delete every virtual service"),
    Spec("restore", "restore", "R", Arg.NONE, "read commands, one per line, from standard input"),
    Spec("save", "save", "S", Arg.NONE, "print the table as -A/-a commands"),
    Spec("add-server", "add-server", "a", Arg.NONE, "add a real server to a virtual service"),
    Spec("edit-server", "edit-server", "e", Arg.NONE, "replace a real server's settings"),
    Spec("delete-server", "delete-server", "d", Arg.NONE, "remove a real server from a virtual service"),
    Spec("list", "list", "L", Arg.NONE, "list the table (also -l)"),
    Spec("zero", "zero", "Z", Arg.NONE, "zero the counters of one service or of all"),
    Spec("set", "set", None, Arg.NONE, "set the tcp, tcpfin and udp connection timeouts", "tcp tcpfin udp"),
    Spec("start-daemon", "start-daemon", None, Arg.REQUIRED, "start a connection sync daemon",
         "master|backup"),
    Spec("stop-daemon", "stop-daemon", None, Arg.REQUIRED, "stop a connection sync daemon", "master|backup"),
    Spec("help", "help", "h", Arg.NONE, "print this help"),
    Spec("version", "version", "v", Arg.NONE, "print the version"),
)

# Options.  ``tag`` is ipvsadm's optnames[] entry (its OPTC order below);
# options outside the matrix carry their own tags.
OPTIONS: tuple[Spec, ...] = (
    Spec("tcp-service", "tcp-service", "t", Arg.REQUIRED, "TCP virtual service", "host[:port]"),
    Spec("udp-service", "udp-service", "u", Arg.REQUIRED, "UDP virtual service", "host[:port]"),
    Spec("sctp-service", "sctp-service", None, Arg.REQUIRED, "SCTP virtual service", "host[:port]"),
    Spec("fwmark-service", "fwmark-service", "f", Arg.REQUIRED,
         "firewall-mark virtual service (mark 1..4294967295)", "fwmark"),
    Spec("ipv6", "ipv6", "6", Arg.NONE, "the fwmark service (-f, given before) is IPv6"),
    Spec("scheduler", "scheduler", "s", Arg.REQUIRED,
         "rr|wrr|lc|wlc|lblc|lblcr|dh|sh|sed|nq|fo|ovf|mh (default wlc)", "scheduler"),
    Spec("pe", "pe", None, Arg.REQUIRED, "persistence engine: sip", "engine"),
    Spec("persistent", "persistent", "p", Arg.OPTIONAL,
         "persistent service; timeout in seconds (default 360)", "timeout"),
    Spec("netmask", "netmask", "M", Arg.REQUIRED,
         "persistence granularity: IPv4 mask or IPv6 prefix length", "netmask"),
    Spec("sched-flags", "sched-flags", "b", Arg.REQUIRED,
         "scheduler flags, comma-separated: sh-fallback, sh-port, mh-fallback, mh-port, flag-1..3",
         "flags"),
    Spec("ops", "ops", "o", Arg.NONE, "one-packet scheduling (UDP and fwmark services)"),
    Spec("real-server", "real-server", "r", Arg.REQUIRED, "real server", "host[:port]"),
    Spec("gatewaying", "gatewaying", "g", Arg.NONE, "direct routing (the default)"),
    Spec("ipip", "ipip", "i", Arg.NONE, "tunnelling"),
    Spec("masquerading", "masquerading", "m", Arg.NONE, "masquerading (NAT)"),
    Spec("weight", "weight", "w", Arg.REQUIRED, "weight of the real server (default 1, 0 = quiesced)",
         "weight"),
    Spec("u-threshold", "u-threshold", "x", Arg.REQUIRED, "upper connection threshold (0 = none)",
         "uthreshold"),
    Spec("l-threshold", "l-threshold", "y", Arg.REQUIRED, "lower connection threshold", "lthreshold"),
    Spec("tun-type", "tun-type", None, Arg.REQUIRED, "tunnel type: ipip (default), gue or gre", "type"),
    Spec("tun-port", "tun-port", None, Arg.REQUIRED, "tunnel destination port (gue)", "port"),
    Spec("tun-nocsum", "tun-nocsum", None, Arg.NONE, "tunnel without checksum (default)"),
    Spec("tun-csum", "tun-csum", None, Arg.NONE, "tunnel with checksum"),
    Spec("tun-remcsum", "tun-remcsum", None, Arg.NONE, "tunnel with remote checksum offload (gue)"),
    Spec("connection", "connection", "c", Arg.NONE, "list the connection table"),
    Spec("timeout", "timeout", None, Arg.NONE, "list the connection timeouts"),
    Spec("daemon", "daemon", None, Arg.NONE, "list the sync daemons"),
    Spec("stats", "stats", None, Arg.NONE, "list statistics"),
    Spec("rate", "rate", None, Arg.NONE, "list rates"),
    Spec("thresholds", "thresholds", None, Arg.NONE, "list thresholds"),
    Spec("persistent-conn", "persistent-conn", None, Arg.NONE, "list persistent connections"),
    Spec("tun-info", "tun-info", None, Arg.NONE, "list tunnel information"),
    Spec("nosort", "nosort", None, Arg.NONE, "do not sort services and real servers"),
    Spec("sort", "sort", None, Arg.NONE, "sort (the default; accepted for compatibility)"),
    Spec("numeric", "numeric", "n", Arg.NONE, "print addresses and ports as numbers"),
    Spec("exact", "exact", "X", Arg.NONE, "print exact numbers in --stats and --rate"),
    Spec("mcast-interface", "mcast-interface", None, Arg.REQUIRED,
         "sync daemon multicast interface (default eth0)", "interface"),
    Spec("syncid", "syncid", None, Arg.REQUIRED, "sync daemon id, 0..255 (default 0)", "id"),
    Spec("sync-maxlen", "sync-maxlen", None, Arg.REQUIRED, "largest sync message", "length"),
    Spec("mcast-group", "mcast-group", None, Arg.REQUIRED,
         "sync multicast group (default 224.0.0.81)", "address"),
    Spec("mcast-port", "mcast-port", None, Arg.REQUIRED, "sync UDP port (default 8848)", "port"),
    Spec("mcast-ttl", "mcast-ttl", None, Arg.REQUIRED, "sync multicast TTL (default 1)", "ttl"),
)

BY_LONG: dict[str, Spec] = {s.long: s for s in COMMANDS + OPTIONS}
BY_SHORT: dict[str, Spec] = {s.short: s for s in COMMANDS + OPTIONS if s.short}
BY_SHORT["l"] = BY_SHORT["L"]  # popt has "list" twice: -L and -l

# optnames[] of ipvsadm.c: matrix columns, in the order violations are found.
MATRIX_OPTIONS: tuple[str, ...] = (
    "numeric", "connection", "service-address", "scheduler", "persistent", "netmask",
    "real-server", "forwarding-method", "weight", "u-threshold", "l-threshold",
    "mcast-interface", "timeout", "daemon", "stats", "rate", "thresholds",
    "persistent-conn", "nosort", "syncid", "exact", "ops", "pe", "sched-flags",
    "mcast-group", "mcast-port", "mcast-ttl", "sync-maxlen", "tun-info", "tun-type",
    "tun-port", "tun-nocsum", "tun-csum", "tun-remcsum",
)

# Which matrix column each option fills (several options share one column).
COLUMN_OF: dict[str, str] = {
    "tcp-service": "service-address", "udp-service": "service-address",
    "sctp-service": "service-address", "fwmark-service": "service-address",
    "gatewaying": "forwarding-method", "ipip": "forwarding-method",
    "masquerading": "forwarding-method",
}

# commands_v_options: '+' required, 'x' illegal, '1' at most one of the '1's,
# '.' optional.  Columns are MATRIX_OPTIONS.
_ROWS = {
    "add-service":    "xx+...xxxxxxxxxxxxxxx...xxxxxxxxxx",
    "edit-service":   "xx+...xxxxxxxxxxxxxxx...xxxxxxxxxx",
    "delete-service": "xx+xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    "flush":          "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    "list":           ".11xxxxxxxxx11.......xxxxxxx.xxxxx",
    "add-server":     "xx+xxx+....xxxxxxxxxxxxxxxxxx.....",
    "delete-server":  "xx+xxx+xxxxxxxxxxxxxxxxxxxxxxxxxxx",
    "edit-server":    "xx+xxx+....xxxxxxxxxxxxxxxxxx.....",
    "set":            "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    "start-daemon":   "xxxxxxxxxxx.xxxxxxx.xxxx....xxxxxx",
    "stop-daemon":    "xxxxxxxxxxxxxxxxxxx.xxxxxxxxxxxxxx",
    "restore":        "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    "save":           ".xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    "zero":           "xx.xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
}
MATRIX: dict[str, dict[str, str]] = {
    cmd: dict(zip(MATRIX_OPTIONS, row, strict=True)) for cmd, row in _ROWS.items()
}

# tunnel_types_v_options: columns tun-port, tun-nocsum, tun-csum, tun-remcsum.
TUNNEL_OPTIONS: tuple[str, ...] = ("tun-port", "tun-nocsum", "tun-csum", "tun-remcsum")
TUNNEL_MATRIX: dict[str, str] = {"ipip": "xxxx", "gue": "+111", "gre": "x11x"}
TUNNEL_NAMES: tuple[str, ...] = ("ipip", "gue", "gre")

VERSION_LINE = "ipvsadm v1.31 2019/12/24 (compiled with popt and IPVS v1.2.1)"


def build_parser():  # -> argparse.ArgumentParser
    """An argparse description of ipvsadm's command line, for help and man pages.

    It documents; it does not parse: ipvsadm's popt semantics (the first
    option must be a command, ``-p`` takes an optional value, errors are
    reported in argv order) are in ``cmdline.py``.  Importable without side
    effects, as argparse-manpage requires.
    """
    import argparse

    parser = argparse.ArgumentParser(
        prog="ipvsadm",
        description="Every difference from ipvsadm 1.31 and IPVS is listed in compat-matrix.md.",
        add_help=False,
        allow_abbrev=False,
    )
    groups = {
        "Commands": COMMANDS,
        "Virtual service": OPTIONS[0:5],
        "Service options": OPTIONS[5:11],
        "Real-server options": OPTIONS[11:23],
        "Listing options": OPTIONS[23:35],
        "Sync daemon options": OPTIONS[35:],
    }
    for title, specs in groups.items():
        group = parser.add_argument_group(title)
        for spec in specs:
            flags = [f"-{spec.short}"] if spec.short else []
            if spec.tag == "list":
                flags.append("-l")
            flags.append(f"--{spec.long}")
            kwargs: dict = {"help": spec.help, "dest": spec.tag.replace("-", "_")}
            if spec.arg is Arg.NONE and spec.metavar is None:
                kwargs["action"] = "store_true"
            elif spec.arg is Arg.OPTIONAL:
                kwargs.update(nargs="?", metavar=spec.metavar)
            elif spec.tag == "set":
                kwargs.update(nargs=3, metavar=("tcp", "tcpfin", "udp"))
            else:
                kwargs["metavar"] = spec.metavar
            group.add_argument(*flags, **kwargs)
    return parser
