"""The daemon takes in its own changes from what their commits wrote (issue 14).

After an ipvsadm call it carried out, the daemon used to decode the whole
state file again: a quarter of a second at 10,000 services, which the next
call waited for.  ``Daemon._absorb`` now merges the commits' services into
the table it holds -- and must end with exactly the table the file holds, in
the file's order, or give up (someone else wrote in between) so that the
whole file is read.  No kernel: the back end is ``none``.
"""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest

from ipvs2nft.backend import Backend
from ipvs2nft.cli import ipvsadm as cli
from ipvs2nft.daemon.main import Daemon
from ipvs2nft.store import Store

SETUP = [
    ["-A", "-t", "10.0.0.1:80", "-s", "wlc"],
    ["-a", "-t", "10.0.0.1:80", "-r", "10.0.1.1", "-m"],
    ["-A", "-u", "10.0.0.2:53", "-s", "rr"],
    ["-A", "-f", "7", "-s", "lc", "-p", "60"],
    ["-a", "-f", "7", "-r", "10.0.1.2", "-g", "-w", "3"],
]


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("IPVS2NFT_STATE", str(tmp_path / "state.json"))
    monkeypatch.setenv("IPVS2NFT_BACKEND", "none")
    s = Store()
    for argv in SETUP:
        assert _run(s, argv)[0] == 0
    return s


def _run(store: Store, argv: list[str], stdin: str | None = None) -> tuple[int, list[cli.Session]]:
    """ipvsadm ``argv`` with sessions as the daemon makes them; the sessions."""
    sessions: list[cli.Session] = []

    def new_session() -> cli.Session:
        sessions.append(cli.Session(store=Store(store.path), backend=Backend(), in_daemon=True))
        return sessions[-1]

    lines = io.BytesIO(stdin.encode()) if stdin is not None else None
    status = cli.serve(argv, "ipvsadm", new_session, lines)
    return status, sessions


def _daemon(store: Store) -> tuple[SimpleNamespace, list]:
    """What ``_absorb`` uses of a daemon, holding the file's table now."""
    snapshot = store.read()
    taken: list = []
    fake = SimpleNamespace(store=store, table=snapshot.table, generation=snapshot.generation,
                           counters={}, identity=None)
    fake._take = lambda table, generation, repair=False: taken.append((table, generation))
    fake._file_identity = lambda: Daemon._file_identity(fake)
    return fake, taken


def _commits(sessions) -> list:
    return [c for s in sessions for c in s.commits]


def _same_as_file(store: Store, table, generation: int) -> None:
    on_disk = store.read()
    assert generation == on_disk.generation
    assert list(table.index) == list(on_disk.table.index)  # the file's order (--nosort)
    assert table == on_disk.table


@pytest.mark.parametrize("calls", [
    [["-a", "-t", "10.0.0.1:80", "-r", "10.0.1.9", "-m", "-w", "2"]],
    [["-e", "-t", "10.0.0.1:80", "-r", "10.0.1.1", "-m", "-w", "0", "-x", "10"]],
    [["-d", "-t", "10.0.0.1:80", "-r", "10.0.1.1"]],
    [["-D", "-u", "10.0.0.2:53"]],
    [["-A", "-t", "10.0.0.3:443", "-s", "sh"], ["-a", "-t", "10.0.0.3:443", "-r", "10.0.1.3", "-i"]],
    [["-E", "-f", "7", "-s", "wrr"], ["-D", "-t", "10.0.0.1:80"], ["-A", "-t", "10.0.0.1:80"]],
    [["--set", "900", "120", "300"]],
    [["-C"]],
    [["-C"], ["-A", "-t", "10.0.0.5:25"]],
])
def test_the_merged_table_is_the_files(store, calls):
    daemon, taken = _daemon(store)
    commits = []
    for argv in calls:
        status, sessions = _run(store, argv)
        assert status == 0, argv
        commits += _commits(sessions)
    assert Daemon._absorb(daemon, commits) is True
    (table, generation), = taken
    _same_as_file(store, table, generation)
    assert daemon.counters == {"absorbed": 1}


def test_a_restore_is_taken_in_whole(store):
    daemon, taken = _daemon(store)
    status, sessions = _run(store, ["-R"], "-A -t 10.9.9.9:80 -s rr\n-a -t 10.9.9.9:80 -r 10.0.2.1:80 -m\n")
    assert status == 0
    assert Daemon._absorb(daemon, _commits(sessions)) is True
    (table, generation), = taken
    _same_as_file(store, table, generation)


def test_a_change_made_beside_the_daemon_makes_it_read_the_file(store):
    """The daemon has not followed an earlier change: its commits read a
    generation it does not hold, so it cannot merge onto its table."""
    daemon, taken = _daemon(store)
    assert _run(store, ["-A", "-t", "10.0.0.4:80"])[0] == 0  # not through the daemon
    status, sessions = _run(store, ["-a", "-t", "10.0.0.1:80", "-r", "10.0.1.7", "-m"])
    assert status == 0
    assert Daemon._absorb(daemon, _commits(sessions)) is False
    assert taken == []


def test_a_change_made_after_the_daemons_makes_it_read_the_file(store):
    """The file's generation is not the last one the daemon wrote."""
    daemon, taken = _daemon(store)
    status, sessions = _run(store, ["-a", "-t", "10.0.0.1:80", "-r", "10.0.1.7", "-m"])
    assert status == 0
    assert _run(store, ["-D", "-u", "10.0.0.2:53"])[0] == 0  # someone else, right after
    assert Daemon._absorb(daemon, _commits(sessions)) is False
    assert taken == []


def test_a_failed_call_commits_nothing(store):
    status, sessions = _run(store, ["-a", "-t", "10.0.0.1:80", "-r", "10.0.1.1", "-m"])
    assert status != 0  # Destination already exists
    assert _commits(sessions) == []
