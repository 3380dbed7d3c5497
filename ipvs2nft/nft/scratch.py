"""Load an nft script into a throw-away namespace and print our tables' JSON.

``unshare -n python -m ipvs2nft.nft.scratch < script`` is how the back end
learns what its own tables *should* look like when listed, to compare with
what the kernel holds (``NftBackend.verify``).  Tunnel devices the script
names get veth stand-ins (only their names matter to a listing).  The nft
command does the loading and listing (the same libnftables and JSON as the
binding), so nft/backend.py stays the one module that imports ``nftables``.
"""

from __future__ import annotations

import json
import re
import sys

OURS = {("inet", "ipvs2nft"), ("ip", "ipvs2nft"), ("ip6", "ipvs2nft")}
# Sets and maps whose elements the data path or the daemon write at run time
# (learnt flows and clients, counters, live choices): no store describes them.
# nft's JSON listing does not always carry their "dynamic" flag.
RUNTIME = frozenset({"persist4", "persist6", "stat4", "stat6", "conn4", "conn6", "dyn", "lbl4", "lbl6",
                     "flows", "live", "persist", "ddyn", "dstat", "dconn", "fins"})


def main() -> int:
    import subprocess

    script = sys.stdin.read()
    for n, device in enumerate(sorted(set(re.findall(r'device "(i2n\d+)"', script)))):
        subprocess.run(["ip", "link", "add", device, "type", "veth", "peer", "name", f"sx{n}"],
                       capture_output=True)
    for args, data in ((["-f", "-"], script), (["-j", "list", "ruleset"], None)):
        p = subprocess.run(["nft", *args], input=data, capture_output=True, text=True)
        if p.returncode != 0:
            sys.stderr.write(p.stderr)
            return 1
    sys.stdout.write(p.stdout)
    return 0


def normalize(listing: dict) -> list[str]:
    """Our tables' objects, comparable across namespaces: no handles, no
    counter values, no learnt (dynamic) elements, elements sorted; objects
    in a fixed order (a chain made by a later, incremental command is
    listed after the others, its place in a full load is elsewhere), rules
    in their order within each chain."""
    out = []
    for item in listing.get("nftables", []):
        (kind, obj), = item.items()
        if kind == "metainfo":
            continue
        family, table = obj.get("family"), obj.get("table", obj.get("name"))
        if (family, table) not in OURS:
            continue
        obj = {k: v for k, v in obj.items() if k != "handle"}
        if kind in ("set", "map"):
            if "dynamic" in obj.get("flags", []) or obj.get("name") in RUNTIME:
                obj.pop("elem", None)
            elif "elem" in obj:
                obj["elem"] = sorted(json.dumps(e, sort_keys=True) for e in obj["elem"])
        if kind == "rule":
            obj["expr"] = [{"counter": {}} if "counter" in e else e for e in obj["expr"]]
        where = (kind, family, table, obj.get("chain", obj.get("name", "")))
        out.append((where, f"{kind} {json.dumps(obj, sort_keys=True)}"))
    return [text for _, text in sorted(out, key=lambda item: item[0])]  # stable: rule order kept


if __name__ == "__main__":
    sys.exit(main())
