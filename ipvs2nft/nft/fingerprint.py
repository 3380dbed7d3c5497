"""A fingerprint of our tables: cheap to take, and changed by any hand on them.

ipvsadm records the kernel's ruleset generation id after each commit of
its own; when the id has moved since, someone committed *something* --
Docker, firewalld, kube-proxy, an nftables reload, or an edit of ours.
Verifying our tables against the store (NftBackend.verify, a scratch
namespace) takes seconds at 10,000 services, so first this, read over
netlink in a few milliseconds:

* each of our tables: its handle (a table deleted and made again has a new
  one) and its use count (chains, sets, objects);
* each set and map: its handle and element count (NFTA_SET_COUNT), the
  sets the data path and the daemon fill at run time left out;
* every chain: name, handle and use count -- its rules plus the rules and
  verdict-map elements that jump to it -- folded into one checksum.

A rule added, a chain flushed or deleted, an element added or deleted, a
table flushed or made again changes it; a change to anyone else's table
does not.  It cannot see an element's value replaced under the same key or
a rule replaced in place: the daemon's monitor sees those (it watches every
transaction that touches our tables).  A kernel that does not report set
sizes (Debian 12's 6.1) gets no fingerprint, and every moved id means a
verification, as before.

After a change of its own, ipvsadm brings the fingerprint up to date from
the chains the change touched (``changed``) instead of reading them all.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

from ipvs2nft.nft import scratch

OURS = (("inet", "ipvs2nft"), ("ip", "ipvs2nft"), ("ip6", "ipvs2nft"))
# Chains that the rules of every service jump to (build.py, direct.py): a
# change that adds or removes such a rule changes their use count.
JUMPED_TO = tuple(("inet", "ipvs2nft", name) for name in ("pick4", "pick6", "dyn4", "dyn6", "unreachable")) \
    + tuple((family, "ipvs2nft", name) for family in ("ip", "ip6") for name in ("pick", "dyn", "unreachable"))
MANY = 256  # more touched chains than this: read them all instead
_MASK = (1 << 64) - 1

Chain = tuple[str, str, str]  # (family, table, name)


def _folded(name: str, handle: int, use: int) -> int:
    return zlib.crc32(f"{name}:{handle}:{use}".encode())


def take(nfnl) -> dict | None:
    """The fingerprint of our tables as the kernel holds them now, or None
    if the kernel does not report set sizes."""
    out = {}
    for family, name in OURS:
        info = nfnl.table_info(family, name)
        if info is None:
            out[f"{family} {name}"] = None
            continue
        sets = _sets(nfnl, family, name)
        if sets is None:
            return None
        checksum = count = 0
        for chain, handle, use in nfnl.chains(family, name):
            checksum = (checksum + _folded(chain, handle, use)) & _MASK
            count += 1
        out[f"{family} {name}"] = [info[0], info[1], sets, checksum, count]
    return out


def _sets(nfnl, family: str, table: str) -> list | None:
    found = []
    for name, handle, count in nfnl.sets(family, table):
        if name in scratch.RUNTIME:
            continue
        if count is None:
            return None
        found.append([name, handle, count])
    return sorted(found)


def chains(nfnl, names: Iterable[Chain]) -> dict[Chain, tuple[int, int] | None]:
    """(handle, use) of each of these chains (None: it does not exist)."""
    return {c: nfnl.chain(*c) for c in names}


def changed(nfnl, recorded: dict | None, before: dict[Chain, tuple[int, int] | None],
            after: dict[Chain, tuple[int, int] | None]) -> dict | None:
    """``recorded`` (the fingerprint before a change) brought up to date
    for a change that touched only the chains of ``before``/``after`` (their
    states on either side of it): tables and sets are read again, the chain
    checksums adjusted.  None when it cannot be (no fingerprint before)."""
    if recorded is None:
        return None
    out = {}
    for family, name in OURS:
        where = f"{family} {name}"
        old = recorded.get(where)
        info = nfnl.table_info(family, name)
        if old is None or info is None:
            return take(nfnl)  # a table came or went: read everything
        sets = _sets(nfnl, family, name)
        if sets is None:
            return None
        checksum, count = old[3], old[4]
        for chain in before:
            if chain[:2] != (family, name):
                continue
            was, now = before[chain], after.get(chain)
            if was is not None:
                checksum, count = (checksum - _folded(chain[2], *was)) & _MASK, count - 1
            if now is not None:
                checksum, count = (checksum + _folded(chain[2], *now)) & _MASK, count + 1
        out[where] = [info[0], info[1], sets, checksum, count]
    return out
