"""iptables rules as the kernel sees them, and the tables that hold them.

A ``Rule`` keeps what xtables checks, in the order it checks it: first the
fixed IP header fields (``-s -d -p -i -o -f``, struct ipt_entry, tested by
ip_packet_match() before any extension), then the matches in the order they
were loaded on the command line, then the target.  That order matters for
``-m statistic --mode nth``: its counter ticks whenever the match is
*evaluated* (net/netfilter/xt_statistic.c), so ``-m statistic ... --dport
80`` counts every packet that got past the header fields, whatever its port.

A ``Ruleset`` is the state that a sequence of iptables commands and
iptables-restore blocks leaves behind: per (family, table), chains with
their policy and ordered rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BUILTIN_CHAINS: dict[str, tuple[str, ...]] = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
    "security": ("INPUT", "FORWARD", "OUTPUT"),
}

# Targets that change nothing a later NAT decision looks at.
HARMLESS = {"", "LOG", "NFLOG", "ULOG", "AUDIT"}


class ParseError(Exception):
    """Input iptables would refuse; ``line`` is the input line number."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.message = message


@dataclass(frozen=True)
class Opt:
    """One option with its values; ``neg`` for a preceding ``!``."""

    name: str
    values: tuple[str, ...] = ()
    neg: bool = False

    @property
    def value(self) -> str:
        return self.values[0] if self.values else ""


@dataclass(frozen=True)
class Match:
    """An extension match (``-m name`` or loaded implicitly by ``-p``)."""

    module: str
    opts: tuple[Opt, ...] = ()
    implicit: bool = False

    def get(self, name: str) -> Opt | None:
        for o in self.opts:
            if o.name == name:
                return o
        return None


@dataclass(frozen=True)
class Rule:
    """One rule of a chain; ``spec`` is its text as given (for translation)."""

    uid: int
    line: int
    family: int  # 4 or 6
    table: str
    chain: str
    spec: tuple[str, ...]
    header: tuple[Opt, ...] = ()
    matches: tuple[Match, ...] = ()
    target: str = ""
    target_opts: tuple[Opt, ...] = ()
    goto: bool = False
    counters: tuple[int, int] | None = None

    def head(self, name: str) -> Opt | None:
        for o in self.header:
            if o.name == name:
                return o
        return None

    def match(self, module: str) -> Match | None:
        for m in self.matches:
            if m.module == module:
                return m
        return None

    def topt(self, name: str) -> Opt | None:
        for o in self.target_opts:
            if o.name == name:
                return o
        return None

    def modules(self) -> list[str]:
        return [m.module for m in self.matches]


@dataclass
class Chain:
    name: str
    policy: str | None  # None: a user-defined chain
    rules: list[Rule] = field(default_factory=list)


@dataclass
class TableState:
    family: int
    name: str
    chains: dict[str, Chain] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """An empty table: its built-in chains, policy ACCEPT."""
        self.chains = {c: Chain(c, "ACCEPT") for c in BUILTIN_CHAINS.get(self.name, ())}


@dataclass
class Ruleset:
    """All tables of both families, in the order they were first named."""

    tables: dict[tuple[int, str], TableState] = field(default_factory=dict)

    def table(self, family: int, name: str) -> TableState:
        key = (family, name)
        if key not in self.tables:
            self.tables[key] = TableState(family, name)
        return self.tables[key]

    def chain(self, family: int, table: str, chain: str) -> Chain | None:
        t = self.tables.get((family, table))
        return t.chains.get(chain) if t else None

    def rules(self, family: int | None = None) -> list[Rule]:
        out = []
        for (fam, _), t in self.tables.items():
            if family is None or fam == family:
                for c in t.chains.values():
                    out.extend(c.rules)
        return out
