"""What the daemon's netlink plumbing costs on this machine, side by side (not a test).

1. conntrack events at two connection rates: CPU per parsed event and events
   lost, for ipvs2nft.conntrack.Events (8 MiB buffer), the same with its BPF
   mark filter, and ``conntrack -E -b 8 MiB`` (C, text out) -- the method of
   ../shared/reference/daemon.md section 5.2: short TCP connections client ->
   VIP -> DNAT -> real server, half of them to a VIP whose flows get a ct
   mark, each consumer a separate process in the director whose own
   user+system time is counted.  NEW events are the loss metric (one per
   connection).
2. a ct-mark-filtered conntrack dump with 10,000+ marked flows: ours, the
   same without parsing (kernel and syscalls only), ``conntrack -L -m``.
3. an 80,000-element set with counters: ours, ``nft -j list set``,
   python3-nftables in process (daemon.md section 4.1: ~1.3 s).
4. replacing 4 elements of a 40,000-element map per transaction: ours
   (Nfnetlink.commit, which also returns the generation id) and
   python3-nftables in process (daemon.md: 0.06 ms), interleaved.

Everything runs in namespaces made here (unique names) and removed at the
end, also on failure.  ``--quick`` is a smoke run.  Usage, as root:
``.venv/bin/python bench/netlink.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

HERE = Path(__file__).resolve().parent
MARKED, OTHER = "192.168.0.40", "192.168.0.41"
MARK, MASK = 0x100, 0xFF00
BUFFER = 8 << 20

_TAG = "ct mark set numgen inc mod 2 map { 0 : 0x101, 1 : 0x102 }"
_BY_MARK = "dnat to ct mark map { 0x101 : 192.168.100.10, 0x102 : 192.168.100.11 }"
_ROUND_ROBIN = "dnat to numgen inc mod 2 map { 0 : 192.168.100.10, 1 : 192.168.100.11 }"
RULESET = f"""
table ip nlbench {{
  chain pre {{ type nat hook prerouting priority dstnat; policy accept;
    ip daddr {MARKED} tcp dport 80 {_TAG} {_BY_MARK}
    ip daddr {OTHER} tcp dport 80 {_ROUND_ROBIN}
  }}
}}
"""


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ---------------------------------------------------------------- consumers (run in the director)

def consume_ours(bpf: bool) -> dict:
    """Events.read until stdin closes; every event is fully parsed."""
    from ipvs2nft.conntrack import Event, Events, EventsLost
    events = Events(rcvbuf=BUFFER, **({"mark": MARK, "mask": MASK} if bpf else {}))
    counts = {"NEW": 0, "UPDATE": 0, "DESTROY": 0, "lost_reports": 0, "new_marked": 0}
    sel = selectors.DefaultSelector()
    sel.register(events, selectors.EVENT_READ)
    sel.register(sys.stdin, selectors.EVENT_READ)
    names = {Event.NEW: "NEW", Event.UPDATE: "UPDATE", Event.DESTROY: "DESTROY"}
    print("ready", flush=True)
    start = cpu()
    done = False
    while not done:
        for key, _ in sel.select(1.0):
            if key.fileobj is sys.stdin:
                done = True
                continue
            try:
                got = events.read()
            except EventsLost as lost:
                counts["lost_reports"] += 1
                got = lost.events
            for kind, flow in got:
                counts[names[kind]] += 1
                if kind == Event.NEW and flow.mark & MASK == MARK:
                    counts["new_marked"] += 1
    return counts | {"cpu": cpu() - start, "rcvbuf": events.rcvbuf}


def consume_tool() -> dict:
    """``conntrack -E -b 8 MiB`` until stdin closes, writing to a file (a pipe
    read by Python would slow it down); its CPU from getrusage of children."""
    counts = {"NEW": 0, "UPDATE": 0, "DESTROY": 0, "lost_reports": 0, "new_marked": 0}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(["conntrack", "-E", "-b", str(BUFFER)], stdout=out, stderr=err, text=True)
        time.sleep(0.3)
        print("ready", flush=True)
        sys.stdin.read()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        out.seek(0)
        for line in out:
            kind = line.strip().split("]", 1)[0].lstrip("[")
            if kind in counts:
                counts[kind] += 1
                if kind == "NEW" and " mark=25" in line:  # 0x101, 0x102 print as 257, 258
                    counts["new_marked"] += 1
        err.seek(0)
        counts["lost_reports"] = err.read().count("ENOBUFS")
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return counts | {"cpu": children.ru_utime + children.ru_stime, "rcvbuf": BUFFER}


# ---------------------------------------------------------------- measurements inside the director

def _both() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn, rounds: int) -> dict:
    """Wall time and CPU time (user + system of this process and of the tools
    it ran: a netlink dump runs in the kernel in the reader's recvmsg, so it
    is charged here) of each call, and the last call's count."""
    wall, cpu_s, result = [], [], 0
    for _ in range(rounds):
        t, c = time.perf_counter(), _both()
        result = fn()
        wall.append(time.perf_counter() - t)
        cpu_s.append(_both() - c)
    return {"s": wall, "cpu": cpu_s, "n": result}


def worker_dump(rounds: int) -> dict:
    from ipvs2nft import conntrack, netlink
    ct = conntrack.Conntrack()
    body = conntrack._mark_filter(MARK, MASK)

    def raw() -> int:  # the same dump, datagrams received but not parsed
        n = 0
        for _ in ct._nl.request((conntrack.NFNL_SUBSYS_CTNETLINK << 8) | conntrack.IPCTNL_MSG_CT_GET,
                                netlink.NLM_F_DUMP, socket.AF_UNSPEC, body):
            n += 1
        return n

    def tool() -> int:
        argv = ["conntrack", "-L", "-m", f"{MARK:#x}/{MASK:#x}"]
        return subprocess.run(argv, capture_output=True, text=True).stdout.count("\n")

    return {name: timed(fn, rounds) for name, fn in (
        ("ours", lambda: len(ct.dump(MARK, MASK))), ("raw", raw), ("tool", tool),
        ("ours_all", lambda: len(ct.dump())))}


def _nft(script: str) -> None:
    subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True)


def worker_elements(rounds: int, size: int) -> dict:
    import nftables

    from ipvs2nft import netlink
    from ipvs2nft.nft.nfnetlink import NFT_MSG_GETSETELEM, Nfnetlink
    elements = ", ".join(f"{i} . {'original' if i % 2 else 'reply'}" for i in range(1, size + 1))
    _nft(f"add table inet nlelems\n"
         f"add set inet nlelems big {{ type mark . ct_dir; counter; size {size * 2}; }}\n"
         f"add element inet nlelems big {{ {elements} }}")
    nl = Nfnetlink()
    lib = nftables.Nftables()
    lib.set_json_output(True)

    def libnft() -> int:
        rc, out, err = lib.cmd("list set inet nlelems big")
        return len(json.loads(out)["nftables"][1]["set"]["elem"])

    def text() -> int:
        return subprocess.run(["nft", "-j", "list", "set", "inet", "nlelems", "big"], capture_output=True,
                              text=True).stdout.count('"elem"')

    def raw() -> int:  # the same dump, datagrams received but not parsed
        body = netlink.attr_str(1, "nlelems") + netlink.attr_str(2, "big")
        for _ in nl._request(NFT_MSG_GETSETELEM, netlink.NLM_F_DUMP, 1, body):
            pass
        return size

    out = {name: timed(fn, rounds) for name, fn in (
        ("ours", lambda: len(nl.set_elements("inet", "nlelems", "big"))), ("raw", raw),
        ("nft_j", text), ("python3_nftables", libnft))}
    _nft("delete table inet nlelems")
    return out


def worker_batch(transactions: int, size: int) -> dict:
    import nftables

    from ipvs2nft.nft.nfnetlink import Batch, Nfnetlink, join_key
    elements = ", ".join(f"{i} : 10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255} . 80" for i in range(size))
    _nft("add table ip nlbatch\nadd map ip nlbatch nat4 { type classid : ipv4_addr . inet_service; }\n"
         "add chain ip nlbatch c { type nat hook output priority 0; }\n"
         "add rule ip nlbatch c meta l4proto tcp dnat ip to meta priority map @nat4\n"
         f"add element ip nlbatch nat4 {{ {elements} }}")
    nl = Nfnetlink()
    lib = nftables.Nftables()
    value = {i: 80 for i in range(size)}

    def ours(n: int) -> None:
        batch = Batch("ip", "nlbatch")
        for slot in range(n * 4, n * 4 + 4):
            slot %= size
            port = value[slot] = 81 if value[slot] == 80 else 80
            batch.delete("nat4", slot.to_bytes(4, sys.byteorder))
            addr = socket.inet_aton(f"10.{slot >> 16 & 255}.{slot >> 8 & 255}.{slot & 255}")
            batch.add("nat4", slot.to_bytes(4, sys.byteorder), join_key(addr, port.to_bytes(2, "big")))
        assert nl.commit(batch) is not None

    def libnft(n: int) -> None:
        cmds = []
        for slot in range(n * 4, n * 4 + 4):
            slot %= size
            port = value[slot] = 81 if value[slot] == 80 else 80
            addr = f"10.{slot >> 16 & 255}.{slot >> 8 & 255}.{slot & 255}"
            cmds.append(f"delete element ip nlbatch nat4 {{ {slot} }}; "
                        f"add element ip nlbatch nat4 {{ {slot} : {addr} . {port} }}")
        rc, _, err = lib.cmd("; ".join(cmds))
        assert rc == 0, err

    times: dict[str, list[float]] = {"ours": [], "python3_nftables": []}
    cpu_s = {"ours": 0.0, "python3_nftables": 0.0}
    n = 0
    for _ in range(transactions // 50):
        for name, fn in (("ours", ours), ("python3_nftables", libnft)):
            c = cpu()
            for _ in range(50):
                t = time.perf_counter()
                fn(n)
                times[name].append(time.perf_counter() - t)
                n += 1
            cpu_s[name] += cpu() - c
    argv = ["nft", "list", "map", "ip", "nlbatch", "nat4"]
    listed = subprocess.run(argv, capture_output=True, text=True).stdout
    _nft("delete table ip nlbatch")
    return {"s": times, "cpu": cpu_s, "checked": listed.count(" . 8") >= size}


# ---------------------------------------------------------------- the run

def _in(lab, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", lab.director, sys.executable, str(Path(__file__).resolve()), *argv]


def _worker(lab, *argv: str) -> dict:
    p = subprocess.run(_in(lab, "worker", *argv), capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"worker {argv} failed: {p.stderr}")
    return json.loads(p.stdout.splitlines()[-1])


def _load(lab, netload: list[str], secs: float, conc: int) -> dict:
    cmd = ["ip", "netns", "exec", lab.client, *netload, "load", str(secs), str(conc),
           ",".join(lab.client_addresses()), f"{MARKED}:80,{OTHER}:80"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"load generator failed: {p.stderr}")
    return json.loads(p.stdout.splitlines()[-1])


def events_round(lab, netload: list[str], consumer: str, secs: float, conc: int) -> dict:
    lab.sh(lab.director, "conntrack -F 2>/dev/null; true")
    proc = subprocess.Popen(_in(lab, "consume", consumer), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        load = _load(lab, netload, secs, conc)
        time.sleep(1.0)
        proc.stdin.close()
        result = json.loads(proc.stdout.read().splitlines()[-1])
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return result | {"conns": load["conns"], "rate": load["conns"] / load["wall"]}


def bench_events(lab, netload: list[str], plan: argparse.Namespace, log) -> list[dict]:
    rows = []
    for conc in plan.concurrency:
        samples: dict[str, list[dict]] = {"ours": [], "ours_bpf": [], "conntrack_E": []}
        for r in range(plan.rounds):
            for consumer in samples:
                sample = events_round(lab, netload, consumer, plan.secs, conc)
                samples[consumer].append(sample)
                log(f"events conc={conc} round {r} {consumer}: {sample}")
        for consumer, got in samples.items():
            rows.append({"conc": conc, "consumer": consumer, "samples": got})
    return rows


def us(x: float) -> str:
    return f"{x * 1e6:.1f}"


def report_events(rows: list[dict]) -> list[str]:
    out = ["### conntrack events (short TCP connections; half to a VIP with a ct mark)", "",
           "| in flight | consumer | conn/s | events parsed | NEW seen / expected | ENOBUFS reports | "
           "µs CPU per event | µs CPU per connection |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        s = row["samples"]
        events = [x["NEW"] + x["UPDATE"] + x["DESTROY"] for x in s]
        bpf = row["consumer"] == "ours_bpf"
        expected = [x["conns"] // 2 if bpf else x["conns"] for x in s]
        per_event = [x["cpu"] / e for x, e in zip(s, events, strict=True) if e]
        per_conn = [x["cpu"] / x["conns"] for x in s if x["conns"]]
        out.append(f"| {row['conc']} | {row['consumer']} | {statistics.median(x['rate'] for x in s):,.0f} | "
                   f"{statistics.median(events):,.0f} | "
                   f"{sum(x['NEW'] for x in s):,} / {sum(expected):,} | "
                   f"{sum(x['lost_reports'] for x in s)} | "
                   f"{us(statistics.median(per_event))} ({us(min(per_event))}-{us(max(per_event))}) | "
                   f"{us(statistics.median(per_conn))} |")
    return out


def report_times(title: str, result: dict, per: str) -> list[str]:
    out = [f"### {title}", "",
           f"| reader | entries | median wall ms | median CPU ms | CPU µs per {per} | CPU per run (ms) |",
           "|---|---|---|---|---|---|"]
    for name, r in result.items():
        wall, cpu_s = statistics.median(r["s"]), statistics.median(r["cpu"])
        runs = ", ".join(f"{t * 1000:.0f}" for t in r["cpu"])
        out.append(f"| {name} | {r['n']:,} | {wall * 1000:.1f} | {cpu_s * 1000:.1f} | "
                   f"{us(cpu_s / max(r['n'], 1))} | {runs} |")
    return out


def report_batch(result: dict) -> list[str]:
    out = ["### replacing 4 elements of a 40,000-element map (delete + add, one transaction each)", "",
           "| writer | transactions | mean wall ms | p50 wall ms | p99 wall ms | mean CPU ms |",
           "|---|---|---|---|---|---|"]
    for name, s in result["s"].items():
        s = sorted(s)
        out.append(f"| {name} | {len(s)} | {statistics.mean(s) * 1000:.3f} | {s[len(s) // 2] * 1000:.3f} | "
                   f"{s[int(len(s) * 0.99)] * 1000:.3f} | {result['cpu'][name] / len(s) * 1000:.3f} |")
    out.append(f"\nthe map's final contents checked: {result['checked']}")
    return out


def main(argv: list[str]) -> int:
    if argv[:1] == ["consume"]:
        result = consume_tool() if argv[1] == "conntrack_E" else consume_ours(argv[1] == "ours_bpf")
        print(json.dumps(result), flush=True)
        return 0
    if argv[:1] == ["worker"]:
        task, *args = argv[1:]
        fn = {"dump": worker_dump, "elements": worker_elements, "batch": worker_batch}[task]
        print(json.dumps(fn(*map(int, args))), flush=True)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: small sizes, one round")
    ap.add_argument("--json", type=Path, help="also write the raw samples here")
    args = ap.parse_args(argv)
    plan = argparse.Namespace(concurrency=(1, 32), rounds=3, secs=3.0, dump_rounds=7, elements=80000,
                              element_rounds=3, transactions=300)
    if args.quick:
        plan = argparse.Namespace(concurrency=(1, 32), rounds=1, secs=1.0, dump_rounds=2, elements=5000,
                                  element_rounds=1, transactions=50)
    if os.geteuid() != 0:
        print("bench/netlink.py needs root (network namespaces)", file=sys.stderr)
        return 1
    sys.path.insert(0, str(HERE))
    import traffic
    from benchlab import open_lab

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ipvs2nft-netlink-")))
        netload, how = traffic.build(workdir)
        lab = open_lab(stack, "nlb", servers=2, server_cmd=netload)
        subprocess.run(["ip", "netns", "exec", lab.director, "nft", "-f", "-"], input=RULESET, text=True,
                       check=True)
        events = bench_events(lab, netload, plan, log)
        # a table of 10,000+ marked flows that stay (closed TCP flows are kept 10 s by default)
        lab.sh(lab.director, "conntrack -F 2>/dev/null; "
                             "sysctl -qw net.netfilter.nf_conntrack_tcp_timeout_close=300")
        filled = _load(lab, netload, 6.0 if not args.quick else 1.0, 32)
        log(f"filled the conntrack table with {filled['conns']} connections")
        dump = _worker(lab, "dump", str(plan.dump_rounds))
        elements = _worker(lab, "elements", str(plan.element_rounds), str(plan.elements))
        batch = _worker(lab, "batch", str(plan.transactions), "40000" if not args.quick else "4000")
    lines = [f"# ipvs2nft netlink plumbing, measured {time.strftime('%Y-%m-%d %H:%M')} on Linux "
             f"{os.uname().release}, {os.cpu_count()} CPUs", "", f"load generator: {how}", ""]
    lines += report_events(events) + [""]
    lines += report_times(f"conntrack dump filtered by ct mark {MARK:#x}/{MASK:#x} in the kernel "
                          "(ours_all: the whole table, unfiltered)", dump, "entry") + [""]
    lines += report_times(f"a set of {plan.elements:,} elements with counters", elements, "element") + [""]
    lines += report_batch(batch)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"events": events, "dump": dump, "elements": elements,
                                         "batch": batch}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
