"""Attacks on `fqdns` rules (issue 12) on the real kernel, from a process inside a target
cgroup. Each test asserts what must hold; the ones the design does not stop are marked
xfail(strict), with why.

- A workload answers its own query in a network namespace of its own (unprivileged: a user
  namespace), as the resolver: what it learns there matches in that namespace only.
- Names that differ from the policy's only in bytes other than A-Z (0x0d for '-', 0x13 for
  '3', 0x7f for '_') do not match it: only letters are folded.
- Targets of one policy share `dns_pending` (an LRU of 4096 queries) and `learned`
  (spec.dns.maxLearned): one target can make every other one learn nothing. It fails
  closed; workloads that distrust each other belong in separate policies (xfail)."""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import dns.message
import pytest
from dns_responder import Datagram, response, run_client, verdicts
from enforcement import enforced
from policy_builders import dns_connect_policy

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
EVIL = "203.0.113.66"  # no answer of the tests' server ever gives it


def connect_policy(
    tmp_path: Path, targets: list[dict[str, str]], servers: list[str], fqdns: list[str], **dns: int
) -> Path:
    """sockets.connect, default deny: UDP port 53 to ``servers`` by address, anything to
    ``fqdns`` by name."""
    rules = [{"action": "allow", "fqdns": fqdns}]
    return dns_connect_policy(tmp_path, "attacked", targets, servers, rules, dns)


# --- a network namespace of the workload's own -----------------------------------------

SELF_ANSWER = r"""
import socket, struct, subprocess, sys
resolver, evil = sys.argv[1], sys.argv[2]
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
subprocess.run(["ip", "addr", "add", resolver + "/32", "dev", "lo"], stderr=subprocess.DEVNULL)
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((resolver, 53))  # root of its user namespace: port 53 of its own network's address
sock.settimeout(5)
name = b"\x03api\x04test\x00"
query = struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0) + name + struct.pack("!HH", 1, 1)
sock.sendto(query, (resolver, 53))  # noted in dns_pending: this socket, id 0x4242, the server
sock.recvfrom(4096)
answer = query[:2] + struct.pack("!HHHHH", 0x8180, 1, 1, 0, 0) + query[12:]
answer += struct.pack("!HHHIH", 0xC00C, 1, 1, 3600, 4) + socket.inet_aton(evil)
sock.sendto(answer, (resolver, 53))  # from resolver:53, to the socket that asked, with its id
sock.recvfrom(4096)
print("answered")
"""


def _user_namespaces_work(cgroup) -> bool:
    done = cgroup.run([*NOBODY, "unshare", "-Urn", "true"])
    return done.returncode == 0


def test_a_workload_cannot_teach_itself_from_a_network_namespace_of_its_own(
    cgroup_root, bpf_dir, scratch_cgroup, tmp_path, dns_server
) -> None:
    """An unprivileged process of the target cgroup (uid 65534) makes a network namespace
    of its own, binds port 53 on the resolver's address there, sends itself a query and
    then the answer (every packet to the resolver's port 53: what the policy allows). The
    address it names must stay refused in the host's namespace. Where unprivileged user
    namespaces are off, root in the cgroup makes the namespace instead."""
    attacker = (
        [*NOBODY, "unshare", "-Urn"] if _user_namespaces_work(scratch_cgroup) else ["unshare", "-n"]
    )
    policy = connect_policy(
        tmp_path, [{"path": scratch_cgroup.relative}], [dns_server.address], ["api.test"]
    )
    with enforced(cgroup_root, bpf_dir, policy):
        assert verdicts(scratch_cgroup, EVIL) == {EVIL: "EPERM"}
        done = scratch_cgroup.run(
            [
                *attacker,
                sys.executable,
                "-c",
                SELF_ANSWER,
                dns_server.address,
                EVIL,
            ]
        )
        assert done.stdout.strip() == "answered", done.stderr
        assert verdicts(scratch_cgroup, EVIL) == {EVIL: "EPERM"}


# --- targets of one policy share its maps ------------------------------------------------

FLOOD = r"""
import socket, sys, time
sink, seconds = sys.argv[1], float(sys.argv[2])
socks = []
for _ in range(16):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((sink, 53))
    socks.append(s)
body = bytes.fromhex("01000001000000000000") + b"\x05flood\x04test\x00\x00\x01\x00\x01"
end, qid = time.monotonic() + seconds, 0
while time.monotonic() < end:
    for _ in range(1000):
        qid = (qid + 1) & 0xFFFF
        try:
            socks[qid & 15].send(qid.to_bytes(2, "big") + body)
        except OSError:
            pass
"""


def _slow(query: dns.message.Message, correct: dns.message.Message) -> list[Datagram]:
    time.sleep(0.2)  # a resolver recursing for a name it has not cached
    return [Datagram(correct.to_wire())]


@pytest.mark.xfail(
    strict=True,
    reason="dns_pending (4096-entry LRU) is one per policy, shared by all its targets: a "
    "target flooding queries evicts another target's pending queries, whose answers then "
    "teach nothing (cross-target denial of service)",
)
def test_a_target_cannot_flood_the_queries_of_another_away(
    cgroup_root, bpf_dir, scratch_cgroup, tmp_path, dns_server
) -> None:
    """Targets a and b of one policy. b resolves names whose answers take 200 ms (the
    resolver recursing) while a sends queries as fast as it can to the policy's other DNS
    server (an address that never answers, so the first server is not loaded). b's
    correctly answered names must stay usable."""
    a, b = scratch_cgroup.child("a"), scratch_cgroup.child("b")
    base = ipaddress.IPv4Address(dns_server.address) - 1
    sink_address = str(base + 3)  # this process's third loopback address (loopback_addresses)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind((sink_address, 53))  # never read: a full buffer drops the flood
    policy = connect_policy(
        tmp_path,
        [{"glob": f"{scratch_cgroup.relative}/*"}],
        [dns_server.address, sink_address],
        ["*.race.test"],
    )
    names = [f"r{index}.race.test" for index in range(700001, 700011)]
    with sink, enforced(cgroup_root, bpf_dir, policy), ExitStack() as stack:
        for name in names:
            stack.enter_context(dns_server.tampered(name, _slow))

        def enter_a() -> None:
            (a.path / "cgroup.procs").write_text("0")

        flooders = [
            subprocess.Popen([sys.executable, "-c", FLOOD, sink_address, "8"], preexec_fn=enter_a)
            for _ in range(4)
        ]
        try:
            time.sleep(1)
            rows = run_client(b, "resolve", dns_server.address, *names)
        finally:
            for flooder in flooders:
                flooder.wait(timeout=30)
    assert len(rows) == len(names)
    assert [verdict for _, _, verdict in rows] == ["ok"] * len(names)


@pytest.mark.xfail(
    strict=True,
    reason="learned (spec.dns.maxLearned) is one map per policy, shared by all its targets "
    "with no per-target share: one target fills it and every other learns nothing until "
    "the entries expire (cross-target denial of service)",
)
def test_a_target_cannot_fill_the_learned_map_of_another(
    cgroup_root, bpf_dir, scratch_cgroup, tmp_path, dns_server
) -> None:
    """maxLearned 64 (small to keep the test short; 65,536 only takes longer): target a
    resolves 64 names through the real server, each a new address; then target b resolves
    api.test, answered correctly, and must be able to use it."""
    a, b = scratch_cgroup.child("a"), scratch_cgroup.child("b")
    policy = connect_policy(
        tmp_path,
        [{"glob": f"{scratch_cgroup.relative}/*"}],
        [dns_server.address],
        ["api.test", "*.race.test"],
        maxLearned=64,
    )
    with enforced(cgroup_root, bpf_dir, policy):
        filled = run_client(a, "resolve", dns_server.address, "r{}.race.test", "--rounds", 64)
        assert [verdict for _, _, verdict in filled] == ["ok"] * 64
        assert run_client(b, "resolve", dns_server.address, "api.test") == [
            ["api.test", "198.51.100.7", "ok"]
        ]


# --- names ------------------------------------------------------------------------------

FOLDED = [  # (a name as dnspython writes it, with its odd byte escaped; the policy's name)
    ("my\\013api.test", "my-api.test"),  # 0x0d | 0x20 == '-'
    ("s\\019.test", "s3.test"),  # 0x13 | 0x20 == '3'
    ("\\127srv.test", "_srv.test"),  # 0x7f == '_' | 0x20
]


@pytest.mark.parametrize(("asked", "allowed"), FOLDED, ids=[a for _, a in FOLDED])
def test_only_the_policys_name_teaches_not_one_that_folds_onto_it(
    cgroup_root, bpf_dir, scratch_cgroup, tmp_path, dns_server, asked, allowed
) -> None:
    """The policy names ``allowed``; the server answers the different name ``asked``
    (as a zone's wildcard record would) with an address: it must stay refused."""
    policy = connect_policy(
        tmp_path, [{"path": scratch_cgroup.relative}], [dns_server.address], [allowed]
    )

    def other(query: dns.message.Message, correct: dns.message.Message) -> list[Datagram]:
        return [Datagram(response(query, [("A", "198.51.100.77")]).to_wire())]

    with enforced(cgroup_root, bpf_dir, policy), dns_server.tampered(asked, other):
        rows = run_client(scratch_cgroup, "resolve", dns_server.address, asked)
        assert rows == [[asked, "198.51.100.77", "EPERM"]]
