"""The kernel's nftables ruleset generation id.

Every committed nftables transaction, from anyone, increments it.  Reading
it costs one netlink round trip (NFT_MSG_GETGEN), so each ipvsadm command can
tell whether the ruleset changed at all since ipvs2nft last looked -- and
only then spend a full listing to check that our tables were not edited.
libnftables does not expose it, hence this small client.
"""

from __future__ import annotations

import os
import socket
import struct

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETGEN = 16
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
NFTA_GEN_ID = 1


def ruleset_genid() -> int | None:
    """The current generation id, or None if it cannot be read."""
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as s:
            s.settimeout(2)
            msg_type = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN
            body = struct.pack("=BBH", socket.AF_UNSPEC, 0, 0)  # struct nfgenmsg
            header = struct.pack("=IHHII", 16 + len(body), msg_type, NLM_F_REQUEST, 1, os.getpid())
            s.send(header + body)
            data = s.recv(65536)
    except OSError:
        return None
    if len(data) < 20:
        return None
    length, kind = struct.unpack_from("=IH", data, 0)
    if kind == NLMSG_ERROR:
        return None
    pos = 16 + 4  # nlmsghdr + nfgenmsg
    while pos + 4 <= min(length, len(data)):
        alen, atype = struct.unpack_from("=HH", data, pos)
        if alen < 4:
            break
        if atype & 0x3FFF == NFTA_GEN_ID and alen >= 8:
            return struct.unpack_from(">I", data, pos + 4)[0]
        pos += (alen + 3) & ~3
    return None
