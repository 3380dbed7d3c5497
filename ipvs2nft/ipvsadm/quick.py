"""The lines ``ipvsadm -S`` writes, read without the popt emulation.

ipvsadm-restore of 10,000 services reads 50,000 lines such as
``-a -t 192.168.0.40:80 -r 192.168.100.10:80 -m -w 1``, and the full
parser (``cmdline.parse``: popt, the option matrix, a Command) costs tens
of microseconds each.  ``mutation`` knows the few shapes of ``-A``/``-a``
that ipvsadm-save writes for IPv4 TCP and UDP services, in which only the
values can be wrong, checks those values with the parser's own helpers,
and returns what ``cmdline.parse`` + ``apply.mutation`` return for the
line; anything else, or any value they would refuse, is None and goes the
full way, which gives ipvsadm's message.  tests/test_parse_fastpath.py
compares both on generated lines.

``Lines`` carries such lines out on a ``-R``/restore batch: a service's
servers are gathered and put into the table at once (IPVS's rules checked
for each as ``ipvs.add_dest`` checks them), instead of a new copy of the
service per line.  A line it cannot be sure of goes the full way, after
what was gathered is in the table.
"""

from __future__ import annotations

import functools

from ipvs2nft import ipvs, sched
from ipvs2nft.ipvsadm.apply import Change
from ipvs2nft.ipvsadm.cmdline import MAX_WEIGHT
from ipvs2nft.model import (
    F_PERSISTENT,
    MAX_TIMEOUT,
    NETMASK_V4_HOST,
    NO_SCHEDULER,
    SCHEDULERS,
    Dest,
    Forward,
    Service,
    ServiceKey,
)
from ipvs2nft.netaddr import AF_INET, IPPROTO_TCP, IPPROTO_UDP, parse_service, string_to_number

_PROTOCOL = {"-t": IPPROTO_TCP, "-u": IPPROTO_UDP}
_FORWARD = {"-m": Forward.MASQ, "-g": Forward.ROUTE}


def mutation(words: list[str]) -> tuple[list[ServiceKey], Change] | None:
    """(the service touched, the change) for a save-shaped -A or -a line, else None."""
    parts = _parts(words)
    if parts is None:
        return None
    if parts[0] == "-A":
        svc = parts[1]
        return [svc.key], lambda t: ipvs.add_service(t, svc)
    _, key, dest = parts
    return [key], lambda t: ipvs.add_dest(t, key, dest)


def _parts(words: list[str]) -> tuple | None:
    """("-A", Service) or ("-a", ServiceKey, Dest) for a save-shaped line."""
    n = len(words)
    if n == 8 and words[0] == "-a":
        return _add_server(words)
    if (n == 5 or n == 7) and words[0] == "-A":
        return _add_service(words)
    return None


class Lines:
    """Save-shaped lines carried out on a batch session's table."""

    def __init__(self, session) -> None:
        self.session = session
        self.svc: Service | None = None  # the service whose servers are being gathered
        self.added: list[Dest] = []  # in the order of the lines
        self.keys: set = set()
        self.usable: dict = {}  # ipvs.dest_address_usable per address, for this batch

    def take(self, words: list[str]) -> bool:
        """Carry out ``words`` if it is a save-shaped line that cannot fail
        here; else False, with the table as the full way expects it."""
        parts = _parts(words)
        if parts is None:
            self.flush()
            return False
        if parts[0] == "-A":
            self.flush()
            return self._service(parts[1])
        return self._server(parts[1], parts[2])

    def _service(self, svc: Service) -> bool:
        table = self.session.table
        known = svc.scheduler == NO_SCHEDULER or svc.scheduler in SCHEDULERS
        if table.find(svc.key) is not None or not known:
            return False  # ipvs.add_service says why
        table.put(Service(svc.af, svc.protocol, svc.addr, svc.port, 0, svc.scheduler, svc.flags,
                          svc.timeout, svc.netmask, "", (), 0, sched.on_init(svc)))
        return True

    def _server(self, key: ServiceKey, dest: Dest) -> bool:
        svc = self.svc
        if svc is None or svc.key != key:
            self.flush()
            svc = self.session.table.find(key)
            # wrr's state follows each addition; a stored service is observed first (the full way)
            if svc is None or svc.sid or svc.scheduler == "wrr":
                return False
            self.svc = svc
            self.session.observed.add(key)
        usable = self.usable.get(dest.addr)
        if usable is None:
            usable = self.usable[dest.addr] = ipvs.dest_address_usable(dest.addr)
        if not usable or dest.key in self.keys or svc.find_dest(dest.key) is not None:
            self.flush()
            return False  # ipvs.add_dest says why
        self.added.append(dest)
        self.keys.add(dest.key)
        return True

    def flush(self) -> None:
        """Put the gathered servers into the table (newest first, as the kernel lists them)."""
        svc = self.svc
        if svc is not None and self.added:
            self.added.reverse()
            self.session.table.put(Service(svc.af, svc.protocol, svc.addr, svc.port, svc.fwmark,
                                           svc.scheduler, svc.flags, svc.timeout, svc.netmask, svc.pe_name,
                                           tuple(self.added) + svc.dests, svc.sid, svc.sched, svc.plan))
        self.svc, self.added, self.keys = None, [], set()


@functools.lru_cache(maxsize=1 << 16)
def _endpoint(text: str, protocol: int):
    """parse_service, once per text: a service's address comes back with each of its servers."""
    return parse_service(text, protocol)


def _virtual(flag: str, text: str):
    """(protocol, address, port) of ``-t``/``-u ADDR:PORT`` (IPv4), or None."""
    protocol = _PROTOCOL.get(flag)
    if protocol is None:
        return None
    parsed = _endpoint(text, protocol)
    if parsed is None or parsed.af != AF_INET or parsed.port is None:
        return None
    return protocol, parsed.addr, parsed.port


def _add_service(words: list[str]) -> tuple | None:
    # -A -t VIP:PORT -s SCHED [-p TIMEOUT]
    if words[3] != "-s" or words[4][:1] in ("-", ""):
        return None
    found = _virtual(words[1], words[2])
    if found is None:
        return None
    protocol, addr, port = found
    flags = timeout = 0
    if len(words) == 7:
        if words[5] != "-p":
            return None
        timeout = string_to_number(words[6], 1, MAX_TIMEOUT)
        if timeout is None or words[6][:1] == "-":
            return None
        flags = F_PERSISTENT
    elif not port:
        return None  # "Zero port specified for non-persistent service"
    return "-A", Service(AF_INET, protocol, addr, port, 0, words[4][:15], flags, timeout, NETMASK_V4_HOST, "")


def _add_server(words: list[str]) -> tuple | None:
    # -a -t VIP:PORT -r RS:PORT -m|-g -w WEIGHT
    fwd = _FORWARD.get(words[5])
    if words[3] != "-r" or words[6] != "-w" or fwd is None or words[4][:1] in ("-", ""):
        return None
    found = _virtual(words[1], words[2])
    if found is None:
        return None
    protocol, addr, port = found
    real = _endpoint(words[4], protocol)
    weight = string_to_number(words[7], 0, MAX_WEIGHT)
    if real is None or real.af != AF_INET or weight is None or words[7][:1] == "-":
        return None
    # the service's port when none is given, and always for direct routing (cmdline._check_command)
    dest_port = port if real.port is None or fwd is Forward.ROUTE else real.port
    return "-a", ServiceKey(AF_INET, 0, protocol, addr, port), Dest(real.addr, dest_port, fwd, weight)
