"""Figures 2-4: Enforcer.plan + Enforcer.apply wall times, with where the time goes.

2. one policy of 10,000 CIDRs whose glob target matches 100 scratch cgroups;
4. one CIDR of that applied policy changed, planned and applied again (the same 100
   cgroups: a new program instance and 100 atomic link updates);
3. 100 different complete policies, each on its own cgroup, in one apply.

Policies are written as YAML and read with the product's loader first; validation is
reported separately (the targets are about plan+apply).
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench import policies
from bench.figures import Figure, Report
from bench.scratch import Scratch
from bench.timing import Split
from cgpolicy.enforcer.engine import Planned
from cgpolicy.policy.model import Policy

FANOUT_TARGET_S = 3.0
POLICIES_TARGET_S = 10.0
CHANGE_TARGET_S = 0.2


def _timed_plan_apply(scratch: Scratch, loaded: list[Policy]) -> tuple[float, float, Split]:
    with Split() as split:
        start = time.perf_counter()
        planned = scratch.enforcer.plan(loaded)
        plan_s = time.perf_counter() - start
        start = time.perf_counter()
        outcomes = scratch.enforcer.apply(planned)
        apply_s = time.perf_counter() - start
    failed = [f"{o.plan.name}: {o.error}" for o in outcomes if not o.ok]
    if failed:
        raise RuntimeError("apply failed: " + "; ".join(failed[:3]))
    split.counts["steps"] = sum(len(item.plan.steps) for item in planned)
    split.planned = planned  # type: ignore[attr-defined]
    return plan_s, apply_s, split


def _split_figures(
    report: Report, key: str, plan_s: float, apply_s: float, split: Split, what: str
) -> None:
    s = split.seconds
    attach = apply_s - s["load"]
    report.add(
        Figure(f"{key}.plan_s", plan_s, "s", f"{what}: Enforcer.plan (observe, compile, diff)")
    )
    report.add(Figure(f"{key}.compile_s", s["compile"], "s", f"{what}: compile_policy (in plan)"))
    report.add(
        Figure(
            f"{key}.load_s",
            s["load"],
            "s",
            f"{what}: load_program: map create+fill and PROG_LOAD (in apply)",
            note=f"{split.counts['load']} programs, PROG_LOAD (verifier) {s['verifier']:.3f}s",
        )
    )
    report.add(
        Figure(
            f"{key}.attach_s",
            attach,
            "s",
            f"{what}: rest of apply: links created/updated, pins, metadata",
            note=f"{split.counts['steps']} plan steps",
        )
    )


def _steps(planned: list[Planned]) -> dict[str, int]:
    return dict(Counter(step.action.value for item in planned for step in item.plan.steps))


def run(report: Report, quick: bool) -> None:
    cidrs = 500 if quick else 10_000
    cgroups = 5 if quick else 100
    count = 5 if quick else 100
    report.params["enforce"] = {
        "fanout_cidrs": cidrs,
        "fanout_cgroups": cgroups,
        "policies": count,
    }
    with tempfile.TemporaryDirectory() as folder:
        _fanout_and_change(report, Path(folder), cidrs, cgroups)
        _many_policies(report, Path(folder), count)


def _fanout_and_change(report: Report, folder: Path, cidrs: int, cgroups: int) -> None:
    v4 = policies.cidrs_v4(cidrs // 2)
    v6 = policies.cidrs_v6(cidrs - cidrs // 2)
    with Scratch("fanout") as scratch:
        scratch.make_cgroups([f"cg-{i:03d}" for i in range(cgroups)])
        target = [("glob", scratch.relative("cg-*"))]

        start = time.perf_counter()
        loaded = policies.load(folder, {"fanout": policies.network_yaml("fanout", target, v4, v6)})
        validate_s = time.perf_counter() - start

        plan_s, apply_s, split = _timed_plan_apply(scratch, loaded)
        details: dict[str, Any] = {"steps": _steps(split.planned)}  # type: ignore[attr-defined]
        total = plan_s + apply_s
        what = f"{cidrs:,} CIDRs on {cgroups} cgroups"
        report.add(
            Figure(
                "apply_fanout_s",
                total,
                "s",
                f"plan+apply of one policy of {cidrs:,} CIDRs, glob target matching {cgroups} "
                "cgroups",
                ("<", FANOUT_TARGET_S),
            )
        )
        _split_figures(report, "apply_fanout", plan_s, apply_s, split, what)
        report.add(
            Figure(
                "validate_fanout_s",
                validate_s,
                "s",
                f"context: load_paths (YAML, schema, semantics) of the {cidrs:,}-CIDR policy",
            )
        )

        # 4. change one CIDR: the second IPv4 prefix moves to an address no other one uses
        changed_v4 = [*v4]
        changed_v4[1] = "100.64.0.0/24" if "100.64.0.0/24" not in v4 else "100.64.1.0/24"
        start = time.perf_counter()
        loaded = policies.load(
            folder, {"fanout": policies.network_yaml("fanout", target, changed_v4, v6)}
        )
        revalidate_s = time.perf_counter() - start
        plan_s, apply_s, split = _timed_plan_apply(scratch, loaded)
        details["change_steps"] = _steps(split.planned)  # type: ignore[attr-defined]
        report.add(
            Figure(
                "rule_change_s",
                plan_s + apply_s,
                "s",
                f"plan+apply after changing one CIDR of the applied {cidrs:,}-CIDR policy "
                f"({cgroups} cgroups)",
                ("<", CHANGE_TARGET_S),
            )
        )
        _split_figures(report, "rule_change", plan_s, apply_s, split, "one CIDR changed")
        details["rule_change_validate_s"] = round(revalidate_s, 3)

        # context: the same policy again, nothing to change (a reconcile pass)
        plan_s, apply_s, split = _timed_plan_apply(scratch, loaded)
        details["unchanged_steps"] = _steps(split.planned)  # type: ignore[attr-defined]
        report.add(
            Figure(
                "reapply_unchanged_s",
                plan_s + apply_s,
                "s",
                "context: plan+apply of the same policy again (nothing changes)",
            )
        )
        start = time.perf_counter()
        scratch.close()
        report.add(
            Figure(
                "remove_fanout_s",
                time.perf_counter() - start,
                "s",
                f"context: removal of the policy from {cgroups} cgroups, and the cgroups",
            )
        )
        report.details["fanout"] = details


def _many_policies(report: Report, folder: Path, count: int) -> None:
    with Scratch("policies") as scratch:
        names = [f"svc-{i:03d}" for i in range(count)]
        relatives = scratch.make_cgroups(names)
        documents = {
            f"bench-{name}": policies.service_yaml(f"bench-{name}", relative, i)
            for i, (name, relative) in enumerate(zip(names, relatives, strict=True))
        }
        start = time.perf_counter()
        loaded = policies.load(folder, documents)
        validate_s = time.perf_counter() - start
        plan_s, apply_s, split = _timed_plan_apply(scratch, loaded)
        programs = sum(len(item.compiled.programs) for item in split.planned if item.compiled)  # type: ignore[attr-defined]
        report.add(
            Figure(
                "apply_policies_s",
                plan_s + apply_s,
                "s",
                f"plan+apply of {count} different policies, each on its own cgroup, one apply",
                ("<", POLICIES_TARGET_S),
                note=f"{programs} programs ({programs // max(1, count)} hooks per policy)",
            )
        )
        _split_figures(report, "apply_policies", plan_s, apply_s, split, f"{count} policies")
        report.add(
            Figure(
                "validate_policies_s",
                validate_s,
                "s",
                f"context: load_paths of the {count} policy files",
            )
        )
        report.details["policies"] = {
            "steps": _steps(split.planned),  # type: ignore[attr-defined]
            "prog_load_s_by_program": {
                name: round(seconds, 3) for name, seconds in sorted(split.verifier_by_name.items())
            },
        }
