"""Cascades that jump to one chain per backend: kube-proxy's iptables mode.

kube-proxy writes a service as a chain (``KUBE-SVC-…``) that ends in a
statistic cascade, each step jumping to an endpoint chain (``KUBE-SEP-…``)
that ends in a DNAT::

    -A KUBE-SVC-X ! -s 10.244.0.0/16 -d 10.96.0.10/32 -p tcp ... -j KUBE-MARK-MASQ
    -A KUBE-SVC-X -m recent --rcheck --seconds 10800 --reap --name KUBE-SEP-A ... -j KUBE-SEP-A
    -A KUBE-SVC-X -m statistic --mode random --probability 0.5 -j KUBE-SEP-A
    -A KUBE-SVC-X -j KUBE-SEP-B
    -A KUBE-SEP-A -s 10.244.1.5/32 -j KUBE-MARK-MASQ
    -A KUBE-SEP-A -p tcp -m recent --set --name KUBE-SEP-A ... -m tcp -j DNAT --to-destination 10.244.1.5:80

The cascade (the picking rules) becomes one rule in the same chain, as on
the seed talk's slides: ``numgen random mod N vmap { 0 : jump KUBE-SEP-A, 1
: jump KUBE-SEP-B }`` (``numgen inc`` and one period for nth).  Everything
else is translated as it is, so every way into the chain (the cluster IP
from KUBE-SERVICES, a NodePort through KUBE-NODEPORTS and KUBE-EXT-…), the
masquerade marks and the endpoint chains keep working exactly.  The chain
is not an IPVS service: a NodePort answers on every local address and the
chain is shared by several ways in, which a dispatch on address and port
cannot say, and kube-proxy's marks (0x4000) would change a fwmark key.

Session affinity (``-m recent`` used as persistence: ``--rcheck --seconds
S`` before the cascade on list L, ``--set`` on L in the DNAT of the chain
the rule jumps to) becomes a lookup in, and an ``update`` of, one dynamic
timeout set per family keyed ``client-net . list`` -- the shape of the
persistence sets of the ipvsadm path (``persist4``/``persist6`` in
nft/build.py), one set whatever the number of services.  ``--reap`` only
frees memory; xt_recent's list limit (``ip_list_tot``, 100 entries) is not
reproduced.

Exact, so lifted only when it is:

* the picking rules are consecutive, match nothing but ``-m statistic``
  (and comments), and jump (or go) to endpoint chains;
* an endpoint chain never returns to the service chain: no RETURN, no
  ``-g``, and it ends in a DNAT whose only conditions are ``-p`` (the same
  for every endpoint of the cascade), a bare protocol match, a comment and
  ``-m recent --set`` -- so ``jump`` in a map and the first-match-wins
  cascade send the same packets to the same place;
* affinity: every list is filled only by its endpoint's DNAT and checked
  only by the rules just before the cascade, with one ``--seconds`` and the
  same ``--mask``; otherwise those rules stay as they are (untranslatable,
  a warning) and only the cascade is lifted.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from ipvs2nft.iptables import shares as sh
from ipvs2nft.iptables.lift import LiftResult, backend_of, statistic_step, terminal_picks
from ipvs2nft.iptables.passthrough import Rewrite
from ipvs2nft.iptables.rules import Chain, Rule, Ruleset, TableState
from ipvs2nft.nft.build import PERSIST_SIZE

AFFINITY_SET = "ipvs2nft_affinity"
_BARE = {"tcp", "udp", "udplite", "sctp", "dccp"}  # protocol matches given no option


@dataclass(frozen=True)
class Endpoint:
    """An endpoint chain and the DNAT that ends it."""

    chain: str
    dnat: Rule
    proto: str | None
    recent: tuple[str, str | None] | None  # (list name, --mask) of its --set

    def __str__(self) -> str:
        return f"{backend_of(self.dnat)} ({self.chain})"


@dataclass(frozen=True)
class Affinity:
    """One ``--rcheck`` rule before the cascade."""

    rule: Rule
    endpoint: Endpoint
    seconds: int


@dataclass
class JumpLift:
    """One service chain whose cascade became one map."""

    family: int
    chain: str
    rules: list[Rule]
    steps: list[sh.Step]
    table: list  # Endpoint (or None: falls through) per slot
    nth: bool
    affinity: list[Affinity] = field(default_factory=list)
    shares: dict = field(default_factory=dict)  # Endpoint (None: falls through) -> Fraction
    summary: str = ""


@dataclass
class JumpResult:
    lifted: list[JumpLift] = field(default_factory=list)
    consumed: set[int] = field(default_factory=set)
    rewrites: dict[int, Rewrite] = field(default_factory=dict)
    declarations: dict[int, list[str]] = field(default_factory=dict)  # family -> nft commands


# ---------------------------------------------------------------- endpoint chains

def _recent_opts(rule: Rule) -> dict[str, str] | None:
    m = rule.match("recent")
    if m is None or any(o.neg for o in m.opts):
        return None
    return {o.name: o.value for o in m.opts}


def endpoint(table: TableState, name: str) -> Endpoint | None:
    """The chain as an endpoint chain, or None (see the module doc)."""
    chain = table.chains.get(name)
    if chain is None or chain.policy is not None or not chain.rules:
        return None
    if any(r.target == "RETURN" or r.goto for r in chain.rules):
        return None
    last = chain.rules[-1]
    if last.target != "DNAT" or backend_of(last) is None:
        return None
    if any(o.name != "p" or o.neg for o in last.header):
        return None
    proto = last.head("p").value if last.head("p") else None
    recent = None
    for m in last.matches:
        if m.module == "comment" or (m.module in _BARE and m.module == proto and not m.opts):
            continue
        opts = _recent_opts(last) if m.module == "recent" else None
        if opts is None or "set" not in opts or set(opts) - {"set", "name", "mask", "rsource"}:
            return None
        recent = (opts.get("name", "DEFAULT"), opts.get("mask"))
    return Endpoint(name, last, proto, recent)


# ---------------------------------------------------------------- service chains

def _pick_step(rule: Rule, table: TableState) -> sh.Step | None:
    """A picking rule: only a statistic match (and comments), a jump to an
    endpoint chain."""
    if rule.header or any(m.module not in ("comment", "statistic") for m in rule.matches):
        return None
    ep = endpoint(table, rule.target)
    return None if ep is None else statistic_step(rule, ep)


def _cascade(chain: Chain, table: TableState, consumed: set[int]) -> tuple[int, list[sh.Step]] | None:
    """(index of the first picking rule, steps) of the chain's cascade."""
    for start, rule in enumerate(chain.rules):
        if rule.uid in consumed or _pick_step(rule, table) is None:
            continue
        steps = []
        for r in chain.rules[start:]:
            step = _pick_step(r, table) if r.uid not in consumed else None
            if step is None:
                break
            steps.append(step)
            if step.mode == "always":
                break  # a catch-all: nothing after it is ever reached
        if len(steps) >= 2:
            return start, steps
        return None
    return None


def _affinity(chain: Chain, start: int, steps: list[sh.Step], ruleset: Ruleset,
              family: int) -> tuple[list[Affinity], str]:
    """The ``--rcheck`` rules right before the cascade, or why not."""
    found: list[Affinity] = []
    endpoints = {s.dest.chain: s.dest for s in steps}
    for rule in reversed(chain.rules[:start]):
        opts = _recent_opts(rule) if rule.match("recent") else None
        if opts is None or "rcheck" not in opts:
            break
        if rule.header or any(m.module not in ("comment", "recent") for m in rule.matches):
            return [], f"line {rule.line}: -m recent with other matches"
        if set(opts) - {"rcheck", "seconds", "reap", "name", "mask", "rsource"} or "seconds" not in opts:
            return [], f"line {rule.line}: -m recent options other than --rcheck --seconds --reap --mask"
        ep = endpoints.get(rule.target)
        name = opts.get("name", "DEFAULT")
        if ep is None or ep.recent != (name, opts.get("mask")):
            return [], f"line {rule.line}: list {name} is not the one its endpoint chain sets"
        seconds = int(opts["seconds"]) if opts["seconds"].isdigit() else 0
        if seconds <= 0:
            return [], f"line {rule.line}: --seconds {opts['seconds']}"
        found.insert(0, Affinity(rule, ep, seconds))
    if not found:
        return [], ""
    mine = {a.rule.uid for a in found} | {a.endpoint.dnat.uid for a in found}
    names = {a.endpoint.recent[0] for a in found}
    if len(names) != len(found):
        return [], f"line {found[0].rule.line}: one list checked twice"
    for r in ruleset.rules(family):
        opts = _recent_opts(r) if r.match("recent") else None
        if r.match("recent") and r.uid not in mine and (opts is None or opts.get("name", "DEFAULT") in names):
            return [], f"line {r.line} also uses the list"
    return found, ""


# ---------------------------------------------------------------- nft text

def _ip(family: int) -> str:
    return "ip6" if family == 6 else "ip"


def _client(family: int, mask: str | None) -> str:
    """The client address under xt_recent's --mask."""
    ip = _ip(family)
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff" if family == 6 else "255.255.255.255"
    if mask is None or ipaddress.ip_address(mask) == ipaddress.ip_address(full):
        return f"{ip} saddr"
    return f"{ip} saddr & {ipaddress.ip_address(mask)}"


def _vmap(lift: JumpLift) -> str:
    """The cascade as one numgen verdict map: runs of slots per endpoint."""
    items, start = [], 0
    table = lift.table
    for i in range(1, len(table) + 1):
        if i == len(table) or table[i] != table[start]:
            if table[start] is not None:
                span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
                verb = "goto" if lift.rules[0].goto else "jump"
                items.append(f"{span} : {verb} {table[start].chain}")
            start = i
    gen = "inc" if lift.nth else "random"
    return f"numgen {gen} mod {len(table)} vmap {{ {', '.join(items)} }}"


def _rewrites(lift: JumpLift, ids: dict[str, int], out: JumpResult) -> None:
    out.rewrites[lift.rules[0].uid] = Rewrite((_vmap(lift),), extras=False)
    out.consumed.update(r.uid for r in lift.rules[1:])
    for a in lift.affinity:
        name, mask = a.endpoint.recent
        key = _client(lift.family, mask)
        verb = "goto" if a.rule.goto else "jump"
        out.rewrites[a.rule.uid] = Rewrite(
            (f"{key} . meta mark & 0x0 | {ids[name]:#010x} @{AFFINITY_SET} counter {verb} {a.rule.target}",))
        dnat = a.endpoint.dnat
        proto = f"meta l4proto {a.endpoint.proto} " if a.endpoint.proto else ""
        out.rewrites[dnat.uid] = Rewrite(
            (f"{proto}update @{AFFINITY_SET} {{ {key} . {ids[name]:#010x} timeout {a.seconds}s }} counter "
             f"dnat to {backend_of(dnat)}",))


def _declaration(family: int) -> str:
    addr = "ipv6_addr" if family == 6 else "ipv4_addr"
    return (f"add set {_ip(family)} nat {AFFINITY_SET} {{ type {addr} . mark; flags dynamic,timeout; "
            f"size {PERSIST_SIZE}; }}")


# ---------------------------------------------------------------- entry point

def lift(ruleset: Ruleset, done: LiftResult) -> JumpResult:
    """Every jump cascade of the nat tables; notes and findings go to ``done``."""
    out = JumpResult()
    for family in (4, 6):
        table = ruleset.tables.get((family, "nat"))
        if table is None:
            continue
        ids: dict[str, int] = {}
        for chain in table.chains.values():
            found = _cascade(chain, table, done.consumed)
            if found is not None:
                _lift_chain(family, chain, *found, ruleset, ids, done, out)
        if ids:
            out.declarations[family] = [_declaration(family)]
    return out


def _lift_chain(family: int, chain: Chain, start: int, steps: list[sh.Step], ruleset: Ruleset,
                ids: dict[str, int], done: LiftResult, out: JumpResult) -> None:
    rules = chain.rules[start:start + len(steps)]
    label = f"chain {chain.name}"
    protos = {s.dest.proto for s in steps}
    if len(protos) > 1:
        done.notes.append((rules[0].line, f"{label} not lifted (its endpoints' DNATs differ in -p)"))
        return
    if len({s.mode for s in steps} - {"always"}) > 1:
        done.notes.append((rules[0].line, f"{label} not lifted (nth and random mixed)"))
        return
    picks = terminal_picks(steps, label, rules[0].line, done)
    if picks is None:
        return
    affinity, why = _affinity(chain, start, steps, ruleset, family)
    if why:
        done.notes.append((rules[0].line, f"{label}: session affinity not lifted ({why})"))
    for a in affinity:
        ids.setdefault(a.endpoint.recent[0], len(ids) + 1)
    shares = {**picks.by_dest, None: picks.analysis.leftover}
    lifted = JumpLift(family, chain.name, rules, steps, picks.table, picks.nth, affinity,
                      {d: x for d, x in shares.items() if x > 0})
    text = ", ".join(f"{d if d is not None else 'falls through'} {sh.pct(x)}"
                     for d, x in lifted.shares.items())
    lines = ", ".join(str(r.line) for r in rules)
    lifted.summary = (f"{label} (lines {lines}) lifted into one {'nth' if picks.nth else 'random'} map: "
                      f"{text}" + (f"; session affinity {affinity[0].seconds} s" if affinity else ""))
    if not picks.exact:
        done.approximated += 1
        done.findings.append((rules[0].line, f"{label}: {picks.note}"))
    done.findings.extend(picks.analysis.findings)
    done.notes.append((rules[0].line, lifted.summary))
    _rewrites(lifted, ids, out)
    out.lifted.append(lifted)
