"""`cgpolicy test` of 1,000 cases: wall time as an operator runs it (a fresh process), with
the reference evaluator alone and with ``--kernel`` (policies applied to a throwaway
cgroup, packets through BPF_PROG_TEST_RUN, every other action by a probe process).

The cases are spread over every kind of action: packets out and in, socket creation,
connect and bind on loopback (unguarded) and to other addresses (guarded), sends, device
opens and mknods, sysctl reads and writes. The throwaway cgroup is made below this
benchmark's scratch cgroup (``--cgroup-root``) and the transient policies pinned in its
pin folder.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.figures import Figure, Report
from bench.scratch import Scratch

CASES = 1000
POLICY = """\
apiVersion: cgpolicy.dev/v1
kind: CgroupPolicy
metadata: {name: bench-test}
spec:
  targets: [{path: x}]
  network:
    egress:
      default: deny
      rules:
        - {action: allow, cidrs: ["10.0.0.0/8", "fd00::/8"], protocol: tcp, ports: [443]}
        - {action: deny, cidrs: ["10.66.0.0/16"]}
        - {action: allow, protocol: icmp, icmpTypes: [8]}
        - {action: allow, cidrs: ["127.0.0.0/8"]}
    ingress:
      default: deny
      rules: [{action: allow, protocol: tcp, ports: [80, 443]}]
  sockets:
    create: {default: allow, rules: [{action: deny, family: inet, type: raw}]}
    bind: {default: allow, rules: [{action: deny, protocol: tcp, ports: ["1-1023"]}]}
    connect: {default: allow, rules: [{action: deny, cidrs: ["169.254.169.254/32"]}]}
  devices:
    default: deny
    rules:
      - {action: allow, type: char, major: 1, minor: 3, access: rwm}
      - {action: allow, type: char, major: 1, minor: 9, access: r}
  sysctl:
    default: allow
    rules: [{action: deny, name: "net.*", access: write}]
"""
# (action, expected verdict); the cases cycle through them
ACTIONS = [
    ("egress tcp 10.1.2.{n}:443", "allow"),
    ("egress tcp 10.66.0.{n}:443", "deny"),
    ("egress udp [fd00::{n:x}]:53", "deny"),
    ("egress icmp 192.0.2.{n} --icmp-type 8", "allow"),
    ("ingress tcp 203.0.113.{n}:443", "allow"),
    ("socket inet stream", "allow"),
    ("socket inet raw icmp", "deny"),
    ("connect tcp 127.0.0.1:{port}", "allow"),
    ("connect tcp 169.254.169.254:80", "deny"),
    ("sendmsg udp 10.0.{n}.1:53", "deny"),  # egress refuses it at sendmsg (fails fast)
    ("bind tcp 127.0.0.1:{low}", "deny"),
    ("device c 1:3 rw", "allow"),
    ("device c 1:9 w", "deny"),
    ("device c 1:3 m", "allow"),
    ("sysctl read kernel.hostname", "allow"),
    ("sysctl write net.ipv4.ip_forward", "deny"),
]


def _test_file(folder: Path) -> Path:
    (folder / "bench.yaml").write_text(POLICY)
    cases = []
    for n in range(CASES):
        text, expect = ACTIONS[n % len(ACTIONS)]
        action = text.format(n=n % 250 + 1, port=40000 + n, low=1 + n % 1000)
        cases.append({"name": f"case {n}", "action": action, "expect": expect})
    path = folder / "bench.test.yaml"
    body = {"apiVersion": "cgpolicy.dev/v1", "kind": "CgroupPolicyTest"}
    path.write_text(json.dumps({**body, "policies": ["bench.yaml"], "cases": cases}))
    return path


def _wall(argv: list[str]) -> tuple[float, dict]:
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr[-2000:]}")
    return elapsed, json.loads(done.stdout)


def run(report: Report, quick: bool) -> None:
    rounds = 1 if quick else 3
    cgpolicy = str(Path(sys.executable).with_name("cgpolicy"))
    with Scratch("policytest") as scratch, tempfile.TemporaryDirectory() as folder:
        path = _test_file(Path(folder))
        base = [cgpolicy, "--bpf-dir", str(scratch.bpf_dir)]
        base += ["--cgroup-root", str(scratch.cgroup_dir), "test", "--json", str(path)]
        times: dict[str, list[float]] = {"reference": [], "kernel": []}
        ran = 0
        for _ in range(rounds):  # interleaved
            elapsed, _ = _wall(base)
            times["reference"].append(elapsed)
            elapsed, result = _wall([*base, "--kernel"])
            times["kernel"].append(elapsed)
            ran = sum(case["kernel"]["ran"] for file in result["files"] for case in file["cases"])
        reference, kernel = (statistics.median(times[k]) for k in ("reference", "kernel"))
        report.details["policytest"] = {**times, "cases": CASES, "ran_in_kernel": ran}
        report.add(
            Figure(
                "policytest_reference_s",
                reference,
                "s",
                f"`cgpolicy test` of {CASES} cases, reference evaluator only: median wall "
                f"time of {rounds} fresh processes",
            )
        )
        report.add(
            Figure(
                "policytest_kernel_s",
                kernel,
                "s",
                f"the same with --kernel: apply to a throwaway cgroup, {ran} cases through "
                "the programs (test_run or a probe process), everything removed",
            )
        )
        report.add(
            Figure(
                "policytest_kernel_per_case_ms",
                (kernel - reference) / CASES * 1000,
                "ms",
                "what --kernel adds per case (kernel - reference) / cases",
            )
        )
