"""The state file's own guarantees that other tests do not already cover."""

from __future__ import annotations

import hashlib
import re

import pytest

from ipvs2nft.errors import StoreError
from ipvs2nft.model import Service, Table
from ipvs2nft.store import Store


def test_state_file_with_the_older_blake2b_digest_still_reads(tmp_path):
    """The checksum became CRC-32; a state file written before still reads,
    and a damaged one is still refused."""
    store = Store(str(tmp_path / "state.json"))
    store.write(store.prepare(store.read(), Table([Service(scheduler="rr", port=80)])))
    raw = (tmp_path / "state.json").read_bytes()
    head, body = raw.split(b"\n", 1)
    old = hashlib.blake2b(body, digest_size=16).hexdigest().encode()
    (tmp_path / "state.json").write_bytes(re.sub(rb'"digest":"[^"]*"', b'"digest":"' + old + b'"', head)
                                          + b"\n" + body)
    assert [s.port for s in Store(str(tmp_path / "state.json")).read().table.services] == [80]
    (tmp_path / "state.json").write_bytes(raw.replace(b'"rr"', b'"sh"'))
    with pytest.raises(StoreError, match="checksum"):
        Store(str(tmp_path / "state.json")).read()
