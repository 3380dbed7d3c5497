"""keepalived's health-check decisions without root or sockets: the state
machine of ipwrapper.c/check_tcp.c (state.py), the probes' verdicts
(probes.py) and the feedback weights' arithmetic (feedback.py)."""

from __future__ import annotations

import hashlib
import struct

from ipvs2nft.health import probes
from ipvs2nft.health.feedback import FeedbackLoop, factors
from ipvs2nft.health.state import VirtualServerState
from ipvs2nft.keepalived.config import DnsCheck, Url
from ipvs2nft.keepalived.lexer import Where
from ipvs2nft.keepalived.parse import loads

A, B, S = "192.168.100.10", "192.168.100.11", "192.168.100.19"


TCP = "TCP_CHECK {\n retry 2\n delay_before_retry 0.5\n}"


def state(body: str = "", rs: str = "", checker: str = TCP,
          servers: tuple[str, ...] = (A, B)) -> VirtualServerState:
    text = ("virtual_server 192.168.0.40 80 {\n delay_loop 3\n lb_algo rr\n lb_kind NAT\n protocol TCP\n"
            + body + "\n"
            + "".join(f" real_server {s} 80 {{\n  weight 2\n{rs}\n  {checker}\n }}\n" for s in servers)
            + "}\n")
    vs = VirtualServerState.build(loads(text).virtual_servers[0])
    vs.start()
    return vs


def image(vs: VirtualServerState) -> dict[str, int]:
    return {str(addr): w for (addr, _), w in vs.image.items()}


def check(vs: VirtualServerState, server: str, results: list[bool]) -> list[float]:
    chk = next(c for c in vs.checkers if str(c.server.cfg.addr) == server)
    return [vs.epilog(chk, ok) for ok in results]


def test_start_puts_every_server_in():
    vs = state()
    assert image(vs) == {A: 2, B: 2} and vs.quorum_up


def test_one_failure_is_enough_before_the_first_success():
    vs = state()
    assert check(vs, A, [False]) == [3.0]
    assert image(vs) == {B: 2}


def test_after_a_success_a_server_goes_only_after_retry_failures_in_a_row():
    vs = state()
    delays = check(vs, A, [True, False, False])
    assert delays == [3.0, 0.5, 0.5] and image(vs) == {A: 2, B: 2}
    assert check(vs, A, [False]) == [3.0] and image(vs) == {B: 2}
    assert check(vs, A, [True]) == [3.0] and image(vs) == {A: 2, B: 2}


def test_a_success_between_failures_resets_the_count():
    vs = state()
    check(vs, A, [True, False, False, True, False, False])
    assert image(vs) == {A: 2, B: 2}


def test_inhibit_on_failure_is_weight_zero():
    vs = state(rs="  inhibit_on_failure")
    check(vs, A, [False])
    assert image(vs) == {A: 0, B: 2}
    check(vs, A, [True])
    assert image(vs) == {A: 2, B: 2}


def test_sorry_server_replaces_the_pool_below_quorum_and_leaves_above():
    vs = state(body=f" sorry_server {S} 80")
    check(vs, A, [False])
    assert image(vs) == {B: 2}
    check(vs, B, [False])
    assert image(vs) == {S: 1} and not vs.quorum_up
    check(vs, A, [True])
    assert image(vs) == {A: 2} and vs.quorum_up


def test_alpha_starts_with_the_sorry_server_only():
    vs = state(body=f" alpha\n sorry_server {S} 80")
    assert image(vs) == {S: 1}
    check(vs, A, [True])
    assert image(vs) == {A: 2}


def test_quorum_with_hysteresis():
    vs = state(body=f" quorum 4\n hysteresis 1\n sorry_server {S} 80", servers=(A, B, "192.168.100.12"))
    check(vs, A, [False])  # live 4: 4 >= 4-1
    assert S not in image(vs)
    check(vs, B, [False])  # live 2 < 3: lost
    assert image(vs) == {S: 1}
    check(vs, B, [True])  # live 4 < 4+1: not yet gained
    assert image(vs) == {S: 1}
    check(vs, A, [True])  # live 6 >= 5
    assert image(vs) == {A: 2, B: 2, "192.168.100.12": 2}


def test_misc_dynamic_weights_and_failures():
    vs = state(checker="MISC_CHECK {\n misc_path /bin/true\n misc_dynamic\n}")
    chk = vs.checkers[0]
    vs.misc_epilog(chk, 12, True)
    assert image(vs)[A] == 10
    vs.misc_epilog(chk, 1, True)
    assert A not in image(vs)
    vs.misc_epilog(chk, 0, True)
    assert image(vs)[A] == 2  # back with its configured weight
    vs.misc_epilog(chk, None, True)  # killed at misc_timeout
    assert A not in image(vs)


def test_notify_scripts_are_queued():
    vs = state(rs='  notify_down "/bin/echo down"\n  notify_up "/bin/echo up"')
    vs.take_actions()
    check(vs, A, [False])
    runs = [a.argv for a in vs.take_actions() if a.kind == "run"]
    assert runs == [["/bin/echo", "down"]]


def test_stop_removes_every_server():
    vs = state(rs="  inhibit_on_failure")
    check(vs, A, [False])
    vs.stop()
    assert image(vs) == {}


# ---------------------------------------------------------------- verdicts

def test_http_verdicts():
    body = b"hello\n"
    url = Url(Where("x", 1), path="/", digest=hashlib.md5(body).digest())
    ok = b"HTTP/1.0 200 OK\r\nContent-Length: 6\r\n\r\n" + body
    assert probes.http_verdict(url, ok) == ""
    assert probes.http_verdict(url, ok.replace(b"200", b"503")) == "HTTP status code 503"
    assert probes.http_verdict(url, ok.replace(b"hello", b"jello")) == "MD5 digest error"
    url = Url(Where("x", 1), path="/", status_codes=frozenset({503}), regex="hel+o", regex_no_match=True)
    assert probes.http_verdict(url, ok.replace(b"200", b"503")) == "Regex match failed"


def test_dns_query_and_verdicts():
    chk = DnsCheck("DNS_CHECK", Where("x", 1), qtype="A", name="www.example.")
    query = probes.dns_query(chk, 0x1234)
    assert query[:2] == b"\x12\x34" and query.endswith(b"\x03www\x07example\x00\x00\x01\x00\x01")
    answer = b"\x12\x34" + struct.pack("!HHHHH", 0x8180, 1, 1, 0, 0)
    assert probes.dns_verdict(answer, 0x1234) == ""
    assert probes.dns_verdict(answer, 0x4321) == "not an answer to our query"
    refused = b"\x12\x34" + struct.pack("!HHHHH", 0x8183, 1, 0, 0, 0)
    assert probes.dns_verdict(refused, 0x1234) == "DNS rcode 3"


# ---------------------------------------------------------------- feedback

def test_feedback_factors_and_deadband():
    vs = state(body=" ipvs2nft_feedback response {\n  smoothing 1\n  deadband 10\n }", rs="  weight 100")
    loop = FeedbackLoop(vs, lambda s: None, lambda t: None)
    a, b = vs.servers
    assert factors({a: 2.0, b: 1.0}) == {a: 1.0, b: 0.5}
    loop.update({a: 0.010, b: 0.040})  # b is 4 times slower
    assert image(vs) == {A: 100, B: 25}
    loop.update({a: 0.010, b: 0.037})  # 27: within 10 % of 25, not published
    assert image(vs) == {A: 100, B: 25}
    loop.update({a: 0.010, b: 0.020})
    assert image(vs) == {A: 100, B: 50}
    loop.update({a: 0.010, b: 100.0})  # never below min_weight
    assert image(vs) == {A: 100, B: 1}


def test_load_feedback_uses_idle_share():
    vs = state(body=" ipvs2nft_feedback load {\n  smoothing 0.5\n }",
               rs="  weight 100\n  ipvs2nft_snmp {\n   capacity 2\n  }")
    loop = FeedbackLoop(vs, lambda s: None, lambda t: None)
    a, b = vs.servers
    loop.update({a: 0.0, b: 1.0})  # idle 1.0 and 0.5
    assert image(vs) == {A: 100, B: 50}
    loop.update({a: 0.0, b: 2.0})  # smoothed: 1.5 -> idle 0.25
    assert image(vs) == {A: 100, B: 25}


def test_engine_stop_ends_every_checker_and_clears_the_table():
    """Checkers that probe many times a second all end at stop (they once
    could not: wait_for swallowed the cancellation), and the virtual servers
    go, as keepalived's clear_services()."""
    import asyncio

    from ipvs2nft.health.engine import Engine

    head = "virtual_server 192.168.0.40 80 {\n delay_loop 0.01\n lb_algo rr\n lb_kind NAT\n protocol TCP\n"
    server = " real_server 192.168.100.{} 80 {{\n  MISC_CHECK {{\n   misc_path /bin/true\n  }}\n }}\n"
    cfg = loads(head + "".join(server.format(10 + i) for i in range(20)) + "}\n")
    applied, removed = [], []

    async def main():
        engine = Engine(cfg, lambda states: applied.append(dict(states[0].image)),
                        log=lambda text: None, remove=lambda states: removed.append(len(states)))
        engine.start()
        await asyncio.sleep(0.5)
        await asyncio.wait_for(engine.stop(), 10)
        return engine

    engine = asyncio.run(main())
    assert all(t.done() for t in engine.tasks) and engine.lateness.probes > 20
    assert len(applied[0]) == 20 and removed == [1] and engine.states[0].image == {}
