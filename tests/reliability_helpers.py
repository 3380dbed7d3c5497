"""Shared machinery of the reliability tests (issue 5).

``Director`` is a bare network namespace with a private state file: enough
to run our ``ipvsadm`` with the nftables back end and look at the table it
made, without touching the host's ruleset.  ``kernel_equals_store`` is the
oracle the crash and drift tests use: the table in the kernel, normalised
(no handles, no counter values, no learned persistence entries), must equal
the table that a full build from the state file loads into a scratch
namespace.  ``kernel_servers`` / ``saved_servers`` are a second, independent
oracle that needs no builder: which real servers each service sends to,
read from the dispatch and slot maps on one side and from ``ipvsadm -S -n``
on the other.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from ipvs2nft.lab import unique_prefix

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
TABLE = ("inet", "ipvs2nft")
ALLOWED_STATUS = {0, 1, 2, 4, 255}
SCHEMA = "ipvs2nft-state/1"
# ``-L -n`` header lines, as ipvsadm prints them
LIST_HEADER = [
    "IP Virtual Server version 1.2.1 (size=4096)",
    "Prot LocalAddress:Port Scheduler Flags",
    "  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn",
]


def run(cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("timeout", 120)
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{shlex.join(cmd)} failed ({p.returncode}): {p.stderr}")
    return p


def netns_skip() -> str | None:
    from tests.conftest import NETNS_SKIP

    return NETNS_SKIP


def no_traceback(text: str) -> bool:
    return "Traceback" not in text and "Exception ignored" not in text


# ---------------------------------------------------------------- a director namespace

class Director:
    """``ip netns add <prefix>`` + a state file in ``state_dir``; removed on exit.

    """

    def __init__(self, state_dir: Path, tag: str = "rel") -> None:
        self.name = unique_prefix(tag)
        self.state_dir = Path(state_dir)
        self.state = self.state_dir / "state.json"
        self.created: list[str] = []

    # ------------------------------------------------------------ life
    def __enter__(self) -> Director:
        try:
            self._add(self.name)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _add(self, name: str) -> None:
        run(["ip", "netns", "add", name])
        self.created.append(name)
        run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"])

    def close(self) -> None:
        for name in reversed(self.created):
            run(["ip", "netns", "del", name], check=False)
        self.created.clear()

    # ------------------------------------------------------------ running
    def env(self, **extra: str | None) -> dict[str, str]:
        env = dict(os.environ)
        env["IPVS2NFT_STATE"] = str(self.state)
        env["IPVS2NFT_BACKEND"] = "nft"
        for k in ("IPVS2NFT_FAULT", "IPVS2NFT_LOCK_WAIT"):
            env.pop(k, None)
        for k, v in extra.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        return env

    def argv(self, prog: str, args: str | list[str]) -> list[str]:
        words = shlex.split(args) if isinstance(args, str) else list(args)
        return ["ip", "netns", "exec", self.name, str(BIN / prog), *words]

    def ipvsadm(self, args: str | list[str] = (), stdin: str | bytes | None = None, check: bool = False,
                prog: str = "ipvsadm", **env: str | None) -> subprocess.CompletedProcess:
        """Our ipvsadm in the namespace; never raises unless ``check``."""
        binary = isinstance(stdin, bytes)
        p = subprocess.run(self.argv(prog, args), input=stdin, capture_output=True, text=not binary,
                           env=self.env(**env), timeout=120)
        if binary:
            p.stdout = p.stdout.decode("utf-8", "replace")
            p.stderr = p.stderr.decode("utf-8", "replace")
        if check and p.returncode != 0:
            raise AssertionError(f"{prog} {args} failed ({p.returncode}): {p.stderr}")
        return p

    def restore(self, text: str, check: bool = True, **env) -> subprocess.CompletedProcess:
        return self.ipvsadm([], stdin=text, check=check, prog="ipvsadm-restore", **env)

    def save(self) -> str:
        return self.ipvsadm("-S -n", check=True).stdout

    def sh(self, script: str, check: bool = True, ns: str | None = None) -> subprocess.CompletedProcess:
        return run(["ip", "netns", "exec", ns or self.name, "sh", "-ec", script], check=check)

    def nft(self, *args: str, check: bool = True, stdin: str | None = None,
            ns: str | None = None) -> subprocess.CompletedProcess:
        return run(["ip", "netns", "exec", ns or self.name, "nft", *args], check=check, input=stdin)

    def ruleset(self) -> str:
        return self.nft("list", "ruleset").stdout

    def table_json(self, ns: str | None = None) -> dict | None:
        p = self.nft("-j", "list", "table", *TABLE, check=False, ns=ns)
        if p.returncode != 0:
            return None
        return json.loads(p.stdout)

    def table_text(self) -> str | None:
        p = self.nft("-s", "list", "table", *TABLE, check=False)
        return p.stdout if p.returncode == 0 else None

    # ------------------------------------------------------------ state
    def reset(self) -> None:
        """No table of ours in the kernel, no state file."""
        for fam in ("inet", "ip", "ip6"):
            self.nft("delete", "table", fam, "ipvs2nft", check=False)
        for p in self.state_dir.glob("state.json*"):
            p.unlink()
        for p in self.state_dir.glob(".state-*"):
            p.unlink()

    def state_bytes(self) -> bytes | None:
        try:
            return self.state.read_bytes()
        except FileNotFoundError:
            return None

    # ------------------------------------------------------------ the oracle
    def kernel_equals_store(self) -> str | None:
        """None when the kernel table is what the store says, else a diff."""
        return compare_with_store(self.state, shape(self.table_json()))


def expected_shape(state: Path) -> dict | None:
    """The normalised table that a full build from the state file loads, in
    a throw-away network namespace (``unshare -n``: nothing to clean up)."""
    from ipvs2nft.nft.backend import NftBackend
    from ipvs2nft.store import Store

    store = Store(str(state))
    snap = store.read()
    # as the back end builds it on this kernel (tunnel servers without a driver quiesced)
    script = NftBackend(store).expected_script(snap.table, snap.generation)
    p = run(["unshare", "-n", "sh", "-ec", "nft -f -; nft -j list table inet ipvs2nft"], input=script)
    return shape(json.loads(p.stdout))


def compare_with_store(state: Path, got: dict | None) -> str | None:
    want = expected_shape(state)
    if got == want:
        return None
    return describe_difference(want, got)


def live_shape() -> dict | None:
    """Our table in the current network namespace, normalised."""
    p = run(["nft", "-j", "list", "table", *TABLE], check=False)
    return shape(json.loads(p.stdout)) if p.returncode == 0 else None


@contextlib.contextmanager
def private_netns(directory: Path, backend: str = "nft"):
    """Run the block (in-process ipvsadm calls) in a throw-away network
    namespace with ``lo`` only and its own state file; yields whether the
    kernel side is there (root, nftables) -- else the store-only back end."""
    from tests import oracle

    keys = ("IPVS2NFT_STATE", "IPVS2NFT_BACKEND", "IPVS2NFT_LOCK_WAIT", "IPVS2NFT_FAULT")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ["IPVS2NFT_STATE"] = str(directory / "state.json")
    os.environ["IPVS2NFT_LOCK_WAIT"] = "0.1"
    os.environ.pop("IPVS2NFT_FAULT", None)
    try:
        with oracle.vm_like_netns(directory) as isolated:
            kernel = bool(isolated) and netns_skip() is None and backend == "nft"
            os.environ["IPVS2NFT_BACKEND"] = "nft" if kernel else "none"
            yield kernel
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def module_director(tmp_path_factory, tag: str):
    """A Director for a whole test module: ``yield from`` it in a fixture."""
    if netns_skip():
        import pytest

        pytest.skip(netns_skip())
    with Director(tmp_path_factory.mktemp(tag), tag=tag) as d:
        yield d


# ---------------------------------------------------------------- normalising nft -j output

_LEARNED = {"persist4", "persist6"}  # dynamic sets: filled by traffic


def _scrub(value):
    """Counter values and timers out of an expression tree."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k == "counter" and isinstance(v, dict):
                out[k] = {}
            elif k in ("expires",):
                continue
            else:
                out[k] = _scrub(v)
        return out
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def shape(doc: dict | None) -> dict | None:
    """A comparable form of ``nft -j list table``: objects by kind and name,
    rules in chain order, set elements as a sorted list."""
    if doc is None:
        return None
    out: dict[str, object] = {}
    for item in doc.get("nftables", []):
        (kind, body), = item.items()
        if kind in ("metainfo", "table"):
            continue
        body = {k: v for k, v in body.items() if k != "handle"}
        if kind == "rule":
            out.setdefault(f"rule {body['chain']}", []).append(
                json.dumps(_scrub(body["expr"]), sort_keys=True))
        elif kind in ("set", "map"):
            elems = [] if body.get("name") in _LEARNED else body.pop("elem", [])
            body.pop("elem", None)
            body["elem"] = sorted(json.dumps(_scrub(e), sort_keys=True) for e in elems)
            out[f"{kind} {body['name']}"] = body
        else:
            out[f"{kind} {body.get('name')}"] = _scrub(body)
    return out


def describe_difference(want: dict | None, got: dict | None) -> str:
    if want is None or got is None:
        return f"table present: store says {want is not None}, kernel has {got is not None}"
    lines = []
    for key in sorted(set(want) | set(got)):
        if want.get(key) != got.get(key):
            lines.append(f"{key}:\n  store:  {str(want.get(key))[:600]}\n  kernel: {str(got.get(key))[:600]}")
    return "kernel differs from store\n" + "\n".join(lines)


# ---------------------------------------------------------------- independent oracle

_PROTO_SWITCH = {"tcp": "-t", "udp": "-u", "sctp": "--sctp-service"}
_SAVE_A = re.compile(r"^-A (-t|-u|--sctp-service|-f) (\S+)( .*)?$")
_SAVE_a = re.compile(r"^-a (-t|-u|--sctp-service|-f) (\S+) -r (\S+) (-m|-g|-i)( .*)? -w (\d+)( .*)?$")


def _host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr else addr


def _dispatch_keys(maps: dict) -> dict[int, str]:
    """sid -> the service as ``-S -n`` names it, from the dispatch maps."""
    sid_of = {}
    for name, elems in maps.items():
        for key, verdict in elems if name in ("svc4", "svc6", "svc4p0", "svc6p0", "fwm4", "fwm6") else ():
            target = verdict.get("goto", verdict.get("jump", {})).get("target", "")
            if name.startswith("fwm"):
                text = f"-f {int(key)}" + (" -6" if name == "fwm6" else "")
            else:
                addr, proto, *port = key["concat"]
                text = f"{_PROTO_SWITCH[proto]} {_host(addr)}:{int(port[0]) if port else 0}"
            sid_of[int(target.removeprefix("svc_"))] = text
    return sid_of


def _dnat_target(exprs: list) -> str | None:
    for e in exprs:
        d = e.get("dnat")
        if d and isinstance(d.get("addr"), str):
            return f"{_host(d['addr'])}:{d.get('port', 0)}"
    return None


def kernel_servers(doc: dict | None) -> dict[str, set[str]]:
    """Service (as ``-S -n`` names it: ``-t 10.0.0.1:80``, ``-f 5``) -> the
    real servers its slots DNAT to: the dispatch maps give the service's
    chain number, the slot maps (``nat4``/``nat4a``/``nat6``/``nat6a``
    directly, ``slots`` through a real-server chain) give its servers."""
    if doc is None:
        return {}
    maps, rs = {}, {}
    for item in doc["nftables"]:
        body = item.get("map")
        if body:
            maps[body["name"]] = body.get("elem", [])
        rule = item.get("rule")
        if rule and rule["chain"].startswith("rs_"):
            rs[rule["chain"]] = rs.get(rule["chain"]) or _dnat_target(rule["expr"])
    sid_of = _dispatch_keys(maps)
    out: dict[str, set[str]] = {s: set() for s in sid_of.values()}
    for name in ("nat4", "nat6", "nat4a", "nat6a", "slots"):
        for slot, value in maps.get(name, []):
            major = int(str(slot).split(":")[0], 16) if ":" in str(slot) else int(slot) >> 16
            if name == "slots":
                server = rs.get(value.get("goto", {}).get("target", ""))
            elif isinstance(value, dict):
                addr, port = value["concat"]
                server = f"{_host(addr)}:{port}"
            else:
                server = f"{_host(value)}:0"
            if major in sid_of and server:
                out[sid_of[major]].add(server)
    return out


def saved_servers(text: str) -> dict[str, set[str]]:
    """The same from ``ipvsadm -S -n``: masquerading servers with weight > 0."""
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        six = " -6" if line.startswith(("-A -f", "-a -f")) and " -6" in line else ""
        m = _SAVE_A.match(line)
        if m:
            out.setdefault(f"{m.group(1)} {m.group(2)}{six}", set())
            continue
        m = _SAVE_a.match(line)
        if m and m.group(4) == "-m" and int(m.group(6)) > 0:
            out.setdefault(f"{m.group(1)} {m.group(2)}{six}", set()).add(m.group(3))
    return out


def kernel_generation(doc: dict | None) -> list[int] | None:
    if doc is None:
        return None
    for item in doc["nftables"]:
        body = item.get("set")
        if body and body["name"] == "gen":
            return sorted(body.get("elem", []))
    return None


def store_document(path: Path) -> dict:
    """The state file as one JSON document, checked against the schema's shape."""
    doc = json.loads(path.read_bytes())
    assert isinstance(doc, dict), type(doc)
    assert doc.get("schema") == SCHEMA, doc.get("schema")
    assert isinstance(doc.get("generation"), int)
    assert isinstance(doc.get("next_rid"), int)
    assert isinstance(doc.get("services"), list) and doc["services"][-1] is None
    for row in doc["services"][:-1]:
        assert isinstance(row, list) and isinstance(row[0], str) and isinstance(row[12], list), row
    return doc


# ---------------------------------------------------------------- foreign tables

# Tables of other owners, as the programs that own them write them (reduced).
FIREWALLD = """\
table inet firewalld {
    set allowed { type ipv4_addr; elements = { 198.51.100.77 } }
    chain filter_INPUT {
        type filter hook input priority filter + 10; policy accept;
        ct state established,related accept
        iifname "lo" accept
        tcp dport 22 ip saddr @allowed accept
        tcp dport 9 counter reject with icmpx admin-prohibited
    }
    chain filter_FORWARD {
        type filter hook forward priority filter + 10; policy accept;
        ct state established,related accept
        tcp sport 40404 counter drop
    }
}
"""
DOCKER = """\
table ip nat {
    chain PREROUTING {
        type nat hook prerouting priority dstnat; policy accept;
        fib daddr type local counter jump DOCKER
    }
    chain OUTPUT {
        type nat hook output priority -100; policy accept;
        ip daddr != 127.0.0.0/8 fib daddr type local counter jump DOCKER
    }
    chain POSTROUTING {
        type nat hook postrouting priority srcnat; policy accept;
        oifname != "docker0" ip saddr 172.17.0.0/16 counter masquerade
    }
    chain DOCKER {
        iifname "docker0" counter return
        iifname != "docker0" ip daddr 192.168.0.42 tcp dport 8080 counter dnat to 192.168.100.12:8080
    }
}
"""
KUBE_PROXY = """\
table ip kube-proxy {
    comment "rules for kube-proxy"
    map service-ips {
        type ipv4_addr . inet_proto . inet_service : verdict
        elements = { 192.168.0.41 . tcp . 443 : goto service-ns1-web }
    }
    map no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict; }
    chain nat-prerouting {
        type nat hook prerouting priority dstnat; policy accept;
        jump services
    }
    chain services {
        ip daddr . meta l4proto . th dport vmap @service-ips
    }
    chain service-ns1-web {
        numgen random mod 1 vmap { 0 : goto endpoint-ns1-web-a }
    }
    chain endpoint-ns1-web-a {
        counter meta l4proto tcp dnat to 192.168.100.11:443
    }
}
"""
IPTABLES = [  # made with the iptables-nft command: table ip filter, ip mangle
    "iptables-nft -w -A FORWARD -p tcp --sport 40405 -j DROP",
    "iptables-nft -w -A INPUT -p tcp --dport 10 -m comment --comment legacy-app -j REJECT",
    "iptables-nft -w -t mangle -A PREROUTING -p tcp --dport 8443 -j MARK --set-mark 7",
]
FOREIGN = [("inet", "firewalld"), ("ip", "nat"), ("ip", "kube-proxy"), ("ip", "filter"), ("ip", "mangle")]


def add_foreign_tables(director: Director, ns: str | None = None) -> None:
    for text in (FIREWALLD, DOCKER, KUBE_PROXY):
        director.nft("-f", "-", stdin=text, ns=ns)
    for cmd in IPTABLES:
        run(["ip", "netns", "exec", ns or director.name, *shlex.split(cmd)])


def foreign_listing(director: Director, ns: str | None = None) -> dict[str, str]:
    out = {}
    for fam, name in FOREIGN:
        out[f"{fam} {name}"] = director.nft("list", "table", fam, name, check=False, ns=ns).stdout
    return out
