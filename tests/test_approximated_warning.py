"""Schedulers that need live connection counts warn once, to syslog, while
no daemon keeps the counts.

ipvsadm's default scheduler is wlc, one of them: a warning on stderr would
break every script that compares ipvsadm's output, so it goes to syslog,
once per scheduler and state directory.
"""

from __future__ import annotations

import syslog

from ipvs2nft.cli import ipvsadm as cli
from ipvs2nft.model import Service, Table
from ipvs2nft.store import Store


def test_first_uses_are_remembered(tmp_path):
    store = Store(str(tmp_path / "state.json"))
    assert store.first_uses({"wlc", "lc"}) == {"wlc", "lc"}
    assert store.first_uses({"wlc", "sed"}) == {"sed"}
    assert store.first_uses({"lc"}) == set()
    assert (tmp_path / "state.json.seen").stat().st_mode & 0o777 == 0o600


def test_warning_once_per_scheduler(tmp_path, monkeypatch):
    logged = []
    monkeypatch.setattr(syslog, "syslog", lambda prio, text: logged.append((prio, text)))
    monkeypatch.setattr(syslog, "openlog", lambda *a: None)
    store = Store(str(tmp_path / "state.json"))
    table = Table([Service(scheduler="wlc"), Service(port=81, scheduler="rr")])
    monkeypatch.setattr(cli, "_daemon_watches", lambda: False)
    cli._warn_approximated(store, table)
    cli._warn_approximated(store, table)
    assert len(logged) == 1
    assert logged[0][0] == syslog.LOG_WARNING
    assert "wlc follows live connection counts only while" in logged[0][1]


def test_no_warning_while_the_daemon_runs(tmp_path, monkeypatch):
    logged = []
    monkeypatch.setattr(syslog, "syslog", lambda prio, text: logged.append((prio, text)))
    monkeypatch.setattr(syslog, "openlog", lambda *a: None)
    monkeypatch.setattr(cli, "_daemon_watches", lambda: True)
    cli._warn_approximated(Store(str(tmp_path / "state.json")), Table([Service(scheduler="lc")]))
    assert logged == []

