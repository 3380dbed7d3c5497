"""The pseudo-schedulers of lifted iptables cascades, for ``ipvs2nft.sched``.

``iptables-nth``: one period of the exact sequence the cascade's nth
counters produce, replayed by ``numgen inc`` (slot i = connection i+1).
``iptables-random``: slots in proportion to the cascade's effective shares,
drawn by ``numgen random``.  A slot that is None is traffic the cascade left
un-NATed.

The slot table of a service is its ``Plan``, recorded by the translator
under the service's identity; the builder only turns dest keys back into
the service's Dest objects (which have their ids by then).  A service with
one of these schedulers but no plan (it did not come from this translator)
is scheduled from its weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from ipvs2nft import sched
from ipvs2nft.iptables.shares import interleave
from ipvs2nft.model import Service, ServiceKey

NTH = "iptables-nth"
RANDOM = "iptables-random"


@dataclass(frozen=True)
class Plan:
    """A lifted cascade's slot table: Dest.key per slot, None = not NATed."""

    random: bool
    table: tuple
    exact: bool = True
    note: str = ""


_PLANS: dict[ServiceKey, Plan] = {}


def set_plans(plans: dict[ServiceKey, Plan]) -> None:
    """The plans of one translation (replacing those of the previous one)."""
    _PLANS.clear()
    _PLANS.update(plans)


def plan_of(svc: Service) -> Plan | None:
    return _PLANS.get(svc.key)


def _from_weights(svc: Service, random: bool) -> sched.Slots:
    weights = {d: d.weight for d in svc.dests if d.weight > 0}
    if random:
        table = tuple(d for d, w in weights.items() for _ in range(w))
    else:
        table = tuple(interleave(weights))
    return sched.Slots(table, None, False, "no iptables cascade recorded; scheduled from the weights",
                       random)


def _build(svc: Service, random: bool) -> sched.Slots:
    plan = _PLANS.get(svc.key)
    by_key = {d.key: d for d in svc.dests}
    if plan is None or plan.random != random or \
            any(k is not None and k not in by_key for k in plan.table):
        return _from_weights(svc, random)
    table = tuple(by_key[k] if k is not None else sched.PASS for k in plan.table)
    return sched.Slots(table, None, plan.exact, plan.note, random)


def build_nth(svc: Service) -> sched.Slots:
    return _build(svc, False)


def build_random(svc: Service) -> sched.Slots:
    return _build(svc, True)


def register() -> None:
    sched.register(NTH, build_nth)
    sched.register(RANDOM, build_random)


register()
