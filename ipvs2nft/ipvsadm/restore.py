"""ipvsadm command lines, split into words as ipvsadm splits them.

The one tokenizer of ipvsadm input: ``ipvsadm -R`` (``lines``), the
``ipvsadm-restore`` script and ``ipvs2nft translate`` (``script_lines``).

ipvsadm's config_stream_read() reads tokens with
``fscanf("%4096[^ \\t\\n\\r]%1[ \\t\\n\\r]")``: no quoting, no comments (``#`` is
an ordinary word), every word ``ipvsadm`` dropped wherever it stands, CR and
tab are blanks -- and nothing else is (a vertical tab or form feed is part
of a word).  One quirk is kept on purpose: a last line that has no newline
and ends in two or more blanks is lost (the scanner meets EOF while skipping
blanks and throws the line away).

The ipvsadm-restore script runs ``grep -v '^#'`` over its input and echoes
the result into ``ipvsadm -R``: only a ``#`` in the first column makes a
comment (``  # x`` is a command, and an invalid one), and the text always
ends in one newline.
"""

from __future__ import annotations

from collections.abc import Iterator

_BLANKS = b" \t\r"
_MAX_TOKEN = 4096


_TO_SPACE = bytes.maketrans(b"\t\r", b"  ")


def lines(data: bytes) -> Iterator[list[str]]:
    """Each line's words, without ``ipvsadm``; blank lines give ``[]``.

    A complete line shorter than a token's limit is plain splitting at
    blanks, done here in bulk; a longer one, and a last line without its
    newline (where the EOF quirk lives), go through the scanner."""
    complete, newline, last = data.rpartition(b"\n")
    if not newline:
        yield from scan(data)
        return
    if complete.isascii():  # the usual file: decoded once, characters are bytes
        for text in complete.translate(_TO_SPACE).decode("ascii").split("\n"):
            if len(text) < _MAX_TOKEN:
                yield [w for w in text.split(" ") if w and w != "ipvsadm"]
            else:
                yield from scan(text.encode() + b"\n")
        yield from scan(last)
        return
    for line in complete.split(b"\n"):
        if len(line) < _MAX_TOKEN:
            yield [w.decode("utf-8", "surrogateescape")
                   for w in line.translate(_TO_SPACE).split(b" ") if w and w != b"ipvsadm"]
        else:
            yield from scan(line + b"\n")
    yield from scan(last)


def scan(data: bytes) -> Iterator[list[str]]:
    """config_stream_read(), token by token."""
    pos, end = 0, len(data)
    words: list[str] = []
    while pos < end:
        ch = data[pos:pos + 1]
        if ch == b"\n":
            yield words
            words, pos = [], pos + 1
            continue
        if ch in (b" ", b"\t", b"\r"):
            # fscanf matched nothing: skip blanks one by one; EOF here
            # discards the words read so far on this line.
            while pos < end and data[pos:pos + 1] in (b" ", b"\t", b"\r"):
                pos += 1
            if pos >= end:
                return
            continue
        stop = pos
        while stop < end and stop - pos < _MAX_TOKEN and data[stop] not in b" \t\n\r":
            stop += 1
        word = data[pos:stop].decode("utf-8", "surrogateescape")
        if word != "ipvsadm":
            words.append(word)
        pos = stop
        if pos < end and data[pos:pos + 1] in (b" ", b"\t", b"\r"):
            pos += 1  # the one blank that %1[...] consumes with the word
    if words:
        yield words


def script_lines(data: bytes) -> Iterator[tuple[int, list[str]]]:
    """What the ipvsadm-restore script hands to ``ipvsadm -R``, as (line
    number in ``data``, words) for every line it keeps: lines that begin
    with ``#`` dropped (grep splits at newlines only), the trailing newlines
    the shell's ``"$(...)"`` removes gone, and one put back by ``echo``."""
    if not data.startswith(b"#") and b"\n#" not in data:  # no comment: every line kept, in order
        stripped = data.rstrip(b"\n")
        yield from enumerate(lines(stripped + b"\n" if stripped else b""), 1)
        return
    kept = [(n, line) for n, line in enumerate(data.split(b"\n"), 1) if not line.startswith(b"#")]
    while kept and not kept[-1][1]:
        kept.pop()
    text = b"".join(line + b"\n" for _, line in kept)
    yield from zip((n for n, _ in kept), lines(text), strict=True)
