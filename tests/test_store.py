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


def test_service_lines_are_what_json_writes():
    """store._line writes the common lines by hand; they must be the bytes
    json.dumps writes for the row (the services of the oracle fixtures,
    every kind of service and server)."""
    import json
    from dataclasses import replace

    from ipvs2nft import ids, store
    from ipvs2nft.cli.ipvs2nft import translate_ipvsadm
    from ipvs2nft.model import SchedState
    from ipvs2nft.netaddr import address

    rules = b"""-A -t 10.0.0.1:80 -s rr
-a -t 10.0.0.1:80 -r 192.168.100.10:80 -m -w 1
-a -t 10.0.0.1:80 -r 192.168.100.11 -i --tun-type gue --tun-port 6080 --tun-csum -x 3 -y 1
-A -f 7 -6 -s sh -b sh-port -p 60 -M 64
-a -f 7 -6 -r [2001:db8::1]:0 -g -w 0
-A -u [2001:db8::2]:53 -s wrr -o
-A --sctp-service 10.0.0.2:0 -s none -p 10 --pe sip
"""
    table, errors, _ = translate_ipvsadm(rules)
    assert not errors
    table, _ = ids.assign(table, 7)
    services = list(table.services)
    pointer = SchedState((2, address("192.168.100.10"), 80), 3, 4, 1)
    services += [replace(services[0], sched=pointer), replace(services[0], scheduler='we"ird', sched=pointer)]
    for svc in services:
        written = json.dumps(store._service_row(svc), separators=(",", ":")).encode() + b",\n"
        assert store._line(svc) == written
