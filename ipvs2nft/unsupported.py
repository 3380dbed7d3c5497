"""What ipvs2nft cannot carry out exactly, and the one policy for it.

As in sqlglot (``unsupported()`` and its ErrorLevel): code that meets an
approximation, a rule it cannot translate or an input it ignores does not
print or fail by itself; it reports to a ``Report``, with the input line when
there is one, and only ``Report.finish`` decides what becomes of it:

* losses (``unsupported``): the output does something other than the
  input (an approximated scheduler, an untranslatable rule kept as a
  comment, a script nft could not check).  A warning on stderr; with
  ``--strict`` the run then fails with status 3 and prints nothing.
* warnings that are no loss (``warn``): what the input itself does wrong
  (an iptables rule that never matches, shares other than the rule says),
  faithfully translated; and notes (``note``): what was done (a lifted
  cascade, an ignored listing command).  Said, never fatal.

Every message is one line ``ipvs2nft: warning: line N: ...``, sorted by line.
The ipvsadm drop-in has the other half of the policy: it must not write
anything ipvsadm would not (scripts compare stderr), so its losses go to
syslog once per state directory (notice.py) and never fail a command.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field


@dataclass
class Report:
    """What one translation met; ``strict``: losses fail the run."""

    strict: bool = False
    items: list[tuple[int, str, str]] = field(default_factory=list)  # (line, kind, text)
    losses: int = 0

    def unsupported(self, text: str, line: int = 0) -> None:
        """A loss: the output does not do exactly what the input does."""
        self.warn(text, line)
        self.losses += 1

    def warn(self, text: str, line: int = 0) -> None:
        self.items.append((line, "warning", text))

    def note(self, text: str, line: int = 0) -> None:
        self.items.append((line, "note", text))

    def suggest(self, text: str) -> None:
        """What the author of the input probably meant (iptables cascades)."""
        self.items.append((0, "suggestion", text))

    def finish(self, output: str) -> int:
        """Say everything, in the order it was reported (each run of one
        kind by line), then print ``output`` -- or, strict with losses,
        nothing: status 3."""
        runs: list[list[tuple[int, str, str]]] = []
        for item in self.items:
            if runs and runs[-1][0][1] == item[1]:
                runs[-1].append(item)
            else:
                runs.append([item])
        for run in runs:
            for line, kind, text in sorted(run, key=lambda i: i[0]):
                where = f"line {line}: " if line else ""
                sys.stderr.write(f"ipvs2nft: {kind}: {where}{text}\n")
        if self.strict and self.losses:
            sys.stderr.write(f"ipvs2nft: --strict: {self.losses} approximated or untranslated item(s); "
                             "nothing printed\n")
            return 3
        sys.stdout.write(output)
        return 0
