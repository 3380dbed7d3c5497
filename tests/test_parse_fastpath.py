"""The fast paths of the command-line parser give what the full one gives.

``ipvsadm-restore`` of 10,000 services reads 50,000 lines; two shortcuts
keep that fast: plain argv skips the popt emulation (``_simple_hits``), and a
canonical ``a.b.c.d:port`` skips inet_aton/getservbyname.  Both must be
invisible: here each is compared with the full path on generated input,
valid and invalid alike.
"""

from __future__ import annotations

import random

import pytest

from ipvs2nft import netaddr
from ipvs2nft.errors import IpvsadmError
from ipvs2nft.ipvsadm import cmdline

OCTETS = ["0", "1", "9", "10", "99", "100", "199", "200", "249", "250", "255", "256", "300", "010", "00"]
PORTS = ["0", "1", "80", "080", "9999", "10000", "59999", "65529", "65535", "65536", "99999", "", "http"]


def _address(rng: random.Random) -> str:
    return ".".join(rng.choice(OCTETS) for _ in range(4)) + ":" + rng.choice(PORTS)


class _NoShortcut:
    def fullmatch(self, _text):
        return None


def test_canonical_ipv4_shortcut_equals_full_parse(monkeypatch):
    rng = random.Random(7)
    cases = [_address(rng) for _ in range(5000)] + ["1.2.3.4:65535", "255.255.255.255:0", "0.0.0.0:1"]
    fast = [netaddr.parse_service(c, 6) for c in cases]
    assert sum(netaddr._CANONICAL_V4.fullmatch(c) is not None for c in cases) > 500  # the shortcut is used
    monkeypatch.setattr(netaddr, "_CANONICAL_V4", _NoShortcut())
    assert [netaddr.parse_service(c, 6) for c in cases] == fast


# Option values are numbers and addresses: a word like "x" as an address
# would be a host name lookup, slow and not what is compared here.
WORDS = ["-A", "-E", "-D", "-a", "-e", "-d", "-L", "-S", "-C", "-Z", "-n", "-t", "-u", "-f", "-s", "-r",
         "-m", "-g", "-i", "-w", "-x", "-p", "-M", "-o", "-6", "-b", "-c", "-Ln", "--numeric",
         "10.0.0.1:80", "192.168.1.2:8080", "[::1]:80", "[::1]:80", "10.0.0.1:80", "1", "0", "-1", "--",
         "sh-port", "255.255.255.0", "", "-", "-X"]


def _outcome(argv: list[str]):
    try:
        return cmdline.parse(argv, "ipvsadm")
    except IpvsadmError as exc:
        return type(exc).__name__, exc.status, exc.message


@pytest.mark.parametrize("seed", range(4))
def test_plain_argv_shortcut_equals_popt(monkeypatch, seed):
    rng = random.Random(seed)
    lines = [["-a", "-t", "10.0.0.1:80", "-r", "192.168.1.2:80", "-m", "-w", "1"],
             ["-A", "-u", "10.0.0.1:53", "-s", "wrr"]]
    for _ in range(1500):
        start = rng.choice(["-A", "-a", "-E", "-e", "-d", "-D", "-L"])
        lines.append([start] + [rng.choice(WORDS) for _ in range(rng.randint(0, 8))])
    fast = [_outcome(argv) for argv in lines]
    assert sum(cmdline._simple_hits(a) is not None for a in lines) > 150  # the shortcut is used
    monkeypatch.setattr(cmdline, "_simple_hits", lambda argv: None)
    assert [_outcome(argv) for argv in lines] == fast


def test_restore_line_splitting_equals_the_scanner():
    """restore.lines() splits whole lines in bulk; restore.scan() is the
    token-by-token emulation of ipvsadm's fscanf loop."""
    from ipvs2nft.ipvsadm import restore

    rng = random.Random(3)
    pieces = [b"-A", b"-t", b"1.2.3.4:80", b"ipvsadm", b" ", b"  ", b"\t", b"\r", b"\n", b"\n\n", b"#",
              b"\xff", b"\x0b", b"x" * 4095, b"y" * 4097, b"ipvsadmx"]
    for _ in range(3000):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        assert list(restore.lines(data)) == list(restore.scan(data)), data[:200]
