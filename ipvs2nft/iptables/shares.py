"""What a cascade of ``-m statistic`` rules really does, and what it was meant to do.

Kernel facts this module is built on (net/netfilter/xt_statistic.c and
iptables' extensions/libxt_statistic.c):

* ``--mode nth --every E --packet P``: the match has its own counter, set to
  ``E-1-P`` when the rule is loaded.  Each *evaluation* moves it one step
  (``E-1`` wraps to 0) and the rule matches when it lands on 0, so of the
  packets that reach the match it takes the (P+1)-th, then every E-th.  Two
  rules never share a counter, and a rule only counts what earlier rules let
  through: ``--every 2 --packet 0`` then ``--every 2 --packet 1`` is not
  round robin, the second rule matches 1 in 4 and 1 in 4 stays un-NATed.
* ``--mode random --probability p`` matches when ``prandom & 0x7fffffff <
  lround(p * 2^31)``: p is the share *of what reaches the rule*.
* ``!`` inverts either test.

Two kinds of cascade: terminal (``-j DNAT`` in nat: the first rule that
matches wins) and overriding (``-j MARK`` in mangle: every rule runs, the
last one that matches decides the mark).  Shares are exact fractions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction

ONE = 1 << 31  # probability unit of xt_statistic: p is stored as lround(p * 2^31)
NTH_LIMIT = 1 << 16  # longest nth period simulated


@dataclass(frozen=True)
class Step:
    """One rule of a cascade: its statistic test and where it sends a match."""

    line: int
    dest: Hashable | None
    mode: str = "always"  # "nth", "random" or "always" (no statistic match)
    every: int = 1
    packet: int = 0
    prob: int = ONE  # random: lround(p * 2^31)
    invert: bool = False

    @property
    def chance(self) -> Fraction:
        """Probability that the test passes for a packet that reaches it."""
        if self.mode == "random":
            c = Fraction(min(self.prob, ONE), ONE)
        elif self.mode == "nth":
            c = Fraction(1, self.every)
        else:
            return Fraction(1)
        return 1 - c if self.invert else c

    def written(self) -> str:
        """The statistic options as a user would write them."""
        bang = "! " if self.invert else ""
        if self.mode == "random":
            return f"{bang}--probability {_prob_text(self.prob)}"
        if self.mode == "nth":
            return f"{bang}--every {self.every} --packet {self.packet}"
        return "no statistic match"


def probability_units(text: str) -> int:
    """``--probability`` as the kernel stores it (lround(p * 2^31), 0 <= p <= 1)."""
    p = float(text)
    if not 0.0 <= p <= 1.0:
        raise ValueError(text)
    return math.floor(p * ONE + 0.5)


def _prob_text(units: int) -> str:
    text = f"{units / ONE:.11f}".rstrip("0").rstrip(".")
    return text or "0"


def pct(x: Fraction | float) -> str:
    """25%, 33.33%, 12.5%."""
    return f"{float(x) * 100:.2f}".rstrip("0").rstrip(".") + "%"


# ---------------------------------------------------------------- effective

def nth_period(steps: Sequence[Step], limit: int = NTH_LIMIT) -> list | None:
    """One period of a terminal nth cascade: the dest (None: no rule) of the
    1st, 2nd ... new connection.  None if the period exceeds ``limit``.

    Each rule's counter only moves when a packet reaches it; the joint state
    is a permutation of a finite set (each step can be undone), so the
    sequence is periodic from the first connection.
    """
    every = [s.every if s.mode == "nth" else 1 for s in steps]
    start = tuple(e - 1 - s.packet if s.mode == "nth" else 0 for s, e in zip(steps, every, strict=True))
    state = list(start)
    out: list = []
    while True:
        pick = None
        for i, s in enumerate(steps):
            if s.mode == "always":
                pick = s
                break
            if s.mode != "nth":
                raise ValueError("nth_period: random step in an nth cascade")
            state[i] = 0 if state[i] == every[i] - 1 else state[i] + 1
            if (state[i] == 0) != s.invert:
                pick = s
                break
        out.append(pick)
        if tuple(state) == start:
            return out
        if len(out) >= limit:
            return None


def terminal_shares(steps: Sequence[Step]) -> list[Fraction]:
    """Share of all new connections each rule takes when the first match wins."""
    left, out = Fraction(1), []
    for s in steps:
        out.append(left * s.chance)
        left -= out[-1]
    return out


def override_shares(steps: Sequence[Step]) -> list[Fraction]:
    """Share each rule decides when every rule runs and the last match wins."""
    out = []
    for i, s in enumerate(steps):
        share = s.chance
        for later in steps[i + 1:]:
            share *= 1 - later.chance
        out.append(share)
    return out


def period_shares(steps: Sequence[Step], period: list) -> list[Fraction]:
    n = len(period)
    return [Fraction(sum(1 for p in period if p is s), n) for s in steps]


# ---------------------------------------------------------------- intent

def intended_shares(steps: Sequence[Step], override: bool) -> tuple[list[Fraction], str]:
    """The shares the author most likely meant, and how that was read.

    Tried in order: each figure is the backend's share of the whole
    (``--every 2`` = half of all; the figures add up to 1); the cascade
    right but for its end (the last DNAT rule, or the first MARK rule, was
    meant to take the rest: ``--every 5, 4, 3, 2, 2``); the opposite
    cascade semantics (DNAT rules written as if the last match won, as on
    slide 22, or MARK rules as if the first did); else the figures scaled
    to add up to 1.
    """
    chances = [s.chance for s in steps]
    fixed = [c for s, c in zip(steps, chances, strict=True) if s.mode != "always"]
    rest = 1 - sum(fixed)
    absolute = [c if s.mode != "always" else Fraction(0) for s, c in zip(steps, chances, strict=True)]
    catch_all = [i for i, s in enumerate(steps) if s.mode == "always"]
    if catch_all and rest > 0:
        absolute[catch_all[0]] = rest
    if abs(sum(absolute) - 1) <= Fraction(1, 200) and all(a > 0 for a in absolute):
        return _normalised(absolute), "each figure read as a share of all connections"
    end = 0 if override else len(steps) - 1
    closed = [replace(s, mode="always", invert=False) if i == end else s
              for i, s in enumerate(steps)]
    closed_shares = override_shares(closed) if override else terminal_shares(closed)
    if all(c > 0 for c in closed_shares):
        return closed_shares, ("the first MARK rule read as meant for every connection" if override
                               else "the last rule read as meant to take the rest")
    mirrored = terminal_shares(steps) if override else override_shares(steps)
    if sum(mirrored) == 1 and all(m > 0 for m in mirrored):
        how = ("MARK rules read as if the first match won" if override
               else "DNAT rules read as if the last match won, like MARK rules")
        return mirrored, how
    total = sum(chances)
    if total == 0:
        return [Fraction(1, len(steps))] * len(steps), "equal shares"
    return [c / total for c in chances], "the figures scaled to add up to 100%"


def _normalised(values: list[Fraction]) -> list[Fraction]:
    total = sum(values)
    return [v / total for v in values]


def by_dest(steps: Sequence[Step], shares: Sequence[Fraction]) -> dict:
    out: dict = {}
    for s, x in zip(steps, shares, strict=True):
        if x:
            out[s.dest] = out.get(s.dest, Fraction(0)) + x
    return out


def small_weights(shares: dict, limit: int = 100) -> dict:
    """Integer weights (sum <= limit where possible) for shares that add up to 1."""
    keys = [k for k, v in shares.items() if v > 0]
    for total in range(1, limit + 1):
        w = {k: shares[k] * total for k in keys}
        if all(v.denominator == 1 and v > 0 for v in w.values()):
            return {k: int(v) for k, v in w.items()}
    return apportion(shares, limit)


def apportion(shares: dict, total: int) -> dict:
    """Largest-remainder rounding of shares to ``total`` slots (>= 1 each when possible)."""
    keys = [k for k, v in shares.items() if v > 0]
    s = sum(shares[k] for k in keys) or Fraction(1)
    exact = {k: shares[k] / s * total for k in keys}
    out = {k: int(exact[k]) for k in keys}
    for k in sorted(keys, key=lambda k: exact[k] - out[k], reverse=True)[:total - sum(out.values())]:
        out[k] += 1
    return out


def interleave(weights: dict) -> list:
    """A smooth sequence with ``weights[k]`` turns of each k (like IPVS wrr, nginx smooth)."""
    current = {k: 0 for k in weights}
    total = sum(weights.values())
    out = []
    for _ in range(total):
        for k in weights:
            current[k] += weights[k]
        best = max(weights, key=lambda k: current[k])
        current[best] -= total
        out.append(best)
    return out


def conditional_probabilities(shares: Sequence[Fraction], override: bool) -> list[Fraction | None]:
    """The --probability of each rule that gives ``shares`` (None: no statistic)."""
    n = len(shares)
    out: list[Fraction | None] = [None] * n
    if override:  # last match wins: the last rule keeps its share, earlier ones scale up
        later = Fraction(0)
        for i in range(n - 1, -1, -1):
            out[i] = None if i == 0 else shares[i] / (1 - later) if later < 1 else Fraction(0)
            later += shares[i]
    else:
        taken = Fraction(0)
        for i in range(n):
            out[i] = None if i == n - 1 else shares[i] / (1 - taken) if taken < 1 else Fraction(0)
            taken += shares[i]
    return out


# ---------------------------------------------------------------- findings

@dataclass(frozen=True)
class Analysis:
    """The cascade as it behaves, and what looks wrong with it."""

    shares: list[Fraction]  # per step, of all new connections
    leftover: Fraction  # not matched by any step
    findings: list[tuple[int, str]]  # (line, text)
    intended: list[Fraction] | None = None  # per step, when it looks like a mistake
    how: str = ""

    @property
    def mistaken(self) -> bool:
        return self.intended is not None


def analyse(steps: Sequence[Step], shares: Sequence[Fraction], label: str, override: bool,
            name: Callable[[Hashable], str] = str) -> Analysis:
    """Findings for a cascade whose effective shares are ``shares``."""
    shares = list(shares)
    leftover = 1 - sum(shares)
    findings: list[tuple[int, str]] = []
    dead = [i for i, x in enumerate(shares) if x == 0]
    for i in dead:
        findings.append((steps[i].line, "never matches: " + _why_dead(steps, i, override)))
    mistaken = bool(dead) or leftover > 0
    if not mistaken:
        return Analysis(shares, leftover, findings)
    intended, how = intended_shares(steps, override)
    for i, s in enumerate(steps):
        if i in dead or shares[i] == intended[i]:
            continue
        reason = (f"later MARK rules (line {', '.join(str(t.line) for t in steps[i + 1:])}) "
                  "overwrite its mark" if override and i + 1 < len(steps) else
                  f"it only sees what line {', '.join(str(t.line) for t in steps[:i])} "
                  "let through" if i else "")
        text = (f"sends {pct(shares[i])} of new connections to {name(s.dest)}, "
                f"probably meant {pct(intended[i])} ({s.written()})")
        findings.append((s.line, text + (f": {reason}" if reason else "")))
    if leftover > 0:
        lines = f"line {steps[0].line}" if len(steps) == 1 else \
            f"lines {steps[0].line}-{steps[-1].line}"
        what = ("get no mark from" if override else "match none of")
        findings.append((steps[-1].line, f"{pct(leftover)} of new connections to {label} {what} "
                                         f"{lines} and are not NATed (they reach the director "
                                         f"itself)"))
    return Analysis(shares, leftover, findings, intended, how)


def _why_dead(steps: Sequence[Step], i: int, override: bool) -> str:
    if override:
        for later in steps[i + 1:]:
            if later.chance == 1:
                return f"line {later.line} after it always overwrites the mark"
        return "its test never passes"
    for earlier in steps[:i]:
        if earlier.chance == 1:
            return f"line {earlier.line} before it takes every connection"
    if steps[i].chance == 0:
        return "its test never passes"
    return f"no connection gets past line {', '.join(str(s.line) for s in steps[:i])} " \
           "at the moment its counter fires"
