"""Effective shares of statistic cascades (no root, no kernel)."""

from __future__ import annotations

from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from ipvs2nft.iptables import shares as sh
from ipvs2nft.iptables.shares import Step


def nth(line, dest, every, packet=0, invert=False):
    return Step(line, dest, "nth", every, packet, invert=invert)


def rnd(line, dest, p, invert=False):
    return Step(line, dest, "random", prob=sh.probability_units(str(p)), invert=invert)


def dests(period):
    return [s.dest if s is not None else None for s in period]


# ---------------------------------------------------------------- the kernel, literally

class XtStatisticNth:
    """net/netfilter/xt_statistic.c + libxt_statistic.c, transcribed:
    userspace stores every-1 and count = (every-1) - packet; each evaluation
    does nval = (oval == every) ? 0 : oval + 1 and matches on nval == 0."""

    def __init__(self, every: int, packet: int, invert: bool) -> None:
        self.every = every - 1
        self.count = self.every - packet
        self.invert = invert

    def match(self) -> bool:
        oval = self.count
        nval = 0 if oval == self.every else oval + 1
        self.count = nval
        return (nval == 0) != self.invert


def kernel_sequence(steps, n):
    """First-match-wins traversal of a nat chain, connection by connection."""
    matches = [XtStatisticNth(s.every, s.packet, s.invert) if s.mode == "nth" else None
               for s in steps]
    out = []
    for _ in range(n):
        pick = None
        for s, m in zip(steps, matches, strict=True):
            if m is None or m.match():
                pick = s.dest
                break
        out.append(pick)
    return out


@st.composite
def nth_cascades(draw):
    n = draw(st.integers(1, 5))
    steps = []
    for i in range(n):
        every = draw(st.integers(1, 6))
        steps.append(nth(i + 1, f"b{i}", every, draw(st.integers(0, every - 1)), draw(st.booleans())))
    if draw(st.booleans()):
        steps.append(Step(n + 1, "last"))
    return steps


@settings(max_examples=300, deadline=None)
@given(nth_cascades())
def test_nth_period_is_what_the_kernel_does(steps):
    period = sh.nth_period(steps)
    got = dests(period)
    assert got == kernel_sequence(steps, len(got))
    # and it repeats: the next period is the same
    assert kernel_sequence(steps, 2 * len(got))[len(got):] == got


# ---------------------------------------------------------------- nth

def test_slide19_is_not_round_robin():
    steps = [nth(1, "a", 2, 0), nth(2, "b", 2, 1)]
    period = sh.nth_period(steps)
    assert dests(period) == ["a", None, "a", "b"]
    assert sh.period_shares(steps, period) == [Fraction(1, 2), Fraction(1, 4)]


def test_decreasing_every_is_round_robin():
    steps = [nth(1, "a", 3), nth(2, "b", 2), Step(3, "c")]
    assert dests(sh.nth_period(steps)) == ["a", "b", "c"]


def test_every_four_packets_zero_to_three():
    steps = [nth(i + 1, f"b{i}", 4, i) for i in range(4)]
    period = sh.nth_period(steps)
    assert len(period) == 256
    assert sh.period_shares(steps, period) == [Fraction(1, 4), Fraction(3, 16), Fraction(9, 64),
                                               Fraction(27, 256)]


def test_last_rule_with_every_two_leaks_half_of_its_share():
    steps = [nth(1, "a", 5), nth(2, "b", 4), nth(3, "c", 3), nth(4, "d", 2), nth(5, "e", 2, 1)]
    assert dests(sh.nth_period(steps)) == ["a", "b", "c", "d", None, "a", "b", "c", "d", "e"]


def test_period_limit():
    steps = [nth(i + 1, f"b{i}", e, 1) for i, e in enumerate((997, 991, 983))]
    assert sh.nth_period(steps, limit=1000) is None


# ---------------------------------------------------------------- random

def test_probability_units_is_lround():
    assert sh.probability_units("0.33") == 708669604  # peers.md: 0.33 -> 708669604
    assert sh.probability_units("1") == 1 << 31
    assert sh.probability_units("0") == 0


def test_slide22_first_rule_takes_everything():
    steps = [rnd(1, "a", 1), rnd(2, "b", 0.33)]
    assert sh.terminal_shares(steps) == [1, 0]


def test_slide28_mark_rules_override():
    steps = [rnd(1, "a", 1), rnd(2, "b", 0.33)]
    shares = sh.override_shares(steps)
    assert shares[1] == Fraction(708669604, 1 << 31)
    assert sum(shares) == 1


def test_conditional_cascade_is_equal():
    steps = [rnd(1, "a", "0.33333333349"), rnd(2, "b", 0.5), Step(3, "c")]
    shares = sh.terminal_shares(steps)
    assert all(abs(x - Fraction(1, 3)) < Fraction(1, 10**9) for x in shares)


def test_invert():
    assert rnd(1, "a", 0.25, invert=True).chance == Fraction(3, 4)
    assert nth(1, "a", 4, invert=True).chance == Fraction(3, 4)


# ---------------------------------------------------------------- findings and intent

def test_findings_for_slide19():
    steps = [nth(2, "a", 2, 0), nth(3, "b", 2, 1)]
    a = sh.analyse(steps, sh.period_shares(steps, sh.nth_period(steps)), "TCP 192.168.0.40:80",
                   override=False)
    assert a.findings == [
        (3, "sends 25% of new connections to b, probably meant 50% (--every 2 --packet 1): "
            "it only sees what line 2 let through"),
        (3, "25% of new connections to TCP 192.168.0.40:80 match none of lines 2-3 and are not "
            "NATed (they reach the director itself)"),
    ]
    assert a.intended == [Fraction(1, 2), Fraction(1, 2)]


def test_findings_for_slide22():
    steps = [rnd(2, "a", 1), rnd(4, "b", 0.33)]
    a = sh.analyse(steps, sh.terminal_shares(steps), "TCP x", override=False)
    assert (4, "never matches: line 2 before it takes every connection") in a.findings
    assert a.how == "DNAT rules read as if the last match won, like MARK rules"
    assert [round(float(x), 2) for x in a.intended] == [0.67, 0.33]


def test_no_findings_for_a_correct_cascade():
    steps = [nth(1, "a", 3), nth(2, "b", 2), Step(3, "c")]
    a = sh.analyse(steps, sh.period_shares(steps, sh.nth_period(steps)), "x", override=False)
    assert a.findings == [] and not a.mistaken


def test_intent_when_only_the_end_is_wrong():
    steps = [nth(1, "a", 5), nth(2, "b", 4), nth(3, "c", 3), nth(4, "d", 2), nth(5, "e", 2, 1)]
    intended, how = sh.intended_shares(steps, override=False)
    assert intended == [Fraction(1, 5)] * 5
    assert how == "the last rule read as meant to take the rest"


def test_intent_absolute_figures():
    steps = [rnd(i, f"b{i}", 0.25) for i in range(4)]
    intended, how = sh.intended_shares(steps, override=False)
    assert intended == [Fraction(1, 4)] * 4 and how.startswith("each figure")


def test_mark_cascade_without_a_catch_all_leaves_traffic_unmarked():
    steps = [rnd(1, "a", 0.5), rnd(2, "b", 0.5)]
    a = sh.analyse(steps, sh.override_shares(steps), "TCP x", override=True)
    assert a.leftover == Fraction(1, 4)
    assert a.findings[-1] == (2, "25% of new connections to TCP x get no mark from lines 1-2 and "
                                 "are not NATed (they reach the director itself)")


def test_conditional_probabilities():
    third = [Fraction(1, 3)] * 3
    assert sh.conditional_probabilities(third, override=False) == [Fraction(1, 3), Fraction(1, 2), None]
    assert sh.conditional_probabilities(third, override=True) == [None, Fraction(1, 2), Fraction(1, 3)]


def test_apportion_interleave_small_weights():
    assert sh.apportion({"a": Fraction(2, 3), "b": Fraction(1, 3)}, 100) == {"a": 67, "b": 33}
    assert sh.interleave({"a": 2, "b": 1}) == ["a", "b", "a"]
    assert sh.small_weights({"a": Fraction(1, 2), "b": Fraction(1, 4), "c": Fraction(1, 4)}) == \
        {"a": 2, "b": 1, "c": 1}


def test_pct():
    assert [sh.pct(x) for x in (Fraction(1, 4), Fraction(1, 3), Fraction(1, 8), 1)] == \
        ["25%", "33.33%", "12.5%", "100%"]
