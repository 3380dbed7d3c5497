"""Shared fixtures: a private state file per test, and the namespace lab."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from ipvs2nft.lab import Lab, unique_prefix


def _can_netns() -> str | None:
    """Why namespace tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    try:
        import nftables  # noqa: F401
    except ImportError:
        return "needs python3-nftables"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if probe.returncode != 0:
        return "cannot create network namespaces"
    return None


NETNS_SKIP = _can_netns()


@pytest.fixture
def state(tmp_path, monkeypatch):
    """A private store for in-process CLI calls."""
    monkeypatch.setenv("IPVS2NFT_STATE", str(tmp_path / "state.json"))
    monkeypatch.setenv("IPVS2NFT_BACKEND", "none")
    return tmp_path


def make_lab(tmp_path, **kw) -> Lab:
    if NETNS_SKIP:
        pytest.skip(NETNS_SKIP)
    return Lab(unique_prefix(), state_dir=tmp_path, **kw).build()


@pytest.fixture
def lab(tmp_path):
    """A built lab (3 real servers), removed afterwards even on failure."""
    lab = make_lab(tmp_path)
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture
def lab4(tmp_path):
    lab = make_lab(tmp_path, servers=4)
    try:
        yield lab
    finally:
        lab.close()


def _host_ruleset() -> str | None:
    if os.geteuid() != 0 or shutil.which("nft") is None:
        return None
    p = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True)
    return p.stdout if p.returncode == 0 else None


@pytest.fixture(scope="session", autouse=True)
def host_ruleset_untouched():
    """Tests work in namespaces they make; the host's own ruleset must be the
    same after the whole run as before it."""
    before = _host_ruleset()
    yield
    after = _host_ruleset()
    assert after == before, "a test changed the host's nftables ruleset"
