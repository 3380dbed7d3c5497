"""conntrackd's configuration for the started sync daemons (pure).

IPVS runs at most one master and one backup per network namespace, each on
its own multicast channel (interface, group, port).  conntrackd speaks with
its peer on one channel and does both jobs there: it sends the states of
the local connections that pass its filter, and it handles the states it
receives.  So one conntrackd runs per channel, and the roles started on
that channel decide its configuration:

* master: local connections pass the filter (below) and are sent;
* backup: received states go straight into the kernel's conntrack table
  (``DisableExternalCache``), so a takeover needs no ``conntrackd -c`` and
  the first packet after the floating addresses moved already finds its
  connection -- what an IPVS backup's table gives.  Without a backup role
  they stay in conntrackd's external cache, in user space, never committed.
  A backup also asks the peer for its whole table when it starts
  (``StartupResync``), as a backup started after its master must learn the
  connections that exist already;
* a channel with a backup role only sends nothing of its own: the filter
  accepts no protocol.

Mode FTFW, not NOTRACK: FTFW numbers its messages, acknowledges them and
resends what was lost (conntrackd.conf(5)), so a backup does not silently
keep a connection in SYN_SENT because the one message that said ESTABLISHED
was dropped; NOTRACK is best effort and would only repair that on an
explicit resync.  IPVS's own protocol is best effort but resends every
connection each 50 packets (sync_period), which FTFW's resend queue stands
in for.  FTFW is a two-peer protocol: one master/backup pair per channel.

The filter.  conntrackd cannot match conntrack marks (its filters are
protocol, address and TCP state; an address matches the original source or
the reply source, conntrack-tools ``src/filter.c``), so "the connections of
our services" cannot be said exactly.  A masqueraded connection's reply
source is its real server, so the filter accepts TCP, UDP and SCTP
connections with a masquerading real server's address at either end.  That
also lets through the host's own connections with those servers (a health
checker's) and any other connection that starts or ends at a real server
address (compat-matrix.md, sync row).  Direct routing, tunnelling and local
real servers leave no conntrack state worth sending: their addresses are
not in the filter (``ipvs2nft.sync.sets`` carries direct routing's flows).

Options IPVS has and conntrackd has not: ``--syncid`` (conntrackd messages
carry no id: two clusters on one link need their own group or port),
``--mcast-ttl`` (conntrackd leaves the multicast TTL at 1, IPVS's default),
``--sync-maxlen`` (conntrackd sizes its own messages).  The set replication
uses all three.  They are kept and listed as IPVS lists them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ipvs2nft.model import Forward, SyncDaemon, Table
from ipvs2nft.netaddr import AF_INET6

PROTOCOLS = ("TCP", "UDP", "SCTP")
SOCKET_BUFFER = 1249280  # conntrackd.conf(5)'s example for a busy firewall
NETLINK_BUFFER = 2097152
NETLINK_BUFFER_MAX = 8388608


@dataclass(frozen=True)
class Channel:
    """Where a pair of sync daemons talk: one conntrackd each."""

    ifname: str
    af: int
    group: str
    port: int

    @property
    def name(self) -> str:
        """A directory name (interface names have no ``/``)."""
        return f"{self.ifname}_{self.group}_{self.port}".replace(":", "-")


@dataclass(frozen=True)
class Instance:
    """One conntrackd: its channel and the roles started on it."""

    channel: Channel
    master: bool = False
    backup: bool = False
    send_id: int = 0  # the master's --syncid
    accept_id: int = 0  # the backup's (0: any, as IPVS)
    maxlen: int = 1472  # the master's message size
    ttl: int = 1  # the master's multicast TTL


def instances(daemons: tuple[SyncDaemon, ...]) -> list[Instance]:
    """The conntrackd instances the started daemons need, one per channel."""
    found: dict[Channel, Instance] = {}
    for d in daemons:
        ch = Channel(d.mcast_ifn, d.mcast_af, d.mcast_group, d.mcast_port)
        was = found.get(ch, Instance(ch))
        if d.state == "master":
            found[ch] = replace(was, master=True, send_id=d.syncid, maxlen=d.sync_maxlen or was.maxlen,
                                ttl=d.mcast_ttl or 1)
        else:
            found[ch] = replace(was, backup=True, accept_id=d.syncid)
    return list(found.values())


def real_servers(table: Table) -> list[str]:
    """The addresses the filter accepts: every masquerading real server."""
    seen = {str(d.addr) for s in table.services for d in s.dests if d.fwd is Forward.MASQ}
    return sorted(seen)


def render(inst: Instance, table: Table, where: Path, interface_address: str | None,
           hash_limit: int) -> str:
    """conntrackd.conf for ``inst``; its lock file, UNIX socket and log in ``where``."""
    ch = inst.channel
    v6 = ch.af == AF_INET6
    fam = "IPv6" if v6 else "IPv4"
    source = interface_address or ("::" if v6 else "0.0.0.0")  # the interface, by one of its addresses
    lines = ["Sync {",
             "\tMode FTFW {",
             f"\t\tDisableExternalCache {'yes' if inst.backup else 'no'}",
             f"\t\tStartupResync {'yes' if inst.backup else 'no'}",
             "\t}",
             "\tMulticast {",
             f"\t\t{fam}_address {ch.group}",
             f"\t\tGroup {ch.port}",
             f"\t\t{fam}_interface {source}",
             f"\t\tInterface {ch.ifname}",
             f"\t\tSndSocketBuffer {SOCKET_BUFFER}",
             f"\t\tRcvSocketBuffer {SOCKET_BUFFER}",
             "\t\tChecksum on",
             "\t}",
             "}",
             "General {",
             "\tSystemd no",
             "\tHashSize 32768",
             f"\tHashLimit {hash_limit}",
             f"\tLogFile {where / 'conntrackd.log'}",
             "\tSyslog off",
             f"\tLockFile {where / 'lock'}",
             f"\tUNIX {{ Path {where / 'ctl'} }}",
             f"\tNetlinkBufferSize {NETLINK_BUFFER}",
             f"\tNetlinkBufferSizeMaxGrowth {NETLINK_BUFFER_MAX}",
             "\tFilter From Userspace {",
             *_filter(inst, table),
             "\t}",
             "}"]
    return "\n".join(lines) + "\n"


def _filter(inst: Instance, table: Table) -> list[str]:
    servers = real_servers(table) if inst.master else []
    if not servers:  # nothing of ours to send: no protocol passes
        return ["\t\tProtocol Accept { }"]
    addrs = [f"\t\t\t{'IPv6' if ':' in a else 'IPv4'}_address {a}" for a in servers]
    return [f"\t\tProtocol Accept {{ {' '.join(PROTOCOLS)} }}",
            "\t\tAddress Accept {", *addrs, "\t\t}"]
