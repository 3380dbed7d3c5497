"""The Debian package, installed on this machine and purged again.

``test_machine_*`` CHANGES THE MACHINE: it installs dist/ipvs2nft_*.deb with
apt (diverting Debian's ipvsadm, which ``make setup`` installs), runs the
installed commands and the boot script in a network namespace of its own
(the host's ruleset is never touched: the package's removal script, which
deletes our tables, runs inside that namespace too), and purges the
package.  Whatever happens, it ends with the package purged, its
diversions gone and Debian's ipvsadm files as they were; a failure to get
there is reported as a failure of its own.

The units are checked with ``systemd-analyze verify`` here (installed) and,
without installing anything, in test_units.py.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ipvs2nft import __version__
from ipvs2nft.lab import unique_prefix
from tests.conftest import NETNS_SKIP

pytestmark = [pytest.mark.netns, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
DEB = ROOT / "dist" / f"ipvs2nft_{__version__}_all.deb"
COMMANDS = ("ipvsadm", "ipvsadm-save", "ipvsadm-restore")
DIVERTED = [f"/sbin/{c}" for c in COMMANDS] + [f"/usr/share/man/man8/{c}.8.gz" for c in COMMANDS]
SYSTEM = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "LANG": "C"}


def run(*cmd: str, check: bool = True, ns: str | None = None, env: dict | None = None):
    argv = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
    p = subprocess.run(argv, capture_output=True, text=True, env=dict(SYSTEM, **(env or {})), timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: status {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def digest(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def diversions() -> list[str]:
    return sorted(run("dpkg-divert", "--list").stdout.splitlines())


def installed(package: str) -> bool:
    p = run("dpkg-query", "-W", "-f=${Status}", package, check=False)
    return p.returncode == 0 and "installed" in p.stdout and "not-installed" not in p.stdout


def wants() -> list[str]:
    where = Path("/etc/systemd/system/multi-user.target.wants")
    return sorted(p.name for p in where.iterdir()) if where.is_dir() else []


@pytest.fixture
def machine():
    """What the test may change, recorded, and put back afterwards."""
    if NETNS_SKIP:
        pytest.skip(NETNS_SKIP)
    for tool in ("apt-get", "dpkg-divert", "dpkg-buildpackage"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (a Debian machine; make setup installs the build tools)")
    if not installed("ipvsadm"):
        pytest.skip("needs Debian's ipvsadm installed to divert (make setup installs it)")
    if installed("ipvs2nft"):
        pytest.skip("ipvs2nft is installed on this machine already: not touching it")
    before = {"files": {p: digest(p) for p in DIVERTED}, "diversions": diversions(), "wants": wants(),
              "run": os.path.exists("/run/ipvs2nft")}
    created: list[Path] = []
    # /run/ipvs2nft is the installed package's: its purge removes it.  What a
    # checkout left there (a default state file) is put back afterwards.
    saved = Path(tempfile.mkdtemp(prefix="i2n-run-")) / "ipvs2nft"
    if before["run"]:
        shutil.copytree("/run/ipvs2nft", saved, symlinks=True)
    yield before, created
    problems = []
    if before["run"] and not os.path.exists("/run/ipvs2nft"):
        shutil.copytree(saved, "/run/ipvs2nft", symlinks=True)
    shutil.rmtree(saved.parent, ignore_errors=True)
    if installed("ipvs2nft") or run("dpkg-query", "-W", "ipvs2nft", check=False).returncode == 0:
        p = run("dpkg", "--purge", "ipvs2nft", check=False)
        if p.returncode != 0:
            problems.append(f"dpkg --purge ipvs2nft: {p.stderr}")
    for line in diversions():
        if line.endswith(" by ipvs2nft"):
            path = line.split()[2]
            run("dpkg-divert", "--package", "ipvs2nft", "--remove", "--rename", path, check=False)
            problems.append(f"left behind: {line}")
    if run("dpkg", "-V", "ipvsadm", check=False).stdout.strip():
        run("apt-get", "install", "-y", "--reinstall", "ipvsadm", check=False)
        problems.append("Debian's ipvsadm files had changed (reinstalled)")
    for path in reversed(created):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    assert not problems, problems


def test_machine_deb_install_run_restore_purge(machine, tmp_path):
    before, created = machine
    build = subprocess.run(["make", "-C", str(ROOT), "deb"], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert DEB.exists()

    run("apt-get", "install", "-y", str(DEB))
    # Debian's commands and man pages are set aside, ours are in their place
    for path in DIVERTED:
        assert digest(path.replace(".8.gz", ".distrib.8.gz") if path.endswith(".8.gz")
                      else path + ".distrib") == before["files"][path], path
        assert digest(path) != before["files"][path], path
    for cmd in (*COMMANDS, "ipvs2nft"):
        head = Path(f"/usr/sbin/{cmd}").read_text()
        assert head.startswith("#!/usr/bin/python3\n") and "from ipvs2nft.cli" in head, head
    # ldirectord takes the first of /sbin/ipvsadm, /usr/sbin/ipvsadm that is executable
    ldirectord = next(p for p in ("/sbin/ipvsadm", "/usr/sbin/ipvsadm") if os.access(p, os.X_OK))
    assert digest(ldirectord) == digest("/usr/sbin/ipvsadm")
    assert "ipvs2nft" in run("sh", "-c", "zcat /usr/share/man/man8/ipvsadm.8.gz").stdout
    verify = run("systemd-analyze", "verify", "/lib/systemd/system/ipvsadm.service",
                 "/lib/systemd/system/ipvs2nft.service", check=False)
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr
    assert {"ipvsadm.service", "ipvs2nft.service"} <= set(wants())

    ns = unique_prefix("i2nd")
    run("ip", "netns", "add", ns)
    etc = Path("/etc/netns") / ns
    created.append(etc)
    try:
        _in_a_namespace(ns, etc, tmp_path)
    finally:
        run("ip", "netns", "del", ns, check=False)
        shutil.rmtree(etc, ignore_errors=True)
        with_others = Path("/etc/netns")
        if with_others.is_dir() and not any(with_others.iterdir()):
            with_others.rmdir()

    assert {p: digest(p) for p in DIVERTED} == before["files"]  # purged in _in_a_namespace
    assert not installed("ipvs2nft")
    assert diversions() == before["diversions"]
    assert wants() == before["wants"]
    assert not os.path.exists("/run/ipvs2nft")  # the package's runtime directory goes with it
    for path in ("/lib/systemd/system/ipvsadm.service", "/lib/systemd/system/ipvs2nft.service",
                 "/usr/libexec/ipvs2nft", "/usr/lib/python3/dist-packages/ipvs2nft"):
        assert not os.path.exists(path), path
    assert run("dpkg", "-V", "ipvsadm").stdout == ""


def _in_a_namespace(ns: str, etc: Path, tmp_path: Path) -> None:
    """The installed commands and the boot script in namespace ``ns``, with
    /etc/default/ipvsadm and /etc/ipvsadm.rules of its own (``ip netns exec``
    mounts /etc/netns/NS/* over /etc/*), then the purge."""
    env = {"IPVS2NFT_STATE": str(tmp_path / "state.json")}
    run("sh", "-ec", "ip link set lo up; ip addr add 192.168.0.40/32 dev lo; "
                     "ip link add eth0 type veth peer name eth1; ip addr add 10.9.9.1/24 dev eth0; "
                     "ip link set eth0 up", ns=ns)
    (etc / "default").mkdir(parents=True)
    (etc / "default" / "ipvsadm").write_text('AUTO="true"\nDAEMON="master"\nIFACE="eth0"\nSYNCID="7"\n'
                                             'SAVE_ON_STOP="true"\n')
    (etc / "ipvsadm.rules").write_text("# ipvsadm.rules\n-A -t 192.168.0.40:443 -s wlc\n"
                                       "-a -t 192.168.0.40:443 -r 10.0.0.2:443 -m -w 3\n")
    # started from a directory holding another checkout: its code must not be the one that runs
    other = tmp_path / "elsewhere"
    shutil.copytree(ROOT / "ipvs2nft", other / "ipvs2nft", ignore=shutil.ignore_patterns("__pycache__"))
    (other / "ipvs2nft" / "__init__.py").write_text("raise SystemExit('the wrong ipvs2nft was imported')\n")
    empty = run("sh", "-c", f"cd {other} && /usr/sbin/ipvsadm -L -n", ns=ns, env=env)
    assert empty.stdout == ("IP Virtual Server version 1.2.1 (size=4096)\n"
                            "Prot LocalAddress:Port Scheduler Flags\n"
                            "  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n")

    run("/usr/libexec/ipvs2nft/ipvsadm-boot", "start", ns=ns, env=env)
    listing = run("/sbin/ipvsadm", "-L", "-n", ns=ns, env=env).stdout
    assert "TCP  192.168.0.40:443 wlc\n  -> 10.0.0.2:443                 Masq    3      0     " in listing
    assert "master sync daemon (mcast=eth0, syncid=7" in run("/sbin/ipvsadm", "-L", "--daemon", ns=ns,
                                                            env=env).stdout
    assert "table inet ipvs2nft" in run("nft", "list", "tables", ns=ns).stdout
    run("/usr/sbin/ipvsadm", "-a", "-t", "192.168.0.40:443", "-r", "10.0.0.3:443", "-m", ns=ns, env=env)

    run("/usr/libexec/ipvs2nft/ipvsadm-boot", "stop", ns=ns, env=env)
    assert (etc / "ipvsadm.rules").read_text() == (
        "# ipvsadm.rules\n-A -t 192.168.0.40:443 -s wlc\n-a -t 192.168.0.40:443 -r 10.0.0.2:443 -m -w 3\n"
        "-a -t 192.168.0.40:443 -r 10.0.0.3:443 -m -w 1\n")
    assert run("/sbin/ipvsadm", "-S", "-n", ns=ns, env=env).stdout == ""  # AUTO: cleared at stop
    assert run("/sbin/ipvsadm", "-L", "--daemon", ns=ns, env=env).stdout == ""
    run("/usr/libexec/ipvs2nft/ipvsadm-boot", "start", ns=ns, env=env)
    assert "10.0.0.3:443" in run("/sbin/ipvsadm", "-L", "-n", ns=ns, env=env).stdout

    # removing the package removes our tables (in this namespace: the script runs here)
    run("apt-get", "purge", "-y", "ipvs2nft", ns=ns, env=env)
    assert run("nft", "list", "tables", ns=ns).stdout == ""


@pytest.mark.skipif(sys.platform != "linux", reason="Debian only")
def test_deb_version_is_the_package_version():
    first = (ROOT / "debian" / "changelog").read_text().splitlines()[0]
    assert first.startswith(f"ipvs2nft ({__version__}) "), first
