"""Every rule that is not part of an idiom, through iptables-restore-translate.

All rules of each family are written back as one iptables-restore document
(in their final chain order, so ``-I n`` and ``-D`` are already applied,
which ``iptables-translate -I`` alone would lose) and handed to
``iptables-restore-translate`` / ``ip6tables-restore-translate`` (Debian
package iptables).  That also validates the rules the idioms consumed (a
rule iptables refuses is an input error, lifted or not); their output is
then dropped, with the base chains and tables nothing else is left in.
Each rule carries a marker comment ``i2n:<uid>`` so every output line can
be traced back to its input line; the marker is replaced by the rule's own
comment afterwards.

What the tool gets wrong is caught here, not passed on silently:

* untranslatable rules come out as ``# -t table -A ...`` with exit status 0
  (measured: -m recent, u32, string, socket, ipvs, -j CT --helper, NETMAP,
  TPROXY; ../shared/reference/peers.md section 3): they stay in the script as
  comments and each one is a warning with its line number;
* ``CONNMARK --set-mark v/m`` comes out as ``ct mark set ct mark xor v and
  ~m``, which nft 1.0.6 parses as ``xor (v and ~m)``, a no-op: rewritten to
  ``ct mark set ct mark and ~m xor v``;
* CONNMARK --save-mark/--restore-mark with partial masks lose the bits
  outside the mask (nft cannot combine two marks): a warning;
* a rule comment with a double quote is printed unquotable: the quote is
  replaced by a single one;
* ``[packets:bytes]`` rule counters are dropped: they are put back as
  ``counter packets P bytes B``;
* ``-p tcp -m tcp`` (a protocol match with no option, as kube-proxy writes
  every DNAT rule) loses its protocol: ``-p tcp -m tcp -j ACCEPT`` comes out
  as ``counter accept`` (every protocol), and ``-j DNAT --to-destination
  a:p`` as a ``dnat to a:p`` nft refuses ("transport protocol mapping is
  only valid after transport protocol match") with exit status 0: the
  protocol is put back as ``meta l4proto tcp``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field

from ipvs2nft.iptables.rules import BUILTIN_CHAINS, ParseError, Rule, Ruleset

TOOLS = {4: "iptables-restore-translate", 6: "ip6tables-restore-translate"}
MARKER = "i2n:"
_MARKED = re.compile(r' comment "' + MARKER + r'(\d+)"')
_UNTRANSLATED = re.compile(r"\s*-m comment --comment " + MARKER + r"(\d+)")
_CONNMARK_XOR_AND = re.compile(r"ct mark set ct mark xor (0x[0-9a-f]+) and (0x[0-9a-f]+)")
FULL = 0xFFFFFFFF


@dataclass(frozen=True)
class Rewrite:
    """A rule a lift writes itself, in its place: nft rule bodies (what
    follows ``add rule <family> <table> <chain>``).  ``extras``: the rule's
    comment and counters are added as to a translated rule."""

    bodies: tuple[str, ...]
    extras: bool = True


@dataclass
class Passthrough:
    """The translated rules of one family: script lines, warnings, notes."""

    lines: list[str] = field(default_factory=list)
    warnings: list[tuple[int, str]] = field(default_factory=list)
    notes: list[tuple[int, str]] = field(default_factory=list)
    untranslated: int = 0
    approximated: int = 0


def quote(word: str) -> str:
    """A word as iptables-restore splits it (double quotes, backslash escapes)."""
    if word and not re.search(r'[\s"\'\\#]', word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class Document:
    """An iptables-restore document of one family, and what to keep of its translation."""

    text: str
    rules: dict[int, Rule]  # by uid, every rule in the document
    keep_tables: set[str]
    keep_chains: set[tuple[str, str]]


def document(ruleset: Ruleset, family: int, consumed: set[int]) -> Document:
    """All rules of ``family`` as an iptables-restore document."""
    out: list[str] = []
    doc = Document("", {}, set(), set())
    for (fam, name), table in ruleset.tables.items():
        if fam != family:
            continue
        chains = []
        for chain in table.chains.values():
            builtin = chain.name in BUILTIN_CHAINS.get(name, ())
            kept = any(r.uid not in consumed for r in chain.rules)
            if kept or chain.policy != "ACCEPT" or not builtin:
                doc.keep_tables.add(name)
                doc.keep_chains.add((name, chain.name))
            if chain.rules or chain.policy != "ACCEPT" or not builtin:
                chains.append(chain)
        if not chains:
            continue
        out.append(f"*{name}")
        for chain in chains:
            out.append(f":{chain.name} {chain.policy or '-'} [0:0]")
        for chain in chains:
            for r in chain.rules:
                doc.rules[r.uid] = r
                words = " ".join(quote(w) for w in r.spec)
                out.append(f"-A {quote(chain.name)} {words} -m comment --comment {MARKER}{r.uid}")
        out.append("COMMIT")
    doc.text = "".join(line + "\n" for line in out)
    return doc


def translate(ruleset: Ruleset, family: int, consumed: set[int],
              rewrites: dict[int, Rewrite] | None = None, declarations: tuple[str, ...] = ()) -> Passthrough:
    """Run the Debian translator over the rules of ``family``; keep what the
    idioms did not consume, write the ``rewrites`` in place of their rules,
    and the ``declarations`` (sets of the nat table) after the nat table."""
    rewrites = rewrites or {}
    doc = document(ruleset, family, consumed)
    result = Passthrough()
    if not doc.text:
        return result
    kept = {u: r for u, r in doc.rules.items() if u not in consumed}
    masks = _mask_warnings(kept.values())
    result.warnings.extend(masks)
    result.approximated += len(masks)
    tool = shutil.which(TOOLS[family]) or shutil.which(TOOLS[family], path="/usr/sbin:/sbin")
    if tool is None:
        for r in kept.values():
            result.warnings.append((r.line, f"not translated: {TOOLS[family]} is missing "
                                            "(Debian package iptables)"))
            result.lines.append(f"# untranslated (line {r.line}): {' '.join(r.spec)}")
        result.untranslated = len(kept)
        return result
    output = _run(tool, doc.text, doc.rules)
    for line in output.splitlines():
        if _wanted(line, doc, consumed):
            _line(line, kept, result, rewrites)
        if declarations and line.startswith(f"add table {_IP[family]} nat"):
            result.lines.extend(declarations)
    return result


_IP = {4: "ip", 6: "ip6"}


_ADD_TABLE = re.compile(r"add table ip6? (\S+)$")
_ADD_CHAIN = re.compile(r"add chain ip6? (\S+) (\S+)")


def _wanted(line: str, doc: Document, consumed: set[int]) -> bool:
    """Drop the output of consumed rules, and tables/base chains left empty."""
    u = re.search(MARKER + r"(\d+)", line)
    if u and int(u.group(1)) in consumed:
        return False
    m = _ADD_TABLE.match(line)
    if m:
        return m.group(1) in doc.keep_tables
    m = _ADD_CHAIN.match(line)
    if m:
        return (m.group(1), m.group(2)) in doc.keep_chains
    return True


def _run(tool: str, text: str, by_uid: dict[int, Rule]) -> str:
    with tempfile.NamedTemporaryFile("w", prefix="ipvs2nft-", suffix=".rules", delete=False) as f:
        f.write(text)
        path = f.name
    try:
        p = subprocess.run([tool, "-f", path], capture_output=True, text=True)
    finally:
        os.unlink(path)
    if p.returncode != 0:
        raise _tool_error(p.stderr, text, by_uid)
    return p.stdout


def _tool_error(stderr: str, text: str, by_uid: dict[int, Rule]) -> ParseError:
    """iptables-restore-translate refused a rule: report it at its input line."""
    texts = [re.sub(r"^\S+ v[\d.]+ \([^)]*\):\s*", "", ln).strip() for ln in stderr.splitlines()]
    message = next((t for t in texts if t and not t.startswith("Try ")
                    and not t.startswith("Error occurred")), "rule refused")
    m = re.search(r"Error occurred at line: (\d+)", stderr)
    if m:
        doc = text.splitlines()[int(m.group(1)) - 1]
        u = re.search(MARKER + r"(\d+)", doc)
        if u and int(u.group(1)) in by_uid:
            return ParseError(by_uid[int(u.group(1))].line, message)
    first = min((r.line for r in by_uid.values()), default=0)
    return ParseError(first, message)


def _line(line: str, by_uid: dict[int, Rule], result: Passthrough, rewrites: dict[int, Rewrite]) -> None:
    if line.startswith("# Translated by") or line.startswith("# Completed on") or not line.strip():
        return
    u = re.search(MARKER + r"(\d+)", line)
    if u and int(u.group(1)) in rewrites and int(u.group(1)) in by_uid:
        _rewritten(by_uid[int(u.group(1))], rewrites[int(u.group(1))], result)
        return
    if line.startswith("#"):
        rule = by_uid.get(int(u.group(1))) if u else None
        original = _UNTRANSLATED.sub("", line[1:]).strip()
        where = f"line {rule.line}" if rule else "line ?"
        result.lines.append(f"# untranslatable ({where}): {original}")
        result.untranslated += 1
        if rule is not None:
            result.warnings.append((rule.line, "iptables-translate cannot translate this rule "
                                               f"({_modules(rule)}); kept as a comment"))
        return
    m = _MARKED.search(line)
    rule = by_uid.get(int(m.group(1))) if m else None
    if m:
        line = line[:m.start()] + line[m.end():]
    if rule is not None:
        line = _fix(line, rule, result)
    result.lines.append(line)


# -p values whose bare match (-m tcp ...) iptables-translate prints as nothing
_L4 = {"tcp": "tcp", "6": "tcp", "udp": "udp", "17": "udp", "udplite": "udplite", "136": "udplite",
       "sctp": "sctp", "132": "sctp", "dccp": "dccp", "33": "dccp"}
_L4_MATCH = re.compile(r"\b(?:tcp|udp|udplite|sctp|dccp|th|meta l4proto|ip protocol|ip6 nexthdr)\b")
_RULE_HEAD = re.compile(r"(add rule ip6? \S+ \S+ )(.*)")


def _protocol_kept(line: str, rule: Rule) -> str:
    """Put back the ``-p`` iptables-translate dropped (see the module doc)."""
    p = rule.head("p")
    proto = _L4.get(p.value) if p is not None and not p.neg else None
    m = _RULE_HEAD.match(line)
    if proto is None or m is None:
        return line
    matches = m.group(2).split(" counter", 1)[0]
    if _L4_MATCH.search(matches):
        return line
    return f"{m.group(1)}meta l4proto {proto} {m.group(2)}"


def _rewritten(rule: Rule, rewrite: Rewrite, result: Passthrough) -> None:
    for body in rewrite.bodies:
        line = f"add rule {_IP[rule.family]} {rule.table} {rule.chain} {body}"
        result.lines.append(_fix(line, rule, result) if rewrite.extras else line)


def _fix(line: str, rule: Rule, result: Passthrough) -> str:
    line = _protocol_kept(line, rule)
    comments = [o.value for m in rule.matches if m.module == "comment" for o in m.opts]
    if comments:
        line += ' comment "' + comments[-1].replace('"', "'")[:128] + '"'
    fixed = _CONNMARK_XOR_AND.sub(r"ct mark set ct mark and \2 xor \1", line)
    if fixed != line:
        result.notes.append((rule.line, "CONNMARK value/mask: iptables-translate's "
                                        "'ct mark set ct mark xor V and M' is a no-op in nft "
                                        "(and binds tighter); written as 'and M xor V'"))
        line = fixed
    if rule.counters is not None and " counter " in line + " ":
        p, b = rule.counters
        line = re.sub(r"\bcounter\b", f"counter packets {p} bytes {b}", line, count=1)
    return line


def _modules(rule: Rule) -> str:
    names = [f"-m {m}" for m in rule.modules() if m != "comment"]
    if rule.target:
        names.append(f"-j {rule.target}")
    return ", ".join(names)


def _mask_warnings(rules) -> list[tuple[int, str]]:
    out = []
    for r in rules:
        if r.target != "CONNMARK" or not (r.topt("save-mark") or r.topt("restore-mark")):
            continue
        for name in ("mask", "nfmask", "ctmask"):
            o = r.topt(name)
            try:
                partial = o is not None and int(o.value, 0) != FULL
            except ValueError:
                partial = False
            if partial:
                out.append((r.line, f"CONNMARK --{name}: nft cannot merge two marks, the bits "
                                    "outside the mask are cleared instead of kept (approximated)"))
                break
    return out
