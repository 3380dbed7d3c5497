"""Connection synchronisation: ``--start-daemon`` / ``--stop-daemon`` on conntrackd.

IPVS's sync daemon copies the connection table (and persistence templates)
to a standby director, so established connections survive a failover.  On
nftables the connections are conntrack entries, and conntrackd
(conntrack-tools) is the well-kept engine that replicates them, NAT
bindings and marks included; ipvs2nft drives it and writes no connection
sync protocol of its own.  What conntrackd cannot carry, the contents of
nft sets (persistence, direct routing's flow memory), ``sets.py`` carries.

``ipvsadm`` calls :func:`apply` with the table it is about to commit,
before it changes anything: the sync daemon of this network namespace
(``supervisor.py``, started here on first use) makes the running conntrackd
instances those of the table's daemons and answers; an error (no
conntrackd, an interface conntrackd cannot use) fails the command, which
then records nothing.  ``ipvsadm --start-daemon`` returns once conntrackd listens, the sync
runs until ``--stop-daemon``, and ``-L --daemon`` lists what IPVS would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ipvs2nft.errors import Ipvs2nftError
from ipvs2nft.model import Table

ADDRESS = "\0ipvs2nft/sync"
START_WAIT = 10.0  # seconds for the sync daemon to listen
APPLY_WAIT = 30.0  # seconds for it to (re)start its conntrackd instances
MISSING = ("ipvs2nft: --start-daemon runs conntrackd, which is not installed: "
           "install the Debian package conntrackd (apt-get install conntrackd)")


def _conntrackd() -> str:
    return os.environ.get("IPVS2NFT_CONNTRACKD") or shutil.which("conntrackd") or "/usr/sbin/conntrackd"


CONNTRACKD = _conntrackd()


def run_directory(store) -> Path:
    """Where the sync daemon keeps its files: beside the state file."""
    return Path(store.directory) / "sync"


def apply(table: Table, store) -> None:
    """Run exactly the sync daemons of ``table``; raises Ipvs2nftError."""
    from ipvs2nft.daemon import control

    daemons = [[d.state, d.mcast_ifn, d.syncid, d.sync_maxlen, d.mcast_af, d.mcast_group, d.mcast_port,
                d.mcast_ttl] for d in table.daemons]
    if control.running_pid(ADDRESS) is None:
        if not daemons:
            return
        if not os.access(CONNTRACKD, os.X_OK):
            raise Ipvs2nftError(MISSING)
        _spawn(store)
    try:
        control.ask("apply", address=ADDRESS, timeout=APPLY_WAIT, daemons=daemons)
    except control.ControlError as exc:
        raise Ipvs2nftError(str(exc)) from None


def stop_all() -> None:
    """End the sync daemon of this namespace, if one runs (for tests that
    throw a namespace away)."""
    from ipvs2nft.daemon import control

    if control.running_pid(ADDRESS) is not None:
        try:
            control.ask("apply", address=ADDRESS, timeout=APPLY_WAIT, daemons=[])
        except control.ControlError:
            pass


def ensure(table: Table, store) -> None:
    """Before any command: the sync daemons the table lists run (a sync
    daemon that was killed is started again, as the kernel's threads would
    still be there).  Silent: the command's own output is ipvsadm's; a
    failure is in the sync daemon's log."""
    from ipvs2nft.daemon import control

    if table.daemons and control.running_pid(ADDRESS) is None:
        try:
            apply(table, store)
        except Ipvs2nftError:
            pass


def _spawn(store) -> None:
    """Start the sync daemon, detached, and wait until it listens."""
    from ipvs2nft.daemon import control

    where = run_directory(store)
    where.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, IPVS2NFT_STATE=os.path.abspath(store.path))
    with open(where / "supervisor.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ipvs2nft.sync.supervisor"], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, env=env, start_new_session=True,
                                cwd="/")
    deadline = time.monotonic() + START_WAIT
    while control.running_pid(ADDRESS) is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise Ipvs2nftError(f"ipvs2nft: the sync daemon did not start (see {where / 'supervisor.log'})")
        time.sleep(0.02)
