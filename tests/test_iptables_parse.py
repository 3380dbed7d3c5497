"""iptables command lines and iptables-save text into a Ruleset."""

from __future__ import annotations

import pytest

from ipvs2nft.iptables.parse import parse
from ipvs2nft.iptables.rules import ParseError


def rules_of(text: str, family: int = 4, table: str = "nat", chain: str = "PREROUTING"):
    ruleset, _ = parse(text)
    return ruleset.chain(family, table, chain).rules


def test_leading_word_optional_and_table_option():
    for line in ("iptables -t nat -A PREROUTING -d 10.0.0.1 -j ACCEPT",
                 "sudo /usr/sbin/iptables-legacy -t nat -A PREROUTING -d 10.0.0.1 -j ACCEPT",
                 "-t nat -A PREROUTING -d 10.0.0.1 -j ACCEPT",
                 "-A PREROUTING -t nat -d 10.0.0.1 -j ACCEPT"):
        (r,) = rules_of(line)
        assert (r.table, r.chain, r.target, r.head("d").value) == ("nat", "PREROUTING", "ACCEPT",
                                                                  "10.0.0.1")


def test_default_table_is_filter():
    (r,) = rules_of("iptables -A INPUT -p tcp --dport 22 -j ACCEPT", table="filter", chain="INPUT")
    assert r.match("tcp").get("dport").value == "22"


def test_family_from_command_word_or_addresses():
    ruleset, _ = parse("ip6tables -t nat -A PREROUTING -p tcp --dport 80 -j ACCEPT\n"
                       "-t nat -A PREROUTING -d 2001:db8::40 -j ACCEPT\n"
                       "-t nat -A PREROUTING -d 10.0.0.1 -j ACCEPT\n")
    assert len(ruleset.chain(6, "nat", "PREROUTING").rules) == 2
    assert len(ruleset.chain(4, "nat", "PREROUTING").rules) == 1


def test_continuation_lines_and_quotes_keep_the_first_line_number():
    text = ('# comment\n'
            'iptables -t nat -A PREROUTING -m comment --comment "a \\"b\\" c" \\\n'
            '   -d 10.0.0.1 -j ACCEPT\n'
            "iptables -t nat -A PREROUTING -m comment --comment 'single quoted' -j ACCEPT\n")
    r1, r2 = rules_of(text)
    assert r1.line == 2 and r1.match("comment").get("comment").value == 'a "b" c'
    assert r1.head("d").value == "10.0.0.1"
    assert r2.line == 4 and r2.match("comment").get("comment").value == "single quoted"


def test_matches_keep_command_line_order_and_implicit_protocol_match():
    (r,) = rules_of("iptables -t nat -A PREROUTING -m statistic --mode nth --every 2 --packet 0 "
                    "-d 192.168.0.40 -p tcp --dport 80 -j DNAT --to-destination 192.168.100.10:80")
    assert r.modules() == ["statistic", "tcp"]
    assert r.matches[1].implicit
    (r,) = rules_of("iptables -t nat -A PREROUTING -d 192.168.0.40 -p tcp --dport 80 "
                    "-m statistic --mode random --probability 0.5 -j DNAT --to 192.168.100.10")
    assert r.modules() == ["tcp", "statistic"]
    assert r.topt("to-destination").value == "192.168.100.10"  # unambiguous prefix, as getopt


def test_options_go_to_their_owner_even_after_the_target():
    (r,) = rules_of('iptables -t nat -A PREROUTING -m mark --mark 1 -j DNAT -p tcp '
                    '--to-destination 192.168.100.10:80 -m recent --name "mark1_list" --set')
    assert r.match("mark").get("mark").value == "1"
    assert r.topt("to-destination").value == "192.168.100.10:80"
    assert [o.name for o in r.match("recent").opts] == ["name", "set"]
    assert r.head("p").value == "tcp"


def test_negation_prefix_old_style_and_equals_form():
    (r,) = rules_of("iptables -t nat -A PREROUTING ! -s 10.0.0.0/8 -p tcp ! --dport 80 "
                    "--sport=1024 -j ACCEPT")
    assert r.head("s").neg
    assert r.match("tcp").get("dport").neg
    assert r.match("tcp").get("sport").value == "1024"
    (r,) = rules_of("iptables -t nat -A PREROUTING -p tcp --dport ! 80 -j ACCEPT")
    assert r.match("tcp").get("dport").neg and r.match("tcp").get("dport").value == "80"


def test_unknown_extensions_take_the_words_up_to_the_next_option():
    (r,) = rules_of('iptables -A INPUT -m u32 --u32 "0>>22&0x3C@4=0x29" -m foo --bar a b -j DROP',
                    table="filter", chain="INPUT")
    assert r.match("u32").get("u32").value == "0>>22&0x3C@4=0x29"
    assert r.match("foo").get("bar").values == ("a", "b")


def test_insert_replace_delete_and_rename():
    text = "\n".join([
        "iptables -t nat -A PREROUTING -d 10.0.0.1 -j ACCEPT",
        "iptables -t nat -A PREROUTING -d 10.0.0.2 -j ACCEPT",
        "iptables -t nat -I PREROUTING -d 10.0.0.3 -j ACCEPT",
        "iptables -t nat -I PREROUTING 3 -d 10.0.0.4 -j ACCEPT",
        "iptables -t nat -R PREROUTING 1 -d 10.0.0.5 -j ACCEPT",
        "iptables -t nat -D PREROUTING -d 10.0.0.1 -j ACCEPT",
        "iptables -t nat -N WEB",
        "iptables -t nat -A WEB -j RETURN",
        "iptables -t nat -E WEB WWW",
        "iptables -t nat -D PREROUTING 1",
    ])
    ruleset, _ = parse(text)
    chain = ruleset.chain(4, "nat", "PREROUTING")
    assert [r.head("d").value for r in chain.rules] == ["10.0.0.4", "10.0.0.2"]
    assert ruleset.chain(4, "nat", "WWW").rules[0].chain == "WWW"


def test_policy_flush_and_delete_chain():
    ruleset, _ = parse("iptables -P FORWARD DROP\niptables -N X\niptables -A X -j ACCEPT\n"
                       "iptables -F X\niptables -X X\n")
    t = ruleset.table(4, "filter")
    assert t.chains["FORWARD"].policy == "DROP" and "X" not in t.chains


def test_iptables_save_blocks_with_counters_and_family_comment():
    text = ("# Generated by ip6tables-save v1.8.9 on Sat Nov 28 12:00:00 2026\n"
            "*nat\n:PREROUTING ACCEPT [3:180]\n:WEB - [0:0]\n"
            "[12:720] -A PREROUTING -p tcp -m tcp --dport 80 -j WEB\n"
            "COMMIT\n")
    ruleset, _ = parse(text)
    (r,) = ruleset.chain(6, "nat", "PREROUTING").rules
    assert r.counters == (12, 720) and r.target == "WEB" and r.line == 5
    assert ruleset.chain(6, "nat", "WEB").policy is None


def test_a_save_block_replaces_its_table():
    text = ("iptables -t nat -A PREROUTING -d 10.0.0.1 -j ACCEPT\n"
            "*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -d 10.0.0.2 -j ACCEPT\nCOMMIT\n")
    assert [r.head("d").value for r in rules_of(text)] == ["10.0.0.2"]


def test_block_family_from_addresses_without_comment():
    ruleset, _ = parse("*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -d 2001:db8::40/128 "
                       "-j ACCEPT\nCOMMIT\n")
    assert ruleset.chain(6, "nat", "PREROUTING").rules


def test_missing_commit_is_a_warning():
    ruleset, warnings = parse("*filter\n-A INPUT -j ACCEPT\n")
    assert ruleset.chain(4, "filter", "INPUT").rules
    assert warnings == ["line 1: *filter has no COMMIT; taken as committed at the end of the input"]


@pytest.mark.parametrize("text,line,message", [
    ("iptables -t nat -A PREROUTING --bogus 1 -j ACCEPT", 1, 'unknown option "--bogus"'),
    ("\niptables -t nat -A PREROUTING -d", 2, 'option "-d" requires an argument'),
    ("iptables -A INPUT -m comment --comment 'open", 1, "cannot split the line"),
    ("COMMIT", 1, "COMMIT without a *table line"),
    ("iptables -t nat -A NOPE -j ACCEPT", 1, "No chain/target/match by that name"),
    ("iptables -t nat -I PREROUTING 5 -j ACCEPT", 1, "Index of insertion too big."),
    ("iptables -t nat -D PREROUTING -d 10.0.0.9 -j ACCEPT", 1, "Bad rule"),
    ("iptables -t nat -s 10.0.0.1", 1, "no command"),
    ("iptables -t bogus -A X -j ACCEPT", 1, "can't initialize iptables table `bogus'"),
    ("echo hello", 1, "not an iptables command: echo"),
    ("iptables -A INPUT -A INPUT", 1, "more than one command"),
])
def test_errors_carry_the_line_number(text, line, message):
    with pytest.raises(ParseError) as exc:
        parse(text)
    assert exc.value.line == line
    assert message in exc.value.message


def test_command_lines_are_split_as_sh_splits_them():
    """A script's ``... --packet 0;`` (the shell ends the command there),
    two commands on a line, a ``#`` comment after a command; quoted ``;``
    and ``#`` stay in their word; in an iptables-save block the shell has
    no say (iptables-restore would pass ``0;`` on and refuse it)."""
    text = ("iptables -t nat -A PREROUTING -d 10.0.0.1 -p tcp --dport 80 -m statistic --mode nth "
            "--every 2 --packet 0 -j DNAT --to-destination 10.0.1.1:80;\n"
            "iptables -t nat -A PREROUTING -d 10.0.0.1 -p tcp --dport 80 -j DNAT "
            "--to-destination 10.0.1.2:80 ; iptables -t nat -A PREROUTING -d 10.0.0.2 -j ACCEPT # x;y\n"
            "iptables -t nat -A PREROUTING -m comment --comment 'a;b #c' -d 10.0.0.3 -j ACCEPT\n")
    rules = rules_of(text)
    assert [r.line for r in rules] == [1, 2, 2, 3]
    assert rules[0].match("statistic").get("packet").value == "0"
    assert rules[2].target == "ACCEPT" and rules[3].match("comment").get("comment").value == "a;b #c"
    with pytest.raises(ParseError, match="shell operator '|'"):
        parse("iptables -A INPUT -j ACCEPT | tee x\n")
    (saved,) = rules_of("*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -m statistic --mode nth "
                        "--every 2 --packet 0; -j ACCEPT\nCOMMIT\n")
    assert saved.match("statistic").get("packet").value == "0;"
