"""Whole commands as an operator runs them: wall time and the process's own peak RSS.

Each command is a fresh `cgpolicy` process (`os.wait4` gives that child's ru_maxrss), run
several times; the figure is the median wall time and the largest peak RSS. The store fill
runs first, into an empty temporary store: the one-time per-machine cost of bcc. Every
other command uses the machine's store (`scripts/setup.sh` filled it), as it would in use.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.figures import Figure, Report
from bench.scratch import Scratch

REPO = Path(__file__).resolve().parents[1]
CGPOLICY = str(Path(sys.executable).with_name("cgpolicy"))

POLICY = """\
apiVersion: cgpolicy.dev/v1
kind: CgroupPolicy
metadata: {{name: startup}}
spec:
  mode: enforce
  targets: [{{path: {target}}}]
  network:
    egress:
      default: deny
      rules: [{{action: allow, cidrs: ["10.0.0.0/8"], protocol: tcp, ports: [443]}}]
  devices:
    default: deny
    rules: [{{action: allow, type: char, major: 1, minor: 3, access: rwm}}]
  sysctl:
    default: allow
    rules: [{{action: deny, name: "net.ipv4.*", access: write}}]
"""


def measure(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one run of ``argv``, which must exit 0."""
    started = time.perf_counter()
    child = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    assert child.stderr is not None
    errors = child.stderr.read().decode(errors="replace")
    child.stderr.close()
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {child.returncode}: {errors.strip()}")
    return wall, usage.ru_maxrss / 1024


def _add(
    report: Report,
    key: str,
    samples: list[tuple[float, float]],
    what: str,
    wall_target: float | None,
    rss_target: float | None = None,
) -> None:
    walls = [wall for wall, _ in samples]
    report.details[key] = [{"s": round(w, 4), "rss_mib": round(r, 1)} for w, r in samples]
    report.add(
        Figure(
            f"{key}_s",
            statistics.median(walls),
            "s",
            f"{what}: median wall time of {len(samples)} fresh processes",
            ("<", wall_target) if wall_target else None,
            note=f"min {min(walls):.3f} s, max {max(walls):.3f} s",
        )
    )
    if rss_target is not None:
        report.add(
            Figure(
                f"{key}_rss_mib",
                max(rss for _, rss in samples),
                "MiB",
                f"{what}: largest peak RSS (ru_maxrss) of those processes",
                ("<", rss_target),
            )
        )


def run(report: Report, quick: bool) -> None:
    rounds = 1 if quick else 7  # quick: a smoke test, every command once

    with tempfile.TemporaryDirectory(prefix="cgpolicy-bench-store-") as folder:
        empty_store = Path(folder) / "store"
        fill = [measure([CGPOLICY, "--cache-dir", str(empty_store), "cache", "fill"])]
    _add(
        report,
        "store_fill",
        fill,
        "`cgpolicy cache fill` into an empty store (bcc, once per machine)",
        None,
        None,
    )

    _add(
        report,
        "cli_help",
        [measure([CGPOLICY, "--help"]) for _ in range(rounds)],
        "`cgpolicy --help`",
        0.3,
    )
    _add(
        report,
        "cli_validate_policies",
        [measure([CGPOLICY, "validate", "policies/"]) for _ in range(rounds)],
        "`cgpolicy validate policies/`",
        0.3,
    )

    with Scratch("startup") as scratch, tempfile.TemporaryDirectory() as folder:
        (target,) = scratch.make_cgroups(["app"])
        policy = Path(folder) / "startup.yaml"
        policy.write_text(POLICY.format(target=target))
        base = [CGPOLICY, "--bpf-dir", str(scratch.bpf_dir)]
        applies = []
        for _ in range(rounds):
            applies.append(measure([*base, "apply", str(policy)]))
            measure([*base, "remove", "startup"])
        _add(
            report,
            "cli_apply_new",
            applies,
            "`cgpolicy apply` of a new policy of 3 sections (egress, devices, sysctl)",
            0.6,
            60,
        )
        runs = [measure([*base, "run", str(policy), "--", "true"]) for _ in range(rounds)]
        _add(report, "cli_run_true", runs, "`cgpolicy run POLICY -- true`, same policy", 0.6, 60)
