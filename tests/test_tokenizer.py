"""One tokenizer for ipvsadm lines: ``ipvs2nft translate`` reads a rules file
exactly as ``ipvsadm-restore`` does (ipvsadm/restore.py).

Before, translate split with Python's ``str.split``/``splitlines`` (a
vertical tab or form feed ended a word or a line), took ``  # x`` as a
comment and let bare CRs end lines, where ipvsadm's fscanf and the
script's ``grep -v '^#'`` do neither.  Here generated files made of such
bytes go through both, and both must agree: the same table when the
restore succeeds, an error from both when one fails.
"""

from __future__ import annotations

import random

import pytest

from ipvs2nft import listing
from ipvs2nft.cli import ipvsadm as cli
from ipvs2nft.cli.ipvs2nft import translate_ipvsadm
from ipvs2nft.ipvsadm import restore
from tests import oracle

PIECES = [b"-A -t 10.0.0.1:80 -s rr", b"-a -t 10.0.0.1:80 -r 10.0.0.2:80 -m", b"-A -u 10.0.0.3:53",
          b"-a -u 10.0.0.3:53 -r 10.0.0.4 -g -w 2", b"ipvsadm", b"#", b"# x", b"-E -t 10.0.0.1:80 -s wrr",
          b"-C", b""]
GLUE = [b" ", b"  ", b"\t", b"\r", b"\v", b"\f", b"\n", b"\n", b"\n", b"\r\n", b"\n#", b"\n  # "]


def _stream(rng: random.Random) -> bytes:
    parts = []
    for _ in range(rng.randint(1, 8)):
        parts += [rng.choice(PIECES), rng.choice(GLUE)]
    return b"".join(parts)


def _restored(data: bytes, tmp_path) -> tuple[int, str, str]:
    """ipvsadm-restore of ``data`` into a fresh store, then ipvsadm-save -n."""
    for p in tmp_path.glob("state.json*"):
        p.unlink()
    status, _, err = oracle.call(cli.restore_main, [], data, "ipvsadm-restore")
    _, saved, _ = oracle.call(cli.save_main, ["-n"], None, "ipvsadm-save")
    return status, err, saved


CASES = [b"-A -t 10.0.0.1:80\v -s rr\n", b"-A -t 10.0.0.1:80 -s rr\n  # x\n", b"-A -t 10.0.0.1:80\f\n",
         b"#x\r-A -t 10.0.0.1:80\n", b"-A -t 10.0.0.1:80 -s rr\r-C\n"]


@pytest.mark.parametrize("seed", range(3))
def test_translate_reads_a_file_as_ipvsadm_restore_does(state, seed):
    rng = random.Random(seed)
    streams = CASES + [_stream(rng) for _ in range(150)]
    disagree = []
    for data in streams:
        status, err, saved = _restored(data, state)
        table, errors, _ = translate_ipvsadm(data)
        ours = listing.save(table, numeric=True)
        restored_cleanly = status == 0 and not err
        if restored_cleanly != (not errors) or (restored_cleanly and ours != saved):
            disagree.append(f"{data!r}: restore {status} {err!r} {saved!r}; translate {errors} {ours!r}")
    assert not disagree, "\n".join(disagree[:10])


def test_the_known_differences_are_gone():
    """The inputs the issue names, one by one."""
    words = {n: w for n, w in restore.script_lines(b"-A -t 10.0.0.1:80\v -s rr\n  # x\n#y\n")}
    assert words == {1: ["-A", "-t", "10.0.0.1:80\v", "-s", "rr"], 2: ["#", "x"]}
    _, errors, _ = translate_ipvsadm(b"-A -t 10.0.0.1:80\v -s rr\n  # x\n")
    assert [e.split(":", 1)[0] for e in errors] == ["line 1", "line 2"]
