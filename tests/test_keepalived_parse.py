"""keepalived.conf(5) without root: the reader, the grammar, keepalived's own
messages with file and line, and the table its samples set up at start.

Fixtures: ``tests/fixtures/keepalived/*.conf`` are keepalived's
doc/samples with the addresses moved into the lab; beside each,
``.ipvsadm`` is what ``ipvs2nft translate --from keepalived`` prints (the
``ipvsadm -S -n`` form of the start state) and ``.err`` its stderr.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ipvs2nft.keepalived import lexer
from ipvs2nft.keepalived.config import DnsCheck, HttpCheck, MiscCheck
from ipvs2nft.keepalived.lexer import ConfigError
from ipvs2nft.keepalived.parse import loads
from ipvs2nft.model import F_ONEPACKET, F_PERSISTENT, F_SCHED1, F_SCHED2, Forward, TunType

FIXTURES = Path(__file__).parent / "fixtures" / "keepalived"
SAMPLES = sorted(p.stem for p in FIXTURES.glob("*.conf"))
IPVS2NFT = str(Path(sys.executable).parent / "ipvs2nft")


def translate(name: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([IPVS2NFT, "translate", "--from", "keepalived", *extra, f"{name}.conf"],
                          cwd=FIXTURES, capture_output=True, text=True, env=dict(os.environ))


@pytest.mark.parametrize("name", SAMPLES)
def test_sample_translates_as_recorded(name):
    p = translate(name)
    expected = FIXTURES / f"{name}.ipvsadm"
    assert p.stderr == (FIXTURES / f"{name}.err").read_text()
    if expected.exists():
        assert p.returncode == 0
        assert p.stdout == expected.read_text()
    else:
        assert p.returncode == 2 and p.stdout == ""


def test_samples_cover_every_checker_kind():
    kinds = set()
    for name in SAMPLES:
        if (FIXTURES / f"{name}.ipvsadm").exists():
            cfg = loads((FIXTURES / f"{name}.conf").read_text())
            kinds |= {c.kind for vs in cfg.virtual_servers for rs in vs.real_servers for c in rs.checkers}
    assert kinds == {"HTTP_GET", "SSL_GET", "TCP_CHECK", "MISC_CHECK", "SMTP_CHECK", "UDP_CHECK",
                     "PING_CHECK"}


def test_nft_output_of_a_sample():
    p = translate("virtual_server_group", "--to", "nft")
    assert p.returncode == 0, p.stderr
    assert "add table inet ipvs2nft" in p.stdout and "fwm4" in p.stdout


def one(text: str):
    return loads(text).virtual_servers[0]


VS = """virtual_server 192.168.0.40 80 {{
    lb_algo rr
    lb_kind NAT
    protocol TCP
{body}
    real_server 192.168.100.10 80 {{
{rs}
    }}
}}
"""


def vs_with(body: str = "", rs: str = "weight 1"):
    return one(VS.format(body=body, rs=rs))


# ---------------------------------------------------------------- the reader

def test_comments_quotes_and_braces_on_one_line():
    nodes = lexer.read_text('a b { c "d ! e" # not this\n} ! nor this\nx "q{r}"\n')
    assert nodes[0].words == ["a", "b"] and nodes[0].block[0].words == ["c", "d ! e"]
    assert nodes[1].words == ["x", "q{r}"]


def test_escaped_comment_characters_are_literal():
    nodes = lexer.read_text(r"a b\#c d\!e")
    assert nodes[0].words == ["a", "b#c", "d!e"]


def test_include_with_a_glob_relative_to_the_including_file(tmp_path):
    sub = tmp_path / "conf.d"
    sub.mkdir()
    (sub / "b.conf").write_text("virtual_server 192.168.0.41 80 {\n protocol TCP\n lb_kind DR\n"
                                " real_server 192.168.100.11 80 {\n }\n}\n")
    (sub / "a.conf").write_text("virtual_server 192.168.0.40 80 {\n protocol TCP\n lb_kind DR\n"
                                " real_server 192.168.100.10 80 {\n }\n}\n")
    main = tmp_path / "keepalived.conf"
    main.write_text("include conf.d/*.conf\n")
    from ipvs2nft.keepalived.parse import load

    cfg = load(str(main))
    assert [str(vs.addr) for vs in cfg.virtual_servers] == ["192.168.0.40", "192.168.0.41"]


def test_include_that_matches_nothing_is_an_error(tmp_path):
    main = tmp_path / "keepalived.conf"
    main.write_text("\ninclude nothing/*.conf\n")
    with pytest.raises(ConfigError) as err:
        lexer.read(str(main))
    assert str(err.value) == f"({main}: Line 2) No config files matched 'nothing/*.conf'."


def test_definitions_and_config_id_lines():
    text = "$VIP=192.168.0.40\n@lb1 virtual_server $VIP 80 {\n@^lb1 virtual_server ${VIP} 81 {\n}\n"
    nodes = lexer.read_text(text, config_id="lb1")
    assert nodes[0].words == ["virtual_server", "192.168.0.40", "80"]
    nodes = lexer.read_text(text, config_id="lb2")
    assert nodes[0].words == ["virtual_server", "192.168.0.40", "81"]


@pytest.mark.parametrize("text, message", [
    ("a {\n", "(keepalived.conf: Line 1) There are 1 missing '}'s or extra '{'s"),
    ("a\n}\n", "(keepalived.conf: Line 2) Extra '}' found"),
    ('a "b\n', "(keepalived.conf: Line 1) Unterminated quote 'a \"b'"),
    ("~SEQ(i, 1, 3) x\n", "(keepalived.conf: Line 1) ~SEQ/~LST sequences are not supported by ipvs2nft; "
                          "write the lines out"),
])
def test_reader_errors_name_the_line(text, message):
    with pytest.raises(ConfigError) as err:
        lexer.read_text(text)
    assert str(err.value) == message


# ---------------------------------------------------------------- the grammar

@pytest.mark.parametrize("body, rs, message", [
    ("    lb_algo twos", "", "(keepalived.conf: Line 5) Invalid lvs_scheduler 'twos' - ignoring"),
    ("    sh-port", "", "(keepalived.conf: Line 5) sh-port only applies to sh scheduler - ignoring"),
    ("    delay_loop x", "", "(keepalived.conf: Line 5) virtual server delay loop 'x' invalid - ignoring"),
    ("    quorum 0", "", "(keepalived.conf: Line 5) Quorum 0 must be in [1, 4294967295]. Setting to 1."),
    ("    lb_kind TUN type gue", "", "(keepalived.conf: Line 5) gue tunnels require port, otherwise cannot "
                                     "have port."),
    ("    frobnicate", "", "(keepalived.conf: Line 5) Unknown keyword 'frobnicate'"),
    ("    ha_suspend", "", "(keepalived.conf: Line 5) ha_suspend is not supported by ipvs2nft"),
    ("", "        weight -1",
     "(keepalived.conf: Line 7) Real server weight -1 is outside range 0-2147483647"),
    ("", "        TCP_CHECK {\n            connect_port 0\n        }",
     "(keepalived.conf: Line 8) Invalid checker connect_port '0'"),
    ("", "        HTTP_GET {\n        }",
     "(keepalived.conf: Line 7) HTTP/SSL_GET checker has no urls specified "
                                          "- ignoring"),
    ("", "        HTTP_GET {\n            url {\n                status_code 99\n            }\n        }",
     "(keepalived.conf: Line 9) Invalid HTTP_GET status code '99'"),
    ("", "        BFD_CHECK {\n        }",
     "(keepalived.conf: Line 7) BFD_CHECK needs keepalived's BFD process"),
    ("", "        FILE_CHECK {\n        }",
     "(keepalived.conf: Line 7) FILE_CHECK (track_file) is not supported "
                                            "by ipvs2nft"),
    ("", "        MISC_CHECK {\n        }", "(keepalived.conf: Line 7) Misc check with no script specified "
                                            "- ignoring"),
])
def test_what_keepalived_rejects_is_an_error_with_its_line(body, rs, message):
    with pytest.raises(ConfigError) as err:
        vs_with(body, rs)
    assert str(err.value) == message


def test_virtual_server_settings_become_service_fields():
    vs = vs_with("    lb_algo sh\n    sh-port\n    sh-fallback\n    persistence_timeout 600\n"
                 "    persistence_granularity 255.255.255.0\n")
    assert vs.scheduler == "sh" and vs.flags == F_SCHED1 | F_SCHED2
    from ipvs2nft.keepalived.mapping import service, service_keys

    svc = service(vs, service_keys(vs)[0])
    assert svc.flags & F_PERSISTENT and svc.timeout == 600 and svc.netmask == 0xFFFFFF00


def test_ops_needs_udp_and_is_reset_otherwise():
    cfg = loads(VS.format(body="    ops", rs="weight 1"))
    assert cfg.virtual_servers[0].flags & F_ONEPACKET == 0
    assert "one packet scheduling requires UDP - resetting" in cfg.warnings[0]


def test_real_server_forwarding_and_ports():
    vs = vs_with("    lb_kind DR", "        lvs_method TUN type gre csum")
    rs = vs.real_servers[0]
    assert rs.fwd is Forward.TUNNEL and rs.tun_type is TunType.GRE and rs.tun_flags == 1


def test_defaults_flow_from_virtual_to_real_server_to_checker():
    vs = vs_with("    delay_loop 2\n    retry 4\n    connect_timeout 1.5",
                 "        delay_before_retry 0.5\n        TCP_CHECK {\n        }\n"
                 "        HTTP_GET {\n            retry 1\n            url {\n                path /\n"
                 "            }\n        }\n        DNS_CHECK {\n            type A\n        }\n"
                 "        MISC_CHECK {\n            misc_path \"/bin/true x\"\n        }")
    tcp, http, dns, misc = vs.real_servers[0].checkers
    assert (tcp.delay_loop, tcp.retry, tcp.connect_timeout, tcp.delay_before_retry) == (2, 4, 1.5, 0.5)
    assert isinstance(http, HttpCheck) and http.retry == 1 and http.urls[0].accepts(204)
    assert isinstance(dns, DnsCheck) and dns.retry == 4 and dns.qtype == "A"
    assert isinstance(misc, MiscCheck) and misc.path == ["/bin/true", "x"] and misc.timeout == 2


def test_checker_defaults_without_overrides():
    vs = vs_with("", "        HTTP_GET {\n            url {\n                path /\n            }\n"
                     "        }\n"
                     "        DNS_CHECK {\n        }\n        MISC_CHECK {\n            misc_path /bin/true\n"
                     "        }")
    http, dns, misc = vs.real_servers[0].checkers
    assert (http.retry, http.delay_before_retry, http.delay_loop, http.connect_timeout) == (1, 3.0, 60.0, 5.0)
    assert (dns.retry, dns.delay_before_retry, dns.qtype, dns.name) == (3, 60.0, "SOA", ".")
    assert misc.retry == 0 and misc.timeout == 60.0


def test_keepalived_corrections_are_warnings():
    cfg = loads("virtual_server 192.168.0.40 80 {\n real_server 192.168.100.10 8080 {\n }\n}\n")
    vs = cfg.virtual_servers[0]
    assert vs.protocol == 17 and vs.scheduler == "wlc" and vs.real_servers[0].fwd is Forward.MASQ
    assert [w.split(") ", 1)[1] for w in cfg.warnings] == [
        "Virtual server 192.168.0.40:none:80: no protocol set - defaulting to UDP",
        "Virtual server 192.168.0.40:udp:80: no scheduler set, setting default 'wlc'",
        "Virtual server 192.168.0.40:udp:80: no forwarding method set, setting default NAT"]


def test_group_ranges_and_fwmarks():
    cfg = loads("virtual_server_group G {\n 192.168.0.40-42 80\n 192.168.0.48/30 443\n fwmark 7 inet\n}\n"
                "virtual_server group G {\n protocol TCP\n lb_kind NAT\n"
                " real_server 192.168.100.10 80 {\n }\n}\n")
    from ipvs2nft.keepalived.mapping import service_keys

    keys = service_keys(cfg.virtual_servers[0])
    assert [(str(k.addr), k.port, k.fwmark) for k in keys] == [
        ("192.168.0.40", 80, 0), ("192.168.0.41", 80, 0), ("192.168.0.42", 80, 0),
        ("192.168.0.48", 443, 0), ("192.168.0.49", 443, 0), ("192.168.0.50", 443, 0),
        ("192.168.0.51", 443, 0),
        ("None", 0, 7)]


def test_undefined_group_and_duplicate_services_are_errors():
    with pytest.raises(ConfigError, match="Virtual server group G specified but not configured"):
        loads("virtual_server group G {\n real_server 192.168.100.10 80 {\n }\n}\n")
    twice = VS.format(body="", rs="weight 1")
    with pytest.raises(ConfigError, match="duplicates the service defined at"):
        loads(twice + twice)


def test_vrrp_and_global_sections_are_one_note_each():
    cfg = loads("global_defs {\n router_id X\n lvs_timeouts tcp 10\n}\nvrrp_instance V {\n state MASTER\n}\n"
                "vrrp_script chk {\n script /bin/true\n}\n" + VS.format(body="", rs="weight 1"))
    assert len(cfg.notes) == 4
    assert "lvs_timeouts not carried out" in cfg.notes[1]
    assert "vrrp_instance V ignored" in cfg.notes[2] and "vrrp_script chk ignored" in cfg.notes[3]


def test_feedback_extension_syntax():
    vs = vs_with("    ipvs2nft_feedback load {\n        interval 2\n        smoothing 0.5\n"
                 "        deadband 20\n    }",
                 "        ipvs2nft_snmp {\n            community lab\n"
                 "            oid hrProcessorLoad\n        }")
    assert (vs.feedback.method, vs.feedback.interval, vs.feedback.smoothing, vs.feedback.deadband) == \
        ("load", 2.0, 0.5, 20.0)
    snmp = vs.real_servers[0].snmp
    assert (snmp.community, snmp.oid, snmp.version, snmp.port) == ("lab", "hrProcessorLoad", "2c", 161)
    with pytest.raises(ConfigError, match="neither response nor load"):
        vs_with("    ipvs2nft_feedback cpu")


def test_thresholds_and_weight_reach_the_real_server():
    from ipvs2nft.keepalived.mapping import dest, service_keys

    vs = vs_with("    weight 4", "        uthreshold 10\n        lthreshold 5")
    rs = vs.real_servers[0]
    d = dest(rs, service_keys(vs)[0], rs.weight)
    assert (d.weight, d.u_threshold, d.l_threshold, d.fwd) == (4, 10, 5, Forward.MASQ)


def test_translate_reads_standard_input():
    text = "virtual_server 192.168.0.40 80 {\n protocol TCP\n lb_kind DR\n lb_algo rr\n" \
           " real_server 192.168.100.10 8080 {\n }\n}\n"
    p = subprocess.run([IPVS2NFT, "translate", "--from", "keepalived"], input=text, capture_output=True,
                       text=True)
    assert p.returncode == 0
    assert p.stdout == "-A -t 192.168.0.40:80 -s rr\n-a -t 192.168.0.40:80 -r 192.168.100.10:80 -g -w 1\n"
    assert p.stderr == ("ipvs2nft: warning: (<stdin>: Line 5) WARNING - virtual server 192.168.0.40:tcp:80 "
                        "and real server 192.168.100.10:8080 ports don't match - resetting\n")


def test_misc_check_user():
    misc = "        MISC_CHECK {{\n            misc_path /bin/true\n            user {}\n        }}"
    chk = vs_with("", misc.format("nobody nogroup")).real_servers[0].checkers[0]
    assert (chk.user, chk.group) == ("nobody", "nogroup")
    with pytest.raises(ConfigError, match="user no-such-user unknown"):
        vs_with("", misc.format("no-such-user"))


def test_feedback_with_a_scheduler_that_ignores_weights_is_a_warning():
    cfg = loads(VS.format(body="    ipvs2nft_feedback response", rs="weight 1"))
    assert cfg.warnings == ["(keepalived.conf: Line 5) ipvs2nft_feedback: lb_algo rr does not use weights; "
                            "the feedback weights need wrr, wlc, sed, sh, mh..."]
