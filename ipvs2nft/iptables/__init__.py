"""The iptables front end: iptables rules in, the one model out.

The pipeline, one module per step::

    parse.py        command lines / iptables-save text -> Ruleset (rules.py)
    lift.py         the load-balancing idioms in a Ruleset -> Services (each with
                    the Plan of its cascade: "iptables-nth" / "iptables-random")
                    + findings
    jumps.py        cascades that jump to a chain per backend (kube-proxy) -> one
                    map inside that chain, affinity through one timeout set
    shares.py       what a statistic cascade really does (pure arithmetic)
    passthrough.py  every other rule through iptables-restore-translate
    translate.py    ``ipvs2nft translate --from iptables``: glue and output

A front end never talks to the kernel: this package only runs
``iptables-restore-translate``, which is a pure text translator.
"""
