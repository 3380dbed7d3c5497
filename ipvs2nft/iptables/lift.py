"""The load-balancing idioms of an iptables ruleset, lifted into Services.

Two idioms (the seed talk, slides 19-28):

* **cascade**: in nat PREROUTING, rules with the same match (destination,
  protocol, ports, or a packet mark) whose targets are ``DNAT`` to one
  backend each, chosen by ``-m statistic`` (nth or random) and/or a final
  catch-all.  First match wins.  -> one service, scheduler ``iptables-nth``
  or ``iptables-random``.
* **mark**: in mangle PREROUTING, ``MARK`` rules with the same match set
  mark k, by ``-m statistic --mode random`` (last match wins) and, for
  persistence, by ``-m recent --rcheck --seconds S`` on list L_k; in nat
  PREROUTING ``-m mark --mark k -j DNAT`` to backend k, with ``-m recent
  --name L_k --set``.  -> one service (``iptables-random``), persistent for
  S seconds when the recent lists are complete.

Safety first: a cascade is lifted only when no other rule of the chain can
act on its traffic (nft runs our table after the translated ``ip nat``
table, so any such rule would change order).  Otherwise its rules are
translated one by one, which iptables-translate does faithfully, and a note
says why.

The service identity follows the match: one address, protocol and port
give an address service (``-A -t VIP:port``); ``-m mark --mark k`` gives
fwmark service k (the user's own MARK rules set it); anything else
(multiport, subnets, interfaces) gives a fwmark service whose mark this
translator sets in its own table ``ipvs2nft_iptables`` (``Marking``).
"""

from __future__ import annotations

import ipaddress
import math
import socket
from dataclasses import dataclass, field, replace
from fractions import Fraction

from ipvs2nft.iptables import shares as sh
from ipvs2nft.iptables.parse import decimal
from ipvs2nft.iptables.rules import HARMLESS, Chain, Rule, Ruleset
from ipvs2nft.model import F_PERSISTENT, Dest, Forward, Plan, Service
from ipvs2nft.netaddr import AF_INET, AF_INET6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP
from ipvs2nft.sched import MAX_SLOTS

L4 = {"tcp": IPPROTO_TCP, "udp": IPPROTO_UDP, "sctp": IPPROTO_SCTP}
# The schedulers of lifted services: names only (listings, --to ipvsadm); the
# slot table is the service's Plan (model.py).
NTH = "iptables-nth"
RANDOM = "iptables-random"
PROTO_NAMES = {"tcp": "tcp", "6": "tcp", "udp": "udp", "17": "udp", "sctp": "sctp",
               "132": "sctp", "icmp": "icmp", "1": "icmp", "icmpv6": "icmpv6",
               "ipv6-icmp": "icmpv6", "58": "icmpv6", "all": None, "0": None}
FULL = 0xFFFFFFFF
RANDOM_TOLERANCE = Fraction(1, 10000)  # slot rounding below 0.01% of traffic is exact enough

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


# ---------------------------------------------------------------- what a rule matches

@dataclass(frozen=True)
class Key:
    """The traffic a rule selects, in the terms a service can carry.

    ``extra`` lists conditions that cannot be carried (then the rule is not
    liftable); negated conditions go there too and are left out of the
    fields, so ``overlap`` stays conservative (a key is never narrower than
    the rule).
    """

    family: int
    dst: IPNetwork | None = None
    src: IPNetwork | None = None
    proto: str | None = None
    dports: tuple[tuple[int, int], ...] | None = None
    iface: str | None = None
    mark: int | None = None
    extra: tuple[str, ...] = ()

    @property
    def liftable(self) -> bool:
        return not self.extra

    @property
    def simple(self) -> bool:
        """One address, tcp/udp/sctp, one port: an IPVS address service."""
        return (self.liftable and self.dst is not None and self.dst.num_addresses == 1
                and self.proto in L4 and self.dports is not None and len(self.dports) == 1
                and self.dports[0][0] == self.dports[0][1] and self.src is None
                and self.iface is None and self.mark is None)

    @property
    def marked(self) -> bool:
        """``-m mark --mark k`` and at most a protocol: IPVS fwmark service k."""
        return (self.liftable and self.mark is not None and self.dst is None
                and self.src is None and self.dports is None and self.iface is None)


def _network(text: str) -> IPNetwork | None:
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        return None


def _port(text: str, proto: str | None) -> int | None:
    if text.isascii() and text.isdigit():
        value = decimal(text)
        return value if value is not None and value <= 65535 else None
    try:
        return socket.getservbyname(text, proto or "tcp")
    except OSError:
        return None


def parse_ports(text: str, proto: str | None) -> tuple[tuple[int, int], ...] | None:
    """``80``, ``80:90``, ``80,443,8000:8080`` (multiport) -> ranges."""
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition(":")
        a = _port(lo, proto) if lo else 0
        b = _port(hi, proto) if hi else (a if not _ else 65535)
        if a is None or b is None or a > b:
            return None
        out.append((a, b))
    return tuple(sorted(set(out)))


def parse_mark(text: str) -> tuple[int, int] | None:
    """``v`` or ``v/m`` -> (value, mask)."""
    value, _, mask = text.partition("/")
    try:
        return int(value, 0), int(mask, 0) if mask else FULL
    except ValueError:
        return None


def _ignorable(module: str, m) -> bool:
    if module in ("statistic", "recent", "comment"):
        return True
    if module in ("state", "conntrack"):
        # nat chains only ever see the first packet of a connection, and
        # every idiom here acts on that packet alone.
        opt = m.get("state") or m.get("ctstate")
        return len(m.opts) == 1 and opt is not None and not opt.neg and opt.value.upper() == "NEW"
    return False


def key_of(rule: Rule, before: str | None = None) -> Key:
    """The rule's Key; with ``before``, only the header and the matches
    loaded before that module (what a statistic match gets to see)."""
    extra: list[str] = []
    fields: dict = {}
    for o in rule.header:
        if o.neg or o.name in ("o", "f"):
            extra.append(("! " if o.neg else "") + "-" + o.name)
            continue
        if o.name in ("d", "s"):
            net = _network(o.value)
            if net is None or "," in o.value:
                extra.append(f"-{o.name} {o.value}")
            else:
                fields["dst" if o.name == "d" else "src"] = net
        elif o.name == "p":
            if o.value not in PROTO_NAMES:
                extra.append(f"-p {o.value}")
            else:
                fields["proto"] = PROTO_NAMES[o.value]
        elif o.name == "i":
            fields["iface"] = o.value
    for m in rule.matches:
        if before is not None and m.module == before:
            break
        if _ignorable(m.module, m):
            continue
        _match_fields(m, fields, extra)
    return Key(rule.family, extra=tuple(extra), **fields)


def _match_fields(m, fields: dict, extra: list[str]) -> None:
    if m.module in ("tcp", "udp", "sctp", "multiport"):
        for o in m.opts:
            ports = parse_ports(o.value, fields.get("proto")) if o.name in ("dport", "dports") else None
            if o.neg or ports is None or "dports" in fields:
                extra.append(f"{m.module} --{o.name}")
            else:
                fields["dports"] = ports
        return
    if m.module == "mark":
        o = m.get("mark")
        mark = parse_mark(o.value) if o is not None else None
        if o is None or o.neg or mark is None or mark[1] != FULL or len(m.opts) != 1:
            extra.append("mark")
        else:
            fields["mark"] = mark[0]
        return
    extra.append(m.module)


def overlap(a: Key, b: Key) -> bool:
    """Can one packet match both?  (True unless provably not.)"""
    if a.family != b.family:
        return False
    for x, y in ((a.dst, b.dst), (a.src, b.src)):
        if x is not None and y is not None and not x.overlaps(y):
            return False
    if a.proto and b.proto and a.proto != b.proto:
        return False
    if a.dports is not None and b.dports is not None and \
            not any(lo <= y_hi and y_lo <= hi for lo, hi in a.dports for y_lo, y_hi in b.dports):
        return False
    if a.mark is not None and b.mark is not None and a.mark != b.mark:
        return False
    if a.iface and b.iface and "+" not in a.iface + b.iface and a.iface != b.iface:
        return False
    return True


# ---------------------------------------------------------------- text forms of a key

def _ports_text(ports: tuple[tuple[int, int], ...], sep: str, rng: str) -> str:
    return sep.join(str(lo) if lo == hi else f"{lo}{rng}{hi}" for lo, hi in ports)


def _addr_text(net: IPNetwork) -> str:
    return str(net.network_address) if net.num_addresses == 1 else str(net)


def nft_matches(key: Key) -> str:
    """The key as nft match expressions."""
    ip = "ip6" if key.family == 6 else "ip"
    out = []
    if key.iface:
        out.append(f'iifname "{key.iface.replace("+", "*")}"')
    if key.src is not None:
        out.append(f"{ip} saddr {_addr_text(key.src)}")
    if key.dst is not None:
        out.append(f"{ip} daddr {_addr_text(key.dst)}")
    if key.dports is not None:
        ports = _ports_text(key.dports, ", ", "-")
        many = len(key.dports) > 1 or key.dports[0][0] != key.dports[0][1]
        out.append(f"{key.proto} dport " + (f"{{ {ports} }}" if many and len(key.dports) > 1 else ports))
    elif key.proto:
        out.append(f"meta l4proto {key.proto}")
    if key.mark is not None:
        out.append(f"meta mark {key.mark:#x}")
    return " ".join(out)


def iptables_words(key: Key) -> str:
    """The key as iptables options (for ``--to ipvsadm`` advice)."""
    out = []
    if key.iface:
        out.append(f"-i {key.iface}")
    if key.src is not None:
        out.append(f"-s {key.src}")
    if key.dst is not None:
        out.append(f"-d {key.dst}")
    if key.proto:
        out.append(f"-p {key.proto}")
    if key.dports is not None:
        if len(key.dports) == 1:
            out.append(f"--dport {_ports_text(key.dports, ',', ':')}")
        else:
            out.append(f"-m multiport --dports {_ports_text(key.dports, ',', ':')}")
    if key.mark is not None:
        out.append(f"-m mark --mark {key.mark:#x}")
    return " ".join(out)


def describe(key: Key, fwmark: int = 0) -> str:
    """TCP 192.168.0.40:80, FWM 1, or the match and the mark we give it."""
    if key.simple:
        addr = key.dst.network_address
        host = f"[{addr}]" if key.family == 6 else str(addr)
        return f"{key.proto.upper()} {host}:{key.dports[0][0]}"
    if key.marked:
        return f"FWM {key.mark}" + (" IPv6" if key.family == 6 else "")
    text = nft_matches(key)
    return f"FWM {fwmark} ({text})" if fwmark else text


# ---------------------------------------------------------------- backends

@dataclass(frozen=True)
class Backend:
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int  # 0: keep the packet's port

    def __str__(self) -> str:
        host = f"[{self.addr}]" if self.addr.version == 6 and self.port else str(self.addr)
        return f"{host}:{self.port}" if self.port else host


def backend_of(rule: Rule) -> Backend | None:
    """The one address (and port) of a DNAT; None for ranges and lists."""
    tos = [o for o in rule.target_opts if o.name == "to-destination"]
    if rule.target != "DNAT" or len(tos) != 1 or \
            any(o.name not in ("to-destination", "persistent", "random") for o in rule.target_opts):
        return None
    text = tos[0].value
    port = ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host = text
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return None
    number = decimal(port) if port else 0
    if (addr.version == 6) != (rule.family == 6) or number is None or number > 65535:
        return None
    return Backend(addr, number)


# ---------------------------------------------------------------- results

@dataclass
class Lifted:
    """One service made from rules, and everything said about it."""

    service: Service  # its Plan is the cascade's slot table
    key: Key
    label: str
    rules: list[Rule]
    summary: str
    marking: bool = False  # this translator must set service.fwmark itself
    suggestion: str = ""
    analysis: sh.Analysis | None = None
    steps: list[sh.Step] = field(default_factory=list)  # the cascade, in rule order
    period: list | None = None  # nth: backend (None = not NATed) per connection


@dataclass
class LiftResult:
    lifted: list[Lifted] = field(default_factory=list)
    consumed: set[int] = field(default_factory=set)
    findings: list[tuple[int, str]] = field(default_factory=list)
    notes: list[tuple[int, str]] = field(default_factory=list)
    approximated: int = 0  # findings where the translation may behave differently


class _Marks:
    """Free mark values for the services this translator marks itself."""

    def __init__(self, ruleset: Ruleset) -> None:
        self.used: set[int] = set()
        for r in ruleset.rules():
            for o in list(r.target_opts) + [o for m in r.matches for o in m.opts]:
                if o.name in ("mark", "set-mark", "set-xmark", "or-mark", "xor-mark"):
                    v = parse_mark(o.value)
                    if v:
                        self.used.add(v[0])

    def take(self) -> int:
        n = 1
        while n in self.used:
            n += 1
        self.used.add(n)
        return n


# ---------------------------------------------------------------- shared helpers

def _lines(rules: list[Rule]) -> str:
    nums = sorted({r.line for r in rules})
    return f"line {nums[0]}" if len(nums) == 1 else "lines " + ", ".join(map(str, nums))


def _affects(rule: Rule, key: Key, marks: set[int] | None = None) -> bool:
    """Can ``rule`` act on the traffic of ``key`` (carrying one of ``marks``)?"""
    k = key_of(rule)
    if marks is not None and k.mark is not None and k.mark not in marks:
        return False
    return overlap(k, key) and rule.target not in HARMLESS


def _service(key: Key, scheduler: str, dests: list[tuple[Backend, int]], marks: _Marks,
             ) -> tuple[Service, bool]:
    """(service without ids, whether we set its mark ourselves)."""
    af = AF_INET6 if key.family == 6 else AF_INET
    if key.simple:
        port = key.dports[0][0]
        ds = tuple(Dest(b.addr, b.port, Forward.MASQ, w) for b, w in dests)
        return Service(af, L4[key.proto], key.dst.network_address, port, 0, scheduler, dests=ds), False
    fwmark, ours = (key.mark, False) if key.marked else (marks.take(), True)
    ds = tuple(Dest(b.addr, b.port, Forward.MASQ, w) for b, w in dests)
    return Service(af, IPPROTO_TCP, None, 0, fwmark, scheduler, dests=ds), ours


def _dest_key(svc: Service, b: Backend | None) -> tuple | None:
    if b is None:
        return None
    for d in svc.dests:
        if d.addr == b.addr and d.port == b.port:
            return d.key
    raise AssertionError(b)


def _normalised(key: Key, steps: list[sh.Step]) -> list[sh.Step]:
    """An address service's backends without a port keep the service port."""
    if not key.simple:
        return steps
    port = key.dports[0][0]
    return [replace(s, dest=Backend(s.dest.addr, s.dest.port or port)) for s in steps]


def random_table(by_dest: dict, order: list) -> tuple[list, bool, str]:
    """Slots for shares (None: not NATed): the smallest table within
    RANDOM_TOLERANCE of every share, else MAX_SLOTS slots (approximate)."""
    keys = [k for k in order if by_dest.get(k, 0) > 0]
    for n in range(1, MAX_SLOTS + 1):
        counts = sh.apportion({k: by_dest[k] for k in keys}, n)
        if all(abs(Fraction(counts.get(k, 0), n) - by_dest[k]) <= RANDOM_TOLERANCE for k in keys):
            break
    exact = all(abs(Fraction(counts.get(k, 0), n) - by_dest[k]) <= RANDOM_TOLERANCE for k in keys)
    note = "" if exact else f"shares rounded to 1/{n} (iptables has 1/2^31)"
    return [k for k in keys for _ in range(counts.get(k, 0))], exact, note


def _weights(table: list) -> dict:
    counts: dict = {}
    for b in table:
        if b is not None:
            counts[b] = counts.get(b, 0) + 1
    g = 0
    for v in counts.values():
        g = math.gcd(g, v)
    return {b: v // (g or 1) for b, v in counts.items()}


def _share_text(by_dest: dict, leftover: Fraction) -> str:
    parts = [f"{b} {sh.pct(x)}" for b, x in by_dest.items() if b is not None and x > 0]
    if leftover > 0:
        parts.append(f"not NATed {sh.pct(leftover)}")
    return ", ".join(parts)


def _suggestion(key: Key, label: str, steps: list[sh.Step], analysis: sh.Analysis,
                nth: bool, override: bool) -> str:
    """The map the author probably meant, in nft and in iptables terms."""
    intended = sh.by_dest(steps, analysis.intended)
    ip = "ip6" if key.family == 6 else "ip"
    ports = {b.port for b in intended}
    typed = any(ports) and len(intended) > 0
    value = (lambda b: f"{b.addr} . {b.port or key.dports[0][0]}") if typed and key.simple else \
        (lambda b: str(b.addr) + (f" . {b.port}" if typed else ""))
    head = f"dnat {ip} addr . port to" if typed else "dnat to"
    order = _nth_intended_order(steps, analysis.intended) if nth else None
    if order is not None:
        elements = ", ".join(f"{i} : {value(b)}" for i, b in enumerate(order))
        rule = f"{nft_matches(key)} {head} numgen inc mod {len(order)} map {{ {elements} }}"
    else:  # weighted: contiguous blocks, as on slide 23 (and nftlb's weights)
        weights = sh.small_weights(intended)
        pos, elements = 0, []
        for b, w in weights.items():
            span = f"{pos}" if w == 1 else f"{pos}-{pos + w - 1}"
            elements.append(f"{span} : {value(b)}")
            pos += w
        gen = "inc" if nth else "random"
        rule = f"{nft_matches(key)} {head} numgen {gen} mod {pos} map {{ {', '.join(elements)} }}"
    fix = _iptables_fix(steps, analysis.intended, nth, override)
    return f"{label} as probably meant ({analysis.how}): {rule}; in iptables: {fix}"


def _nth_intended_order(steps: list[sh.Step], intended: list[Fraction]) -> list | None:
    """Round robin order when every backend gets one turn (``--packet``
    order when all rules share one ``--every``); None for weighted shares."""
    everies = {s.every for s in steps if s.mode == "nth"}
    packets = [s.packet for s in steps if s.mode == "nth"]
    if len(everies) == 1 and len(packets) == len(steps) == next(iter(everies)) \
            and len(set(packets)) == len(packets):
        return [s.dest for s in sorted(steps, key=lambda s: s.packet)]
    weights = sh.small_weights(sh.by_dest(steps, intended))
    return list(weights) if set(weights.values()) == {1} else None


def _iptables_fix(steps: list[sh.Step], intended: list[Fraction], nth: bool, override: bool) -> str:
    probs = sh.conditional_probabilities(intended, override)
    parts = []
    for s, p in zip(steps, probs, strict=True):
        if p is None or p == 1:
            parts.append(f"line {s.line} without -m statistic")
        elif nth and p.numerator == 1:
            parts.append(f"line {s.line} --every {p.denominator} --packet 0")
        else:
            parts.append(f"line {s.line} --mode random --probability {float(p):.6g}")
    return ", ".join(parts)


# ---------------------------------------------------------------- idiom 1: cascades

def statistic_step(rule: Rule, backend) -> sh.Step | None:
    """The rule as a cascade step to ``backend``: its ``-m statistic`` test
    (none: always), or None for one that cannot be read."""
    stats = [m for m in rule.matches if m.module == "statistic"]
    if not stats:
        return sh.Step(rule.line, backend)
    if len(stats) > 1:
        return None
    m = stats[0]
    mode = m.get("mode")
    invert = any(o.neg for o in m.opts)
    try:
        if mode and mode.value == "nth" and m.get("every"):
            packet = m.get("packet")
            every, first = int(m.get("every").value), int(packet.value) if packet else 0
            if not 0 <= first < every:
                return None  # iptables refuses it; passthrough reports the line
            return sh.Step(rule.line, backend, "nth", every, first, invert=invert)
        if mode and mode.value == "random" and m.get("probability"):
            return sh.Step(rule.line, backend, "random",
                           prob=sh.probability_units(m.get("probability").value), invert=invert)
    except ValueError:
        return None
    return None


def _cascade_candidates(chain: Chain, consumed: set[int]) -> dict[Key, list[tuple[Rule, sh.Step]]]:
    groups: dict[Key, list[tuple[Rule, sh.Step]]] = {}
    for r in chain.rules:
        if r.target != "DNAT" or r.match("recent") is not None or r.uid in consumed:
            continue
        b = backend_of(r)
        key = key_of(r)
        if b is None or not key.liftable:
            continue
        step = statistic_step(r, b)
        if step is not None:
            groups.setdefault(key, []).append((r, step))
    return groups


def lift_cascades(ruleset: Ruleset, family: int, marks: _Marks, out: LiftResult) -> None:
    chain = ruleset.chain(family, "nat", "PREROUTING")
    if chain is None:
        return
    for key, group in _cascade_candidates(chain, out.consumed).items():
        rules = [r for r, _ in group]
        steps = _normalised(key, [s for _, s in group])
        if all(s.mode == "always" for s in steps) and len(steps) < 2:
            continue  # one plain DNAT: nothing to balance, iptables-translate does it
        why = _cascade_blocked(chain, key, rules, steps, out)
        if why:
            out.notes.append((rules[0].line, f"{describe(key)} not lifted ({why}); "
                                             f"{_lines(rules)} translated rule by rule"))
            continue
        _lift_cascade(key, rules, steps, marks, out)


def _cascade_blocked(chain: Chain, key: Key, rules: list[Rule], steps: list[sh.Step],
                     out: LiftResult) -> str:
    if chain.policy != "ACCEPT":
        return f"policy {chain.policy} of nat {chain.name}"
    if key.proto not in L4 and not key.marked:
        return "no tcp, udp or sctp protocol match"
    uids = {r.uid for r in rules}
    for r in chain.rules:
        if r.uid not in uids and r.uid not in out.consumed and _affects(r, key):
            return f"line {r.line} also acts on this traffic"
    for other in out.lifted:
        if overlap(other.key, key):
            return f"it overlaps {other.label}, lifted from {_lines(other.rules)}"
    modes = {s.mode for s in steps} - {"always"}
    if len(modes) > 1:
        return "nth and random mixed"
    return ""


@dataclass
class Picks:
    """What a first-match-wins cascade does, as a slot table."""

    nth: bool
    table: list  # dest per slot (None: not NATed)
    exact: bool
    note: str
    analysis: sh.Analysis
    by_dest: dict
    order: list  # dests in rule order


def terminal_picks(steps: list[sh.Step], label: str, line: int, out: LiftResult) -> Picks | None:
    """The slot table of a cascade whose first matching rule wins (nth:
    one period of its sequence; random: its shares in the fewest slots);
    None, with a note, when there is none to make."""
    nth = any(s.mode == "nth" for s in steps)
    period = None
    if nth:
        period = sh.nth_period(steps)
        if period is None:
            out.notes.append((line, f"{label} not lifted (nth period above "
                                    f"{sh.NTH_LIMIT}); translated rule by rule"))
            return None
        shares = sh.period_shares(steps, period)
    else:
        shares = sh.terminal_shares(steps)
    analysis = sh.analyse(steps, shares, label, override=False)
    by_dest = sh.by_dest(steps, shares)
    order = list(dict.fromkeys(s.dest for s in steps))
    if nth:
        table = [p.dest if p is not None else None for p in period]
        exact, note = True, ""
        if len(table) > MAX_SLOTS:
            weights = sh.apportion({**by_dest, None: analysis.leftover}, MAX_SLOTS)
            table, exact = sh.interleave(weights), False
            note = f"nth period of {len(period)} connections scaled to {MAX_SLOTS} slots"
    else:
        table, exact, note = random_table({**by_dest, None: analysis.leftover}, order + [None])
    return Picks(nth, table, exact, note, analysis, by_dest, order)


def _lift_cascade(key: Key, rules: list[Rule], steps: list[sh.Step], marks: _Marks,
                  out: LiftResult) -> None:
    label = describe(key)
    picks = terminal_picks(steps, label, rules[0].line, out)
    if picks is None:
        return
    nth, table, exact, note = picks.nth, picks.table, picks.exact, picks.note
    analysis, by_dest, order = picks.analysis, picks.by_dest, picks.order
    weights = _weights(table)
    dests = [(b, weights[b]) for b in order if b in weights]
    if not dests:
        out.notes.append((rules[0].line, f"{label} not lifted (no rule ever matches); "
                                         "translated rule by rule"))
        out.findings.extend(analysis.findings)
        return
    svc, ours = _service(key, NTH if nth else RANDOM, dests, marks)
    label = describe(key, svc.fwmark if ours else 0)
    svc = replace(svc, plan=Plan(not nth, tuple(_dest_key(svc, b) for b in table), exact, note))
    lifted = Lifted(svc, key, label, rules, "", ours, analysis=analysis, steps=steps, period=table)
    lifted.summary = (f"{label} ({_lines(rules)}) lifted into one {'nth' if nth else 'random'} map: "
                      f"{_share_text(by_dest, analysis.leftover)}")
    if nth:
        lifted.summary += f"; sequence of {len(table)}: " + " ".join(
            str(b) if b is not None else "-" for b in table[:12]) + (" ..." if len(table) > 12 else "")
        for s, r in zip(steps, rules, strict=True):
            pre = key_of(r, before="statistic")
            if s.mode == "nth" and pre != key:
                out.approximated += 1
                out.findings.append((r.line, "-m statistic is checked before the rest of the "
                                             "match, so this nth counter also counts new "
                                             f"connections matching only '{nft_matches(pre)}'; "
                                             f"the translation counts only {label} (the same "
                                             "while no other such connection arrives)"))
    if analysis.mistaken:
        lifted.suggestion = _suggestion(key, label, steps, analysis, nth, override=False)
    out.findings.extend(analysis.findings)
    out.lifted.append(lifted)
    out.consumed.update(r.uid for r in rules)


# ---------------------------------------------------------------- idiom 2: MARK + recent

@dataclass
class _MarkDnat:
    rule: Rule
    backend: Backend
    recent: str | None  # list name set by --set/--update
    mask: str | None


def _set_value(rule: Rule) -> int | None:
    """The mark a ``-j MARK`` sets outright (all 32 bits), else None."""
    if rule.target != "MARK" or len(rule.target_opts) != 1:
        return None
    o = rule.target_opts[0]
    v = parse_mark(o.value) if o.name in ("set-mark", "set-xmark") else None
    if v is None:
        return None
    mask = v[1] | v[0] if o.name == "set-mark" else v[1]
    return v[0] if mask == FULL else None


def _recent(rule: Rule, verbs: tuple[str, ...]) -> tuple[str, int | None, str | None] | None:
    """(list name, --seconds, --mask) of a recent match using one of ``verbs``."""
    m = rule.match("recent")
    if m is None or any(o.neg for o in m.opts):
        return None
    names = {o.name for o in m.opts}
    if not names & set(verbs) or names - {"name", "seconds", "mask", "rsource", *verbs}:
        return None
    seconds = m.get("seconds")
    name = m.get("name")
    mask = m.get("mask")
    timeout = decimal(seconds.value) if seconds else None
    if seconds and timeout is None:
        return None
    return (name.value if name else "DEFAULT", timeout, mask.value if mask else None)


def _mark_dnats(chain: Chain | None) -> dict[int, _MarkDnat]:
    """Marks that exactly one nat rule handles, with a plain DNAT to one backend."""
    out: dict[int, _MarkDnat] = {}
    if chain is None:
        return out
    seen: dict[int, int] = {}
    for r in chain.rules:
        key = key_of(r)
        if key.mark is not None:
            seen[key.mark] = seen.get(key.mark, 0) + 1
        b = backend_of(r)
        if r.target != "DNAT" or b is None or not key.marked or r.match("statistic"):
            continue
        rec = _recent(r, ("set", "update")) if r.match("recent") else (None, None, None)
        if rec is not None:
            out[key.mark] = _MarkDnat(r, b, rec[0], rec[2])
    return {m: d for m, d in out.items() if seen[m] == 1}


def lift_marks(ruleset: Ruleset, family: int, marks: _Marks, out: LiftResult) -> None:
    nat = ruleset.chain(family, "nat", "PREROUTING")
    mangle = ruleset.chain(family, "mangle", "PREROUTING")
    dnats = _mark_dnats(nat)
    if not dnats or mangle is None:
        return
    groups: dict[Key, list[Rule]] = {}
    for r in mangle.rules:
        v = _set_value(r)
        if v is not None and v in dnats and r.uid not in out.consumed:
            groups.setdefault(key_of(r), []).append(r)
    for key, setters in groups.items():
        if not any(r.match("statistic") or r.match("recent") for r in setters):
            continue  # marking alone (slide 24): not a balancing idiom, translated as it is
        used = {_set_value(r) for r in setters}
        others = [r for k, rs in groups.items() if k != key for r in rs if _set_value(r) in used]
        if others:
            out.notes.append((setters[0].line, f"mark {sorted(used)} set for more than one match "
                                               f"(line {others[0].line}); translated rule by rule"))
            continue
        _lift_mark_group(key, setters, {m: dnats[m] for m in used}, nat, mangle, marks, out)


def _lift_mark_group(key: Key, setters: list[Rule], dnats: dict[int, _MarkDnat], nat: Chain,
                     mangle: Chain, marks: _Marks, out: LiftResult) -> None:
    label = describe(key)
    why = _mark_blocked(key, setters, dnats, nat, mangle)
    pick = [r for r in setters if r.match("recent") is None]
    sticky = [r for r in setters if r.match("recent") is not None]
    steps = [statistic_step(r, dnats[_set_value(r)].backend) for r in pick] if not why else []
    if not why and any(s is None or s.mode == "nth" for s in steps):
        why = "nth in mangle counts packets, not connections"
    if not why:
        steps = _normalised(key, steps)
        for d in dnats.values():
            d.backend = _normalised(key, [sh.Step(0, d.backend)])[0].dest
        for o in out.lifted:
            if overlap(o.key, key):
                why = f"it overlaps {o.label}, lifted from {_lines(o.rules)}"
    persist = None if why else _persistence(sticky, pick, dnats, mangle.rules)
    if isinstance(persist, str):
        why = persist
    if why:
        out.notes.append((setters[0].line, f"{label} not lifted ({why}); "
                                           f"{_lines(setters + [d.rule for d in dnats.values()])} "
                                           "translated rule by rule"))
        return
    shares = sh.override_shares(steps)
    analysis = sh.analyse(steps, shares, label, override=True)
    by_dest = sh.by_dest(steps, shares)
    order = list(dict.fromkeys(s.dest for s in steps))
    table, exact, note = random_table({**by_dest, None: analysis.leftover}, order + [None])
    weights = _weights(table)
    dests = [(b, weights[b]) for b in order if b in weights]
    if not dests:
        out.notes.append((setters[0].line, f"{label} not lifted (no rule ever sets a mark)"))
        out.findings.extend(analysis.findings)
        return
    svc, ours = _service(key, RANDOM, dests, marks)
    if persist is not None:
        timeout, netmask = persist
        svc = _persistent(svc, timeout, netmask)
    label = describe(key, svc.fwmark if ours else 0)
    rules = setters + [d.rule for d in dnats.values()]
    svc = replace(svc, plan=Plan(True, tuple(_dest_key(svc, b) for b in table), exact, note))
    lifted = Lifted(svc, key, label, rules, "", ours, analysis=analysis, steps=steps)
    lifted.summary = (f"{label} ({_lines(rules)}) lifted into one random map: "
                      f"{_share_text(by_dest, analysis.leftover)}"
                      + (f"; source persistence {svc.timeout} s" if persist else ""))
    if analysis.mistaken:
        lifted.suggestion = _suggestion(key, label, steps, analysis, False, override=True)
    out.findings.extend(analysis.findings)
    out.lifted.append(lifted)
    out.consumed.update(r.uid for r in rules)


def _mark_blocked(key: Key, setters: list[Rule], dnats: dict[int, _MarkDnat], nat: Chain,
                  mangle: Chain) -> str:
    if not key.liftable or key.proto not in L4:
        return "its match cannot be a service"
    if nat.policy != "ACCEPT":
        return f"policy {nat.policy} of nat PREROUTING"
    mine = {r.uid for r in setters}
    first = min(mangle.rules.index(r) for r in setters)
    for i, r in enumerate(mangle.rules):
        if r.uid in mine or not _affects(r, key):
            continue
        if r.target == "CONNMARK" and r.topt("save-mark"):
            continue
        if r.target == "CONNMARK" and r.topt("restore-mark") and i < first:
            continue  # a new connection's ct mark is 0: restoring it before the MARK rules is moot
        return f"line {r.line} also acts on this traffic in mangle"
    dnat_uids = {d.rule.uid for d in dnats.values()}
    for r in nat.rules:
        if r.uid not in dnat_uids and _affects(r, key, set(dnats)):
            return f"line {r.line} also acts on this traffic in nat"
    return ""


def _persistence(sticky: list[Rule], pick: list[Rule], dnats: dict[int, _MarkDnat],
                 order: list[Rule]) -> tuple[int, str | None] | None | str:
    """(timeout, --mask) of the recent lists, None without any, or why not."""
    if not sticky and not any(d.recent for d in dnats.values()):
        return None
    position = {r.uid: i for i, r in enumerate(order)}
    last_pick = max(position[r.uid] for r in pick) if pick else -1
    seen: dict[int, tuple] = {}
    for r in sticky:
        rec = _recent(r, ("rcheck", "update"))
        mark = _set_value(r)
        if rec is None:
            return f"line {r.line}: -m recent options other than --rcheck/--update --seconds --mask"
        if position[r.uid] < last_pick:
            return (f"line {r.line}: -m recent comes before random MARK rules that overwrite "
                    "its mark, so persistence only holds by chance")
        d = dnats[mark]
        if d.recent != rec[0]:
            return f"line {r.line}: list {rec[0]} is not the one line {d.rule.line} fills"
        if rec[1] is None:
            return f"line {r.line}: no --seconds (entries never expire, only get evicted)"
        if (rec[2] or None) != (d.mask or None):
            return f"line {r.line}: --mask differs from line {d.rule.line}"
        seen[mark] = (rec[1], rec[2])
    if set(seen) != set(dnats) or len(set(seen.values())) != 1:
        return "the recent lists do not cover every backend with one timeout"
    return next(iter(seen.values()))


def _persistent(svc: Service, timeout: int, mask: str | None) -> Service:
    """IPVS persistence from recent lists: --seconds, --mask (an address mask)."""
    netmask = svc.netmask
    if svc.af == AF_INET6:
        netmask = bin(int(ipaddress.IPv6Address(mask))).count("1") if mask else 128
    elif mask:
        netmask = int(ipaddress.IPv4Address(mask))
    return replace(svc, flags=svc.flags | F_PERSISTENT, timeout=timeout, netmask=netmask)


# ---------------------------------------------------------------- entry point

def lift(ruleset: Ruleset) -> LiftResult:
    """Every idiom of the ruleset, both families."""
    out = LiftResult()
    marks = _Marks(ruleset)
    for family in (4, 6):
        lift_marks(ruleset, family, marks, out)
        lift_cascades(ruleset, family, marks, out)
    mark_users = [r for r in ruleset.rules() if r.uid not in out.consumed and
                  (r.match("mark") or r.match("connmark"))]
    dropped = {_set_value(r) for lf in out.lifted for r in lf.rules if _set_value(r) is not None}
    for r in mark_users:
        k = key_of(r)
        if k.mark in dropped:
            out.findings.append((r.line, f"matches mark {k.mark}, which only lifted rules set; "
                                         "the translation no longer sets it"))
    out.findings.sort(key=lambda f: f[0])
    return out
