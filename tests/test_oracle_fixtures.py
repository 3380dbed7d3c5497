"""Every recorded answer of the real ipvsadm, replayed against ipvs2nft.

The fixtures under tests/fixtures/oracle were produced by
../shared/oracle/ipvs-oracle (Debian's ipvsadm 1.31 on a Debian 6.1 kernel
with IPVS); see that directory's README.md.  Each fixture is one test that
lists every record whose exit status, stdout or stderr differs.
"""

from __future__ import annotations

import pytest

from tests import oracle


@pytest.mark.oracle
@pytest.mark.parametrize("name", oracle.fixture_names())
def test_fixture(name, tmp_path):
    records = oracle.load(name)
    with oracle.vm_like_netns(tmp_path) as isolated:
        if not isolated:
            pytest.skip("replaying needs namespaces like the VM's (root): interfaces, /etc/hosts")
        outcomes = oracle.replay(records, tmp_path)
    assert outcomes, f"{name}: nothing replayed"
    bad = [oracle.describe(o) for o in outcomes if not o.matches()]
    assert not bad, f"{len(bad)} of {len(outcomes)} records differ:\n" + "\n".join(bad[:40])
