"""The real `cgpolicy` CLI as processes whose pid is known before they start, and that start
together: each waits behind a gate (a line on stdin), then execs the CLI in the same process.

    procs = [gated("--bpf-dir", d, "apply", f) for f in files]
    open_gates(*procs)                  # all of them exec `cgpolicy` at once
    done = [finish(p) for p in procs]   # CompletedProcess-like results
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CGPOLICY = Path(sys.executable).with_name("cgpolicy")

_WAIT_THEN_EXEC = "import os, sys; sys.stdin.readline(); os.execv(sys.argv[1], sys.argv[1:])"


def gated(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """`cgpolicy ARGS`, started when its gate opens; its pid is the CLI's pid."""
    return subprocess.Popen(
        [sys.executable, "-c", _WAIT_THEN_EXEC, str(CGPOLICY), *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def open_gates(*processes: subprocess.Popen[str]) -> None:
    for process in processes:
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()


def finish(
    process: subprocess.Popen[str], timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)
