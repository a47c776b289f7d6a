"""`path:` device rules on the real kernel. A path that names a device node on the node is
enforced by that device's numbers, whatever name a process opens it by. A path that names
nothing is reported (apply output, audit, the service's log and metrics) and weakens
nothing: the rest of the policy is enforced, and a deny whose node vanishes keeps denying
the device it named.

Nodes are made with mknod in a device folder of the test's own (`--dev-root`, as the
DaemonSet points it at the node's /dev); probes open the real /dev/zero (1:5) and /dev/full
(1:7), so a rule resolved to those numbers is seen on the real nodes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import urllib.request
from pathlib import Path

from enforcement import ALLOWED, CGPOLICY, EPERM, apply_ok, enforced, expect, load, remove
from policy_builders import policy_file
from service import wait_until

from cgpolicy.enforcer.engine import Enforcer

ZERO, FULL = (1, 5), (1, 7)


def make_node(path: Path, numbers: tuple[int, int]) -> None:
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(*numbers))


def node_dev(tmp_path: Path) -> Path:
    """A node's /dev, as --dev-root sees it: root-owned, nothing in it yet."""
    folder = tmp_path / "node-dev"
    folder.mkdir()
    return folder


def line_of(path: Path, text: str) -> int:
    """The line where the rule holding ``text`` starts (its '{': policy_file writes JSON)."""
    lines = path.read_text().splitlines()
    found = next(index for index, line in enumerate(lines) if text in line)
    return next(i for i in range(found, -1, -1) if lines[i].strip() == "{") + 1


def start_service(
    bpf_dir: Path, dev: Path, policies: Path, log: Path, interval: str
) -> tuple[subprocess.Popen[bytes], int]:
    """`cgpolicy reconcile` on ``policies`` with ``dev`` as the node's /dev, its output in
    ``log``: the process and the port of its metrics."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        str(CGPOLICY),
        "--bpf-dir",
        str(bpf_dir),
        "--dev-root",
        str(dev),
        "--log-level",
        "info",
        "reconcile",
        "--policy-dir",
        str(policies),
        "--interval",
        interval,
        "--metrics-addr",
        f"127.0.0.1:{port}",
    ]
    with open(log, "wb") as output:
        return subprocess.Popen(command, stdout=output, stderr=output), port


def cgpolicy(bpf_dir: Path, dev: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [str(CGPOLICY), "--bpf-dir", str(bpf_dir), "--dev-root", str(dev), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_a_present_path_is_enforced_by_its_numbers(scratch_cgroup, bpf_dir, cgroup_root, tmp_path):
    allow = policy_file(
        tmp_path,
        "dev-allow",
        [scratch_cgroup.relative],
        {
            "devices": {
                "default": "deny",
                "rules": [
                    {"action": "allow", "path": "/dev/null", "access": "rw"},
                    {"action": "allow", "path": "/dev/zero", "access": "r"},
                ],
            }
        },
    )
    with enforced(cgroup_root, bpf_dir, allow):
        expect(
            scratch_cgroup,
            [
                (("open", "/dev/null", "rw"), ALLOWED),
                (("open", "/dev/zero", "r"), ALLOWED),
                (("open", "/dev/zero", "w"), EPERM),
                (("open", "/dev/full", "r"), EPERM),  # the default
            ],
        )
    other_name = tmp_path / "full-by-another-name"
    make_node(other_name, FULL)
    deny = policy_file(
        tmp_path,
        "dev-deny",
        [scratch_cgroup.relative],
        {"devices": {"default": "allow", "rules": [{"action": "deny", "path": "/dev/full"}]}},
    )
    with enforced(cgroup_root, bpf_dir, deny):
        expect(
            scratch_cgroup,
            [
                (("open", "/dev/full", "r"), EPERM),
                (("open", str(other_name), "r"), EPERM),  # the device, not the name
                (("open", "/dev/zero", "r"), ALLOWED),
            ],
        )


def test_a_missing_path_is_reported_and_weakens_nothing(
    scratch_cgroup, bpf_dir, cgroup_root, tmp_path
):
    dev = node_dev(tmp_path)
    make_node(dev / "full", FULL)  # this node has /dev/full, and no GPU
    path = policy_file(
        tmp_path,
        "gpu",
        [scratch_cgroup.relative],
        {
            "devices": {
                "default": "allow",
                "rules": [
                    {"action": "deny", "path": "/dev/full", "access": "r"},
                    {"action": "deny", "path": "/dev/nvidia0", "access": "rw"},
                    {"action": "allow", "path": "/dev/nvidia1"},
                ],
            }
        },
    )
    try:
        done = cgpolicy(bpf_dir, dev, "apply", str(path))
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0].startswith("gpu: new, revision ")
        deny_line = (
            f"  warning: device path /dev/nvidia0 (deny rule, line {line_of(path, 'nvidia0')}) "
            "does not exist: on this node the rule denies nothing until the path names a device"
        )
        assert deny_line in lines
        assert any(line.startswith("  warning: device path /dev/nvidia1 (allow") for line in lines)
        # What is there is enforced; nothing broader is denied in its place.
        expect(
            scratch_cgroup,
            [(("open", "/dev/full", "r"), EPERM), (("open", "/dev/zero", "rw"), ALLOWED)],
        )

        planned = json.loads(cgpolicy(bpf_dir, dev, "plan", "--json", str(path)).stdout)
        (entry,) = planned["policies"]
        assert not entry["changed"]
        states = {(d["path"], d["action"]): (d["state"], d["device"]) for d in entry["devices"]}
        assert states == {
            ("/dev/full", "deny"): ("resolved", "c 1:7"),
            ("/dev/nvidia0", "deny"): ("missing", None),
            ("/dev/nvidia1", "allow"): ("missing", None),
        }

        done = cgpolicy(bpf_dir, dev, "audit", "--cgroup", scratch_cgroup.relative)
        line = line_of(path, "nvidia0")
        assert f"deny /dev/nvidia0 rw (line {line}): 0 allowed, 0 denied [path does not exist" in (
            done.stdout
        )
        report = json.loads(
            cgpolicy(bpf_dir, dev, "audit", "--json", "--cgroup", scratch_cgroup.relative).stdout
        )
        (attachment,) = [a for c in report["cgroups"] for a in c["attachments"]]
        notes = {rule["text"]: rule["note"] for rule in attachment["counters"]["rules"]}
        assert notes == {
            "deny c 1:7 r (/dev/full)": None,
            "deny /dev/nvidia0 rw": "path does not exist: matches nothing on this node",
            "allow /dev/nvidia1 rwm": "path does not exist: matches nothing on this node",
        }
    finally:
        remove(Enforcer(cgroup_root, bpf_dir), "gpu")


def test_a_deny_keeps_its_device_while_the_node_is_gone_and_follows_it_back(
    scratch_cgroup, bpf_dir, cgroup_root, tmp_path
):
    dev = node_dev(tmp_path)
    make_node(dev / "gpu0", ZERO)
    path = policy_file(
        tmp_path,
        "gpu",
        [scratch_cgroup.relative],
        {
            "devices": {
                "default": "allow",
                "rules": [{"action": "deny", "path": "/dev/gpu0", "access": "r"}],
            }
        },
    )
    enforcer = Enforcer(cgroup_root, bpf_dir, dev_root=dev)
    try:
        apply_ok(enforcer, path)
        expect(scratch_cgroup, [(("open", "/dev/zero", "r"), EPERM)])

        (dev / "gpu0").unlink()  # udev re-creating it, a driver reload, a lost mount...
        (outcome,) = apply_ok(enforcer, path)
        (device,) = outcome.plan.devices
        assert (device.node.state, device.node.numbers()) == ("kept", "c 1:5")
        assert outcome.plan.device_warnings() == [
            f"device path /dev/gpu0 (deny rule, line {line_of(path, 'gpu0')}) does not exist "
            "now: the rule keeps denying c 1:5, the device it named when last applied"
        ]
        expect(scratch_cgroup, [(("open", "/dev/zero", "r"), EPERM)])
        (again,) = apply_ok(enforcer, path)  # and it stays so, without reloading
        assert not again.plan.changed

        make_node(dev / "gpu0", FULL)  # back, as another device: the rule follows the path
        (outcome,) = apply_ok(enforcer, path)
        assert outcome.plan.reload and outcome.plan.device_warnings() == []
        expect(
            scratch_cgroup,
            [(("open", "/dev/full", "r"), EPERM), (("open", "/dev/zero", "r"), ALLOWED)],
        )
    finally:
        remove(enforcer, "gpu")


def test_the_service_reports_a_missing_node_and_enforces_it_when_it_appears(
    scratch_cgroup, bpf_dir, cgroup_root, tmp_path
):
    dev = node_dev(tmp_path)
    policies = tmp_path / "policies"
    policies.mkdir()
    path = policy_file(
        policies,
        "gpu",
        [scratch_cgroup.relative],
        {
            "devices": {
                "default": "allow",
                "rules": [{"action": "deny", "path": "/dev/gpu0", "access": "r"}],
            }
        },
    )
    assert [p.name for p in load(path)] == ["gpu"]
    log = tmp_path / "service.log"
    series = (
        'cgpolicy_device_path_unresolved{action="deny",path="/dev/gpu0",policy="gpu",'
        'state="missing"} 1.0'
    )

    def metrics() -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
                return answer.read().decode()
        except OSError:
            return ""

    # a long resync, so that only the device folder's watch can explain a prompt reaction
    service, port = start_service(bpf_dir, dev, policies, log, "300")
    try:
        assert wait_until(lambda: series in metrics()), log.read_text()
        warning = f"device path /dev/gpu0 (deny rule, line {line_of(path, 'gpu0')}) does not exist"
        assert warning in log.read_text()
        expect(scratch_cgroup, [(("open", "/dev/zero", "r"), ALLOWED)])  # nothing to deny yet

        make_node(dev / "gpu0", ZERO)  # the driver loads; udev makes the node
        assert wait_until(lambda: not scratch_cgroup.probe("open", "/dev/zero", "r").ok), (
            log.read_text()
        )
        assert wait_until(lambda: "cgpolicy_device_path_unresolved{" not in metrics())
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=30)
        remove(Enforcer(cgroup_root, bpf_dir), "gpu")


def test_the_service_follows_a_device_path_changed_in_place_to_another_folder(
    scratch_cgroup, bpf_dir, cgroup_root, tmp_path
):
    """A changed file whose new rules are the same map contents (a deny `path:` renamed to
    another name of the same node) may be put in force without a full pass; the service
    must still watch the folder of the new path, so that the node replaced there later is
    followed at once, not at the next resync."""
    dev = node_dev(tmp_path)
    make_node(dev / "a0", ZERO)
    (dev / "sub").mkdir()
    make_node(dev / "sub" / "b0", ZERO)  # the same device by another name, in another folder
    policies = tmp_path / "policies"
    policies.mkdir()
    path = policies / "dev.yaml"

    def write(device: str) -> None:
        spec = {
            "targets": [{"path": scratch_cgroup.relative}],
            "sockets": {  # net.c programs: a load that can change in place
                "connect": {"default": "allow", "rules": [{"action": "deny", "ports": [9]}]}
            },
            "devices": {
                "default": "allow",
                "rules": [{"action": "deny", "path": device, "access": "r"}],
            },
        }
        document = {
            "apiVersion": "cgpolicy.dev/v1",
            "kind": "CgroupPolicy",
            "metadata": {"name": "dev"},
            "spec": spec,
        }
        path.write_text(json.dumps(document, indent=2) + "\n")

    write("/dev/a0")
    log = tmp_path / "service.log"
    # so that only a watch can explain a prompt reaction
    service, _ = start_service(bpf_dir, dev, policies, log, "3600")
    try:
        assert wait_until(lambda: not scratch_cgroup.probe("open", "/dev/zero", "r").ok, 30), (
            log.read_text()
        )
        write("/dev/sub/b0")
        assert wait_until(
            lambda: "dev: revision" in log.read_text() or "in place" in log.read_text()
        )
        expect(scratch_cgroup, [(("open", "/dev/full", "r"), ALLOWED)])

        (dev / "sub" / "b0").unlink()  # the node is replaced: the path names /dev/full now
        make_node(dev / "sub" / "b0", FULL)
        assert wait_until(lambda: not scratch_cgroup.probe("open", "/dev/full", "r").ok), (
            log.read_text()
        )
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=30)
        remove(Enforcer(cgroup_root, bpf_dir), "dev")
