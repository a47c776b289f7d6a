"""The one-time cost: bcc compiles each C file in bpf/ once per process (clang at run time).
Every later program instance reuses the instructions, so this is paid once per process,
not per policy; the other figures are measured after it."""

from __future__ import annotations

import time

from bench.figures import Figure, Report
from cgpolicy.kernel.loader import SOURCE_DIR, compile_function

# One function of each source file; the others in a file come from the same compile.
SOURCES = {
    "net.c": "cgp_egress",
    "sock.c": "cgp_sock_create",
    "device.c": "cgp_device",
    "sysctl.c": "cgp_sysctl",
}


def run(report: Report) -> None:
    start = time.perf_counter()
    import bcc  # noqa: F401  (the import itself is part of the first compile's cost)

    import_s = time.perf_counter() - start
    per_file = {}
    for source, function in SOURCES.items():
        start = time.perf_counter()
        compile_function(SOURCE_DIR / source, function)
        per_file[source] = time.perf_counter() - start
    total = import_s + sum(per_file.values())
    split = {"import bcc": import_s, **per_file}
    report.details["bcc_first_compile_s"] = {name: round(s, 3) for name, s in split.items()}
    report.add(
        Figure(
            "bcc_first_compile_s",
            total,
            "s",
            "one-time per process: import bcc and compile net.c, sock.c, device.c, sysctl.c",
            note=", ".join(
                f"{k} {v:.2f}s" for k, v in report.details["bcc_first_compile_s"].items()
            ),
        )
    )
