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


def _applied(keys_change, table):
    """The table after the change (on a copy), or the KernelError's text."""
    from ipvs2nft.errors import KernelError

    keys, change = keys_change
    try:
        return keys, change(table.copy())
    except KernelError as exc:
        return keys, exc.message


def _tables():
    """An empty table, one holding the service, one holding service and server."""
    from ipvs2nft import ipvs
    from ipvs2nft.ipvsadm.apply import mutation
    from ipvs2nft.model import Table

    tables = [Table()]
    for line in (["-A", "-t", "10.0.0.1:80", "-s", "wrr"], ["-a", "-t", "10.0.0.1:80", "-r", "10.1.1.1:80",
                                                            "-m", "-w", "2"]):
        _, change = mutation(cmdline.parse(line))
        tables.append(change(tables[-1].copy()))
    tables.append(ipvs.add_service(Table(), cmdline.parse(["-A", "-u", "10.0.0.1:80"]).service))
    return tables


def test_save_shaped_lines_shortcut_equals_the_parser():
    """quick.mutation (ipvsadm-restore's short cut for the lines -S writes)
    gives what cmdline.parse + apply.mutation give, or declines."""
    from ipvs2nft.ipvsadm import quick
    from ipvs2nft.ipvsadm.apply import mutation

    rng = random.Random(11)
    addrs = ["10.0.0.1:80", "10.1.1.1:80", "10.1.1.1:8080", "10.1.1.1", "10.0.0.1:0", "10.0.0.1:http",
             "010.0.0.1:80", "[::1]:80", "10.1.1.256:80", "255.255.255.255:80", "0.0.0.0:80", "224.0.0.1:80"]
    numbers = ["0", "1", "2", "360", "+5", "010", "-1", "x", "65535", "2147483647", "2147483648", "2678400",
               "2678401"]
    lines = []
    for _ in range(4000):
        proto = rng.choice(["-t", "-u", "-t", "-f"])
        if rng.random() < 0.4:
            line = ["-A", proto, rng.choice(addrs), rng.choice(["-s", "-s", "-p"]),
                    rng.choice(["rr", "wlc", "wrr", "nosuch", "-p", "sh", "a" * 20])]
            if rng.random() < 0.5:
                line += [rng.choice(["-p", "-p", "-M"]), rng.choice(numbers)]
        else:
            line = ["-a", proto, rng.choice(addrs), rng.choice(["-r", "-r", "-w"]), rng.choice(addrs),
                    rng.choice(["-m", "-g", "-i", "-w"]), rng.choice(["-w", "-w", "-x"]), rng.choice(numbers)]
        lines.append(line)
    tables = _tables()
    taken = 0
    for line in lines:
        fast = quick.mutation(line)
        if fast is None:
            continue
        taken += 1
        full = mutation(cmdline.parse(line))  # must not raise where the short cut took the line
        for table in tables:
            assert _applied(fast, table) == _applied(full, table), line
    assert taken > 300  # the short cut is used


def test_restore_with_gathered_servers_equals_line_by_line(state, monkeypatch):
    """ipvsadm -R with the short cut (quick.Lines: save-shaped lines, a
    service's servers gathered) answers and leaves the table exactly as
    with every line going the full way -- errors, duplicates, wrr, edits
    and unknown lines in between included."""
    from ipvs2nft.cli import ipvsadm as cli
    from ipvs2nft.ipvsadm import quick
    from ipvs2nft.store import Store
    from tests import oracle

    rng = random.Random(21)
    vips = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.2:8080", "10.0.0.1:443"] * 8 + ["10.0.0.3:0"]
    reals = ["10.1.0.1:80", "10.1.0.2:80", "10.1.0.2:81", "10.1.0.3", "10.1.0.4:80"] * 3 + [
        "255.255.255.255:80", "0.0.0.0:1"]
    weights = ["1", "2", "0"] * 20 + ["-1"]  # -1 ends the restore (a usage error): rarely
    for _ in range(60):
        lines = []
        for _ in range(rng.randint(1, 8)):  # blocks like ipvsadm -S writes, with noise
            vip, proto = rng.choice(vips), rng.choice(["-t", "-u"])
            lines.append(f"-A {proto} {vip} -s {rng.choice(['rr', 'wlc', 'wrr', 'sh', 'nosuch'])}"
                         + rng.choice(["", "", " -p 30"]))
            for _ in range(rng.randint(0, 6)):
                kind = rng.random()
                if kind < 0.85:
                    fwd = rng.choice(["-m", "-m", "-g", "-i"])
                    lines.append(f"-a {proto} {vip} -r {rng.choice(reals)} {fwd} -w {rng.choice(weights)}")
                elif kind < 0.92:
                    lines.append(f"-e {proto} {vip} -r {rng.choice(reals)} -m -w 3")
                else:
                    lines.append(rng.choice([f"-d {proto} {vip} -r {rng.choice(reals)}", "-C", "-x", ""]))
        data = ("\n".join(lines) + "\n").encode()
        outcomes = []
        for shortcut in (True, False):
            _reset(state)
            with monkeypatch.context() as m:
                if not shortcut:
                    m.setattr(quick.Lines, "take", lambda self, words: self.flush() or False)
                answer = oracle.call(cli.main, ["-R"], data, "ipvsadm")
            outcomes.append((answer, Store().read().table))
        assert outcomes[0] == outcomes[1], data.decode()


def _reset(state):
    for path in state.iterdir():
        if path.name.startswith("state.json"):
            path.unlink()


def test_restore_script_without_comments_takes_the_short_way():
    """script_lines skips its comment filter when no line is a comment; the
    lines and their numbers must be what the filter gives."""
    from ipvs2nft.ipvsadm import restore

    def filtered(data: bytes):  # the filter, always
        kept = [(n, line) for n, line in enumerate(data.split(b"\n"), 1) if not line.startswith(b"#")]
        while kept and not kept[-1][1]:
            kept.pop()
        text = b"".join(line + b"\n" for _, line in kept)
        return list(zip((n for n, _ in kept), restore.lines(text), strict=True))

    rng = random.Random(9)
    pieces = [b"-A", b"-t", b"1.2.3.4:80", b" ", b"\n", b"\n\n", b"\t", b"\xff", b"x#", b"ipvsadm"]
    for _ in range(3000):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))
        assert list(restore.script_lines(data)) == filtered(data), data
