"""Tunnel devices for ``-i`` real servers.

nftables cannot encapsulate.  Each tunnelled real server gets a
point-to-point device named ``i2n<rid>`` (ipip, gre, gue or ip6tnl, with
the checksum options of ``--tun-*``); ``dup ... device "i2n<rid>"`` in the
direct table sends packets into it.  The devices must exist before the
nftables transaction that refers to them, and go after the one that
stops referring to them.  iproute2 does the work.
"""

from __future__ import annotations

from ipvs2nft.errors import BackendError
from ipvs2nft.model import TUN_CSUM, TUN_REMCSUM, Dest, TunType
from ipvs2nft.netaddr import AF_INET6
from ipvs2nft.nft.direct import tunnel_device

if False:  # typing.TYPE_CHECKING
    import subprocess

PREFIX = "i2n"


def link_args(dest: Dest) -> list[str]:
    """``ip link add`` arguments for the device of a tunnelled server."""
    name, remote = tunnel_device(dest), str(dest.addr)
    if dest.af == AF_INET6:
        kind = "ip6gre" if dest.tun_type is TunType.GRE else "ip6tnl"
        args = ["type", kind, "remote", remote] + ([] if kind == "ip6gre" else ["mode", "any"])
    elif dest.tun_type is TunType.GRE:
        args = ["type", "gre", "remote", remote] + (["csum"] if dest.tun_flags == TUN_CSUM else [])
    else:
        args = ["type", "ipip", "remote", remote]
        if dest.tun_type is TunType.GUE:
            args += ["encap", "gue", "encap-sport", "auto", "encap-dport", str(dest.tun_port),
                     "encap-csum" if dest.tun_flags == TUN_CSUM else "noencap-csum"]
            if dest.tun_flags == TUN_REMCSUM:
                args.append("encap-remcsum")
    return ["link", "add", name] + args


def script_lines(dests: dict[str, Dest]) -> list[str]:
    """What an operator runs before ``nft -f`` of a translated script."""
    return [f"ip {' '.join(link_args(d))} && ip link set {name} up" for name, d in dests.items()]


def _ip(args: list[str]) -> subprocess.CompletedProcess:
    import subprocess  # imported here: most commands never look at tunnel devices

    return subprocess.run(["ip", *args], capture_output=True, text=True)


def existing() -> set[str]:
    p = _ip(["-o", "link", "show"])
    names = set()
    for line in p.stdout.splitlines():
        parts = line.split(": ", 2)
        if len(parts) > 1:
            names.add(parts[1].split("@", 1)[0])
    return {n for n in names if n.startswith(PREFIX)}


# What iproute2 says when the kernel has no driver for the link type.
UNSUPPORTED = ("Unknown device type", "Operation not supported", "not supported")


def ensure(wanted: dict[str, Dest]) -> list[str]:
    """Create the missing devices; returns the names created (to undo).

    A device this kernel cannot make at all (no ipip, gre or fou driver) is
    left out: the back end finds it missing (``existing``, in
    ``NftBackend._absent``) and keeps that real server out of scheduling.
    Any other failure raises."""
    have = existing() if wanted else set()
    created = []
    for name, dest in wanted.items():
        if name in have:
            continue
        p = _ip(link_args(dest))
        if p.returncode == 0:
            p = _ip(["link", "set", name, "up"])
        if p.returncode != 0:
            reason = (p.stderr.strip().splitlines() or ["failed"])[-1]
            if any(text in reason for text in UNSUPPORTED):
                continue
            remove(created)
            raise BackendError(f"ipvs2nft: cannot create the tunnel device {name} for {dest.addr} "
                               f"({reason})")
        created.append(name)
    return created


def remove(names) -> None:
    for name in names:
        _ip(["link", "del", name])
