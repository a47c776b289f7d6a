"""Issue 12 (work in progress): the name table the compiler builds (cgpolicy/compiler/
names.py) against what the kernel computes from a DNS answer, through the cgroup_skb
parser prototype (bench/prototypes/dns_learn.c) and BPF_PROG_TEST_RUN: an address is
learned exactly when the question name matches a rule, exactly or below a `*.` domain,
whatever its case."""

from __future__ import annotations

import ctypes
import ipaddress
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cgpolicy.compiler.names import name_table
from cgpolicy.kernel.syscall import prog_test_run

PROTOTYPE = Path(__file__).resolve().parents[2] / "bench" / "prototypes"
RULES = [(0, ["api.example.com"]), (1, ["*.s3.example.net"]), (3, ["example.org", "*.example.org"])]


@pytest.fixture(scope="module")
def learner() -> Iterator[Any]:
    from bcc import BPF

    bpf = BPF(src_file=str(PROTOTYPE / "dns_learn.c"))
    question = bpf.load_func("dns_learn", BPF.CGROUP_SKB)
    answers = bpf.load_func("dns_answers", BPF.CGROUP_SKB)
    bpf["jump"][ctypes.c_int(0)] = ctypes.c_int(answers.fd)
    key = secrets.token_bytes(16)
    keys = bpf["hash_key"]
    keys[ctypes.c_int(0)] = keys.Leaf(*(int.from_bytes(key[i : i + 8], "little") for i in (0, 8)))
    names = bpf["names"]
    for hashed, entry in name_table(key, 1, [(0, i, n) for i, n in RULES]).items():
        names[ctypes.c_uint64(hashed)] = names.Leaf(entry.exact[0], entry.wildcard[0])
    yield bpf, question
    bpf.cleanup()


def learned(learner: Any, question: str, address: str) -> list[tuple[str, int]]:
    """(address, rule mask) of every entry learned from one answer to ``question``."""
    from bench.prototypes.dns_learn import dns_answer

    bpf, program = learner
    table = bpf["learned"]
    table.clear()
    prog_test_run(program.fd, dns_answer(question, [("A", address)]))
    return [
        (str(ipaddress.IPv4Address(key.addr.to_bytes(4, "little"))), value.rules)
        for key, value in table.items()
    ]


@pytest.mark.parametrize(
    ("question", "rules"),
    [
        ("api.example.com", 0b1),
        ("API.Example.COM", 0b1),  # case-insensitive
        ("www.api.example.com", None),  # an exact name covers no name below it
        ("example.com", None),
        ("bucket.s3.example.net", 0b10),
        ("a.b.s3.example.net", 0b10),  # one or more labels in front
        ("s3.example.net", None),  # never the bare domain
        ("example.org", 0b1000),  # an exact rule and a wildcard rule for one domain
        ("www.example.org", 0b1000),
        ("other.test", None),
    ],
)
def test_an_address_is_learned_exactly_when_the_question_matches_a_rule(
    learner: Any, question: str, rules: int | None
) -> None:
    expected = [] if rules is None else [("192.0.2.7", rules)]
    assert learned(learner, question, "192.0.2.7") == expected
