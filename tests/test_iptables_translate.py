"""``ipvs2nft translate --from iptables``: scripts, warnings, ipvsadm output.

Each fixture ``tests/fixtures/iptables/NAME.(sh|rules)`` has its expected
stderr in ``NAME.err`` and its ``--to ipvsadm`` output in ``NAME.ipvsadm``
(regenerate with ``IPVS2NFT_REGEN=1`` and review the diff).  The nft script
itself is the builder's business (tests of nft/build.py); here its
iptables-specific parts are checked, and a namespace test loads every
script with ``nft -f`` into an empty namespace.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from ipvs2nft import sched
from ipvs2nft.cli.ipvs2nft import main, translate_iptables
from ipvs2nft.iptables import translate
from ipvs2nft.unsupported import Report
from tests.conftest import NETNS_SKIP

FIXTURES = Path(__file__).parent / "fixtures" / "iptables"
INPUTS = sorted(p.name for p in FIXTURES.iterdir() if p.suffix in (".sh", ".rules", ".rules6"))
REGEN = bool(os.environ.get("IPVS2NFT_REGEN"))


def run(capsys, text: str, target: str = "nft", strict: bool = False) -> tuple[int, str, str]:
    rc = translate_iptables(text.encode(), Report(strict=strict), target=target)
    out, err = capsys.readouterr()
    return rc, out, err


def golden(path: Path, got: str) -> None:
    if REGEN:
        path.write_text(got)
    assert got == path.read_text(), f"{path.name} differs (IPVS2NFT_REGEN=1 to rewrite)"


@pytest.mark.parametrize("name", INPUTS)
def test_warnings_golden(capsys, name):
    rc, _, err = run(capsys, (FIXTURES / name).read_text())
    assert rc == 0
    golden(FIXTURES / (Path(name).stem + ".err"), err)


@pytest.mark.parametrize("name", INPUTS)
def test_ipvsadm_golden(capsys, name):
    rc, out, _ = run(capsys, (FIXTURES / name).read_text(), target="ipvsadm")
    assert rc == 0
    golden(FIXTURES / (Path(name).stem + ".ipvsadm"), out)


def test_the_plan_travels_with_its_service():
    """A lifted cascade's slot table is the service's own (Service.plan),
    not a module-level registry: a second translation in the same process
    leaves the first one's services as they were."""
    first = translate.run((FIXTURES / "slide19.sh").read_text())
    (svc,) = first.table.services
    before = sched.slots(svc, svc.sched)
    translate.run((FIXTURES / "random3.sh").read_text().replace("192.168.100.", "10.9.9."))
    assert sched.slots(svc, svc.sched) == before and svc.plan is not None and not svc.plan.random
    assert [str(d.addr) if d is not sched.PASS else None for d in before.table] == \
        ["192.168.100.10", None, "192.168.100.10", "192.168.100.11"]


# ---------------------------------------------------------------- the lifted services

def lifted(name: str):
    return translate.run((FIXTURES / name).read_text())


def test_slide19_plan_and_unnated_slot():
    t = lifted("slide19.sh")
    (svc,) = t.table.services
    assert (svc.scheduler, str(svc.addr), svc.port) == ("iptables-nth", "192.168.0.40", 80)
    slots = sched.slots(svc, svc.sched)
    assert [str(d.addr) if d is not sched.PASS else None for d in slots.table] == \
        ["192.168.100.10", None, "192.168.100.10", "192.168.100.11"]
    assert not slots.random and slots.exact
    script = "\n".join(t.script_lines)
    assert "numgen inc mod 4" in script
    assert re.search(r"add element inet ipvs2nft slots \{[^}]*\b65537 : accept\b", script)


def test_slide22_random_map_holds_only_what_matches():
    (svc,) = lifted("slide22.sh").table.services
    slots = sched.slots(svc, svc.sched)
    assert slots.random and {str(d.addr) for d in slots.table} == {"192.168.100.10"}


def test_slide25_multiport_is_a_fwmark_service_marked_by_us():
    t = lifted("slide25.sh")
    (svc,) = t.table.services
    assert svc.fwmark == 1 and svc.dests[0].port == 0
    script = "\n".join(t.script_lines)
    assert ("add rule ip ipvs2nft_iptables marks ct state new ip daddr 192.168.0.40 "
            "tcp dport { 80, 443 } meta mark set 0x00000001") in script
    assert "priority -101" in script


def test_slide28_persistence():
    t = lifted("slide28.sh")
    (svc,) = t.table.services
    assert svc.persistent and svc.timeout == 120 and svc.scheduler == "iptables-random"
    weights = {str(d.addr): d.weight for d in svc.dests}
    assert weights == {"192.168.100.10": 67, "192.168.100.11": 33}
    script = "\n".join(t.script_lines)
    assert "timeout 120s" in script
    # the recent rules are gone, the CONNMARK plumbing stays
    assert "recent" not in script and "meta mark set ct mark" in script


def test_user_mark_cascade_is_the_users_fwmark():
    t = lifted("fwmark-nth.sh")
    (svc,) = t.table.services
    assert svc.fwmark == 1
    script = "\n".join(t.script_lines)
    assert "ipvs2nft_iptables" not in script  # the user's own MARK rule sets it
    assert "meta mark set 0x1" in script


def test_mark_cascade_without_recent_is_not_persistent():
    (svc,) = lifted("mark-random.sh").table.services
    assert not svc.persistent and svc.scheduler == "iptables-random"
    assert {str(d.addr): d.weight for d in svc.dests} == {"192.168.100.10": 1, "192.168.100.11": 2}


def test_conntrack_timeouts_are_the_kernels():
    """iptables never set timeouts: no ct timeout policy, none applied."""
    script = "\n".join(lifted("nth3.sh").script_lines)
    assert "ct timeout" not in script


def test_pick_chain_semantics_unchanged():
    """The un-NATed slots rely on the builder's pick chain consulting the
    ``slots`` verdict map after the nat data maps and before unreachable."""
    lines = lifted("slide19.sh").script_lines
    pick = [ln for ln in lines if ln.startswith("add rule inet ipvs2nft pick4 ")]
    assert pick[-2].endswith("meta priority vmap @slots") and pick[-1].endswith("goto unreachable")


# ---------------------------------------------------------------- not lifted

def test_overlapping_rule_blocks_lifting(capsys):
    text = ("iptables -t nat -A PREROUTING -s 10.0.0.0/8 -j ACCEPT\n"
            "iptables -t nat -A PREROUTING -d 192.168.0.40 -p tcp --dport 80 -m statistic "
            "--mode nth --every 2 --packet 0 -j DNAT --to-destination 192.168.100.10\n"
            "iptables -t nat -A PREROUTING -d 192.168.0.40 -p tcp --dport 80 -j DNAT "
            "--to-destination 192.168.100.11\n")
    rc, out, err = run(capsys, text)
    assert rc == 0
    assert ("ipvs2nft: note: line 2: TCP 192.168.0.40:80 not lifted (line 1 also acts on this "
            "traffic); lines 2, 3 translated rule by rule") in err
    assert "numgen inc mod 2 0" in out and "inet ipvs2nft" not in out


def test_disjoint_rules_do_not_block(capsys):
    text = ("iptables -t nat -A PREROUTING -d 192.168.0.41 -j ACCEPT\n"
            "iptables -t nat -A PREROUTING -d 192.168.0.40 -p udp -j ACCEPT\n"
            "iptables -t nat -A PREROUTING -d 192.168.0.40 -p tcp --dport 80 -m statistic "
            "--mode random --probability 0.5 -j DNAT --to-destination 192.168.100.10\n"
            "iptables -t nat -A PREROUTING -d 192.168.0.40 -p tcp --dport 80 -j DNAT "
            "--to-destination 192.168.100.11\n")
    t = translate.run(text)
    assert len(list(t.table.services)) == 1


def test_mixed_nth_and_random_stays_rule_by_rule():
    text = ("iptables -t nat -A PREROUTING -d 192.168.0.40 -p tcp --dport 80 -m statistic "
            "--mode nth --every 2 --packet 0 -j DNAT --to-destination 192.168.100.10\n"
            "iptables -t nat -A PREROUTING -d 192.168.0.40 -p tcp --dport 80 -m statistic "
            "--mode random --probability 0.5 -j DNAT --to-destination 192.168.100.11\n")
    t = translate.run(text)
    assert not list(t.table.services)
    assert any("nth and random mixed" in n for _, n in t.notes)


def test_persistence_checked_before_the_random_rules_is_not_lifted():
    text = (FIXTURES / "slide28.sh").read_text().splitlines()
    # move the two recent rules (2 physical lines each) before the random ones
    reordered = "\n".join(text[:2] + text[6:10] + text[2:6] + text[10:])
    t = translate.run(reordered)
    assert not list(t.table.services)
    assert any("persistence only holds by chance" in n for _, n in t.notes)


# ---------------------------------------------------------------- passthrough

def test_untranslatable_rule_is_a_warning_and_a_comment(capsys):
    text = "iptables -A INPUT -m recent --name ssh --rcheck --seconds 60 -j DROP\n"
    rc, out, err = run(capsys, text)
    assert rc == 0
    assert ("ipvs2nft: warning: line 1: iptables-translate cannot translate this rule "
            "(-m recent, -j DROP); kept as a comment") in err
    assert "# untranslatable (line 1): -t filter -A INPUT -m recent --name ssh --rcheck " \
           "--seconds 60 -j DROP" in out
    rc, out, err = run(capsys, text, strict=True)
    assert rc == 3 and out == "" and "--strict" in err


def test_strict_accepts_an_exact_translation_and_refuses_ipvsadm_approximations(capsys):
    text = (FIXTURES / "nth3.sh").read_text()
    rc, out, _ = run(capsys, text, strict=True)
    assert rc == 0 and out
    rc, out, _ = run(capsys, text, target="ipvsadm", strict=True)
    assert rc == 0 and "-s rr" in out  # nth3 is plain round robin
    rc, out, _ = run(capsys, (FIXTURES / "slide28.sh").read_text(), target="ipvsadm", strict=True)
    assert rc == 3 and out == ""


def test_connmark_value_mask_is_corrected(capsys):
    rc, out, err = run(capsys, "iptables -t mangle -A PREROUTING -j CONNMARK --set-mark 0x1/0xff\n")
    assert "ct mark set ct mark and 0xffffff00 xor 0x1" in out
    assert "xor 0x1 and" not in out
    assert "CONNMARK value/mask" in err


def test_comment_counters_and_insert_order(capsys):
    text = ("*filter\n:INPUT ACCEPT [0:0]\n"
            '[7:420] -A INPUT -p tcp --dport 22 -m comment --comment "ssh \\"admin\\"" -j ACCEPT\n'
            "COMMIT\n"
            "iptables -I INPUT 1 -i lo -j ACCEPT\n")
    rc, out, _ = run(capsys, text)
    rules = [ln for ln in out.splitlines() if ln.startswith("add rule ip filter INPUT")]
    assert rules == ['add rule ip filter INPUT iifname "lo" counter accept',
                     "add rule ip filter INPUT tcp dport 22 counter packets 7 bytes 420 accept "
                     "comment \"ssh 'admin'\""]


def test_partial_connmark_masks_are_approximations(capsys):
    rc, _, err = run(capsys, "iptables -t mangle -A PREROUTING -j CONNMARK --save-mark "
                             "--nfmask 0xff --ctmask 0xff\n", strict=True)
    assert rc == 3 and "approximated" in err


# ---------------------------------------------------------------- errors and CLI

def test_rule_iptables_refuses_is_a_parse_error_with_its_line(capsys):
    text = ("iptables -A INPUT -j ACCEPT\n\n"
            "iptables -t nat -A PREROUTING -p tcp --dport 80 -j DROP\n")
    rc, out, err = run(capsys, text)
    assert rc == 2 and out == ""
    assert err.startswith("ipvs2nft: line 3: ")
    assert "nat" in err and "DROP" in err


def test_lifted_rule_errors_are_found_too(capsys):
    text = ("iptables -t nat -A PREROUTING -d 192.168.0.40 -p tcp --dport 80 -m statistic "
            "--mode nth --every 2 --packet 5 -j DNAT --to-destination 192.168.100.10\n")
    rc, _, err = run(capsys, text)
    assert rc == 2 and err.startswith("ipvs2nft: line 1:")


def test_parser_error(capsys):
    rc, _, err = run(capsys, "iptables -t nat -A PREROUTING --frobnicate\n")
    assert rc == 2 and err == 'ipvs2nft: line 1: unknown option "--frobnicate"\n'


def test_cli_entry_point(capsys, tmp_path):
    path = tmp_path / "rules"
    path.write_text((FIXTURES / "slide19.sh").read_text())
    assert main(["translate", "--from", "iptables", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("# ipvs2nft translate --from iptables: 1 service(s)")
    assert main(["translate", "--from", "iptables", "--to", "ipvsadm", str(path)]) == 0
    out, _ = capsys.readouterr()
    assert out.splitlines()[0] == "-A -t 192.168.0.40:80 -s wrr"


# ---------------------------------------------------------------- nft loads it

def _in_netns(script: str, check_only: bool = False) -> subprocess.CompletedProcess:
    args = ["unshare", "-n", "nft"] + (["-c"] if check_only else []) + ["-f", "-"]
    return subprocess.run(args, input=script, capture_output=True, text=True)


@pytest.mark.netns
@pytest.mark.parametrize("name", INPUTS)
def test_script_loads_into_an_empty_namespace(name):
    if NETNS_SKIP:
        pytest.skip(NETNS_SKIP)
    t = lifted(name)
    got = _in_netns("".join(line + "\n" for line in t.script_lines))
    assert got.returncode == 0, got.stderr


@pytest.mark.netns
@pytest.mark.parametrize("name", INPUTS)
def test_suggestions_are_valid_nft(name):
    if NETNS_SKIP:
        pytest.skip(NETNS_SKIP)
    for lf in lifted(name).lifted.lifted:
        if not lf.suggestion:
            continue
        rule = re.search(r"\): (.*); in iptables:", lf.suggestion).group(1)
        family = "ip6" if lf.key.family == 6 else "ip"
        script = (f"table {family} t {{ chain c {{ type nat hook prerouting priority -100; "
                  f"{rule}; }}; }}\n")
        got = _in_netns(script, check_only=True)
        assert got.returncode == 0, (lf.suggestion, got.stderr)


def test_bare_protocol_match_keeps_its_protocol(capsys):
    """iptables-translate prints ``-p tcp -m tcp`` (kube-proxy's DNAT rules)
    as nothing: an ACCEPT for every protocol, a DNAT to a port nft refuses
    (exit 0).  The protocol is put back."""
    rc, out, _ = run(capsys, "iptables -A INPUT -p tcp -m tcp -j ACCEPT\n"
                             "iptables -A INPUT -p 17 -m udp -j ACCEPT\n"
                             "iptables -t nat -A PREROUTING -p tcp -m comment --comment x -m tcp "
                             "-j DNAT --to-destination 10.0.0.1:80\n"
                             "iptables -A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\n"
                             "iptables -A INPUT ! -p tcp -m comment --comment y -j ACCEPT\n")
    rules = [line for line in out.splitlines() if line.startswith("add rule")]
    assert rules == ["add rule ip filter INPUT meta l4proto tcp counter accept",
                     "add rule ip filter INPUT meta l4proto udp counter accept",
                     "add rule ip filter INPUT tcp dport 22 counter accept",
                     'add rule ip filter INPUT ip protocol != tcp counter accept comment "y"',
                     'add rule ip nat PREROUTING meta l4proto tcp counter dnat to 10.0.0.1:80 comment "x"']
    assert rc == 0


# ---------------------------------------------------------------- jump cascades (kube-proxy)

def test_kube_proxy_cascades_become_one_map_per_service_chain(capsys):
    """KUBE-SVC-… cascades jumping to KUBE-SEP-… chains: one numgen vmap
    each; session affinity through the one affinity set; nothing left as
    an untranslatable comment; the rest (entries, marks, endpoint chains)
    as iptables-restore-translate writes it."""
    rc, out, err = run(capsys, (FIXTURES / "kube-proxy.rules").read_text())
    assert rc == 0 and "warning" not in err and "# untranslatable" not in out
    rules = [line for line in out.splitlines() if line.startswith("add rule ip nat KUBE-SVC-")]
    assert "add rule ip nat KUBE-SVC-WEBT6MQ3RBNY2ZPA numgen random mod 3 vmap { 0 : jump " \
           "KUBE-SEP-WEB2XRDM5KQ4LZ7P, 1 : jump KUBE-SEP-WEB5JQ2NVT7YHX4C, 2 : jump " \
           "KUBE-SEP-WEB7LC4ZPQ2WRM6D }" in rules
    assert not any("statistic" in r or "meta random" in r for r in rules)
    api = [r for r in rules if "KUBE-SVC-APIF3KQ7ZL2WX6NB" in r]
    assert api[1] == ('add rule ip nat KUBE-SVC-APIF3KQ7ZL2WX6NB ip saddr . meta mark & 0x0 | 0x00000001 '
                      '@ipvs2nft_affinity counter jump KUBE-SEP-API2Q5WDX3MHF7KR comment '
                      '"shop/api:http -> 192.168.100.10:8080"')
    assert ('add rule ip nat KUBE-SEP-API2Q5WDX3MHF7KR meta l4proto tcp update @ipvs2nft_affinity '
            '{ ip saddr . 0x00000001 timeout 10800s } counter dnat to 192.168.100.10:8080 comment '
            '"shop/api:http"') in out
    assert out.count("add set ip nat ipvs2nft_affinity") == 1
    # the single-endpoint chain has nothing to pick: left as it is
    assert "add rule ip nat KUBE-SVC-ADMQ5ZR2K7VN4XHL counter jump KUBE-SEP-ADM4LHKQ7VZT2NEC" in out


KUBE_SMALL = """*nat
:PREROUTING ACCEPT [0:0]
:SVC - [0:0]
:EP1 - [0:0]
:EP2 - [0:0]
-A PREROUTING -d 10.96.0.1/32 -p tcp -m tcp --dport 80 -j SVC
-A SVC -m recent --rcheck --seconds 60 --reap --name EP1 --mask 255.255.255.0 --rsource -j EP1
-A SVC -m statistic --mode random --probability 0.25 -j EP1
-A SVC -j EP2
-A EP1 -p tcp -m recent --set --name EP1 --mask 255.255.255.0 --rsource -m tcp -j DNAT --to 10.0.0.1:80
-A EP2 -p tcp -m tcp -j DNAT --to-destination 10.0.0.2:80
COMMIT
"""


def test_jump_cascade_masks_and_shares():
    t = translate.run(KUBE_SMALL)
    (lift,) = t.jumps.lifted
    assert [str(d) for d in lift.table] == ["10.0.0.1:80 (EP1)"] + ["10.0.0.2:80 (EP2)"] * 3
    script = "\n".join(t.script_lines)
    assert "numgen random mod 4 vmap { 0 : jump EP1, 1-3 : jump EP2 }" in script
    assert "ip saddr & 255.255.255.0 . meta mark & 0x0 | 0x00000001 @ipvs2nft_affinity" in script
    assert "update @ipvs2nft_affinity { ip saddr & 255.255.255.0 . 0x00000001 timeout 60s }" in script


@pytest.mark.parametrize("change,why", [
    ("-A EP2 -j RETURN\n", "an endpoint chain that can return"),
    ("-A EP1 -g EP2\n", "a goto in an endpoint chain"),
])
def test_jump_cascade_not_lifted_when_an_endpoint_can_return(change, why):
    text = KUBE_SMALL.replace("-A EP2 -p tcp", change + "-A EP2 -p tcp")
    assert translate.run(text).jumps.lifted == [], why


def test_affinity_list_used_elsewhere_stays_rule_by_rule(capsys):
    text = KUBE_SMALL.replace("COMMIT", "-A PREROUTING -m recent --rcheck --name EP1 -j ACCEPT\nCOMMIT")
    rc, out, err = run(capsys, text)
    assert rc == 0 and "numgen random mod 4 vmap" in out
    assert "session affinity not lifted (line 12 also uses the list)" in err
    assert "# untranslatable (line 7)" in out and "warning: line 7: iptables-translate cannot" in err


@pytest.mark.netns
def test_a_script_nft_refuses_is_an_error_naming_the_input_line(capsys):
    """iptables-translate writes ``-j TOS --set-tos`` in an ip table as
    ``ip6 dscp set``, which nft refuses ("conflicting protocols"); translate
    checks its script with nft -c and names the input line instead of
    printing it with exit status 0."""
    if NETNS_SKIP:
        pytest.skip(NETNS_SKIP)
    rc, out, err = run(capsys, "iptables -t mangle -A PREROUTING -j MARK --set-mark 1\n"
                               "iptables -t mangle -A PREROUTING -p tcp --dport 22 -j TOS --set-tos 0x10\n"
                               "iptables -A INPUT -j ACCEPT\n")
    assert (rc, out) == (2, "")
    assert re.fullmatch(r"ipvs2nft: line 2: nftables refuses the translation \(script line \d+: "
                        r"conflicting protocols specified: ip vs\. ip6\)\n", err), err
