"""`fqdns` rules on the real kernel (issue 12, work in progress): an address is allowed by
a name rule only after a DNS answer for the name reached the cgroup, at once (no race), and
never for another cgroup. A DNS responder on a loopback address of its own answers from
port 53, as a resolver does."""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from enforcement import apply_ok, enforced
from policy_builders import policy_file
from service import wait_until

CLIENT = Path(__file__).with_name("dns_names_client.py")
SERVER = "127.77.0.53"


class Responder:
    """Answers every A question: names under race.test get an address of their own (the
    round number in 198.18.0.0/15), a few fixed names theirs; anything else gets nothing."""

    FIXED = {"api.test": "198.51.100.7", "db.other.test": "198.51.100.8"}

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((SERVER, 53))
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @staticmethod
    def address(name: str) -> str | None:
        if name.endswith(".race.test"):
            index = int(name.split(".")[0].removeprefix("r"))
            return str(ipaddress.IPv4Address("198.18.0.0") + index + 1)
        return Responder.FIXED.get(name)

    @staticmethod
    def answer(query_id: int, name: str, address: str | None) -> bytes:
        question = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
        question += struct.pack("!HH", 1, 1)
        header = struct.pack("!HHHHHH", query_id, 0x8180, 1, 1 if address else 0, 0, 0)
        if not address:
            return header + question
        record = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 300, 4) + socket.inet_aton(address)
        return header + question + record

    def _serve(self) -> None:
        while True:
            query, client = self.sock.recvfrom(4096)
            if self.stopping:
                return
            labels, at = [], 12
            while query[at]:
                labels.append(query[at + 1 : at + 1 + query[at]].decode())
                at += 1 + query[at]
            name = ".".join(labels).lower()
            (query_id,) = struct.unpack_from("!H", query)
            self.sock.sendto(self.answer(query_id, name, self.address(name)), client)

    def close(self) -> None:
        self.stopping = True
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as waker:
            waker.sendto(b"", (SERVER, 53))  # wakes the thread's recvfrom
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.fixture(scope="module")
def responder() -> Iterator[Responder]:
    server = Responder()
    try:
        yield server
    finally:
        server.close()


def client(cgroup, rounds: int, template: str = "-", *addresses: str) -> list[list[str]]:
    done = cgroup.run([sys.executable, str(CLIENT), SERVER, str(rounds), template, *addresses])
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def names_policy(
    tmp_path: Path, scratch_cgroup, targets: Sequence[dict[str, str]] = (), **dns: int
) -> Path:
    """Connects allowed to the responder, and by name to api.test and *.race.test; on the
    scratch cgroup unless ``targets`` (as the policy writes them) are given."""
    return policy_file(
        tmp_path,
        "names",
        [scratch_cgroup.relative],
        {
            **({"targets": list(targets)} if targets else {}),
            **({"dns": dns} if dns else {}),
            "sockets": {
                "connect": {
                    "default": "deny",
                    "rules": [
                        {
                            "action": "allow",
                            "protocol": "udp",
                            "cidrs": [f"{SERVER}/32"],
                            "ports": [53],
                        },
                        {"action": "allow", "fqdns": ["api.test", "*.race.test"]},
                    ],
                }
            },
        },
    )


def test_an_address_is_allowed_only_after_an_answer_for_its_name(
    cgroup_root, bpf_dir, scratch_cgroup, tmp_path, responder
) -> None:
    with enforced(cgroup_root, bpf_dir, names_policy(tmp_path, scratch_cgroup)):
        # before any answer, and for an address no name of the rule gave
        assert client(scratch_cgroup, 0, "-", "198.51.100.7") == [["-", "198.51.100.7", "EPERM"]]
        assert client(scratch_cgroup, 1, "api.test", "198.51.100.9") == [
            ["api.test", "198.51.100.7", "ok"],
            ["-", "198.51.100.9", "EPERM"],
        ]
        # a name no rule names teaches nothing
        assert client(scratch_cgroup, 1, "db.other.test") == [
            ["db.other.test", "198.51.100.8", "EPERM"]
        ]


def test_learned_addresses_belong_to_the_target_cgroup_that_resolved(
    cgroup_root, bpf_dir, scratch_cgroup, tmp_path, responder
) -> None:
    """Two targets of one policy (a glob): an answer that reached a cgroup below the first
    counts for all of the first target (a sibling below it connects), never for the second."""
    first, second = scratch_cgroup.child("first"), scratch_cgroup.child("second")
    resolver, worker = first.child("resolver"), first.child("worker")
    policy = names_policy(
        tmp_path, scratch_cgroup, targets=[{"glob": f"{scratch_cgroup.relative}/*"}]
    )
    with enforced(cgroup_root, bpf_dir, policy):
        assert client(resolver, 1, "api.test") == [["api.test", "198.51.100.7", "ok"]]
        assert client(worker, 0, "-", "198.51.100.7") == [["-", "198.51.100.7", "ok"]]
        assert client(first, 0, "-", "198.51.100.7") == [["-", "198.51.100.7", "ok"]]
        assert client(second, 0, "-", "198.51.100.7") == [["-", "198.51.100.7", "EPERM"]]


def test_targets_at_several_depths_each_keep_their_own(
    cgroup_root, bpf_dir, scratch_cgroup, tmp_path, responder
) -> None:
    """Targets at two depths (one below a cgroup that is no target, one not): each learns
    for itself, and a cgroup below the shallow one counts as it."""
    shallow, deep = scratch_cgroup.child("shallow"), scratch_cgroup.child("outer").child("deep")
    policy = names_policy(
        tmp_path, scratch_cgroup, targets=[{"path": shallow.relative}, {"path": deep.relative}]
    )
    with enforced(cgroup_root, bpf_dir, policy):
        assert client(deep, 1, "api.test") == [["api.test", "198.51.100.7", "ok"]]
        assert client(shallow, 0, "-", "198.51.100.7") == [["-", "198.51.100.7", "EPERM"]]
        assert client(shallow, 1, "api.test") == [["api.test", "198.51.100.7", "ok"]]
        # as deep as `deep` but below `shallow`, which is its target
        inner = shallow.child("inner")
        assert client(inner, 0, "-", "198.51.100.7") == [["-", "198.51.100.7", "ok"]]


def test_a_thousand_lookups_then_connects_are_never_refused(
    cgroup_root, bpf_dir, scratch_cgroup, tmp_path, responder
) -> None:
    """Each round a name and an address never seen before, connected to as soon as the
    answer is read: the kernel learned it before the answer reached the socket."""
    with enforced(cgroup_root, bpf_dir, names_policy(tmp_path, scratch_cgroup)):
        results = client(scratch_cgroup, 1000, "r{}.race.test")
    assert len(results) == 1000
    refused = [row for row in results if row[2] != "ok"]
    assert refused == []


def test_an_answer_nobody_asked_for_teaches_nothing(
    cgroup_root, bpf_dir, scratch_cgroup, tmp_path, responder
) -> None:
    """A forged answer, from the resolver's address and port 53, for a name the rule names,
    to a socket of the cgroup that sent no query: its address stays refused."""
    with enforced(cgroup_root, bpf_dir, names_policy(tmp_path, scratch_cgroup)):
        waiting = subprocess.Popen(
            [sys.executable, str(CLIENT), "--unasked", "198.51.100.7"],
            preexec_fn=lambda: (scratch_cgroup.path / "cgroup.procs").write_text("0"),
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert waiting.stdout is not None
            port = json.loads(waiting.stdout.readline())["port"]
            forged = Responder.answer(0x1234, "api.test", "198.51.100.7")
            responder.sock.sendto(forged, ("127.0.0.1", port))
            result = json.loads(waiting.stdout.readline())
        finally:
            waiting.kill()
            waiting.wait()
    assert result == [["-", "198.51.100.7", "EPERM"]]


def test_a_learned_address_stops_matching_when_its_ttl_runs_out(
    cgroup_root, bpf_dir, scratch_cgroup, tmp_path, responder
) -> None:
    """The answer's TTL (300 s) cut to maxTTL 1 s: allowed at once, refused once it ran out
    (polled: no assertion on elapsed time, only that it happens)."""
    policy = names_policy(tmp_path, scratch_cgroup, minTTL=1, maxTTL=1)
    with enforced(cgroup_root, bpf_dir, policy):
        assert client(scratch_cgroup, 1, "api.test") == [["api.test", "198.51.100.7", "ok"]]
        expired = wait_until(
            lambda: client(scratch_cgroup, 0, "-", "198.51.100.7")[0][2] == "EPERM", timeout=30
        )
    assert expired


def test_a_policy_edit_keeps_what_its_workloads_resolved(
    cgroup_root, bpf_dir, scratch_cgroup, tmp_path, responder
) -> None:
    """A new version of the policy (a new revision: new programs and maps) still allows an
    address resolved under the old one, while its name is still allowed; a version that no
    longer names it refuses it. Nothing is resolved again in between."""
    first = names_policy(tmp_path, scratch_cgroup)
    with enforced(cgroup_root, bpf_dir, first) as enforcer:
        assert client(scratch_cgroup, 1, "api.test") == [["api.test", "198.51.100.7", "ok"]]
        edited = names_policy(tmp_path, scratch_cgroup, maxTTL=600)  # another revision
        apply_ok(enforcer, edited)
        assert client(scratch_cgroup, 0, "-", "198.51.100.7") == [["-", "198.51.100.7", "ok"]]
        text = re.sub(r'"api\.test",\s*', "", edited.read_text())
        assert text != edited.read_text()
        edited.write_text(text)
        apply_ok(enforcer, edited)
        assert client(scratch_cgroup, 0, "-", "198.51.100.7") == [["-", "198.51.100.7", "EPERM"]]
