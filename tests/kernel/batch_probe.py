"""The runner side of ``probe_batch.py --serve``: one probe process in a test cgroup (and
optionally a network namespace), given batches of actions as JSON lines (the differential
tests of test_differential.py and test_failfast_differential.py)."""

from __future__ import annotations

import json
import select
import subprocess
import sys
from pathlib import Path

BATCH_PROBE = Path(__file__).with_name("probe_batch.py")


class BatchProbe:
    """``probe_batch.py --serve`` in a process inside the scratch cgroup, started once per
    test and given every batch of its examples: a hook decides by the cgroup the calling
    process is in at the time of the call, so this process sees each newly applied policy
    as a new one would, without an interpreter start per example. With ``netns``, it runs
    in that network namespace."""

    def __init__(self, cgroup: object, netns: str | None = None) -> None:
        self.cgroup = cgroup
        procs = cgroup.path / "cgroup.procs"  # type: ignore[attr-defined]
        inside = ["ip", "netns", "exec", netns] if netns else []
        self.process = subprocess.Popen(
            [*inside, sys.executable, str(BATCH_PROBE), "--serve"],
            preexec_fn=lambda: procs.write_text("0"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(self, actions: list[list[object]]) -> list[dict[str, object]]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(actions) + "\n")
        self.process.stdin.flush()
        # Every action is bounded (probe.TIMEOUT): a batch that takes minutes is stuck.
        ready, _, _ = select.select([self.process.stdout], [], [], 120)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            self.process.kill()
            raise RuntimeError(f"batch probe gave no answer (exit {self.process.wait()})")
        return json.loads(line)

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
