"""``ipvs2nft translate --from iptables``: iptables rules in, nft (or ipvsadm) out.

The load-balancing idioms become services of the one model (lift.py) and go
through the same builder as ipvsadm input (table ``inet ipvs2nft``, one
map for all services); every other rule goes through iptables-restore-
translate (passthrough.py).  The script loads with ``nft -f`` as it is.

What differs from ipvsadm input:

* slots a cascade leaves un-NATed are ``sched.PASS`` slots: the connection
  goes on un-NATed, as it fell through the nat chain in iptables (IPVS
  refuses a connection it has no server for);
* services keyed by something IPVS cannot name (multiport, subnets, an
  interface) are fwmark services whose mark table ``ipvs2nft_iptables``
  sets, for new connections only, at priority -101: after the translated
  mangle table (-150), before nat (-100) and our dispatch (-99);
* the connection-tracking timeouts stay the kernel's own
  (``build.KERNEL_TIMEOUTS``): iptables never changed them;
* only the prerouting hook: PREROUTING rules never saw the director's own
  connections.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ipvs2nft import ids, sched
from ipvs2nft.iptables import jumps
from ipvs2nft.iptables.jumps import JumpResult
from ipvs2nft.iptables.lift import NTH, Lifted, LiftResult, iptables_words, lift, nft_matches
from ipvs2nft.iptables.parse import parse
from ipvs2nft.iptables.passthrough import Passthrough
from ipvs2nft.iptables.passthrough import translate as passthrough
from ipvs2nft.iptables.rules import ParseError
from ipvs2nft.model import Table
from ipvs2nft.nft import build

MARK_TABLE = "ipvs2nft_iptables"
MARK_PRIORITY = -101  # after mangle (-150), before nat (-100) and ipvs2nft's dispatch (-99)
# nf_conntrack defaults (tcp_timeout_established 5 days, fin_wait 120 s,
# udp_timeout_stream 120 s): what the iptables setup ran with.  The builder
# has one UDP value for replied and unreplied flows; unreplied UDP flows
# (kernel: 30 s) therefore live 120 s.
CONNTRACK_TIMEOUTS = build.KERNEL_TIMEOUTS


@dataclass
class Translation:
    """Everything one input turns into."""

    lifted: LiftResult
    table: Table  # lifted services, ids assigned
    passthrough: dict[int, Passthrough]
    jumps: JumpResult = field(default_factory=JumpResult)  # cascades lifted inside their chain
    warnings: list[tuple[int, str]] = field(default_factory=list)
    notes: list[tuple[int, str]] = field(default_factory=list)
    approximations: int = 0
    script_lines: list[str] = field(default_factory=list)


def run(text: str) -> Translation:
    """Parse, lift and translate; raises ParseError for input iptables refuses."""
    ruleset, parse_warnings = parse(text)
    lifted = lift(ruleset)
    jumped = jumps.lift(ruleset, lifted)
    table = Table([lf.service for lf in lifted.lifted], CONNTRACK_TIMEOUTS)
    table, _ = ids.assign(table)
    through = {fam: passthrough(ruleset, fam, lifted.consumed | jumped.consumed, jumped.rewrites,
                                tuple(jumped.declarations.get(fam, ()))) for fam in (4, 6)}
    t = Translation(lifted, table, through, jumped)
    t.warnings = [(_line_of(w), w.split(": ", 1)[1]) for w in parse_warnings]
    t.warnings += lifted.findings
    t.notes = list(lifted.notes) + [(lf.rules[0].line, lf.summary) for lf in lifted.lifted]
    t.approximations = lifted.approximated
    for p in through.values():
        t.warnings += p.warnings
        t.notes += p.notes
        t.approximations += p.untranslated + p.approximated
    t.script_lines = _script(t)
    return t


def _line_of(warning: str) -> int:
    try:
        return int(warning.split(":", 1)[0].split()[1])
    except (IndexError, ValueError):
        return 0


# ---------------------------------------------------------------- nft

def _script(t: Translation) -> list[str]:
    lines = [f"# ipvs2nft translate --from iptables: {len(t.lifted.lifted)} service(s) lifted "
             f"from {len(t.lifted.consumed)} rule(s); {len(t.jumps.lifted)} chain cascade(s) lifted; "
             f"{sum(len(p.lines) for p in t.passthrough.values())} line(s) from "
             "iptables-restore-translate"]
    services = list(t.table.services)
    if services:
        script = build.full(t.table, generation=1, hooks=("prerouting",))
        lines += script.lines
        for w in script.warnings:
            t.warnings.append((0, w))
            t.approximations += 1
    lines += _marking([lf for lf in t.lifted.lifted if lf.marking], t.table)
    for fam in (4, 6):
        lines += t.passthrough[fam].lines
    return lines


def _marking(lifted: list[Lifted], table: Table) -> list[str]:
    out = []
    for fam, family in ((4, "ip"), (6, "ip6")):
        mine = [lf for lf in lifted if lf.key.family == fam]
        if not mine:
            continue
        name = f"{family} {MARK_TABLE}"
        out += [f"add table {name}", f"delete table {name}", f"add table {name}",
                f"add chain {name} marks {{ type filter hook prerouting priority {MARK_PRIORITY}; "
                "policy accept; }"]
        for lf in mine:
            fwmark = _prepared(lf, table).fwmark
            out.append(f"add rule {name} marks ct state new {nft_matches(lf.key)} "
                       f"meta mark set {fwmark:#010x}")
    return out


def _prepared(lf: Lifted, table: Table):
    return table.find(lf.service.key)


# ---------------------------------------------------------------- ipvsadm

def ipvsadm_rules(t: Translation) -> tuple[str, list[tuple[int, str]], int]:
    """``ipvsadm -S -n`` lines for the lifted services; notes; approximations."""
    from ipvs2nft import listing

    notes: list[tuple[int, str]] = []
    approx = 0
    services = []
    for lf in t.lifted.lifted:
        svc = _prepared(lf, t.table)
        mapped, note, exact = _ipvs_scheduler(lf, svc)
        services.append(mapped)
        notes.append((lf.rules[0].line, f"{lf.label}: {note}"))
        approx += 0 if exact else 1
        if lf.marking:
            notes.append((lf.rules[0].line, f"{lf.label}: mark it as before: iptables -t mangle "
                                            f"-A PREROUTING {iptables_words(lf.key)} -j MARK "
                                            f"--set-mark {svc.fwmark}"))
    others = sum(len(p.lines) for p in t.passthrough.values())
    if others:
        notes.append((0, f"{others} line(s) of other rules are not ipvsadm's: use --to nft "
                         "(or keep them in iptables)"))
    text = listing.save(Table(services), numeric=True) if services else ""
    return text, notes, approx


def _ipvs_scheduler(lf: Lifted, svc):
    """The closest IPVS scheduler for a pseudo-scheduler, and what it changes."""
    table = sched.slots(svc, svc.sched).table
    unnated = sum(1 for d in table if d is sched.PASS)
    lost = f"; the {unnated}/{len(table)} of connections left un-NATed get a server under IPVS" \
        if unnated else ""
    dests = [d for d in svc.dests]
    if svc.scheduler == NTH:
        once = len(table) == len(dests) and not unnated
        if once:
            ds = tuple(replace(d, weight=1) for d in dests)
            return (replace(svc, scheduler="rr", dests=ds),
                    "iptables-nth -> rr (same sequence of servers; the round may start "
                    "elsewhere)", True)
        return (replace(svc, scheduler="wrr"),
                f"iptables-nth -> wrr with the same shares, in wrr's order{lost}", False)
    return (replace(svc, scheduler="wrr"),
            f"iptables-random -> wrr (IPVS has no random scheduler: same shares, "
            f"deterministic order){lost}", False)


def script_of(text: str, lines: int) -> str | None:
    """The nft translation of the first ``lines`` lines, if they translate."""
    try:
        t = run("".join(line + "\n" for line in text.splitlines()[:lines]))
    except ParseError:
        return None
    return "".join(line + "\n" for line in t.script_lines)
