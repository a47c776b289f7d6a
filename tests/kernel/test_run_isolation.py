"""`cgpolicy run` touches only what it created (issue 10, item 5): an applied policy named
like its transient policy stays attached, its transient policy is refused to others while
it runs, and what it removes at the end is what it recorded, never what a name now names."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from enforcement import EPERM, kill_and_remove_cgroup, probe, run_cli
from gate import finish, gated, open_gates
from netns import PROBE_EXTRA
from policy_builders import policy_file
from service import wait_until

from cgpolicy.enforcer.engine import Enforcer
from cgpolicy.kernel import pins
from cgpolicy.kernel.bpf import CgroupLink

RUN_PARENT = "cgpolicy.run"


def deny_connect(folder: Path, name: str, targets: list[str], address: str) -> Path:
    rules = [{"action": "deny", "cidrs": [f"{address}/32"]}]
    return policy_file(
        folder, name, targets, {"sockets": {"connect": {"default": "allow", "rules": rules}}}
    )


def pinned_links(bpf_dir: Path, name: str) -> dict[str, tuple[int, int, int]]:
    """Every link pin of a policy: relative path -> (link id, program id, cgroup id)."""
    found = {}
    for pin in sorted((bpf_dir / name).glob("*/link-*")):
        with CgroupLink.from_pin(pin) as link:
            info = link.info()
        found[str(pin.relative_to(bpf_dir))] = (info.id, info.prog_id, info.cgroup_id)
    return found


def connect_errno(cgroup, address: str) -> int:
    result = probe(cgroup, "connect", "tcp", address, 9)
    return 0 if result.ok else result.errno


@pytest.fixture
def cleanup(bpf_dir: Path, cgroup_root: Path) -> Iterator[str]:
    """A policy name of this test's own; whatever a run left is removed afterwards."""
    name = f"iso-{os.getpid()}"
    yield name
    parent = cgroup_root / RUN_PARENT
    if parent.exists():
        for stale in parent.glob(f"{name}-*"):
            kill_and_remove_cgroup(stale)
    enforcer = Enforcer(cgroup_root, bpf_dir)
    names = list(enforcer.observe())
    if names:
        enforcer.apply(enforcer.plan_removal(names, force=True))


def test_run_leaves_a_policy_named_like_its_transient_policy_attached(
    bpf_dir, scratch_cgroup, tmp_path, cleanup
):
    name = cleanup
    run_file = deny_connect(tmp_path, name, ["unused/replaced-by-run"], "127.0.0.2")
    command = [sys.executable, str(PROBE_EXTRA), "connect", "tcp", "127.0.0.2", "9"]
    runner = gated("--bpf-dir", bpf_dir, "run", run_file, "--", *command)
    # What `run` used to call its transient policy, applied first by someone else.
    victim = f"{name}-run{runner.pid}"
    victim_file = deny_connect(tmp_path, victim, [scratch_cgroup.relative], "127.0.0.3")
    assert run_cli("--bpf-dir", bpf_dir, "apply", victim_file).returncode == 0
    before = pinned_links(bpf_dir, victim)
    revision = pins.read_meta(bpf_dir / victim)
    assert before and revision is not None
    open_gates(runner)
    done = finish(runner)
    # The command ran under the run's own policy...
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert json.loads(done.stdout.strip().splitlines()[-1])["errno"] == EPERM
    # ...and the policy that had the name is untouched: same links on the same programs,
    # same metadata, still enforcing; nothing of the run is left.
    assert pinned_links(bpf_dir, victim) == before
    after = pins.read_meta(bpf_dir / victim)
    assert after is not None and after.revision == revision.revision
    assert connect_errno(scratch_cgroup, "127.0.0.3") == EPERM
    assert sorted(p.name for p in pins.policy_folders(bpf_dir)) == [victim]


# A command that waits (two minutes at most) until the test creates the file it names.
WAIT_FOR_FILE = """\
import os, sys, time
for _ in range(2400):
    if os.path.exists(sys.argv[1]):
        break
    time.sleep(0.05)
"""


def transient_names(bpf_dir: Path, name: str) -> list[str]:
    return [p.name for p in pins.policy_folders(bpf_dir) if p.name.startswith(f"{name}-run")]


def start_waiting_run(
    bpf_dir: Path, folder: Path, name: str
) -> tuple[subprocess.Popen[str], str, Path]:
    """`cgpolicy run` of a deny policy called ``name`` whose command waits until the file
    returned is made: the process, its transient policy's name (once applied), the file."""
    flag = folder / "stop"
    run_file = deny_connect(folder, name, ["unused/replaced-by-run"], "127.0.0.2")
    runner = gated(
        "--bpf-dir", bpf_dir, "run", run_file, "--", sys.executable, "-c", WAIT_FOR_FILE, flag
    )
    open_gates(runner)
    try:
        assert wait_until(lambda: bool(transient_names(bpf_dir, name)), timeout=60)
    except BaseException:
        flag.touch()
        finish(runner)
        raise
    (transient,) = transient_names(bpf_dir, name)
    return runner, transient, flag


def test_a_running_transient_policy_is_refused_to_others_and_removal_is_by_recorded_ids(
    bpf_dir, scratch_cgroup, tmp_path, cleanup
):
    name = cleanup
    runner, transient, flag = start_waiting_run(bpf_dir, tmp_path, name)
    try:
        # While its command runs, the transient policy is the run's: not removed, not replaced.
        refused = run_cli("--bpf-dir", bpf_dir, "remove", transient)
        assert refused.returncode == 1 and "cgpolicy run" in refused.stdout, refused
        recorded = pins.read_meta(bpf_dir / transient)
        assert recorded is not None and recorded.owner is not None
        assert recorded.owner["kind"] == "run" and recorded.owner["pid"] == runner.pid
        everything = run_cli("--bpf-dir", bpf_dir, "remove", "--all")
        assert everything.returncode == 1, everything
        replacement = deny_connect(tmp_path, transient, [scratch_cgroup.relative], "127.0.0.3")
        replaced = run_cli("--bpf-dir", bpf_dir, "apply", replacement)
        assert replaced.returncode == 1 and "--force" in replaced.stdout, replaced
        assert transient_names(bpf_dir, name) == [transient]

        # An operator forces it out and applies a policy of the same name on another cgroup:
        # the run's clean-up must not take that one with it.
        forced = run_cli("--bpf-dir", bpf_dir, "remove", "--force", transient)
        assert forced.returncode == 0, forced
        assert run_cli("--bpf-dir", bpf_dir, "apply", replacement).returncode == 0
        before = pinned_links(bpf_dir, transient)
        flag.touch()
        done = finish(runner)
        assert done.returncode == 0, (done.stdout, done.stderr)
        assert pinned_links(bpf_dir, transient) == before
        assert connect_errno(scratch_cgroup, "127.0.0.3") == EPERM
    finally:
        flag.touch()
        finish(runner)


def test_what_a_killed_run_left_is_removed_without_force(bpf_dir, cgroup_root, tmp_path, cleanup):
    name = cleanup
    runner, transient, flag = start_waiting_run(bpf_dir, tmp_path, name)
    try:
        runner.send_signal(signal.SIGKILL)
        runner.wait(timeout=60)  # its command lives on, in the cgroup the run made
        # Its process is gone: what it left is nobody's, and `remove` cleans it up.
        done = run_cli("--bpf-dir", bpf_dir, "remove", transient)
        assert done.returncode == 0, done
        assert transient_names(bpf_dir, name) == []
    finally:
        flag.touch()
        finish(runner)


def test_the_transient_policy_goes_even_when_the_cgroup_stays_busy(
    bpf_dir, cgroup_root, tmp_path, cleanup, monkeypatch
):
    """`run` removes its transient policy also when its cgroup cannot be removed (as
    `test --kernel` does: both are applied_in_throwaway)."""
    from cgpolicy.enforcer import transient
    from cgpolicy.kernel.cgroup import remove_if_empty
    from cgpolicy.policy.validate import load_paths

    def busy(path: Path) -> None:
        raise OSError(16, "Device or resource busy", str(path))

    monkeypatch.setattr(transient, "remove_cgroup_tree", busy)
    path = deny_connect(tmp_path, cleanup, ["unused"], "127.0.0.9")
    (policy,) = load_paths([path]).policies
    with pytest.raises(OSError, match="busy"):
        transient.run_under_policy(Enforcer(cgroup_root, bpf_dir), policy, ["true"])
    assert Enforcer(cgroup_root, bpf_dir).observe() == {}
    for stale in (cgroup_root / RUN_PARENT).glob(f"{cleanup}-*"):
        kill_and_remove_cgroup(stale)
    remove_if_empty(cgroup_root / RUN_PARENT)  # as run does once no other run uses it
