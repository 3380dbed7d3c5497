"""Would ``nft -f`` load a script?  ``nft -c`` in a throw-away network namespace.

``ipvs2nft translate`` prints a script for ``nft -f``; iptables-translate
and our own builder can both write one nft refuses (kube-proxy's
``-p tcp -m tcp -j DNAT`` did, with exit status 0).  So every translation is
checked before it is printed, by nft's and the kernel's own validation
(``nft --check`` sends the whole batch and has the kernel abort it), in a
new network namespace, so nothing of this host is read or changed:
``unshare -n`` as root, ``unshare -rn`` (a user namespace of one's own)
otherwise.  Tunnel devices the script names get veth stand-ins (their names
are all ``dup ... device`` looks at).

A refusal is reported at the input line that brings it in: the translation
of ever longer prefixes of the input is checked (a binary search), and the
first line whose addition makes nft refuse is named.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

_ERROR = re.compile(r"^[^\n]*?:(\d+):\d+(?:-\d+)?: Error: (.*)$", re.M)


@dataclass(frozen=True)
class Verdict:
    """What ``nft -c`` said: loads (``ok``), refused at script ``line``
    (``message``), or could not be asked (``unchecked``: why)."""

    ok: bool
    line: int = 0
    message: str = ""
    unchecked: str = ""


def check(script: str) -> Verdict:
    nft = shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")
    unshare = shutil.which("unshare")
    if nft is None or unshare is None:
        return Verdict(False, unchecked=f"{'nft' if nft is None else 'unshare'} is missing")
    devices = sorted(set(re.findall(r'device "(i2n\d+)"', script)))
    setup = "".join(f"ip link add {d} type veth peer name sx{n} && " for n, d in enumerate(devices))
    own = "-n" if os.geteuid() == 0 else "-rn"
    p = subprocess.run([unshare, own, "sh", "-c", f'{setup}exec "$0" -c -f -', nft], input=script,
                       capture_output=True, text=True)
    if p.returncode == 0:
        return Verdict(True)
    found = _ERROR.search(p.stderr)
    if found:
        return Verdict(False, int(found.group(1)), found.group(2).strip())
    if p.stderr.startswith(("unshare:", "RTNETLINK", "sh:")):
        return Verdict(False, unchecked=p.stderr.strip().splitlines()[0])
    return Verdict(False, 0, (p.stderr.strip().splitlines() or [f"nft exited with {p.returncode}"])[0])


def culprit(last: int, refused: Callable[[int], bool]) -> int:
    """The input line whose addition makes nft refuse: the smallest k with
    ``refused(k)`` (the translation of lines 1..k), given that the whole
    input (``last``) is refused and nothing (0) is not."""
    good, bad = 0, last
    while bad - good > 1:
        mid = (good + bad) // 2
        if refused(mid):
            bad = mid
        else:
            good = mid
    return bad


def verify(script: str, last: int, script_of: Callable[[int], str | None]) -> tuple[str, str]:
    """(error, warning) for a translation about to be printed: an error
    naming the input line nft's refusal comes from, or a warning that it
    could not be checked; ("", "") when nft loads it.  ``script_of(k)``: the
    translation of input lines 1..k (None when they do not translate)."""
    verdict = check(script)
    if verdict.ok:
        return "", ""
    if verdict.unchecked:
        return "", f"the script was not checked with nft -c ({verdict.unchecked})"

    def refused(k: int) -> bool:
        text = script_of(k)
        found = check(text) if text is not None else Verdict(True)
        return not found.ok and not found.unchecked

    line = culprit(last, refused)
    where = f"script line {verdict.line}: " if verdict.line else ""
    return f"line {line}: nftables refuses the translation ({where}{verdict.message})", ""
