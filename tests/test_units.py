"""The systemd units and the boot script, without installing anything.

``systemd-analyze verify`` checks the units as shipped, with their command
paths pointed at this checkout's files (the installed ones are verified in
test_machine_deb.py).  The boot script runs in a namespace lab against this
checkout's ipvsadm, with /etc/default/ipvsadm and /etc/ipvsadm.rules of the
lab's own (``ip netns exec`` mounts /etc/netns/NAME/* over /etc/*).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ipvs2nft.lab import VIP4, rs4
from tests.conftest import make_lab

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "contrib" / "systemd"
BOOT = ROOT / "contrib" / "ipvsadm-boot"
BIN = Path(sys.executable).parent


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (make setup)")
def test_units_verify(tmp_path):
    for unit in ("ipvsadm.service", "ipvs2nft.service"):
        text = (UNITS / unit).read_text()
        text = text.replace("/usr/libexec/ipvs2nft/ipvsadm-boot", str(BOOT))
        text = text.replace("/usr/sbin/ipvs2nft", str(BIN / "ipvs2nft"))
        (tmp_path / unit).write_text(text)
    p = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / "ipvsadm.service"),
                        str(tmp_path / "ipvs2nft.service")], capture_output=True, text=True)
    assert p.returncode == 0 and p.stderr == "", p.stderr


def test_units_as_the_package_installs_them():
    daemon = (UNITS / "ipvs2nft.service").read_text()
    assert "Type=notify\n" in daemon and "ExecStart=/usr/sbin/ipvs2nft daemon" in daemon
    assert "After=network.target nftables.service ipvsadm.service\n" in daemon
    assert "CapabilityBoundingSet=CAP_NET_ADMIN CAP_SYS_ADMIN\n" in daemon
    restore = (UNITS / "ipvsadm.service").read_text()
    assert "After=network.target nftables.service\n" in restore
    for name in ("ipvs2nft.ipvs2nft.service", "ipvs2nft.ipvsadm.service"):
        link = ROOT / "debian" / name
        assert link.resolve().parent == UNITS.resolve(), link
    assert os.access(BOOT, os.X_OK)


@pytest.fixture
def lab(tmp_path):
    lab = make_lab(tmp_path)
    etc = Path("/etc/netns") / lab.director
    try:
        yield lab, etc
    finally:
        lab.close()
        shutil.rmtree(etc, ignore_errors=True)


def boot(lab, action: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(lab.env(), IPVSADM=str(BIN / "ipvsadm"), IPVSADM_RESTORE=str(BIN / "ipvsadm-restore"))
    p = subprocess.run(["ip", "netns", "exec", lab.director, str(BOOT), action], capture_output=True,
                       text=True, env=env)
    if check:
        assert p.returncode == 0, p.stderr
    return p


@pytest.mark.netns
@pytest.mark.skipif(not (os.path.exists("/etc/ipvsadm.rules") and os.path.exists("/etc/default")),
                    reason="ip netns exec mounts over existing /etc files only (Debian's ipvsadm has them)")
def test_boot_script_as_debian_init_script(lab):
    lab, etc = lab
    (etc / "default").mkdir(parents=True)
    config = etc / "default" / "ipvsadm"
    rules = etc / "ipvsadm.rules"
    rules.write_text(f"# saved\n-A -t {VIP4}:80 -s rr\n-a -t {VIP4}:80 -r {rs4(0)}:80 -m\n")

    config.write_text('AUTO="false"\n')
    boot(lab, "start")
    assert lab.ipvsadm("-S -n").stdout == ""  # Debian's default: nothing restored
    config.write_text('AUTO="true"\nDAEMON="backup"\nIFACE="cli0"\nSYNCID="3"\n')
    boot(lab, "start")
    assert lab.ipvsadm("-S -n").stdout == f"-A -t {VIP4}:80 -s rr\n-a -t {VIP4}:80 -r {rs4(0)}:80 -m -w 1\n"
    assert "backup sync daemon (mcast=cli0, syncid=3" in lab.ipvsadm("-L --daemon").stdout
    assert lab.backends(VIP4, 80, 2) == [rs4(0), rs4(0)]
    lab.ipvsadm(f"-a -t {VIP4}:80 -r {rs4(1)}:80 -m")
    boot(lab, "reload")  # the rules file again, as Debian's reload
    assert rs4(1) not in lab.ipvsadm("-L -n").stdout
    lab.ipvsadm(f"-a -t {VIP4}:80 -r {rs4(1)}:80 -m")
    boot(lab, "stop")  # without SAVE_ON_STOP the file is kept
    assert rs4(1) not in rules.read_text()
    assert lab.ipvsadm("-S -n").stdout == "" and lab.ipvsadm("-L --daemon").stdout == ""

    config.write_text('AUTO="true"\nSAVE_ON_STOP="true"\n')
    boot(lab, "start")
    lab.ipvsadm(f"-a -t {VIP4}:80 -r {rs4(1)}:80 -m -w 2")
    boot(lab, "stop")
    assert rules.read_text() == (f"# ipvsadm.rules\n-A -t {VIP4}:80 -s rr\n"
                                 f"-a -t {VIP4}:80 -r {rs4(0)}:80 -m -w 1\n"
                                 f"-a -t {VIP4}:80 -r {rs4(1)}:80 -m -w 2\n")
    rules.write_text("-A -t 1.2.3.4:80 -s nosuch\n")
    failed = boot(lab, "start", check=False)
    assert failed.returncode == 1 and "not (fully) loaded" in failed.stderr
    assert boot(lab, "bogus", check=False).returncode == 2
