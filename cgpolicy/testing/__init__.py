"""`cgpolicy test`: test files of cases (an action, the expected verdict and optionally
the deciding rule) run through the reference evaluator and, with ``--kernel``, through the
real programs in a throwaway cgroup (docs/testing.md).

``spec`` finds and checks test files, ``evaluate`` runs cases through the reference,
``kernel`` through the kernel, ``report`` renders the results (text, JSON, JUnit XML).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cgpolicy.testing.evaluate import Evaluator, unexercised
from cgpolicy.testing.report import FileReport, Report
from cgpolicy.testing.spec import TestFile

if TYPE_CHECKING:
    from cgpolicy.enforcer.engine import Enforcer


def run_tests(
    files: list[TestFile], dev_root: Path = Path("/dev"), enforcer: Enforcer | None = None
) -> Report:
    """Every case of ``files`` through the reference, and through the kernel when an
    ``enforcer`` is given (its cgroup root and pin folder are used for the throwaway
    cgroups and the transient policies)."""
    evaluator = Evaluator(dev_root)
    report = Report(kernel=enforcer is not None)
    for test in files:
        results = [evaluator.run(test, case) for case in test.cases]
        if enforcer is not None:
            from cgpolicy.kernel.processes import sigterm_as_interrupt
            from cgpolicy.testing.kernel import run_in_kernel

            with sigterm_as_interrupt():
                run_in_kernel(enforcer, evaluator, test, results)
        report.files.append(FileReport(test, results, unexercised(test, results)))
    return report
