"""The verifier's share of a policy load (issue 14, "load a 10,000-prefix list"): for each
program of a policy with every network section (egress, ingress, sockets.connect and
sockets.bind, IPv4 and IPv6 prefixes), the verifier's steps (``verified_insns`` of
bpf_prog_info, which does not depend on the machine's speed) and the PROG_LOAD time
(verifier and JIT, median of the rounds, one program at a time, maps made and filled as a
load does). The same for the egress and ingress programs of a policy whose rules name
fqdns (the ``_names`` variants), and for the shape of policy ``bench.compare`` loads (egress
default deny, one allow rule listing prefixes of one family: ``.ipv4``, ``.ipv6``), whose
programs walk only the index of that family (contract.family_variant). PROG_LOAD is most
of a policy load: the programs are verified on one thread each, up to the CPUs
(cgpolicy/kernel/loader.py load_prepared).
"""

from __future__ import annotations

import statistics
import time

from bench.figures import Figure, Report
from cgpolicy.compiler.compile import compile_policy
from cgpolicy.kernel.bpf import close_all
from cgpolicy.kernel.loader import prepare_program
from cgpolicy.policy.validate import load_contents

HEAD = """\
apiVersion: cgpolicy.dev/v1
kind: CgroupPolicy
metadata: {{name: verifier}}
spec:
  mode: enforce
  targets: [{{path: x}}]
  network:
    egress:
      default: deny
"""
POLICY = (
    HEAD
    + """\
      rules:
        - {{action: allow, protocol: tcp, ports: [443, 8000-8080], {remote}}}
        - {{action: deny, cidrs: ["10.1.0.0/16", "fd01::/16"]}}
    ingress:
      default: deny
      rules: [{{action: allow, protocol: tcp, ports: [22], cidrs: ["10.0.0.0/8", "fd00::/8"]}}]
  sockets:
    connect:
      default: deny
      rules: [{{action: allow, protocol: tcp, ports: [5432], cidrs: ["10.1.2.0/24", "fd02::/32"]}}]
    bind:
      default: deny
      rules: [{{action: allow, cidrs: ["127.0.0.0/8", "::1/128"]}}]
"""
)
CIDRS = 'cidrs: ["10.0.0.0/8", "192.168.1.0/24", "fd00::/8", "2001:db8::1/128"]'
NAMES = "fqdns: [example.com]"
# the compare bench's shape: one allow rule of prefixes
ONE_FAMILY = HEAD + "      rules: [{{action: allow, cidrs: {cidrs}}}]\n"
VARIANTS = (
    ("plain", POLICY.format(remote=CIDRS)),
    ("names", POLICY.format(remote=NAMES)),
    ("ipv4", ONE_FAMILY.format(cidrs='["10.77.0.0/24", "192.168.1.0/24"]')),
    ("ipv6", ONE_FAMILY.format(cidrs='["fd77::/64", "2001:db8::1/128"]')),
)


def run(report: Report, quick: bool) -> None:
    rounds = 1 if quick else 5
    report.params["verifier"] = {"rounds": rounds, "statistic": "median PROG_LOAD time"}
    for variant, text in VARIANTS:
        (policy,) = load_contents([("verifier.yaml", text.encode())]).policies
        for spec in compile_policy(policy).programs:
            if variant == "names" and spec.hook not in ("egress", "ingress"):
                continue
            key = spec.hook if variant == "plain" else f"{spec.hook}.{variant}"
            steps, times = 0, []
            for _ in range(rounds):
                prepared = prepare_program(spec)
                try:
                    prepared.fill()
                    started = time.perf_counter()
                    loaded = prepared.load()
                    times.append((time.perf_counter() - started) * 1000)
                except BaseException:
                    close_all(prepared.maps.values())
                    raise
                with loaded:
                    steps = loaded.info().verified_insns
            what = f"the {spec.function} program ({spec.hook})"
            report.add(Figure(f"verifier.steps.{key}", steps, "steps", f"verifier steps of {what}"))
            report.add(
                Figure(
                    f"verifier.prog_load_ms.{key}",
                    statistics.median(times),
                    "ms",
                    f"PROG_LOAD of {what}, alone",
                )
            )
