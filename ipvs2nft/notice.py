"""Warnings given once per state directory, to syslog.

Not on stderr: scripts compare ipvsadm's stderr with the real one's, so a
notice of ours there would break them.  ``Store.first_uses`` remembers what
was already said.
"""

from __future__ import annotations


def once(store, key: str, text: str) -> None:
    """Log ``text`` at LOG_WARNING unless ``key`` was logged before."""
    if not store.first_uses({key}):
        return
    import syslog

    syslog.openlog("ipvs2nft", 0, syslog.LOG_DAEMON)
    syslog.syslog(syslog.LOG_WARNING, text)
