"""`cgpolicy validate` on large and hostile input: wall time and peak memory per process.

Issue 2's bar: every bad or hostile input is refused with exit 2 within 2 s and 200 MB, and
a policy listing 100,000 CIDRs is accepted. Each input runs in a fresh `cgpolicy validate`
process, as an operator would run it, and that process's own peak RSS is reported. The
hostile inputs include those tests/unit/test_loader.py refuses under an address-space limit
(the tests assert what is refused and how; how long it takes is measured only here).

Also the compile of that 100,000-CIDR policy, in this process (`compile_policy` alone).
"""

from __future__ import annotations

import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.figures import Figure, Report
from cgpolicy.compiler.compile import compile_policy
from cgpolicy.policy.loader import MAX_FILE_BYTES
from cgpolicy.policy.validate import load_paths

HEADER = """\
apiVersion: cgpolicy.dev/v1
kind: CgroupPolicy
metadata: {name: big}
spec:
  targets: [{path: system.slice/big.service}]
  network:
    egress:
      default: deny
      rules:
        - action: allow
          cidrs:
"""


def _cidrs_policy(count: int) -> bytes:
    rng = random.Random(7)
    lines: set[str] = set()
    while len(lines) < count:
        value = rng.getrandbits(24)
        lines.add(f'            - "{value >> 16}.{value >> 8 & 255}.{value & 255}.0/24"')
    return (HEADER + "\n".join(sorted(lines)) + "\n").encode()


def _alias_bomb() -> bytes:
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 12)]
    return ("\n".join(levels) + "\n").encode()


HOSTILE: dict[str, Callable[[], bytes]] = {
    "alias_bomb": _alias_bomb,
    "deep_flow_nesting": lambda: b"[" * 200_000 + b"]" * 200_000,
    "deep_block_nesting": lambda: "".join(f"{' ' * i}k{i}:\n" for i in range(3000)).encode(),
    "deep_flow_16mib": lambda: b"[" * (MAX_FILE_BYTES - 1),
    "many_nodes": lambda: b"x:\n" + b"- s\n" * (MAX_FILE_BYTES // 4 - 1),
    "many_lists": lambda: b"x: [" + b"[]," * (MAX_FILE_BYTES // 3 - 2) + b"]",
    "long_string": lambda: b'x: "' + b"y" * (MAX_FILE_BYTES - 10) + b'"\n',
    "oversized_20mib": lambda: b"# padding\n" * (2 * 1024 * 1024),
    "binary": lambda: bytes(range(256)) * 4096,
    "latin1": lambda: "metadata: {name: caf\xe9}\n".encode("latin-1"),
    "empty": lambda: b"",
    "top_level_list": lambda: b"- apiVersion: cgpolicy.dev/v1\n",
    "duplicate_keys": lambda: _cidrs_policy(10).replace(
        b"  network:", b"  mode: enforce\n  mode: audit\n  network:"
    ),
    "many_keys": lambda: "".join(f"k{i}: {i}\n" for i in range(700_000)).encode(),
}


# Runs `cgpolicy validate` and then records the process's own peak RSS (VmHWM). The
# rusage of wait4() would not do: Linux carries the pre-exec peak of the forked bench
# process (hundreds of MB after bcc) into the child's ru_maxrss.
_MEASURED = """
import runpy, sys
sys.argv = ["cgpolicy", "validate", sys.argv[1]]
try:
    runpy.run_module("cgpolicy", run_name="__main__")
finally:
    status = open("/proc/self/status").read()
    hwm = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    open(sys.argv[-1] + ".hwm", "w").write(hwm.split()[1])
"""


def _run(path: Path) -> tuple[int, float, float, str]:
    """exit status, wall seconds, peak RSS MiB, and stderr's last line."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _MEASURED, str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    wall = time.perf_counter() - started
    hwm_kib = int(Path(f"{path}.hwm").read_text())
    last = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
    return done.returncode, wall, hwm_kib / 1024, last[0]


def run(report: Report, quick: bool) -> None:
    cidrs = 1_000 if quick else 100_000
    worst_time = worst_rss = 0.0
    failures = []
    with tempfile.TemporaryDirectory(prefix="cgpolicy-bench-validate-") as folder:
        big = Path(folder, "big.yaml")
        big.write_bytes(_cidrs_policy(cidrs))
        status, wall, rss, _ = _run(big)
        report.add(
            Figure(
                "validate_cidrs_s",
                wall,
                "s",
                f"`cgpolicy validate` of a policy with {cidrs:,} CIDRs "
                f"({big.stat().st_size / 2**20:.1f} MiB), whole process; exit {status}",
                ("<", 2.0),
            )
        )
        report.add(Figure("validate_cidrs_rss_mib", rss, "MiB", "its peak RSS", ("<", 200.0)))
        compile_s = None
        if status != 0:
            failures.append(f"big policy: exit {status}")
        else:
            (policy,) = load_paths([big]).policies
            started = time.perf_counter()
            compile_policy(policy)
            compile_s = time.perf_counter() - started
        report.add(
            Figure(
                "compile_cidrs_s",
                compile_s,
                "s",
                f"compile_policy of that policy ({cidrs:,} IPv4 /24s in one rule), in process",
                ("<", 2.0),
                "" if compile_s is not None else "not measured: the policy was refused",
            )
        )

        def run_hostile(name: str) -> tuple[int, float, float, str]:
            path = Path(folder, f"{name}.yaml")
            path.write_bytes(HOSTILE[name]())
            return _run(path)

        # --quick is a smoke test: every input still runs and is checked, two processes at
        # a time (each one's wall time then includes some contention; `make bench` runs
        # them one after the other).
        with ThreadPoolExecutor(2 if quick else 1) as pool:
            outcomes = list(pool.map(run_hostile, HOSTILE))
        for name, (status, wall, rss, message) in zip(HOSTILE, outcomes, strict=True):
            report.details.setdefault("validate_hostile", {})[name] = {
                "exit": status,
                "wall_s": round(wall, 3),
                "peak_rss_mib": round(rss, 1),
                "message": message,
            }
            worst_time, worst_rss = max(worst_time, wall), max(worst_rss, rss)
            if status != 2 or "Traceback" in message:
                failures.append(f"{name}: exit {status}")
    what = f"slowest of {len(HOSTILE)} hostile inputs, each refused with exit 2 (details)"
    report.add(Figure("validate_hostile_max_s", worst_time, "s", what, ("<", 2.0)))
    report.add(
        Figure("validate_hostile_max_rss_mib", worst_rss, "MiB", "largest peak RSS", ("<", 200.0))
    )
    if failures:
        report.notes.append("validate: not refused as expected: " + ", ".join(failures))
