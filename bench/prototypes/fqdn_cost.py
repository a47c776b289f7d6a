"""Per-packet cost of fqdns rules at egress (issue 12 target: at most +20 ns over the same
addresses as cidrs): a policy with 100 names in an allow rule and 10,000 learned addresses,
against one whose rule lists the same 10,000 addresses as cidrs. BPF_PROG_TEST_RUN,
median of 7 rounds of 1,000,000 runs, for an address that matches and one that does not.

    .venv/bin/python -m bench.prototypes.fqdn_cost
"""

from __future__ import annotations

import ipaddress
import statistics

from bench import packets
from cgpolicy.compiler.compile import compile_policy
from cgpolicy.contract import LEARNED, LEARNED_KEY
from cgpolicy.kernel.loader import load_program
from cgpolicy.kernel.syscall import prog_test_run
from cgpolicy.policy.model import Network, NetworkRule, NetworkSection, Policy, Target

ADDRESSES = [ipaddress.IPv4Address("100.64.0.0") + i for i in range(10_000)]
NAMES = tuple(f"h{i}.example.test" for i in range(100))
MATCH, MISS = str(ADDRESSES[5000]), "100.127.0.1"


def policy(rule: NetworkRule) -> Policy:
    egress = NetworkSection("deny", (rule,))
    return Policy("cost", "enforce", (Target("x", False),), Network(egress=egress))


def egress_program(compiled):  # noqa: ANN001, ANN201 - a bench script
    (spec,) = [p for p in compiled.programs if p.hook == "egress"]
    return load_program(spec)


def cost(program, address: str) -> float:  # noqa: ANN001
    packet = packets.ipv4_tcp("10.0.0.1", address, 443)
    runs = [prog_test_run(program.program.fd, packet, repeat=1_000_000) for _ in range(7)]
    return statistics.median(run.duration_ns for run in runs)


def main() -> None:
    cidrs = tuple(ipaddress.ip_network(f"{a}/32") for a in ADDRESSES)
    by_cidrs = egress_program(compile_policy(policy(NetworkRule("allow", cidrs=cidrs))))
    by_names = egress_program(compile_policy(policy(NetworkRule("allow", fqdns=NAMES))))
    learned = by_names.maps["learned"]
    for address in ADDRESSES:  # as an answer would have taught cgroup 0 (test runs have no socket)
        key = LEARNED_KEY.pack(cgroup_id=0, addr=b"\0" * 10 + b"\xff\xff" + address.packed)
        learned.update(
            key, LEARNED.pack(expires_ns=(1 << 63), learned_ns=0, rules=(1, 0, 0), name_id=1, pad=0)
        )
    print(f"{'':24s} {'match':>8s} {'miss':>8s}  ns per packet")
    for what, program in (("10,000 cidrs", by_cidrs), ("100 fqdns, 10,000 learned", by_names)):
        print(f"{what:24s} {cost(program, MATCH):8.0f} {cost(program, MISS):8.0f}")


if __name__ == "__main__":
    main()
