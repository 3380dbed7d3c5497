"""Injection (issue 5): nothing a user types reaches nft as syntax.

Addresses, ports, host and service names, scheduler names, sched-flags,
persistence engines, netmasks, weights, tunnel options, sync-daemon
interfaces, comments, ``-R`` / ``ipvsadm-restore`` streams, ``ipvs2nft
translate`` input (ipvsadm and iptables) and the ``ipvs2nft snat`` value
carry nft syntax (``;``, ``}``, ``"``, newlines, ``flush ruleset``, ``$var``,
``@set``, ``include "/etc/passwd"``).  Each is refused or neutralised:

* the generated script names nothing but our own tables, and loads next to
  a canary table that stays as it was;
* in a namespace, after every attempt, the ruleset holds only the canary
  and our tables, the canary is untouched, our table equals the store, and
  ``ipvsadm -S`` still prints only command lines (its output is what
  ``ipvsadm-restore`` reads back).

The state file and its lock are created 0600 in a 0700 directory (whatever
the umask) and symlinks planted at the state or lock path are not written
through.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

from ipvs2nft.cli import ipvs2nft as i2n_cli
from ipvs2nft.cli import ipvsadm as cli
from tests import oracle
from tests.reliability_helpers import (
    ALLOWED_STATUS,
    BIN,
    Director,
    compare_with_store,
    live_shape,
    module_director,
    netns_skip,
    no_traceback,
    private_netns,
    run,
)

PAYLOADS = [
    "; flush ruleset", "}", "\"", "\nflush ruleset\n", "$var", "@set", "include \"/etc/passwd\"",
    "'; delete table inet canary; '", "\\", "#", " } ; add table inet evil { ", "\r\nadd table ip evil",
]
MARKERS = ("evil", "passwd", "$var")
# (template, whether the command needs a service first); {p} is where the payload goes
TEMPLATES = [
    "-A -t 10.0.0.1{p}:80 -s rr", "-A -t 10.0.0.1:80{p} -s rr", "-A -t 10.0.0.1:{p} -s rr",
    "-A -t {p}:80", "-A -t [2001:db8::1{p}]:80", "-A -t 10.0.0.1:80 -s rr{p}", "-A -t 10.0.0.1:80 -s {p}",
    "-A -t 10.0.0.1:80 -s sh -b sh-port{p}", "-A -t 10.0.0.1:80 --pe sip{p}",
    "-A -t 10.0.0.1:80 -s rr -p 60 -M 255.255.255.0{p}", "-A -t 10.0.0.1:80 -s rr -p 60{p}",
    "-A -f 1{p} -s rr", "-A -u 10.0.0.1:http{p}", "-A -t localhost{p}:80",
    "-a -t 10.0.0.2:80 -r 192.168.100.10{p}:80 -m", "-a -t 10.0.0.2:80 -r 192.168.100.10:80 -m -w 1{p}",
    "-a -t 10.0.0.2:80 -r 192.168.100.10:80 -m -x 5{p}",
    "-a -t 10.0.0.2:80 -r 192.168.100.11 -i --tun-type gue --tun-port 6080{p}",
    "-a -t 10.0.0.2:80 -r 192.168.100.11 -i --tun-type gue{p}", "-e -t 10.0.0.2:80 -r 192.168.100.12{p} -m",
    "--start-daemon master --mcast-interface lo{p}",
    "--start-daemon backup --mcast-interface lo --syncid 3{p}",
    "--set 10 20 30{p}",
]
SETUP = "-A -t 10.0.0.2:80 -s rr\n-a -t 10.0.0.2:80 -r 192.168.100.12:80 -m\n"
CANARY = """\
table inet canary {
    set s { type ipv4_addr; elements = { 10.9.9.9 } }
    chain c { type filter hook input priority 0; policy accept; ip saddr @s counter drop; }
}
"""
OURS = {"table inet ipvs2nft", "table ip ipvs2nft", "table ip6 ipvs2nft"}
# A saved line: options, short or long (--tun-type gue), each with at most one plain value.
_SAVE_LINE = re.compile(r"^-(A|a) (-t|-u|--sctp-service|-f) [0-9a-fA-F.:\[\]]+"
                        r"( --?[a-zA-Z6][a-zA-Z-]*( [0-9a-zA-Z.,:\[\]-]+)?)*$")


def argv_with(template: str, payload: str) -> list[str]:
    """The template's words, the payload inside the word that holds {p}."""
    return [w.replace("{p}", payload) for w in template.split()]


# ---------------------------------------------------------------- translate

def _translate(data: bytes, *args: str) -> tuple[int, str, str]:
    return oracle.call(i2n_cli.main, ["translate", *args, "-"], data, "ipvs2nft")


def _script_lines_are_ours(script: str) -> list[str]:
    ours = re.compile(r"^(add|delete|flush) (table|chain|rule|map|set|element|ct timeout) (inet|ip|ip6) "
                      r"ipvs2nft( |$)")
    return [line for line in script.splitlines() if not ours.match(line)]


@pytest.mark.parametrize("template", TEMPLATES)
def test_translate_never_carries_a_payload(template):
    for payload in PAYLOADS:
        line = " ".join(argv_with(template, payload))
        data = (SETUP + line + "\n").encode()
        status, out, err = _translate(data)
        assert isinstance(status, int) and no_traceback(err), err
        assert status in (0, 2, 3), (line, status, err)
        if status == 0:
            assert not _script_lines_are_ours(out), (line, _script_lines_are_ours(out)[:3])
            for marker in MARKERS:
                assert marker not in out, (line, marker)


def test_translate_comment_lines_stay_comments():
    data = "".join(f"#{p}\n" for p in PAYLOADS if "\n" not in p and "\r" not in p).encode() + SETUP.encode()
    status, out, err = _translate(data)
    assert status == 0, err
    assert not _script_lines_are_ours(out)
    assert not any(m in out for m in MARKERS)


IPTABLES_PAYLOADS = [
    '-A INPUT -p tcp --dport 22 -m comment --comment "x\\"; flush ruleset; add table ip evil; \\"" -j ACCEPT',
    "-A INPUT -p tcp --dport 22 -m comment --comment 'a } ; add table ip evil { ' -j ACCEPT",
    '-A INPUT -p tcp --dport 23 -j LOG --log-prefix "p\\"; add table ip evil; \\""',
    "-A INPUT -p tcp --dport 24 -m comment --comment '$var @set include \"/etc/passwd\"' -j DROP",
    '-A INPUT -p tcp --dport 25 -m comment --comment "back\\\\" -j DROP',
    "-A INPUT -i 'eth0;flush' -j DROP",
    "-N evil;x",
    "-A PREROUTING -t nat -d 192.168.0.40 -p tcp --dport 80 -m comment --comment 'x\"}{' "
    "-m statistic --mode nth --every 2 --packet 0 -j DNAT --to-destination 192.168.100.10:80",
    "-A PREROUTING -t nat -d 192.168.0.40 -p tcp --dport 80 -j DNAT --to-destination '192.168.100.11:80;x'",
]


def _load_next_to_canary(ns: Director, script: str) -> subprocess.CompletedProcess:
    ns.nft("flush", "ruleset")
    ns.nft("-f", "-", stdin=CANARY)
    canary = ns.nft("list", "table", "inet", "canary").stdout
    loaded = ns.nft("-f", "-", stdin=script, check=False)
    assert ns.nft("list", "table", "inet", "canary").stdout == canary, script
    tables = set(ns.nft("list", "tables").stdout.splitlines())
    assert not any("evil" in t for t in tables), tables
    return loaded


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    yield from module_director(tmp_path_factory, "inj")


@pytest.mark.netns
@pytest.mark.parametrize("rule", IPTABLES_PAYLOADS)
def test_translate_iptables_input_cannot_smuggle(scratch, rule):
    words = shlex.split(rule) if "'" in rule or '"' in rule else rule.split()
    line = "iptables " + " ".join(shlex.quote(w) for w in words)
    status, out, err = _translate((line + "\n").encode(), "--from", "iptables")
    assert isinstance(status, int) and no_traceback(err), err
    assert status in (0, 2, 3), (status, err)
    if status == 0:
        assert "evil" not in scratch.nft("-c", "-f", "-", stdin=out, check=False).stdout
        _load_next_to_canary(scratch, out)


@pytest.mark.netns
@pytest.mark.parametrize("template", TEMPLATES[:6])
def test_translated_script_loads_next_to_a_canary(scratch, template):
    for payload in PAYLOADS:
        status, out, _ = _translate((SETUP + " ".join(argv_with(template, payload)) + "\n").encode())
        if status == 0:
            loaded = _load_next_to_canary(scratch, out)
            assert loaded.returncode == 0, loaded.stderr


# ---------------------------------------------------------------- the real thing, in a namespace
# In-process calls of the console-script entry points, with the nftables back
# end, in a throw-away network namespace (hundreds of attempts in seconds);
# one test runs the installed commands as processes.

@pytest.fixture(scope="module")
def netns(tmp_path_factory):
    if netns_skip():
        pytest.skip(netns_skip())
    directory = tmp_path_factory.mktemp("injns")
    with private_netns(directory) as kernel:
        if not kernel:
            pytest.skip("needs the nftables back end")
        run(["nft", "-f", "-"], input=CANARY)
        yield directory / "state.json"


def _nft(*args: str) -> str:
    return run(["nft", *args]).stdout


def _fresh(state: Path) -> str:
    for fam in ("inet", "ip", "ip6"):
        run(["nft", "delete", "table", fam, "ipvs2nft"], check=False)
    for q in state.parent.glob("state.json*"):
        q.unlink()
    status, _, err = oracle.call(cli.restore_main, [], SETUP, "ipvsadm-restore")
    assert status == 0, err
    return _nft("list", "table", "inet", "canary")


def _check_ruleset(state: Path, canary: str, what: str) -> None:
    assert _nft("list", "table", "inet", "canary") == canary, what
    tables = set(_nft("list", "tables").splitlines())
    assert tables <= OURS | {"table inet canary"}, (what, tables)
    ruleset = _nft("list", "ruleset")
    for marker in MARKERS:
        assert marker not in ruleset, (what, marker)
    status, out, err = oracle.call(cli.main, ["-S", "-n"], None, "ipvsadm")
    assert status == 0, err
    for line in out.splitlines():
        assert _SAVE_LINE.match(line), (what, line)
    diff = compare_with_store(state, live_shape())
    assert diff is None, (what, diff)


def _attempt(func, argv, stdin, prog) -> None:
    status, _, err = oracle.call(func, argv, stdin, prog)
    assert status in ALLOWED_STATUS and no_traceback(err), (argv, stdin, status, err)


@pytest.mark.netns
@pytest.mark.parametrize("template", TEMPLATES)
def test_ipvsadm_arguments_cannot_smuggle(netns, template):
    canary = _fresh(netns)
    for payload in PAYLOADS:
        _attempt(cli.main, argv_with(template, payload), None, "ipvsadm")
    _check_ruleset(netns, canary, template)


@pytest.mark.netns
@pytest.mark.parametrize("prog", ["ipvsadm", "ipvsadm-restore"])
def test_restore_streams_cannot_smuggle(netns, prog):
    canary = _fresh(netns)
    func, argv = (cli.main, ["-R"]) if prog == "ipvsadm" else (cli.restore_main, [])
    for template in TEMPLATES:
        for payload in PAYLOADS:
            line = " ".join(argv_with(template, payload))
            _attempt(func, argv, SETUP.replace("10.0.0.2", "10.0.0.3") + line + "\n", prog)
    _check_ruleset(netns, canary, prog)


@pytest.mark.netns
def test_snat_value_cannot_smuggle(netns):
    canary = _fresh(netns)
    for payload in PAYLOADS + ["masquerade; flush ruleset", "10.0.0.1; add table ip evil", "masquerade\n"]:
        status, _, err = oracle.call(i2n_cli.main, ["snat", payload], None, "ipvs2nft")
        assert no_traceback(err), err
        assert status != 0, (payload, "accepted")
    _check_ruleset(netns, canary, "snat")


@pytest.mark.netns
def test_installed_commands_with_hostile_words(tmp_path):
    """The console scripts as processes: argv words with newlines, quotes
    and undecodable bytes, in a namespace with a canary table."""
    if netns_skip():
        pytest.skip(netns_skip())
    with Director(tmp_path, tag="injp") as d:
        d.nft("-f", "-", stdin=CANARY)
        canary = d.nft("list", "table", "inet", "canary").stdout
        d.restore(SETUP)
        for template in ("-A -t 10.0.0.1:80 -s {p}", "-a -t 10.0.0.2:80 -r 192.168.100.10{p} -m",
                         "--start-daemon master --mcast-interface lo{p}", "-A -t 10.0.0.1:80 --pe sip{p}"):
            for payload in ("\nflush ruleset\n", "\"; add table ip evil; \"", "\udcff\udcfe"):
                if "mcast" in template and payload.startswith("\udcff"):
                    continue  # test_undecodable_interface_name
                argv = [os.fsencode(w) for w in argv_with(template, payload)]
                p = subprocess.run(d.argv("ipvsadm", []) + argv, env=d.env(), capture_output=True,
                                   timeout=60)
                err = p.stderr.decode(errors="replace")
                assert p.returncode in ALLOWED_STATUS and no_traceback(err), (argv, p.returncode, err)
        assert d.nft("list", "table", "inet", "canary").stdout == canary
        tables = set(d.nft("list", "tables").stdout.splitlines())
        assert tables <= OURS | {"table inet canary"}, tables
        assert d.kernel_equals_store() is None


def test_undecodable_interface_name(tmp_path):
    env = dict(os.environ, IPVS2NFT_STATE=str(tmp_path / "state.json"), IPVS2NFT_BACKEND="none")
    p = subprocess.run([str(BIN / "ipvsadm"), b"--start-daemon", b"master", b"--mcast-interface", b"lo\xff"],
                       env=env, capture_output=True, timeout=60)
    err = p.stderr.decode(errors="replace")
    assert no_traceback(err) and "internal error" not in err, err
    assert (p.returncode, err) == (255, "No such device\n")


# ---------------------------------------------------------------- file modes and symlinks

def _ipvsadm(state: Path, args: str, umask: int | None = None, stdin: str | None = None):
    env = dict(os.environ, IPVS2NFT_STATE=str(state), IPVS2NFT_BACKEND="none")
    env.pop("IPVS2NFT_FAULT", None)
    cmd = [str(BIN / "ipvsadm"), *shlex.split(args)]
    if umask is not None:
        cmd = ["sh", "-c", f"umask {umask:03o}; exec \"$@\"", "sh", *cmd]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, input=stdin, timeout=60)


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_state_and_lock_are_0600_in_a_0700_directory(tmp_path, umask):
    state = tmp_path / "run" / "ipvs2nft" / "state.json"
    p = _ipvsadm(state, "-A -t 10.0.0.1:80 -s rr", umask=umask)
    assert p.returncode == 0, p.stderr
    mode = {q.name: stat.S_IMODE(q.stat().st_mode) for q in state.parent.iterdir()}
    assert stat.S_IMODE(state.parent.stat().st_mode) == 0o700
    assert mode == {"state.json": 0o600, "state.json.lock": 0o600}, mode
    # and after a rewrite
    assert _ipvsadm(state, "-a -t 10.0.0.1:80 -r 192.168.100.10:80 -m", umask=umask).returncode == 0
    assert stat.S_IMODE(state.stat().st_mode) == 0o600


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    return victim


@pytest.mark.parametrize("args", ["-A -t 10.0.0.1:80 -s rr", "-C", "-R"])
def test_symlink_at_state_path_is_not_written_through(tmp_path, args):
    victim = _victim(tmp_path)
    state = tmp_path / "s" / "state.json"
    state.parent.mkdir(mode=0o700)
    state.symlink_to(victim)
    p = _ipvsadm(state, args, stdin="-A -t 10.0.0.2:80\n")
    assert no_traceback(p.stderr), p.stderr
    assert victim.read_bytes() == b"precious\n"
    if p.returncode != 0:
        assert len(p.stderr.splitlines()) == 1, p.stderr
        assert state.is_symlink()


@pytest.mark.parametrize("dangling", [False, True])
def test_symlink_at_lock_path_is_not_followed(tmp_path, dangling):
    victim = tmp_path / "victim"
    if not dangling:
        victim.write_bytes(b"precious\n")
    state = tmp_path / "s" / "state.json"
    state.parent.mkdir(mode=0o700)
    Path(str(state) + ".lock").symlink_to(victim)
    p = _ipvsadm(state, "-A -t 10.0.0.1:80 -s rr")
    assert no_traceback(p.stderr), p.stderr
    if dangling:
        assert not victim.exists(), "the lock symlink's target was created"
    else:
        assert victim.read_bytes() == b"precious\n"
    assert p.returncode != 0 and len(p.stderr.splitlines()) == 1, (p.returncode, p.stderr)


def test_symlinked_state_directory_is_not_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ipvs2nft").symlink_to(elsewhere)
    p = _ipvsadm(tmp_path / "run" / "ipvs2nft" / "state.json", "-A -t 10.0.0.1:80 -s rr")
    assert no_traceback(p.stderr), p.stderr
    assert list(elsewhere.iterdir()) == [], "files were created through the symlink"
    assert p.returncode != 0 and len(p.stderr.splitlines()) == 1, p.stderr
