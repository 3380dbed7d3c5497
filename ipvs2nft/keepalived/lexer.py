"""keepalived.conf(5) read the way keepalived's own reader does, into a tree.

keepalived's ``lib/parser.c`` reads a file line by line: ``include`` (with
glob patterns, relative to the including file's directory, since keepalived
``chdir``s into it) pulls other files in; ``decomment()`` cuts a line at the
first ``!`` or ``#`` outside double quotes (``\\!`` and ``\\#`` are literal);
``read_line()`` then splits the line at every ``{`` and ``}`` outside quotes,
so a brace is always a statement of its own; ``alloc_strvec()`` splits a
statement into words at blanks, a ``"quoted string"`` being one word without
its quotes.  ``$NAME=value`` lines define parameters that ``$NAME`` or
``${NAME}`` later expands, and a line starting ``@ID`` or ``@^ID`` is kept
only when the configuration id (keepalived's ``-i``, by default the host
name without its domain) is or is not ``ID``.

Which keyword opens a block is the grammar's business in keepalived
(``keyword->sub``); here the tree is generic -- a statement followed by a
``{`` statement owns everything up to the matching ``}`` -- and ``parse.py``
says which keywords must or must not have a block.  Every node keeps its
file and line number, so every error can name them as keepalived does
(``(FILE: Line N) message``, ``report_config_error``).
"""

from __future__ import annotations

import glob
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

MAX_INCLUDE_DEPTH = 32  # a loop of includes must end somewhere


@dataclass(frozen=True)
class Where:
    """A place in the configuration, for messages."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"({self.file}: Line {self.line})"


class ConfigError(Exception):
    """Something keepalived refuses or that ipvs2nft does not carry out: the
    configuration is not applied.  ``str()`` is keepalived's form of the message."""

    def __init__(self, where: Where | None, message: str) -> None:
        super().__init__(message)
        self.where = where
        self.message = message

    def __str__(self) -> str:
        return f"{self.where} {self.message}" if self.where else self.message


@dataclass
class Node:
    """One statement (its words) and, if a ``{`` followed it, its block."""

    words: list[str]
    where: Where
    block: list[Node] | None = None

    @property
    def keyword(self) -> str:
        return self.words[0]

    @property
    def args(self) -> list[str]:
        return self.words[1:]


@dataclass
class _Reader:
    config_id: str
    defs: dict[str, str] = field(default_factory=dict)
    depth: int = 0

    # ------------------------------------------------------------ files
    def read_file(self, path: Path, shown: str) -> list[tuple[list[str], Where]]:
        try:
            text = path.read_text(encoding="utf-8", errors="surrogateescape")
        except OSError as exc:
            raise ConfigError(None, f"Configuration file '{shown}' open problem ({exc.strerror})") from None
        out: list[tuple[list[str], Where]] = []
        for number, raw in enumerate(text.splitlines(), 1):
            out += self.line(raw, Where(shown, number), path.parent)
        return out

    def include(self, pattern: str, where: Where, directory: Path) -> list[tuple[list[str], Where]]:
        """``include FILE|GLOB``: every match in sorted order (glob(3) sorts);
        a pattern that matches nothing is keepalived's "No config files
        matched" and a missing plain file its "Config files missing"."""
        if self.depth >= MAX_INCLUDE_DEPTH:
            raise ConfigError(where, f"include nesting deeper than {MAX_INCLUDE_DEPTH} - loop?")
        full = pattern if os.path.isabs(pattern) else str(directory / pattern)
        matches = sorted(glob.glob(full))
        if not matches:
            wild = any(c in pattern for c in "*?[")
            text = "No config files matched" if wild else "Config files missing"
            raise ConfigError(where, f"{text} '{pattern}'.")
        out: list[tuple[list[str], Where]] = []
        self.depth += 1
        try:
            for match in matches:
                if os.path.isdir(match):
                    raise ConfigError(where, f"Configuration file '{match}' is a directory - skipping")
                out += self.read_file(Path(match), match)
        finally:
            self.depth -= 1
        return out

    # ------------------------------------------------------------ lines
    def line(self, raw: str, where: Where, directory: Path) -> list[tuple[list[str], Where]]:
        text = decomment(raw.rstrip("\r\n"), where)
        if not text:
            return []
        text = self.conditional(text)
        if not text:
            return []
        if text.startswith("$") and self.definition(text):
            return []
        if text.startswith("~"):
            raise ConfigError(where, "~SEQ/~LST sequences are not supported by ipvs2nft; "
                                     "write the lines out")
        if "$" in text and self.defs:
            text = self.expand(text, where)
            text = decomment(text, where)
        words = split_words(text, where)
        if words and words[0] in ("include", "includer", "includem", "includew", "includeb", "includea"):
            if len(words) < 2:
                raise ConfigError(where, "include: missing file name")
            return self.include(" ".join(words[1:]), where, directory)
        return [(w, where) for w in split_braces(text, where)]

    def conditional(self, text: str) -> str:
        """``@ID rest`` / ``@^ID rest`` (keepalived's config_id lines)."""
        if not text.startswith("@"):
            return text
        negate = text.startswith("@^")
        rest = text[2:] if negate else text[1:]
        ident, _, remainder = rest.partition(" ")
        if not remainder.strip():
            return ""
        return remainder.strip() if (ident == self.config_id) != negate else ""

    def definition(self, text: str) -> bool:
        m = re.match(r"\$([A-Za-z_][A-Za-z0-9_]*)[ \t]*=[ \t]*(.*)\Z", text)
        if not m:
            return False
        if m.group(2).endswith("\\"):
            raise ConfigError(None, f"multi-line definition ${m.group(1)} is not supported by ipvs2nft")
        self.defs[m.group(1)] = m.group(2)
        return True

    def expand(self, text: str, where: Where) -> str:
        def one(m: re.Match) -> str:
            name = m.group(1) or m.group(2)
            return self.defs.get(name, m.group(0))

        for _ in range(20):  # definitions may refer to definitions
            new = re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)", one, text)
            if new == text:
                return new
            text = new
        raise ConfigError(where, "parameter expansion does not end (a definition refers to itself)")


def decomment(line: str, where: Where) -> str:
    """parser.c ``decomment()``: cut at ``!``/``#`` outside quotes, unescape
    ``\\!``/``\\#``, strip blanks."""
    out, quote, i = [], False, 0
    while i < len(line):
        c = line[i]
        if c == "\\" and i + 1 < len(line):
            if not quote and line[i + 1] in "!#":
                out.append(line[i + 1])
            else:
                out.append(line[i:i + 2])
            i += 2
            continue
        if c == '"':
            quote = not quote
        elif not quote and c in "!#":
            break
        out.append(c)
        i += 1
    if quote:
        raise ConfigError(where, f"Unterminated quote '{line.strip()}'")
    return "".join(out).strip(" \t")


def split_braces(text: str, where: Where) -> list[list[str]]:
    """``read_line()``: every ``{``/``}`` outside quotes is a statement of its own."""
    parts, cur, quote = [], [], False
    for c in text:
        if c == '"':
            quote = not quote
        if not quote and c in "{}":
            parts.append("".join(cur))
            parts.append(c)
            cur = []
            continue
        cur.append(c)
    parts.append("".join(cur))
    return [w for w in (split_words(p, where) for p in parts) if w]


def split_words(text: str, where: Where) -> list[str]:
    """``alloc_strvec()``: blank-separated words; ``"..."`` is one word."""
    words, i, n = [], 0, len(text)
    while i < n:
        while i < n and text[i] in " \t\f\v":
            i += 1
        if i >= n:
            break
        if text[i] == '"':
            end = text.find('"', i + 1)
            if end < 0:
                raise ConfigError(where, f"Unmatched quote: '{text}'")
            words.append(text[i + 1:end])
            i = end + 1
            continue
        start = i
        while i < n and text[i] not in ' \t\f\v"':
            i += 1
        words.append(text[start:i])
    return words


def default_config_id() -> str:
    """keepalived's default ``config_id``: the host name up to its first dot."""
    return socket.gethostname().split(".", 1)[0]


def read(path: str, config_id: str | None = None) -> list[Node]:
    """The configuration rooted at ``path`` (its includes followed) as a tree."""
    reader = _Reader(config_id if config_id is not None else default_config_id())
    p = Path(path)
    if not p.is_file():
        raise ConfigError(None, f"Unable to find configuration file {path}")
    statements = reader.read_file(p, path)
    return _tree(statements)


def read_text(text: str, name: str = "keepalived.conf", directory: str = ".",
              config_id: str = "") -> list[Node]:
    """The same for text in memory (tests, stdin)."""
    reader = _Reader(config_id)
    statements: list[tuple[list[str], Where]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        statements += reader.line(raw, Where(name, number), Path(directory))
    return _tree(statements)


def _tree(statements: list[tuple[list[str], Where]]) -> list[Node]:
    root: list[Node] = []
    stack: list[list[Node]] = [root]
    opened: list[Where] = []
    for words, where in statements:
        if words == ["{"]:
            current = stack[-1]
            if not current or current[-1].block is not None:
                raise ConfigError(where, "Unexpected '{' - no keyword before it")
            current[-1].block = []
            stack.append(current[-1].block)
            opened.append(where)
        elif words == ["}"]:
            if len(stack) == 1:
                raise ConfigError(where, "Extra '}' found")
            stack.pop()
            opened.pop()
        else:
            stack[-1].append(Node(words, where))
    if opened:
        raise ConfigError(opened[-1], f"There are {len(opened)} missing '}}'s or extra '{{'s")
    return root
