#!/usr/bin/env python3
"""ATTACK 4 (process in a target cgroup, real resolver): question names that are not the
policy's name but hash as it. The program folds every byte with `| 0x20` (to lowercase
letters), which also folds 0x0d to '-', 0x10..0x19 to '0'..'9', 0x00 to ' ' and 0x7f/0x5f
together ('_' = 0x5f and DEL = 0x7f both give 0x7f), and the compiler does the same. So an
answer for "my\\rapi.example.test" (byte 0x0d) teaches addresses for a rule naming
"my-api.example.test", and "s\\x13.example.test" for "s3.example.test". A resolver answers
such a name from whatever the zone has for it (a wildcard record, a different delegation),
not the allowed name's addresses.

Run as root: .venv/bin/python attack/case_fold_names.py   (exit 0 = a folded name taught)
"""

from __future__ import annotations

import json
import sys

import common
from resolver import Resolver

RESOLVER = "127.77.2.53"
CLIENT = str(common.REPO / "attack/client.py")
PY = "/usr/bin/python3"

CASES = [  # (asked, allowed by the policy)
    ("my\rapi.example.test", "my-api.example.test"),
    ("s\x13.example.test", "s3.example.test"),
    ("\x7fsrv.example.test", "_srv.example.test"),
    ("MY-API.EXAMPLE.TEST", "my-api.example.test"),  # control: case is meant to fold
    ("my.api.example.test", "my-api.example.test"),  # control: must not match
]


def main() -> int:
    cgs = common.setup("w")
    spec = {
        "sockets": {"connect": {"default": "deny", "rules": [
            {"action": "allow", "protocol": "udp", "cidrs": [f"{RESOLVER}/32"], "ports": [53]},
            {"action": "allow", "ports": [443], "fqdns": sorted({allowed for _, allowed in CASES})}]}}
    }
    common.cli("apply", str(common.write_policy("fold", common.policy("attack-fold", [cgs["w"]], spec))))
    server = Resolver(RESOLVER)
    broke = False
    for asked, allowed in CASES:
        done = common.in_cgroup(cgs["w"], [PY, CLIENT, "resolve", RESOLVER, asked])
        row = json.loads(done.stdout)[0]
        print(f"asked {asked!r:28} (policy names {allowed!r}): {row[1]} -> {row[2]}")
        if row[2] == "ok" and asked.lower() != allowed:
            broke = True
    print("RESULT:", "BROKE (a name that is not the policy's matched it)" if broke else "held")
    server.close()
    return 0 if broke else 1


if __name__ == "__main__":
    sys.exit(main())
