"""Apply with a way back: what ``--confirm-within`` adds to an apply, what a rollback costs,
and what the lockout guard's look at ``/proc`` costs `plan` and `apply`.

- ``rollout_apply_change_s`` / ``rollout_apply_confirm_within_s``: `cgpolicy apply` of a
  changed version (v1 -> v2 of a connect policy on N cgroups) as a fresh process, plain and
  with ``--confirm-within 1h`` (which also keeps the previous version pinned and starts the
  rollback process); median of the rounds, each from v1.
- ``rollout_rollback_ms``: the rollback itself, in this process under the pin lock: every
  link switched back (BPF_LINK_UPDATE), pins and metadata restored, the way back dropped.
- ``rollout_guard_scan_ms``: one scan for the processes the guard protects (this process,
  its ancestors, its session leader, every sshd and reconcile service).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench.figures import Figure, Report
from bench.scratch import Scratch
from bench.startup import CGPOLICY, measure
from cgpolicy.enforcer.rollout import roll_back, stop_idle_timers
from cgpolicy.kernel import pending
from cgpolicy.kernel.lock import PinFolderLock
from cgpolicy.kernel.processes import protected_processes

POLICY = """\
apiVersion: cgpolicy.dev/v1
kind: CgroupPolicy
metadata: {{name: rollout}}
spec:
  targets: [{targets}]
  sockets:
    connect: {{default: allow, rules: [{{action: deny, cidrs: ["{address}/32"]}}]}}
"""


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def run(report: Report, quick: bool) -> None:
    rounds = 1 if quick else 5
    count = 4 if quick else 50
    with Scratch("rollout") as scratch, tempfile.TemporaryDirectory() as folder:
        targets = scratch.make_cgroups([f"c{i}" for i in range(count)])
        listed = ", ".join(f"{{path: {t}}}" for t in targets)
        v1, v2 = Path(folder) / "v1.yaml", Path(folder) / "v2.yaml"
        v1.write_text(POLICY.format(targets=listed, address="127.0.0.7"))
        v2.write_text(POLICY.format(targets=listed, address="127.0.0.8"))
        base = [CGPOLICY, "--bpf-dir", str(scratch.bpf_dir)]
        plain, way_back, rollback = [], [], []
        try:
            measure([*base, "apply", str(v1)])
            for _ in range(rounds):
                plain.append(measure([*base, "apply", str(v2)])[0])
                measure([*base, "apply", str(v1)])
                way_back.append(measure([*base, "apply", "--confirm-within", "1h", str(v2)])[0])
                with PinFolderLock(scratch.bpf_dir):
                    (record,) = pending.read_records(scratch.bpf_dir).values()
                    started = time.perf_counter()
                    roll_back(scratch.bpf_dir, scratch.root, dataclasses.replace(record))
                    rollback.append(time.perf_counter() - started)
                    stop_idle_timers(scratch.bpf_dir, scratch.root)
        finally:
            with PinFolderLock(scratch.bpf_dir):
                for name in pending.read_records(scratch.bpf_dir):
                    pending.drop(scratch.bpf_dir, name)
                stop_idle_timers(scratch.bpf_dir, scratch.root)
    links = count * 4  # connect4/6, sendmsg4/6 on every cgroup
    report.add(
        Figure(
            "rollout_apply_change_s",
            statistics.median(plain),
            "s",
            f"`cgpolicy apply` of a changed policy on {count} cgroups ({links} links), plain",
        )
    )
    report.add(
        Figure(
            "rollout_apply_confirm_within_s",
            statistics.median(way_back),
            "s",
            "the same apply with --confirm-within 1h (way back kept, rollback process started)",
        )
    )
    report.add(
        Figure(
            "rollout_rollback_ms",
            _median_ms(rollback),
            "ms",
            f"one rollback of that policy ({links} links switched back, pins and metadata "
            "restored), in process under the lock",
        )
    )
    scans = []
    for _ in range(5 if quick else 20):
        started = time.perf_counter()
        found = protected_processes()
        scans.append(time.perf_counter() - started)
    report.add(
        Figure(
            "rollout_guard_scan_ms",
            _median_ms(scans),
            "ms",
            f"the lockout guard's /proc scan ({len(os.listdir('/proc'))} /proc entries, "
            f"{len(found)} protected processes found)",
        )
    )
