"""The listings' sorts take short cuts; each must order as ipvsadm's
comparators (glibc's merge sort over libipvs's wrapping compares) do."""

from __future__ import annotations

import random

from ipvs2nft import listing
from ipvs2nft.model import Dest
from ipvs2nft.netaddr import address


def test_ipv4_real_servers_sort_as_the_comparator_does():
    rng = random.Random(4)
    near = [f"10.0.{i}.{j}" for i in range(3) for j in (1, 2, 200)]
    far = ["1.1.1.1", "200.1.1.1", "128.0.0.1", "127.255.255.255"]  # more than 2^31 apart: the slow way
    for _ in range(3000):
        pool = near + (far if rng.random() < 0.3 else [])
        dests = [Dest(address(rng.choice(pool)), rng.choice([0, 80, 81, 8080]))
                 for _ in range(rng.randint(0, 7))]
        assert listing.sort_dests(dests) == listing.msort(dests, listing.cmp_dests)
