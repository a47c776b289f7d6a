"""`python -m bench --quick` runs end to end on the real kernel and writes every figure.

No timing is asserted here: the figures are for people (bench/README.md), not for CI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cgpolicy.mounts import find_bpffs

REPO = Path(__file__).resolve().parents[2]

FIGURES = {
    "store_fill_s",
    *(f"{key}_s" for key in ("cli_help", "cli_validate_policies", "cli_apply_new", "cli_run_true")),
    "cli_apply_new_rss_mib",
    "cli_run_true_rss_mib",
    "testrun_overhead_ns.return_1",
    *(
        f"{kind}.{family}.{outcome}{suffix}"
        for family in ("ipv4", "ipv6")
        for outcome in ("match", "miss")
        for kind, suffix in (
            ("verdict_ns", ".one_cidr"),
            ("verdict_ns", ".many_cidrs"),
            ("verdict_ratio", ""),
            ("real_traffic_ns", ".one_cidr"),
            ("real_traffic_ns", ".many_cidrs"),
        )
    ),
    *(
        f"{key}{part}"
        for key in ("apply_fanout", "rule_change", "apply_policies")
        for part in ("_s", ".plan_s", ".compile_s", ".load_s", ".attach_s")
    ),
    *(
        f"verdict_ns.ipv4.{path}.{size}"
        for path in ("deny_event", "deny_over_limit")
        for size in ("one_cidr", "many_cidrs")
    ),
    *(
        f"{kind}.ipv6_mix.{mix}.{outcome}"
        for kind in ("verdict_ns", "verdict_ratio")
        for mix in ("all_64", "all_128", "r32_128", "r16_128")
        for outcome in ("match", "miss")
    ),
    "event_decode_per_s",
    "validate_cidrs_s",
    "validate_cidrs_rss_mib",
    "compile_cidrs_s",
    "validate_hostile_max_s",
    "validate_hostile_max_rss_mib",
    *(
        f"parse_{kind}_ms.{count}"
        for kind in ("load_paths", "compile", "total", "change")
        for count in (1000, 10000)
    ),
    "validate_fanout_s",
    "reapply_unchanged_s",
    "remove_fanout_s",
    "validate_policies_s",
    "reconcile_new_cgroup_ms",
    "reconcile_new_cgroup_p99_ms",
    "reconcile_policy_change_ms",
    "reconcile_policy_change_p99_ms",
    "reconcile_detach_restore_ms",
    "reconcile_noop_pass_ms",
    "reconcile_noop_pass_max_ms",
    "reconcile_initial_pass_s",
    "reconcile_daemon_rss_mib",
    "reconcile_daemon_hwm_mib",
    "reconcile_daemon_pass_ms",
    "policytest_reference_s",
    "policytest_kernel_s",
    "policytest_kernel_per_case_ms",
    "peak_rss_mib",
}

DNS_FIGURES = {
    *(
        f"dns_verdict_ns.ipv4.{outcome}.{how}"
        for outcome in ("match", "miss", "near-miss")
        for how in ("cidrs", "fqdns")
    ),
    *(f"dns_verdict_delta_ns.ipv4.{outcome}" for outcome in ("match", "miss", "near-miss")),
    *(f"dns_latency_{p}_us.{side}" for p in ("p50", "p99") for side in ("none", "policy")),
    "dns_latency_added_p99_us",
    "dns_program_ns.query",
    "dns_program_ns.answer",
    "dns_sustained_answered",
    "dns_sustained_learned",
    "dns_sustained_lost",
    "dns_sustained_learned_per_s",
    "dns_learned_entry_bytes",
    "dns_learned_map_mib",
}
FAILFAST_FIGURES = {
    *(f"failfast.connect_ns.{name}" for name in ("fast", "slow", "none")),
    "failfast.added_ns",
    "failfast.check_ns.allowed",
    "failfast.check_ns.refused",
}
FIGURES |= DNS_FIGURES | FAILFAST_FIGURES

LEARN_FIGURES = {
    *(
        f"{kind}_ns.{hook}"
        for kind in ("learn", "enforce")
        for hook in ("sendmsg4", "egress", "device", "sysctl")
    ),
    "learn_entry_bytes.addr",
    "learn_entry_bytes.egress",
}
FIGURES |= LEARN_FIGURES
SCALE_FIGURES = {
    "scale_mkdir_s",
    "scale_cold_start_s",
    "scale_cold_first_pass_s",
    "scale_daemon_rss_mib",
    "scale_daemon_hwm_mib",
    "scale_bpf_memlock_kib",
    "scale_slab_growth_mib",
    "scale_new_cgroup_ms",
    "scale_new_cgroup_p99_ms",
    "scale_new_cgroup_between_resyncs_p99_ms",
    "scale_policy_change_ms",
    "scale_policy_change_p99_ms",
    "scale_idle_pass_ms",
    "scale_remove_policy_s",
    "scale_rmdir_s",
    # kernel memory charged to the daemon: only where cgroup v1's memory controller is
    *(
        {"scale_daemon_kmem_mib"}
        if Path("/sys/fs/cgroup/memory/memory.kmem.usage_in_bytes").exists()
        else set()
    ),
    *(f"ancestor_cold_{key}_s" for key in ("direct", "map", "map_batch")),
    *(
        f"ancestor_run_ns.{hook}.{where}"
        for hook in ("egress", "connect4")
        for where in ("direct", "matched", "unmatched")
    ),
    *(f"ancestor_testrun_ns.egress.{case}" for case in ("direct", "miss", "hit")),
    "ancestor_new_cgroup_us.direct",
    "ancestor_new_cgroup_us.map",
    "ancestor_map_kib",
    "ancestor_direct_links_kib",
    "ancestor_remove_direct_s",
    "ancestor_remove_map_s",
}
FIGURES |= SCALE_FIGURES
VERIFIER_HOOKS = (
    "ingress",
    "egress",
    *(f"{hook}{v}" for hook in ("bind", "connect", "sendmsg") for v in (4, 6)),
    *(f"egress@{hook}{v}" for hook in ("connect", "sendmsg") for v in (4, 6)),
    "ingress.names",
    "egress.names",
    # the compare bench's shape of policy, with prefixes of one family
    *(
        f"{slot}.{family}"
        for slot in (
            "egress",
            *(f"egress@{hook}{v}" for hook in ("connect", "sendmsg") for v in (4, 6)),
        )
        for family in ("ipv4", "ipv6")
    ),
)
FIGURES |= {
    f"verifier.{kind}.{hook}" for kind in ("steps", "prog_load_ms") for hook in VERIFIER_HOOKS
}
FIGURES |= {
    "rollout_apply_change_s",
    "rollout_apply_confirm_within_s",
    "rollout_rollback_ms",
    "rollout_guard_scan_ms",
}


def run_quick_bench(tmp_path: Path, *only: str) -> tuple[dict, int]:
    """``python -m bench --quick`` (``--only`` each of ``only``): its results and pid."""
    output = tmp_path / "results.json"
    command = [sys.executable, "-m", "bench", "--quick", "--output", str(output)]
    for name in only:
        command += ["--only", name]
    bench = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    stdout, stderr = bench.communicate(timeout=600)
    assert bench.returncode == 0, stderr or stdout
    return json.loads(output.read_text()), bench.pid


def assert_figures(results: dict, expected: set[str]) -> None:
    assert set(results["figures"]) == expected
    for key, figure in results["figures"].items():
        assert figure["value"] is not None, key
        assert set(figure) == {"value", "unit", "what", "target", "pass", "note"}, key
    assert results["params"]["quick"] is True


def assert_removed(cgroup_root: Path, pid: int) -> None:
    """Everything the bench process made is gone again."""
    assert not (cgroup_root / f"cgpolicy-bench-{pid}").exists()
    bpffs = find_bpffs()
    assert bpffs is not None
    assert not (bpffs / f"cgpolicy-bench-{pid}").exists()


def test_quick_bench_writes_every_figure(cgroup_root, tmp_path):
    results, pid = run_quick_bench(tmp_path)
    assert_figures(results, FIGURES)
    assert_removed(cgroup_root, pid)


def test_quick_dns_bench_writes_its_figures(cgroup_root, tmp_path):
    """The DNS names benchmark alone (``--only dns``): its responder, clients, policies and
    cgroups, end to end; only that every figure comes out, never its value."""
    results, pid = run_quick_bench(tmp_path, "dns")
    assert_figures(results, DNS_FIGURES | {"peak_rss_mib"})
    assert results["params"]["only"] == ["dns"]
    assert_removed(cgroup_root, pid)


def test_quick_failfast_bench_writes_its_figures(cgroup_root, tmp_path):
    """The connect-check benchmark alone (``--only failfast``): only that every figure
    comes out, never its value."""
    results, pid = run_quick_bench(tmp_path, "failfast")
    assert_figures(results, FAILFAST_FIGURES | {"peak_rss_mib"})
    assert_removed(cgroup_root, pid)
