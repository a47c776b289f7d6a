"""Hostile DNS answers against `fqdns` rules on the real kernel (issue 12): whatever the
server sends, nothing crashes, the workload still receives the packet (the kernel drops no
answer it does not learn from), and no address opens that a correct answer alone would
open. Every case is checked against its control: the same question answered correctly
opens the same addresses, so a test that sees them refused could also have seen them open.

The policy allows DNS to the tests' server (dns_responder.py) by address and every name
under hostile.test by name; the server answers one name per case with raw bytes."""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from dns_responder import Datagram, Responder, response, run_client, verdicts
from enforcement import enforced
from policy_builders import dns_connect_policy

A_RECORD = 16  # bytes of an A record whose owner is a pointer: 2 + type, class, TTL, length 10 + 4


def hostile_policy(tmp_path: Path, cgroup, server: Responder, *fqdns: str) -> Path:
    """sockets.connect, default deny: UDP to the server's port 53 by address, and every
    name under hostile.test (and ``fqdns``) by name."""
    rules = [{"action": "allow", "fqdns": ["*.hostile.test", *fqdns]}]
    return dns_connect_policy(tmp_path, "hostile", [cgroup.relative], [server.address], rules)


def exchange(cgroup, server: Responder, name: str, *options: str | int) -> list[dict]:
    """One query for ``name`` from ``cgroup``; what came back (see dns_names_client.py)."""
    return run_client(cgroup, "exchange", server.address, name, *options)["received"]


def answer(query: dns.message.Message, *addresses: str) -> dns.message.Message:
    return response(query, [("A", address) for address in addresses])


def patched(wire: bytes, at: int, value: bytes) -> bytes:
    return wire[:at] + value + wire[at + len(value) :]


def pointer(offset: int) -> bytes:
    return struct.pack("!H", 0xC000 | offset)


def encoded(labels: list[str]) -> bytes:
    return b"".join(bytes([len(label)]) + label.encode() for label in labels) + b"\0"


# --- the cases: (query, its two addresses) -> what the server sends instead --------------


def tc_bit(query: dns.message.Message, a: str, b: str) -> list[Datagram]:
    wrong = answer(query, a, b)
    wrong.flags |= dns.flags.TC
    return [Datagram(wrong.to_wire())]


def cut_off_record(query: dns.message.Message, a: str, b: str) -> list[Datagram]:
    """Two A records claimed, the packet ending in the address of the first."""
    return [Datagram(answer(query, a, b).to_wire()[: -A_RECORD - 2])]


def cut_off_after_a_whole_record(query: dns.message.Message, a: str, b: str) -> list[Datagram]:
    """Three A records claimed: a whole, b whole, and the third not there at all."""
    wire = answer(query, a, b).to_wire()
    return [Datagram(patched(wire, 6, struct.pack("!H", 3)))]


def question_pointing_at_itself(query: dns.message.Message, a: str, b: str) -> list[Datagram]:
    """The question name is a pointer to itself (a compression loop); the answers' owner
    names point at it."""
    record = pointer(12) + struct.pack("!HHIH", 1, 1, 300, 4)
    wire = struct.pack("!HHHHHH", query.id, 0x8180, 1, 2, 0, 0) + pointer(12)
    wire += struct.pack("!HH", 1, 1)
    for address in (a, b):
        wire += record + ipaddress.IPv4Address(address).packed
    return [Datagram(wire)]


def owner_pointing_at_itself(query: dns.message.Message, a: str, b: str) -> list[Datagram]:
    """Each answer's owner name is a pointer to itself."""
    wire = answer(query, a, b).to_wire()
    for at in (len(wire) - 2 * A_RECORD, len(wire) - A_RECORD):
        wire = patched(wire, at, pointer(at))
    return [Datagram(wire)]


def owners_pointing_at_each_other(query: dns.message.Message, a: str, b: str) -> list[Datagram]:
    """The first answer's owner name points at the second's, which points at the first."""
    wire = answer(query, a, b).to_wire()
    first, second = len(wire) - 2 * A_RECORD, len(wire) - A_RECORD
    wire = patched(patched(wire, first, pointer(second)), second, pointer(first))
    return [Datagram(wire)]


def record_class_chaos(query: dns.message.Message, a: str, b: str) -> list[Datagram]:
    """Class CH in the answer records (an IN question)."""
    wire = answer(query, a, b).to_wire()
    for at in (len(wire) - 2 * A_RECORD, len(wire) - A_RECORD):
        wire = patched(wire, at + 4, struct.pack("!H", dns.rdataclass.CH))
    return [Datagram(wire)]


def question_class_chaos(query: dns.message.Message, a: str, b: str) -> list[Datagram]:
    """The question (asked so) in class CH, its answers IN A records."""
    assert query.question[0].rdclass == dns.rdataclass.CH
    return [Datagram(answer(query, a, b).to_wire())]


def wrong_id(query: dns.message.Message, a: str, b: str) -> list[Datagram]:
    wrong = answer(query, a, b)
    wrong.id = (query.id + 1) & 0xFFFF
    return [Datagram(wrong.to_wire())]


def from_another_server(query: dns.message.Message, a: str, b: str) -> list[Datagram]:
    """A correct answer, from port 53 of the server's other address (not the one asked)."""
    return [Datagram(answer(query, a, b).to_wire(), via=1)]


def rcode(code: dns.rcode.Rcode) -> Callable[[dns.message.Message, str, str], list[Datagram]]:
    def with_rcode(query: dns.message.Message, a: str, b: str) -> list[Datagram]:
        wrong = answer(query, a, b)
        wrong.set_rcode(code)
        return [Datagram(wrong.to_wire())]

    return with_rcode


def no_question(query: dns.message.Message, a: str, b: str) -> list[Datagram]:
    """The question count says 0 (the question's bytes still there)."""
    return [Datagram(patched(answer(query, a, b).to_wire(), 4, struct.pack("!H", 0)))]


def two_questions(query: dns.message.Message, a: str, b: str) -> list[Datagram]:
    wrong = answer(query, a, b)
    name = query.question[0].name
    wrong.question.append(dns.rrset.RRset(name, dns.rdataclass.IN, dns.rdatatype.AAAA))
    return [Datagram(wrong.to_wire())]


def not_a_response(query: dns.message.Message, a: str, b: str) -> list[Datagram]:
    """The QR bit clear: a query, with answers."""
    wrong = answer(query, a, b)
    wrong.flags &= ~dns.flags.QR
    return [Datagram(wrong.to_wire())]


def opcode_update(query: dns.message.Message, a: str, b: str) -> list[Datagram]:
    wire = answer(query, a, b).to_wire()
    return [Datagram(patched(wire, 2, bytes([wire[2] | 5 << 3])))]


def question_too_long(query: dns.message.Message, a: str, b: str) -> list[Datagram]:
    """The answer's question a name of 257 bytes (at most 255 are allowed) under
    hostile.test, its records pointing at it."""
    labels = ["q" * 63, "r" * 63, "s" * 63, "t" * 50, "hostile", "test"]
    question = encoded(labels) + struct.pack("!HH", 1, 1)
    assert len(question) - 4 == 257
    wire = struct.pack("!HHHHHH", query.id, 0x8180, 1, 2, 0, 0) + question
    for address in (a, b):
        wire += pointer(12) + struct.pack("!HHIH", 1, 1, 300, 4)
        wire += ipaddress.IPv4Address(address).packed
    return [Datagram(wire)]


@dataclass(frozen=True)
class Case:
    name: str
    send: Callable[[dns.message.Message, str, str], list[Datagram]]
    rdclass: str = "IN"  # the class the client asks in


CASES = [
    Case("tc-bit", tc_bit),
    Case("cut-off-record", cut_off_record),
    Case("cut-off-after-whole-records", cut_off_after_a_whole_record),
    Case("question-pointing-at-itself", question_pointing_at_itself),
    Case("owner-pointing-at-itself", owner_pointing_at_itself),
    Case("owners-pointing-at-each-other", owners_pointing_at_each_other),
    Case("record-class-chaos", record_class_chaos),
    Case("question-class-chaos", question_class_chaos, rdclass="CH"),
    Case("wrong-id", wrong_id),
    Case("from-another-server", from_another_server),
    Case("nxdomain", rcode(dns.rcode.NXDOMAIN)),
    Case("servfail", rcode(dns.rcode.SERVFAIL)),
    Case("no-question", no_question),
    Case("two-questions", two_questions),
    Case("not-a-response", not_a_response),
    Case("opcode-update", opcode_update),
    Case("question-too-long", question_too_long),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_a_hostile_answer_opens_nothing(
    cgroup_root, bpf_dir, scratch_cgroup, tmp_path, dns_server, case: Case
) -> None:
    """The case's answer reaches the workload and leaves both addresses refused; then a
    correct answer to the same question opens both."""
    name = f"{case.name}.hostile.test"
    a, b = "203.0.113.10", "203.0.113.11"
    dns_server.zone[name] = [("A", a), ("A", b)]
    policy = hostile_policy(tmp_path, scratch_cgroup, dns_server)
    try:
        with enforced(cgroup_root, bpf_dir, policy):
            with dns_server.tampered(name, lambda query, _: case.send(query, a, b)):
                received = exchange(scratch_cgroup, dns_server, name, "--class", case.rdclass)
            assert len(received) == 1  # the kernel dropped nothing
            if case.send is from_another_server:
                assert received[0]["from"] == dns_server.addresses[1]
            assert verdicts(scratch_cgroup, a, b) == {a: "EPERM", b: "EPERM"}
            # the control: the same question, answered correctly
            received = exchange(scratch_cgroup, dns_server, name)
            assert [sorted(r["addresses"]) for r in received] == [[a, b]]
            assert verdicts(scratch_cgroup, a, b) == {a: "ok", b: "ok"}
    finally:
        del dns_server.zone[name]


def test_one_answer_per_query(cgroup_root, bpf_dir, scratch_cgroup, tmp_path, dns_server) -> None:
    """Two correct answers to one query (same id, same server): the first teaches, the
    second, with another address, does not, though the workload receives it; a query of
    its own answered with that address opens it."""
    name = "twice.hostile.test"
    first, second = "203.0.113.20", "203.0.113.21"
    policy = hostile_policy(tmp_path, scratch_cgroup, dns_server)

    def two_answers(query: dns.message.Message, _: dns.message.Message) -> list[Datagram]:
        return [Datagram(answer(query, address).to_wire()) for address in (first, second)]

    dns_server.zone[name] = [("A", second)]
    try:
        with enforced(cgroup_root, bpf_dir, policy):
            with dns_server.tampered(name, two_answers):
                received = exchange(scratch_cgroup, dns_server, name, "--datagrams", 2)
            assert [r["addresses"] for r in received] == [[first], [second]]
            assert verdicts(scratch_cgroup, first, second) == {first: "ok", second: "EPERM"}
            exchange(scratch_cgroup, dns_server, name)
            assert verdicts(scratch_cgroup, second) == {second: "ok"}
    finally:
        del dns_server.zone[name]


def test_only_the_first_16_of_hundreds_of_records_are_learned(
    cgroup_root, bpf_dir, scratch_cgroup, tmp_path, dns_server
) -> None:
    """An answer of 300 A records (one UDP datagram of 4.8 kB): the workload receives all
    300; the addresses of the first 16 open, the other 284 stay refused."""
    name = "many.hostile.test"
    many = [str(ipaddress.IPv4Address("100.64.1.0") + i) for i in range(300)]
    dns_server.zone[name] = [("A", address) for address in many]
    policy = hostile_policy(tmp_path, scratch_cgroup, dns_server)
    try:
        with enforced(cgroup_root, bpf_dir, policy):
            received = exchange(scratch_cgroup, dns_server, name)
            assert len(received) == 1
            in_order = received[0]["addresses"]  # as the packet holds them
            assert sorted(in_order, key=ipaddress.IPv4Address) == many
            got = verdicts(scratch_cgroup, *in_order)
    finally:
        del dns_server.zone[name]
    assert [got[address] for address in in_order] == ["ok"] * 16 + ["EPERM"] * 284


MAXIMAL = ".".join(["A" * 63, "b" * 63, "C" * 63, "d" * 48, "hostile", "test"])
MAXIMAL_EXACT = ".".join(["e" * 63, "F" * 63, "g" * 63, "h" * 50, "exact", "test"])


def labels_under_hostile(count: int) -> str:
    return ".".join(["x"] * (count - 2) + ["hostile", "test"])


@pytest.mark.parametrize(
    ("name", "opens"),
    [
        pytest.param(MAXIMAL, True, id="253-characters-by-wildcard"),
        pytest.param(MAXIMAL_EXACT, True, id="253-characters-exact"),
        pytest.param(labels_under_hostile(32), True, id="32-labels"),
        pytest.param(labels_under_hostile(33), False, id="33-labels"),
        pytest.param(labels_under_hostile(122), False, id="122-labels-253-characters"),
    ],
)
def test_long_names(
    cgroup_root, bpf_dir, scratch_cgroup, tmp_path, dns_server, name: str, opens: bool
) -> None:
    """Names at the limits, each answered correctly with one A record: a 253-character name
    of 63-byte labels (mixed case) opens its address through a `*.` rule and through an
    exact one; a name of up to 32 labels opens it, one of more (documented) does not. In
    every case the workload receives the answer."""
    assert len(name) <= 253
    address = "203.0.113.30"
    dns_server.zone[name.lower()] = [("A", address)]
    policy = hostile_policy(tmp_path, scratch_cgroup, dns_server, MAXIMAL_EXACT.lower())
    try:
        with enforced(cgroup_root, bpf_dir, policy):
            assert verdicts(scratch_cgroup, address) == {address: "EPERM"}
            received = exchange(scratch_cgroup, dns_server, name)
            assert [r["addresses"] for r in received] == [[address]]
            assert verdicts(scratch_cgroup, address) == {address: "ok" if opens else "EPERM"}
    finally:
        del dns_server.zone[name.lower()]
