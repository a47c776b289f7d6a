"""Reading and compiling a long CIDR list, in this process: `load_paths` and `compile_policy`.

The file is bench/validate.py's: one allow rule of N random IPv4 /24s (N = 1,000, 10,000
and 100,000; --quick: the first two). Each figure is the median wall time of several rounds
(the spread is in the note). A change of one prefix in such a file is timed
as the service reads and compiles it, right after it loaded the file as it was (only the
changed line is checked and the compilation is changed: policy/splice.py,
compile.recompile): `parse_change_ms`. `details.parse` splits the load into its stages (YAML
events to plain data, the JSON Schema, the semantic checks, building the model), each
timed alone, the median of the same rounds. bench/README.md has the before/after table.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from bench.figures import Figure, Report
from bench.validate import _cidrs_policy
from cgpolicy.compiler.compile import compile_policy
from cgpolicy.policy import validate as validation
from cgpolicy.policy.build import build_policy
from cgpolicy.policy.gcpause import gc_paused
from cgpolicy.policy.loader import load_file
from cgpolicy.policy.semantic import check_policy, end_of_load
from cgpolicy.policy.validate import FileMemo, load_contents, load_paths
from cgpolicy.reconciler.decide import Compilations

SIZES = (1_000, 10_000, 100_000)
QUICK_SIZES = (1_000, 10_000)


def _median_ms(
    function: Callable[[], Any], rounds: int, before: Callable[[], None] = lambda: None
) -> tuple[float, float, float]:
    """Median, lowest and highest wall time in ms of ``rounds`` calls (after one warm-up),
    each after ``before`` (not timed). What a call returns is freed after its timing: the
    previous result is not freed inside the next call either."""
    function()
    times = []
    for _ in range(rounds):
        before()
        started = time.perf_counter()
        result = function()
        times.append((time.perf_counter() - started) * 1e3)
        del result
    return statistics.median(times), min(times), max(times)


def _stages(path: Path, rounds: int) -> dict[str, float]:
    """Median ms of each stage of load_paths alone (as load_paths runs them: the collector
    paused, the CIDR cache filled by the checks and used by the build)."""
    loaded = load_file(str(path))
    (document,) = loaded.documents

    def schema() -> None:
        with gc_paused():
            list(validation._validator().iter_errors(document.data))

    def checks() -> list[Any]:
        with gc_paused():
            return list(check_policy(document.data))

    def build() -> Any:  # after checks(): the CIDRs are in the cache, as in load_paths
        with gc_paused():
            return build_policy(document.data, document.source_map, str(path))

    def yaml() -> Any:
        with gc_paused():
            return load_file(str(path))

    found = {
        "yaml_ms": _median_ms(yaml, rounds)[0],
        "schema_ms": _median_ms(schema, rounds)[0],
        "semantic_ms": _median_ms(checks, rounds, partial(end_of_load, keep=False))[0],
        "build_ms": _median_ms(build, rounds)[0],
    }
    end_of_load(keep=False)
    return {key: round(value, 2) for key, value in found.items()}


def _change_ms(folder: Path, path: Path, rounds: int) -> float:
    """Median ms of reading and compiling ``path`` with one prefix changed as the service
    does, each time right after it read and compiled ``path`` itself: its memo of the file
    (validate.FileMemo, the line spliced in) and its compilations (the compilation changed
    in place, the index made ready as the service makes it after a load)."""
    lines = path.read_bytes().split(b"\n")
    middle = len(lines) // 2
    changed = b"\n".join([*lines[:middle], b'            - "203.0.113.0/24"', *lines[middle + 1 :]])
    times = []
    for _ in range(rounds):
        memo, compiled = FileMemo(), Compilations(lambda policy, _: compile_policy(policy))
        (policy,) = load_contents([(str(path), path.read_bytes())], memo).policies
        for spec in compiled(policy, None).programs:
            for m in spec.maps:
                if m.index is not None:
                    m.index.prepare(m)
        started = time.perf_counter()
        (policy,) = load_contents([(str(path), changed)], memo).policies
        compiled(policy, None)
        times.append((time.perf_counter() - started) * 1e3)
        del policy, compiled, memo
    return statistics.median(times)


def run(report: Report, quick: bool) -> None:
    sizes = QUICK_SIZES if quick else SIZES
    totals: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="cgpolicy-bench-parse-") as folder:
        for count in sizes:
            path = Path(folder, f"cidrs-{count}.yaml")
            path.write_bytes(_cidrs_policy(count))
            rounds = 3 if quick or count >= 100_000 else 9
            result = load_paths([path])
            (policy,) = result.policies
            load, load_low, load_high = _median_ms(
                partial(load_paths, [path]), rounds, partial(end_of_load, keep=False)
            )
            comp, comp_low, comp_high = _median_ms(partial(compile_policy, policy), rounds)
            totals[count] = load + comp
            spread = f"median of {rounds}; load {load_low:.1f}-{load_high:.1f}"
            report.add(
                Figure(
                    f"parse_load_paths_ms.{count}",
                    load,
                    "ms",
                    f"load_paths of a policy of {count:,} IPv4 /24s (read, YAML, schema, "
                    "checks, model)",
                    note=f"{spread} ms",
                )
            )
            report.add(
                Figure(
                    f"parse_compile_ms.{count}",
                    comp,
                    "ms",
                    "compile_policy of that policy (IPv4 index, canonical order, revision)",
                    note=f"median of {rounds}; {comp_low:.1f}-{comp_high:.1f} ms",
                )
            )
            report.add(
                Figure(
                    f"parse_total_ms.{count}",
                    totals[count],
                    "ms",
                    "the two together: reading a new file of that size, before anything is applied",
                )
            )
            change = _change_ms(Path(folder), path, rounds)
            report.add(
                Figure(
                    f"parse_change_ms.{count}",
                    change,
                    "ms",
                    "that file with one prefix changed, read and compiled as the service does "
                    "right after it loaded the file as it was (the line spliced into its "
                    "last reading, the compilation changed)",
                    ("<", 10.0) if count == 10_000 else None,
                )
            )
            report.details.setdefault("parse", {})[str(count)] = _stages(path, rounds)
    if 100_000 in totals:
        ratio = totals[100_000] / (10 * totals[10_000])
        what = "time per prefix at 100,000 over that at 10,000 (1 = linear)"
        report.add(Figure("parse_scaling_100k_over_10k", ratio, "x", what, ("<=", 1.2)))
