"""Our own ``ipvsadm -h`` text: every command and option, long and short.

The wording is ours (issue 2 asks for the content, not a copy of ipvsadm's
text); its first line is the version line scripts may look for.  Built from
the same table the parser uses, so the two cannot drift apart.
"""

from __future__ import annotations

from ipvs2nft.ipvsadm.options import COMMANDS, OPTIONS, VERSION_LINE, Arg, Spec

SYNOPSIS = (
    "{p} -A|-E service [-s scheduler] [-p [timeout]] [-M netmask] [--pe engine] [-b flags] [-o]",
    "{p} -D service",
    "{p} -C",
    "{p} -R < rules",
    "{p} -S [-n]",
    "{p} -a|-e service -r server[:port] [-g|-i|-m] [-w weight] [-x upper] [-y lower] [tunnel options]",
    "{p} -d service -r server[:port]",
    "{p} -L|-l [service] [-n] [--exact] [-c|--timeout|--daemon] [--stats|--rate|--thresholds|...]",
    "{p} -Z [service]",
    "{p} --set tcp tcpfin udp",
    "{p} --start-daemon master|backup [daemon options]",
    "{p} --stop-daemon master|backup",
    "{p} -h | -v",
)


def _flag(spec: Spec) -> str:
    names = [f"-{spec.short}"] if spec.short else []
    if spec.tag == "list":
        names.append("-l")
    names.append(f"--{spec.long}")
    text = ", ".join(names)
    if spec.metavar:
        text += f" [{spec.metavar}]" if spec.arg is Arg.OPTIONAL else f" {spec.metavar}"
    return text


def usage(prog: str) -> str:
    """The help text, printed on standard output with exit status 0."""
    out = [VERSION_LINE, "ipvs2nft: the Linux Virtual Server table, carried out by nftables.", "",
           "Usage:"]
    out += ["  " + line.format(p=prog) for line in SYNOPSIS]
    out += ["", "service is one of:  -t|-u|--sctp-service host[:port]   or   -f fwmark [-6]", ""]
    sections = (("Commands", COMMANDS), ("Options", OPTIONS))
    for title, specs in sections:
        out.append(f"{title}:")
        for spec in specs:
            out.append(f"  {_flag(spec):<36} {spec.help}")
        out.append("")
    return "\n".join(out)
