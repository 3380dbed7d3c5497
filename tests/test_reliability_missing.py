"""Missing pieces (issue 5): no libnftables, no python3-nftables, not root,
no network namespaces, no iptables-restore-translate.

Each gives one clear line (ipvsadm's own wording where ipvsadm has one) and
a non-zero status, never a traceback, and changes nothing.
"""

from __future__ import annotations

import ctypes.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.reliability_helpers import BIN, ROOT, Director, netns_skip, no_traceback

# ipvsadm 1.31 when ipvs_init() fails with EPERM (libipvs ipvs_strerror), exit 2
NOT_ROOT = ("Can't initialize ipvs: Permission denied (you must be root)\n"
            "Are you sure that IP Virtual Server is built in the kernel or as module?\n")
BASE = "-A -t 10.0.0.1:80 -s rr\n-a -t 10.0.0.1:80 -r 192.168.100.10:80 -m\n"
MUTATIONS = [
    ("ipvsadm", "-A -t 10.0.0.2:80 -s rr", None),
    ("ipvsadm", "-a -t 10.0.0.1:80 -r 192.168.100.11:80 -m", None),
    ("ipvsadm", "-C", None),
    ("ipvsadm", "-R", "-A -t 10.0.0.3:80 -s rr\n"),
    ("ipvsadm-restore", "", "-A -t 10.0.0.4:80 -s rr\n"),
]


def _needs_root():
    if os.geteuid() != 0:
        pytest.skip("needs root")


def _env(state: Path, **extra) -> dict[str, str]:
    env = dict(os.environ, IPVS2NFT_STATE=str(state), IPVS2NFT_BACKEND="nft")
    env.pop("IPVS2NFT_FAULT", None)
    env.update(extra)
    return env


def _libnftables() -> str:
    name = ctypes.util.find_library("nftables") or "libnftables.so.1"
    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/lib"):
        p = Path(d) / name
        if p.exists():
            return str(p.resolve())
    pytest.skip("libnftables not found")


def _one_clear_line(p, what) -> None:
    assert p.returncode != 0, (what, "succeeded")
    assert no_traceback(p.stderr), (what, p.stderr)
    lines = p.stderr.splitlines()
    assert len(lines) == 1, (what, p.stderr)


# ---------------------------------------------------------------- no libnftables / no nft

@pytest.fixture
def director(tmp_path):
    if netns_skip():
        pytest.skip(netns_skip())
    with Director(tmp_path, tag="mis") as d:
        d.restore(BASE)
        yield d


def _hidden(d: Director, hide: list[str], prog: str, args: str, stdin, env: dict | None = None):
    """Run in the director with files hidden behind /dev/null in a private mount namespace."""
    mounts = "".join(f"mount --bind /dev/null {h}; " for h in hide)
    argv = " ".join(f"'{a}'" for a in d.argv(prog, args)[4:])
    script = f"{mounts}exec {argv}"
    return subprocess.run(["ip", "netns", "exec", d.name, "unshare", "-m", "--propagation", "private",
                           "sh", "-c", script], input=stdin, capture_output=True, text=True,
                          env=env or d.env(), timeout=60)


# libnftables writes the skeleton of our tables (the first command, a rebuild,
# SNAT); the services go over raw netlink (nft/netbuild.py).  So without it a
# command that must make our tables is one clear line and changes nothing,
# while a change to tables that exist needs neither libnftables nor nft.

def _tables_gone(director: Director) -> None:
    """Our table deleted by hand: the next command must make it again."""
    director.nft("delete", "table", "inet", "ipvs2nft")


@pytest.mark.netns
@pytest.mark.parametrize("prog,args,stdin", MUTATIONS, ids=[m[1] or m[0] for m in MUTATIONS])
def test_no_libnftables_to_make_our_tables(director, prog, args, stdin):
    _tables_gone(director)
    state, table = director.state_bytes(), director.table_text()
    hide = [_libnftables()] + [t for t in ("/usr/sbin/nft",) if os.path.exists(t)]
    p = _hidden(director, hide, prog, args, stdin)
    _one_clear_line(p, args)
    assert "libnftables" in p.stderr
    assert director.state_bytes() == state and director.table_text() == table


@pytest.mark.netns
@pytest.mark.parametrize("prog,args,stdin", MUTATIONS, ids=[m[1] or m[0] for m in MUTATIONS])
def test_changes_to_our_tables_need_neither_libnftables_nor_nft(director, prog, args, stdin):
    hide = [_libnftables()] + [t for t in ("/usr/sbin/nft",) if os.path.exists(t)]
    p = _hidden(director, hide, prog, args, stdin, env=director.env(IPVS2NFT_DAEMON="no"))
    assert p.returncode == 0, p.stderr
    assert director.kernel_equals_store() is None


# ---------------------------------------------------------------- no python3-nftables

def _shadowed(tmp_path: Path) -> str:
    """A PYTHONPATH on which ``import nftables`` fails."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "nftables.py").write_text("raise ImportError('No module named nftables (test shadow)')\n")
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join([str(shadow), *inherited])


@pytest.mark.netns
@pytest.mark.parametrize("prog,args,stdin", MUTATIONS, ids=[m[1] or m[0] for m in MUTATIONS])
def test_no_python_binding_to_make_our_tables(director, tmp_path, prog, args, stdin):
    _tables_gone(director)
    state, table = director.state_bytes(), director.table_text()
    p = director.ipvsadm(args, stdin=stdin, prog=prog, PYTHONPATH=_shadowed(tmp_path))
    _one_clear_line(p, args)
    assert "python3-nftables" in p.stderr, p.stderr
    assert p.returncode == 2
    assert director.state_bytes() == state and director.table_text() == table


@pytest.mark.netns
def test_a_change_to_our_tables_needs_no_python_binding(director, tmp_path):
    p = director.ipvsadm("-a -t 10.0.0.1:80 -r 192.168.100.11:80 -m", PYTHONPATH=_shadowed(tmp_path),
                         IPVS2NFT_DAEMON="no")
    assert p.returncode == 0, p.stderr
    assert director.kernel_equals_store() is None


# ---------------------------------------------------------------- not root

NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
AS_NOBODY = [
    ("ipvsadm", ""), ("ipvsadm", "-L -n"), ("ipvsadm", "-S -n"), ("ipvsadm", "-L -n -c"),
    ("ipvsadm", "-Z"), ("ipvsadm", "-A -t 10.0.0.2:80 -s rr"), ("ipvsadm", "-C"), ("ipvsadm", "-R"),
    ("ipvsadm", "--set 1 2 3"), ("ipvsadm-save", "-n"), ("ipvsadm-restore", ""),
]


def _as_nobody(state: Path, prog: str, args: str, ns: str | None = None) -> subprocess.CompletedProcess:
    cmd = NOBODY + [str(BIN / prog), *args.split()]
    if ns:
        cmd = ["ip", "netns", "exec", ns] + cmd
    env = _env(state)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return subprocess.run(cmd, input="-A -t 10.0.0.5:80\n", capture_output=True, text=True, env=env,
                          timeout=60, cwd="/")


@pytest.fixture
def public_tmp():
    """A directory everybody may traverse (pytest's tmp_path is under a 0700 one)."""
    _needs_root()
    d = Path(tempfile.mkdtemp(prefix="ipvs2nft-rel-"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("prog,args", AS_NOBODY, ids=[f"{p} {a}".strip() for p, a in AS_NOBODY])
def test_not_root_gets_ipvsadm_wording(public_tmp, prog, args):
    """The state directory as root leaves it: /run/ipvs2nft, 0700."""
    state = public_tmp / "run" / "state.json"
    subprocess.run([str(BIN / "ipvsadm-restore")], input=BASE, env=_env(state, IPVS2NFT_BACKEND="none"),
                   check=True, capture_output=True, text=True)
    before = state.read_bytes()
    p = _as_nobody(state, prog, args)
    assert no_traceback(p.stderr), p.stderr
    assert (p.returncode, p.stdout, p.stderr) == (2, "", NOT_ROOT), (p.returncode, p.stderr)
    assert state.read_bytes() == before


def test_not_root_never_a_traceback_and_changes_nothing(public_tmp):
    """Whatever the wording: no traceback, non-zero for changes, store intact,
    also when the user may write the state directory."""
    if netns_skip():
        pytest.skip(netns_skip())
    for owner in ("root", "nobody"):
        d = public_tmp / owner
        d.mkdir(mode=0o755)
        state = d / "state.json"
        subprocess.run([str(BIN / "ipvsadm-restore")], input=BASE, env=_env(state, IPVS2NFT_BACKEND="none"),
                       check=True, capture_output=True, text=True)
        if owner == "nobody":
            shutil.chown(d, "nobody")
            os.chmod(state, 0o644)
        before = state.read_bytes()
        for prog, args in AS_NOBODY:
            p = _as_nobody(state, prog, args)
            assert no_traceback(p.stderr), (owner, args, p.stderr)
            if args.split()[:1] in (["-A"], ["-C"], ["-R"], ["--set"]) or prog == "ipvsadm-restore":
                assert p.returncode != 0, (owner, prog, args, "changed something as nobody")
            assert state.read_bytes() == before, (owner, prog, args)


# ---------------------------------------------------------------- no network namespaces

FAKE_IP = """#!/bin/sh
# iproute2 on a kernel without CONFIG_NET_NS
if [ "$1" = netns ] && [ "$2" = add ]; then
    echo "Failed to create a new network namespace \\"$3\\": Invalid argument" >&2
    exit 1
fi
exec {real} "$@"
"""


def test_demo_without_netns_support(tmp_path):
    _needs_root()
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "ip").write_text(FAKE_IP.format(real=shutil.which("ip") or "/usr/sbin/ip"))
    (fake / "ip").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ.get('PATH', '/usr/bin:/bin')}",
               PYTHONPATH=os.environ.get("PYTHONPATH") or str(ROOT))
    p = subprocess.run([sys.executable, "-m", "ipvs2nft.demo"], capture_output=True, text=True, env=env,
                       timeout=120, cwd=tmp_path)
    assert no_traceback(p.stderr), p.stderr[-1500:]
    assert p.returncode != 0
    assert len(p.stderr.splitlines()) == 1, p.stderr


# ---------------------------------------------------------------- no iptables-restore-translate

def test_translate_without_iptables_translate_tool(tmp_path):
    _needs_root()
    rules = tmp_path / "rules.sh"
    rules.write_text("iptables -A INPUT -p tcp --dport 22 -j ACCEPT\n"
                     "iptables -t nat -A PREROUTING -d 192.168.0.40 -p tcp --dport 80 "
                     "-m statistic --mode nth --every 2 --packet 0 "
                     "-j DNAT --to-destination 192.168.100.10:80\n"
                     "iptables -t nat -A PREROUTING -d 192.168.0.40 -p tcp --dport 80 "
                     "-j DNAT --to-destination 192.168.100.11:80\n")
    hide = " ".join(f"mount --bind /dev/null {shutil.which(t) or '/usr/sbin/' + t};"
                    for t in ("iptables-restore-translate", "ip6tables-restore-translate"))
    p = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                        f"{hide} exec {BIN / 'ipvs2nft'} translate --from iptables {rules}"],
                       capture_output=True, text=True, timeout=60)
    assert no_traceback(p.stderr), p.stderr
    assert p.returncode in (0, 3), p.stderr
    assert "iptables-restore-translate is missing" in p.stderr, p.stderr
    assert "add element inet ipvs2nft svc4" in p.stdout  # the lifted service still comes out
