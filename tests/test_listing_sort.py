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


def test_services_sort_as_the_comparator_does_over_the_kernels_order():
    """The key sort leaves out the kernel's order (no two services share a
    key); the comparator's merge sort starts from it."""
    from ipvs2nft.model import Service

    rng = random.Random(5)
    vips = ["10.0.0.1", "10.0.0.2", "10.0.1.1", "192.168.0.40", "2001:db8::1", "2001:db8::2", "fe80::1"]
    far = ["1.1.1.1", "200.1.1.1"]  # more than 2^31 apart: the slow way
    for _ in range(1000):
        pool = vips + (far if rng.random() < 0.3 else [])
        services = {}
        for _ in range(rng.randint(0, 9)):
            if rng.random() < 0.2:
                svc = Service(af=rng.choice([2, 10]), fwmark=rng.choice([1, 2, 7, 0xFFFFFFF0]))
            else:
                addr = address(rng.choice(pool))
                svc = Service(af=2 if addr.version == 4 else 10, protocol=rng.choice([6, 17]), addr=addr,
                              port=rng.choice([80, 443, 8080]))
            services[svc.key] = svc
        items = list(services.values())
        expected = listing.msort(listing.kernel_order(items), listing.cmp_services)
        assert listing.sort_services(items) == expected
