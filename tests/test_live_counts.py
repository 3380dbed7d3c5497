"""Without the daemon, ipvsadm writes a managed service's next choices from
the connections conntrack holds (nft/backend.py ``_live``), reading only the
connections of the services the command touches (issue 14: its cost
follows the command, not the table).
"""

from __future__ import annotations

import pytest

from ipvs2nft import dynsched
from ipvs2nft.lab import VIP4, rs4
from ipvs2nft.store import Store
from tests.conftest import make_lab

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PORT = 7777  # held open by the lab's servers


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = make_lab(tmp_path_factory.mktemp("lab"), servers=2)
    try:
        yield lab
    finally:
        lab.close()


def test_wlc_written_by_ipvsadm_counts_the_open_connections(lab, monkeypatch):
    """Three connections held on A; B added: IPVS's wlc now sends the next
    ones to B until it carries as much -- not A, B, A as for a fresh table."""
    lab.ipvsadm("-C")
    lab.ipvsadm(f"-A -t {VIP4}:{PORT} -s wlc")
    lab.ipvsadm(f"-a -t {VIP4}:{PORT} -r {rs4(0)}:{PORT} -m")
    sessions = [lab.session(VIP4, PORT) for _ in range(3)]
    assert {s.backend for s in sessions} == {rs4(0)}
    # another managed service with connections of its own, which -a must not read
    lab.ipvsadm(f"-A -t {VIP4}:80 -s wlc")
    lab.ipvsadm(f"-a -t {VIP4}:80 -r {rs4(1)}:80 -m")
    lab.ipvsadm(f"-a -t {VIP4}:{PORT} -r {rs4(1)}:{PORT} -m")
    svc = next(s for s in Store(str(lab.state_dir / "state.json")).read().table.services if s.port == PORT)
    held = {d.key: dynsched.Load(active=3 if str(d.addr) == rs4(0) else 0) for d in svc.dests}
    expected = [str(d.addr) for d in dynsched.predict(svc, held, 3)]
    assert expected == [rs4(1)] * 3 != [str(d.addr) for d in dynsched.predict(svc, {}, 3)]
    assert lab.backends(VIP4, PORT, 3) == expected
    for s in sessions:
        s.close()
    lab.ipvsadm("-C")
