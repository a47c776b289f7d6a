"""python -m bench [--output FILE] [--quick] [--only NAME ...]"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import (
    ancestor,
    dns,
    enforce,
    failfast,
    learn,
    parse,
    policytest,
    reconcile,
    rollout,
    scale,
    startup,
    validate,
    verdict,
    verifier,
)
from bench.figures import Figure, Report
from bench.scratch import remove_top_folders

BENCHMARKS: dict[str, Callable[[Report, bool], None]] = {
    "startup": startup.run,  # first: whole commands, before this process grows
    "validate": validate.run,
    "parse": parse.run,
    "verdict": verdict.run,
    "verifier": verifier.run,
    "enforce": enforce.run,
    "reconcile": reconcile.run,
    "dns": dns.run,
    "failfast": failfast.run,
    "learn": learn.run,
    "policytest": policytest.run,
    "rollout": rollout.run,
    "scale": scale.run,
    "ancestor": ancestor.run,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--output", type=Path, help="write the figures as JSON here")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument(
        "--only",
        action="append",
        choices=list(BENCHMARKS),
        help="run only this benchmark (repeatable); default: all, in this order",
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (bpf(), cgroupfs, bpffs)", file=sys.stderr)
        return 1

    report = Report()
    report.params.update(
        {
            "quick": args.quick,
            "only": args.only,
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    )
    started = time.perf_counter()
    try:
        for name, benchmark in BENCHMARKS.items():
            if args.only is None or name in args.only:
                benchmark(report, args.quick)
    finally:
        remove_top_folders()
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report.add(Figure("peak_rss_mib", rss_kib / 1024, "MiB", "peak RSS of the bench process"))
    report.params["wall_s"] = round(time.perf_counter() - started, 1)

    print(report.table())
    passed, judged = report.summary()
    print(f"\n{passed}/{judged} targets met; {report.params['wall_s']} s")
    for note in report.notes:
        print(f"note: {note}")
    if args.output:
        args.output.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
