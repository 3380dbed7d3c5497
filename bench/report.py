"""Medians, spreads, goals, and the RESULTS.md / stdout tables.

Every goal is a ratio of medians of series measured in the same rounds (or,
for the listings, a median against a fixed bound).  Beside it stands the
range of the per-round ratios (A and B of the same round were measured next
to each other), which shows how far the noise of this shared machine moved
the answer.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float]) -> tuple[float, float]:
    return (min(values), max(values)) if values else (float("nan"), float("nan"))


@dataclass
class Goal:
    """``value <= limit`` (a ratio, or seconds when ``unit`` is "s")."""

    item: int
    text: str
    value: float
    limit: float
    unit: str = "×"
    per_round: list[float] = field(default_factory=list)
    evidence: str = ""  # why it missed, when it did (profiles)

    @property
    def passed(self) -> bool:
        return self.value <= self.limit

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "MISS"

    def measured(self) -> str:
        lo, hi = spread(self.per_round)
        fmt = {"s": lambda v: f"{v:.3f} s", "n": lambda v: f"{v:g}"}.get(self.unit, lambda v: f"{v:.2f}×")
        return f"{fmt(self.value)} (rounds {fmt(lo)}–{fmt(hi)})" if self.per_round else fmt(self.value)

    def bound(self) -> str:
        return {"s": f"≤ {self.limit:g} s", "n": f"≤ {self.limit:g}"}.get(self.unit, f"≤ {self.limit:g}×")


def ratio_goal(item: int, text: str, num: list[float], den: list[float], limit: float) -> Goal:
    """median(num) / median(den), with the per-round ratios as its spread."""
    rounds = [a / b for a, b in zip(num, den, strict=True) if b]
    return Goal(item, text, median(num) / median(den), limit, per_round=rounds)


def bound_goal(item: int, text: str, values: list[float], limit: float) -> Goal:
    return Goal(item, text, median(values), limit, unit="s", per_round=values)


# ---------------------------------------------------------------- formatting

def fmt_series(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    """"median (min–max)" of values × scale."""
    lo, hi = spread(values)
    return f"{median(values) * scale:.{digits}f} ({lo * scale:.{digits}f}–{hi * scale:.{digits}f})"


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def goals_rows(goals: list[Goal]) -> list[list[str]]:
    return [[str(g.item), g.text, g.measured(), g.bound(), g.verdict] for g in goals]
