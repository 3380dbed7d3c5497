"""What conntrackd cannot carry: the memory kept in nft sets.

conntrackd replicates conntrack entries (tuples, NAT bindings, marks, TCP
state); it knows nothing of nft set contents (daemon.md section 8).  Two
kinds of ipvs2nft state live there, and an IPVS backup has both in its
table, because IPVS's sync daemon sends connection entries *and*
persistence templates:

* persistence, ``-p``: ``persist4``/``persist6`` of ``inet ipvs2nft`` and
  ``persist`` of ``ip``/``ip6 ipvs2nft`` (client network . real server);
* direct routing and tunnelling, which leave no conntrack state at all:
  ``flows`` of ``ip``/``ip6 ipvs2nft`` (client address . client port . real
  server).

A master's sync daemon reads those sets (nfnetlink dumps, every
``SEND_EVERY`` seconds) and sends what is new or was refreshed by traffic
since it last sent it, and everything again every ``RESEND_EVERY`` seconds
(so a backup started later, or one that lost a datagram, catches up, as
IPVS resends a connection every 50 packets).  A backup adds what it
receives to its own sets with the time the master's element had left.

Every key ends with the real server's rid (a ``mark`` field, host byte
order), which is this store's number and need not be the peer's: on the
wire the rid is replaced by the real server's identity (its service and
address), and the backup puts its own rid for that identity back.  An
element for a real server the backup does not have is dropped.

The datagrams are JSON, at most ``--sync-maxlen`` bytes, to the master's
group on the port after conntrackd's (``--mcast-port`` + 1); they carry
``--syncid``, and a backup keeps those with its own syncid or any when it
has 0, as IPVS's backup does.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable

from ipvs2nft.model import Table
from ipvs2nft.netlink import NetlinkError
from ipvs2nft.nft.nfnetlink import Batch, Nfnetlink

# (family, table, set) of every set replicated; a message names them by index
SETS = (("inet", "ipvs2nft", "persist4"), ("inet", "ipvs2nft", "persist6"),
        ("ip", "ipvs2nft", "persist"), ("ip6", "ipvs2nft", "persist"),
        ("ip", "ipvs2nft", "flows"), ("ip6", "ipvs2nft", "flows"))
SEND_EVERY = 0.2  # seconds between looks at the sets
RESEND_EVERY = 10.0  # seconds between full sends
VERSION = 1
MIN_TIMEOUT_MS = 500  # an element about to expire is not worth sending


def identities(table: Table) -> dict[int, str]:
    """rid -> the real server's identity, the same on every director that
    has the same service and server."""
    return {d.rid: f"{s.key}|{d.key}" for s in table.services for d in s.dests if d.rid}


def _rid(key: bytes) -> int:
    return int.from_bytes(key[-4:], sys.byteorder)


def _slack(timeout_ms: int | None) -> float:
    """How much later the master's element may expire than the backup's
    copy before it is sent again: a tenth of its timeout, 1 to 30 s."""
    return max(1.0, min((timeout_ms or 0) / 10000, 30.0))


class Sender:
    """A master's side: what changed in the sets, as datagrams."""

    def __init__(self, syncid: int, maxlen: int) -> None:
        self.syncid = syncid
        self.maxlen = max(maxlen, 512)
        self.sent: dict[tuple[int, bytes], float] = {}  # -> when the backup's copy expires
        self.last_full = 0.0

    def collect(self, nfnl: Nfnetlink, table: Table, now: float | None = None) -> list[bytes]:
        now = time.monotonic() if now is None else now
        full = now - self.last_full >= RESEND_EVERY
        if full:
            self.last_full = now
        ids = identities(table)
        out: list[tuple[int, str, str, int]] = []
        for index, (family, name, set_name) in enumerate(SETS):
            try:
                elements = nfnl.set_elements(family, name, set_name)
            except (NetlinkError, OSError):
                continue  # the table or set is not there (yet)
            for e in elements:
                ident = ids.get(_rid(e.key))
                left = e.expiration or 0
                if ident is None or left < MIN_TIMEOUT_MS:
                    continue
                expires = now + left / 1000
                known = self.sent.get((index, e.key))
                if not full and known is not None and expires - known < _slack(e.timeout):
                    continue
                self.sent[(index, e.key)] = expires
                out.append((index, e.key[:-4].hex(), ident, left))
        self.sent = {k: v for k, v in self.sent.items() if v > now}
        return list(self.datagrams(out))

    def datagrams(self, elements: list[tuple[int, str, str, int]]) -> Iterable[bytes]:
        """``elements`` cut into messages of at most ``maxlen`` bytes."""
        start = 0
        while start < len(elements):
            count = len(elements) - start
            while True:
                data = encode(self.syncid, elements[start:start + count])
                if len(data) <= self.maxlen or count == 1:
                    break
                count = max(1, count * self.maxlen // len(data) - 1)
            yield data
            start += count


def encode(syncid: int, elements: list[tuple[int, str, str, int]]) -> bytes:
    names: dict[str, int] = {}
    rows = [[i, prefix, names.setdefault(ident, len(names)), left] for i, prefix, ident, left in elements]
    return json.dumps({"v": VERSION, "id": syncid, "ids": list(names), "e": rows},
                      separators=(",", ":")).encode()


class Receiver:
    """A backup's side: datagrams into its own sets."""

    def __init__(self, accept_id: int) -> None:
        self.accept_id = accept_id
        self.present: dict[tuple[int, bytes], float] = {}  # what was added, until when
        self.added = 0

    def apply(self, nfnl: Nfnetlink, table: Table, data: bytes, now: float | None = None) -> int:
        """Add a datagram's elements; returns how many were added."""
        now = time.monotonic() if now is None else now
        wanted = self._decode(data, table)
        if not wanted:
            return 0
        batch = Batch()
        for index, key, left in wanted:
            family, name, set_name = SETS[index]
            if self.present.get((index, key), 0) > now:  # an add would keep the old timeout
                batch.delete(set_name, key, family=family, table=name)
            batch.add(set_name, key, timeout=left, family=family, table=name)
        try:
            nfnl.commit(batch)
            done = len(wanted)
        except (NetlinkError, OSError):
            done = sum(self._one(nfnl, index, key, left, now) for index, key, left in wanted)
        for index, key, left in wanted:
            self.present[(index, key)] = now + left / 1000
        if len(self.present) > 4 * len(wanted) + 65536:
            self.present = {k: v for k, v in self.present.items() if v > now}
        self.added += done
        return done

    def _one(self, nfnl: Nfnetlink, index: int, key: bytes, left: int, now: float) -> int:
        """One element alone, after its batch failed (one of the deletes
        found nothing: the element expired or its server went)."""
        family, name, set_name = SETS[index]
        for replace in (True, False):
            batch = Batch()
            if replace:
                batch.delete(set_name, key, family=family, table=name)
            batch.add(set_name, key, timeout=left, family=family, table=name)
            try:
                nfnl.commit(batch)
                return 1
            except (NetlinkError, OSError):
                continue
        return 0

    def _decode(self, data: bytes, table: Table) -> list[tuple[int, bytes, int]]:
        try:
            msg = json.loads(data)
            if msg.get("v") != VERSION or (self.accept_id and msg.get("id") != self.accept_id):
                return []
            names, rows = list(msg["ids"]), list(msg["e"])
            rids = {ident: rid for rid, ident in identities(table).items()}
            out = []
            for index, prefix, which, left in rows:
                rid = rids.get(names[which])
                if rid is None or not 0 <= index < len(SETS) or left < MIN_TIMEOUT_MS:
                    continue
                out.append((index, bytes.fromhex(prefix) + rid.to_bytes(4, sys.byteorder), int(left)))
            return out
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return []  # not ours, or damaged
