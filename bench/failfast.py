"""Denials that fail fast (issue 13, part 4): what the connect checks of network.egress
(bpf/net.c cgp_egress_at_connect, at the connect4/6 and sendmsg4/6 hooks) add per connect.

Three scratch cgroups: ``fast`` under an egress policy (default allow, a deny CIDR rule and
a few allow rules with ports, so that the checks are attached), ``slow`` under the same
policy with ``failFast: false`` (no checks: the egress program alone), ``none`` with no
policy. A client process inside each does UDP connect() calls on one socket to an allowed
loopback address (a UDP connect sends nothing: the figure is the system call and the
hooks), in interleaved rounds; then connects to the denied range from ``fast``.

1. ``failfast.connect_ns.<fast|slow|none>``: wall time per UDP connect() seen by the client
   (median over rounds), and ``failfast.added_ns`` = fast - slow: what a connect pays for
   the check.
2. ``failfast.check_ns.<allowed|refused>``: the connect4 check program alone,
   ``run_time_ns / run_cnt`` with BPF_ENABLE_STATS, for connects it lets through and for
   connects it refuses (EPERM; counted, and the deny event past the rate limit is refused).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import policies
from bench.figures import Figure, Report
from bench.scratch import Scratch
from cgpolicy.kernel.bpf import Program
from cgpolicy.kernel.syscall import enable_run_time_stats

_CLIENT = """
import errno, json, socket, sys, time
address, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
connect = sock.connect_ex
refused = 0
start = time.perf_counter_ns()
for _ in range(count):
    if connect((address, port)) == errno.EPERM:
        refused += 1
elapsed = time.perf_counter_ns() - start
print(json.dumps({"ns": elapsed / count, "refused": refused}))
"""

ALLOWED = "127.0.0.1"
DENIED = "10.66.0.1"


def _policy(name: str, target: str, fail_fast: bool) -> str:
    rules = [
        {"action": "deny", "cidrs": ["10.66.0.0/16"]},
        {"action": "allow", "protocol": "tcp", "cidrs": ["10.0.0.0/8"], "ports": [443]},
        {"action": "allow", "protocol": "udp", "cidrs": ["10.0.0.0/8"], "ports": [53]},
    ]
    document = {
        "apiVersion": "cgpolicy.dev/v1",
        "kind": "CgroupPolicy",
        "metadata": {"name": name},
        "spec": {
            "targets": [{"path": target}],
            "network": {"egress": {"default": "allow", "rules": rules, "failFast": fail_fast}},
        },
    }
    return json.dumps(document, indent=2) + "\n"


def _connects(cgroup: Path, address: str, count: int) -> dict[str, float]:
    procs = cgroup / "cgroup.procs"
    done = subprocess.run(
        [sys.executable, "-c", _CLIENT, address, "9", str(count)],
        preexec_fn=lambda: procs.write_text("0"),
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return json.loads(done.stdout)


def run(report: Report, quick: bool) -> None:
    count = 20_000 if quick else 200_000
    rounds = 3 if quick else 7
    report.params["failfast"] = {
        "connects_per_round": count,
        "rounds": rounds,
        "statistic": "median over rounds of the mean ns per connect",
    }
    with Scratch("failfast") as scratch, tempfile.TemporaryDirectory() as folder:
        fast, slow, _ = scratch.make_cgroups(["fast", "slow", "none"])
        documents = {"ff-fast": _policy("ff-fast", fast, True)}
        documents["ff-slow"] = _policy("ff-slow", slow, False)
        scratch.plan_apply(policies.load(Path(folder), documents))
        check = Program.from_pin(scratch.bpf_dir / "ff-fast" / "egress@connect4" / "prog")
        samples: dict[str, list[float]] = {"fast": [], "slow": [], "none": []}
        order = random.Random(0)
        try:
            for _ in range(rounds):  # wall time: run-time stats off, cgroups in shuffled order
                names = list(samples)
                order.shuffle(names)
                for name in names:
                    result = _connects(scratch.cgroup_dir / name, ALLOWED, count)
                    if result["refused"]:
                        raise RuntimeError(f"{name}: allowed connects refused: {result}")
                    samples[name].append(result["ns"])
            stats_fd = enable_run_time_stats()  # then the check program alone
            try:
                check_runs = {}
                for outcome, address in (("allowed", ALLOWED), ("refused", DENIED)):
                    before = check.info()
                    result = _connects(scratch.cgroup_dir / "fast", address, count)
                    after = check.info()
                    if result["refused"] != (count if outcome == "refused" else 0):
                        raise RuntimeError(f"{outcome}: {result}")
                    check_runs[outcome] = (
                        after.run_cnt - before.run_cnt,
                        after.run_time_ns - before.run_time_ns,
                    )
            finally:
                os.close(stats_fd)
        finally:
            check.close()
    medians = {name: statistics.median(values) for name, values in samples.items()}
    report.details["failfast_connect_ns_samples"] = samples
    spread = {name: max(values) - min(values) for name, values in samples.items()}
    what = {
        "fast": "egress policy with its connect checks (failFast, the default)",
        "slow": "the same policy, failFast: false (egress program only, no connect check)",
        "none": "no policy",
    }
    for name, value in medians.items():
        report.add(
            Figure(
                f"failfast.connect_ns.{name}",
                value,
                "ns",
                f"UDP connect() to an allowed address, wall time per call in a Python client: "
                f"{what[name]}",
                note=f"spread over rounds {spread[name]:,.0f} ns",
            )
        )
    report.add(
        Figure(
            "failfast.added_ns",
            medians["fast"] - medians["slow"],
            "ns",
            "added per connect by the connect check (fast - slow; within the rounds' "
            "spread on a loaded machine, see check_ns for the program's own cost)",
        )
    )
    verbs = {"allowed": "lets through", "refused": "refuses"}
    for outcome, (runs, ns) in check_runs.items():
        report.add(
            Figure(
                f"failfast.check_ns.{outcome}",
                ns / runs if runs else None,
                "ns",
                f"the connect4 check program alone, for connects it {verbs[outcome]}: "
                "run_time_ns / run_cnt (BPF_ENABLE_STATS)",
                note=f"{runs} runs",
            )
        )
