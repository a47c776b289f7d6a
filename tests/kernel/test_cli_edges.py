"""Small defects found by attacking the CLI (issue 10, item 7): a target that names a file
in the cgroup tree, and `audit`/`events` pointed at a folder that is missing or not on
bpffs. Each test failed before its fix."""

from __future__ import annotations

from pathlib import Path

from enforcement import attachments, run_cli
from policy_builders import policy_file


def test_a_target_that_is_a_file_is_refused_by_plan_and_apply(
    scratch_cgroup, bpf_dir: Path, tmp_path: Path
) -> None:
    target = f"{scratch_cgroup.relative}/cgroup.procs"
    policy = policy_file(
        tmp_path,
        "file-target",
        [target],
        {"sysctl": {"default": "allow", "rules": [{"action": "deny", "name": "net.*"}]}},
    )
    for command in ("plan", "apply"):
        done = run_cli("--bpf-dir", bpf_dir, command, policy)
        assert done.returncode == 1, done
        assert f"target {target} is not a cgroup" in done.stdout, done.stdout
        assert "Traceback" not in done.stderr
    assert attachments(scratch_cgroup.path) == {}
    assert not (bpf_dir / "file-target").exists()


def test_audit_and_events_say_when_the_pin_folder_is_missing_or_not_bpffs(
    bpf_dir: Path, tmp_path: Path
) -> None:
    missing = bpf_dir / "never-made"
    for command in (["audit"], ["events"]):
        done = run_cli("--bpf-dir", missing, *command)
        assert done.returncode in (0, 3), done  # audit still lists other owners' programs
        assert f"{missing} does not exist: nothing is applied" in done.stderr
        wrong = run_cli("--bpf-dir", tmp_path, *command)
        assert wrong.returncode == 1
        assert f"{tmp_path} is not on a bpf filesystem" in wrong.stderr
        assert "Traceback" not in wrong.stderr
