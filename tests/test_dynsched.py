"""dynsched's fast prediction path agrees with the general one (which
test_dynsched_oracle proves against the real IPVS), for random services and
counts."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ipvs2nft import dynsched
from ipvs2nft.model import Dest, Forward, Service
from ipvs2nft.netaddr import address

servers = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 6), st.integers(0, 6), st.integers(0, 8),
                             st.integers(0, 8), st.booleans()), min_size=1, max_size=6)


@settings(max_examples=400, deadline=None)
@given(scheduler=st.sampled_from(sorted(dynsched._FAST)), rows=servers, udp=st.booleans())
def test_fast_prediction_is_the_general_one(scheduler, rows, udp):
    dests, loads = [], {}
    for i, (weight, active, inactive, upper, lower, overloaded) in enumerate(rows):
        lower = min(lower, upper)
        dest = Dest(address(f"10.0.0.{i + 1}"), 80, Forward.MASQ, weight, upper, lower)
        dests.append(dest)
        loads[dest.key] = dynsched.Load(active, inactive, 0, overloaded and upper > 0)
    svc = Service(protocol=17 if udp else 6, addr=address("192.0.2.1"), port=80, scheduler=scheduler,
                  dests=tuple(dests))
    fast = dynsched.predict(svc, loads, 12)
    general = dynsched.predict(svc, loads, 12, states=[])  # states: the general path
    assert fast == general
