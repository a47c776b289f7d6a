"""Device paths (`path:` device rules): validated for syntax on any machine, resolved by the
node that applies the policy, and reported wherever they name no device node there."""

from __future__ import annotations

import json
import os
import stat
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from policy_builders import policy_model, section_text

from cgpolicy.audit.model import Attachment, CgroupReport
from cgpolicy.audit.render import render_cgroup
from cgpolicy.compiler.compile import bind_device_paths, compile_policy
from cgpolicy.compiler.spec import CompileError, DeviceNode, DevicePath
from cgpolicy.enforcer.plan import plan_policy
from cgpolicy.enforcer.targets import Resolution
from cgpolicy.kernel.devices import (
    DeviceBinding,
    bind_devices,
    remembered_denies,
    resolve_device_path,
    watch_folders,
)
from cgpolicy.kernel.pins import PolicyMeta
from cgpolicy.policy.describe import describe
from cgpolicy.policy.model import DeviceRule, DeviceSection, Policy
from cgpolicy.policy.validate import load_paths, load_policy_file
from cgpolicy.reconciler.metrics import Metrics
from cgpolicy.reference import DeviceAccess, evaluate

WriteFile = Callable[..., Path]
MakePolicy = Callable[..., str]
ROOT = Path(__file__).resolve().parents[2]

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 and not os.environ.get("CI"),  # under CI it must run, so it fails
    reason="device nodes and root-owned folders need root",
)


def policy(*rules: DeviceRule, default: str = "allow") -> Policy:
    section = DeviceSection(default, rules)  # type: ignore[arg-type]
    return policy_model(name="gpu", target="a", devices=section)


def path_rule(action: str, path: str, access: str = "rw") -> DeviceRule:
    return DeviceRule(action, None, None, None, access, path)  # type: ignore[arg-type]


# --- validation: syntax only, the same answer on every machine ---------------------------------


def test_a_device_absent_here_is_valid(write: WriteFile, make_policy: MakePolicy) -> None:
    assert not os.path.exists("/dev/cgpolicy-no-such-device")
    spec = section_text(
        "devices",
        "{action: allow, path: /dev/nvidia0, access: rw}",
        "{action: deny, path: /dev/cgpolicy-no-such-device}",
        "{action: allow, path: /dev/dri/by-path/pci-0000:00:02.0-card}",
    )
    policy = load_policy_file(write(make_policy(spec=spec)))
    assert policy.devices is not None
    rules = policy.devices.rules
    assert [(r.type, r.major, r.minor, r.path) for r in rules] == [
        (None, None, None, "/dev/nvidia0"),
        (None, None, None, "/dev/cgpolicy-no-such-device"),
        (None, None, None, "/dev/dri/by-path/pci-0000:00:02.0-card"),
    ]


def test_validation_does_not_look_at_devices(write: WriteFile, make_policy: MakePolicy) -> None:
    """Not even for a node that exists: /dev/null stays unresolved, and the module that looks
    into /dev is not loaded by validation."""
    path = write(make_policy(spec=section_text("devices", "{action: allow, path: /dev/null}")))
    code = (
        "import sys\n"
        "from cgpolicy.policy.validate import load_paths\n"
        f"result = load_paths([{str(path)!r}])\n"
        "assert result.ok, result.problems\n"
        "assert result.policies[0].devices.rules[0].type is None\n"
        "assert 'cgpolicy.kernel.devices' not in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("nvidia0", "device path 'nvidia0' is not absolute (hint: write '/dev/nvidia0'?)"),
        ("/tmp/gpu", "device path '/tmp/gpu' is not under /dev"),
        ("/devices/gpu", "device path '/devices/gpu' is not under /dev"),
        ("/dev", "device path '/dev' names the /dev folder, not a device node"),
        ("/dev/", "device path '/dev/' names the /dev folder, not a device node"),
        ("/dev/../etc/shadow", "device path '/dev/../etc/shadow' has a '..' component"),
        ("/dev/./null", "device path '/dev/./null' has a '.' component"),
        ("/dev/dri/../../etc", "device path '/dev/dri/../../etc' has a '..' component"),
        ("/dev//null", "device path '/dev//null' has an empty component (hint: write '/dev/null')"),
        ("/dev/dri/", "device path '/dev/dri/' has an empty component (hint: write '/dev/dri')"),
        ("/dev/nul\\tl", "device path '/dev/nul\\tl' contains a control character"),
        ("/dev/" + "a" * 256, "has a component longer than 255 bytes"),
        ("/dev/" + "a/" * 2045 + "b", "device path is 4096 bytes long; at most 4095"),
    ],
)
def test_bad_device_paths_are_refused_with_file_line_column(
    write: WriteFile, make_policy: MakePolicy, path: str, message: str
) -> None:
    file = write(make_policy(spec=section_text("devices", f'{{action: deny, path: "{path}"}}')))
    result = load_paths([file])
    assert result.policies == []
    assert len(result.problems) == 1
    problem = result.problems[0]
    # line 11 holds the rule; the value starts after `    - {action: deny, path: `.
    assert problem.format().startswith(f"{file}:11:30: spec.devices.rules[0].path: ")
    assert message in problem.format()


def test_path_and_numbers_together_are_still_refused(
    write: WriteFile, make_policy: MakePolicy
) -> None:
    spec = section_text("devices", "{action: deny, path: /dev/nvidia0, major: 195}")
    file = write(make_policy(spec=spec))
    (problem,) = load_paths([file]).problems
    assert problem.message == "a device rule takes either path or major, not both"


# --- resolution on the node ---------------------------------------------------------------------


def test_resolution_on_the_real_dev() -> None:
    null = os.stat("/dev/null").st_rdev
    assert resolve_device_path("/dev/null") == DeviceNode(
        "char", os.major(null), os.minor(null), "resolved"
    )
    missing = resolve_device_path("/dev/cgpolicy-no-such-device")
    assert (missing.type, missing.state, missing.detail) == (None, "missing", "does not exist")


@pytest.fixture
def dev(tmp_path: Path) -> Path:
    """A device folder of our own (what --dev-root points at), owned by root like /dev."""
    folder = tmp_path / "dev"
    folder.mkdir()
    return folder


def mknod(path: Path, kind: str, major: int, minor: int) -> None:
    mode = (stat.S_IFCHR if kind == "char" else stat.S_IFBLK) | 0o600
    os.mknod(path, mode, os.makedev(major, minor))


@needs_root
def test_resolution_inside_a_dev_root(dev: Path) -> None:
    mknod(dev / "gpu0", "char", 195, 0)
    mknod(dev / "sdz", "block", 8, 240)
    (dev / "dri").mkdir()
    mknod(dev / "dri" / "card0", "char", 226, 0)
    (dev / "dri" / "by-path").mkdir()
    os.symlink("../card0", dev / "dri" / "by-path" / "pci-card")  # relative, as udev makes them
    os.symlink("/dev/gpu0", dev / "gpu-link")  # absolute: followed inside the dev root
    (dev / "regular").write_text("x")

    def found(path: str) -> tuple[object, ...]:
        node = resolve_device_path(path, dev)
        return (node.state, node.numbers(), node.detail)

    assert found("/dev/gpu0") == ("resolved", "c 195:0", "")
    assert found("/dev/sdz") == ("resolved", "b 8:240", "")
    assert found("/dev/dri/card0") == ("resolved", "c 226:0", "")
    assert found("/dev/dri/by-path/pci-card") == ("resolved", "c 226:0", "")
    assert found("/dev/gpu-link") == ("resolved", "c 195:0", "")
    assert found("/dev/gpu1") == ("missing", None, "does not exist")
    assert found("/dev/nvidia/0") == ("missing", None, "does not exist (no /dev/nvidia)")
    assert found("/dev/regular") == ("not-a-device", None, "is a regular file, not a device node")
    assert found("/dev/dri") == ("not-a-device", None, "is a folder, not a device node")
    assert found("/dev/regular/x") == (
        "not-a-device",
        None,
        "goes through /dev/regular, which is not a folder",
    )


@needs_root
def test_resolution_refuses_what_others_than_root_could_redirect(dev: Path) -> None:
    mknod(dev / "sda", "block", 8, 0)
    shm = dev / "shm"
    shm.mkdir()
    shm.chmod(0o1777)
    os.symlink("../sda", shm / "planted")  # as any local user could, in a world-writable folder
    os.symlink("/proc/self/fd/0", dev / "stdin")
    os.symlink("../../etc", dev / "up")
    os.symlink("loop-b", dev / "loop-a")
    os.symlink("loop-a", dev / "loop-b")
    os.symlink("sda", dev / "users-link")
    os.lchown(dev / "users-link", 1000, 1000)

    def found(path: str) -> tuple[object, ...]:
        node = resolve_device_path(path, dev)
        return (node.state, node.detail)

    assert found("/dev/shm/planted") == (
        "unsafe",
        "goes through /dev/shm, which others than root can write",
    )
    assert found("/dev/stdin") == (
        "unsafe",
        "goes through the symlink /dev/stdin, which points out of /dev (to /proc/self/fd/0)",
    )
    assert found("/dev/up/passwd") == ("unsafe", "leads out of /dev through '..'")
    assert found("/dev/loop-a") == ("not-a-device", "goes through too many symlinks")
    assert found("/dev/users-link") == (
        "unsafe",
        "goes through the symlink /dev/users-link, which root does not own",
    )


def test_a_missing_dev_root_says_so(tmp_path: Path) -> None:
    node = resolve_device_path("/dev/null", tmp_path / "host-dev")
    assert node.state == "missing"
    assert (
        node.detail == f"cannot be looked up: the device folder {tmp_path / 'host-dev'} is missing"
    )


def test_a_deny_keeps_the_device_it_named_an_allow_does_not(tmp_path: Path) -> None:
    rules = (path_rule("deny", "/dev/gpu0"), path_rule("allow", "/dev/gpu0"))
    remembered = remembered_denies(
        [
            {"path": "/dev/gpu0", "action": "deny", "state": "resolved", "device": "c 195:0"},
            {"path": "/dev/gpu0", "action": "allow", "state": "resolved", "device": "c 195:0"},
            {"path": "/dev/other", "action": "deny", "device": "x 1:2"},  # malformed: ignored
            {"path": 7, "action": "deny", "device": "c 1:2"},
        ]
    )
    assert remembered == {"/dev/gpu0": DeviceNode("char", 195, 0)}
    binding = bind_devices(policy(*rules), tmp_path, remembered)  # nothing exists there
    deny, allow = binding(rules[0]), binding(rules[1])
    assert (deny.state, deny.numbers()) == ("kept", "c 195:0")
    assert (allow.state, allow.numbers()) == ("missing", None)


def test_watch_folders_are_the_deepest_existing_ones(tmp_path: Path) -> None:
    (tmp_path / "dri").mkdir()
    paths = ["/dev/nvidia0", "/dev/dri/card0", "/dev/dri/by-path/x", "/dev/net/tun"]
    assert watch_folders(paths, tmp_path) == {tmp_path, tmp_path / "dri"}


# --- compiling, planning and reporting --------------------------------------------------------


def node(kind: str | None, major: int = 0, minor: int = 0, state: str = "resolved") -> DeviceNode:
    detail = "" if state == "resolved" else "does not exist"
    return DeviceNode(kind, major, minor, state, detail)  # type: ignore[arg-type]


def binding(*entries: tuple[str, str, DeviceNode]) -> DeviceBinding:
    return DeviceBinding(tuple(entries))


def device_config(compiled_policy: object) -> bytes:
    (program,) = compiled_policy.programs  # type: ignore[attr-defined]
    config = next(m for m in program.maps if m.name == "config")
    return config.entries[0][1]


def test_compiling_needs_a_resolver_for_path_rules() -> None:
    with pytest.raises(CompileError, match="need a device resolver"):
        compile_policy(policy(path_rule("deny", "/dev/gpu0")))


def test_an_unresolved_rule_matches_nothing_in_the_program_and_the_reference() -> None:
    rule = path_rule("deny", "/dev/gpu0")
    p = policy(rule)
    compiled = compile_policy(
        p, resolve_device=binding(("deny", "/dev/gpu0", node(None, state="missing")))
    )
    value = device_config(compiled)
    _, deny_mask, _, _, nrules, _ = struct.unpack_from("<QQIIII", value)
    bit, kind, major, minor, access = struct.unpack_from("<QIIII", value, 32)
    assert (deny_mask, nrules, bit) == (1, 1, 1)  # the rule keeps its bit and counter slot
    assert (kind, access) == (3, 0)  # a type no device has, and no rights: never matches
    bound, paths = bind_device_paths(p, binding(("deny", "/dev/gpu0", node(None, state="missing"))))
    verdict = evaluate(bound, DeviceAccess("char", 195, 0, "rw"))
    assert (verdict.allowed, verdict.decided_by) == (True, "default")
    assert [d.to_json()["state"] for d in paths] == ["missing"]
    labels = dict(compiled.rules)["device"]
    assert labels[0].text == "deny /dev/gpu0 rw"
    assert labels[0].note == "path does not exist: matches nothing on this node"


def test_a_resolved_rule_is_enforced_by_its_numbers() -> None:
    rule = path_rule("deny", "/dev/gpu0", "r")
    resolved = binding(("deny", "/dev/gpu0", node("char", 195, 0)))
    compiled = compile_policy(policy(rule), resolve_device=resolved)
    bit, kind, major, minor, access = struct.unpack_from("<QIIII", device_config(compiled), 32)
    assert (kind, major, minor, access) == (2, 195, 0, 2)  # char, 195:0, read
    label = dict(compiled.rules)["device"][0]
    assert (label.text, label.note) == ("deny c 195:0 r (/dev/gpu0)", None)
    bound, _ = bind_device_paths(policy(rule), resolved)
    assert not evaluate(bound, DeviceAccess("char", 195, 0, "r")).allowed


def test_the_revision_follows_what_the_path_names() -> None:
    p = policy(path_rule("deny", "/dev/gpu0"))
    revisions = {
        compile_policy(p, resolve_device=binding(("deny", "/dev/gpu0", n))).revision
        for n in (
            node(None, state="missing"),
            node("char", 195, 0),
            node("char", 195, 1),
            node("char", 195, 0, state="kept"),
        )
    }
    assert len(revisions) == 4
    again = compile_policy(p, resolve_device=binding(("deny", "/dev/gpu0", node("char", 195, 0))))
    assert again.revision in revisions


def test_plan_reports_unresolved_paths_and_never_blocks() -> None:
    rules = (
        path_rule("deny", "/dev/gpu0"),
        path_rule("allow", "/dev/gpu1"),
        path_rule("allow", "/dev/null"),
    )
    found = binding(
        ("deny", "/dev/gpu0", node(None, state="missing")),
        (
            "allow",
            "/dev/gpu1",
            DeviceNode(None, 0, 0, "not-a-device", "is a folder, not a device node"),
        ),
        ("allow", "/dev/null", node("char", 1, 3)),
    )
    compiled = compile_policy(policy(*rules), resolve_device=found)
    plan = plan_policy(compiled, Resolution((), ()), None)
    assert not plan.blocked
    assert plan.device_warnings() == [
        "device path /dev/gpu0 (deny rule) does not exist: on this node the rule denies nothing "
        "until the path names a device",
        "device path /dev/gpu1 (allow rule) is a folder, not a device node: on this node the rule "
        "allows nothing until the path names a device",
    ]
    assert plan.warnings == plan.device_warnings()
    assert "waiting for" not in plan.summary()  # device paths get lines of their own
    listed = json.loads(json.dumps(plan.to_json()))["devices"]
    states = [(d["path"], d["state"], d["device"]) for d in listed]
    assert states == [
        ("/dev/gpu0", "missing", None),
        ("/dev/gpu1", "not-a-device", None),
        ("/dev/null", "resolved", "c 1:3"),
    ]


def test_a_kept_deny_is_reported_as_such() -> None:
    kept = DevicePath("/dev/gpu0", "deny", 17, DeviceNode("char", 195, 0, "kept", "does not exist"))
    assert kept.warning() == (
        "device path /dev/gpu0 (deny rule, line 17) does not exist now: the rule keeps denying "
        "c 195:0, the device it named when last applied"
    )
    assert kept.note() == "path does not exist now: still denies c 195:0, as before"


def test_metadata_keeps_the_device_paths() -> None:
    entries = [{"path": "/dev/gpu0", "action": "deny", "state": "resolved", "device": "c 195:0"}]
    meta = PolicyMeta("gpu", "r1", "enforce", devices=entries)  # type: ignore[arg-type]
    assert PolicyMeta.decode(meta.encode()).devices == entries
    plain = PolicyMeta("gpu", "r1", "enforce")
    assert "devices" not in json.loads(plain.encode())  # unchanged for policies without them
    assert PolicyMeta.decode(plain.encode()).devices == []


def test_audit_shows_the_note_next_to_the_rule() -> None:
    counters = {
        "mode": "enforce",
        "rules": [
            {
                "rule": 0,
                "text": "deny /dev/gpu0 rw",
                "line": 11,
                "allowed": 0,
                "denied": 0,
                "note": "path does not exist: matches nothing on this node",
            },
        ],
        "default": {"allowed": 3, "denied": 0},
        "events_dropped": 0,
    }
    report = CgroupReport(
        "a",
        1,
        [
            Attachment(
                "device", 7, "cgp_device", "t", "link", "cgpolicy", "gpu", "r", None, counters
            )
        ],
    )
    text = "\n".join(render_cgroup(report))
    assert (
        "gpu device rule 0 deny /dev/gpu0 rw (line 11): 0 allowed, 0 denied "
        "[path does not exist: matches nothing on this node]"
    ) in text


def test_metrics_name_each_unresolved_path_and_drop_it_once_resolved() -> None:
    metrics = Metrics()
    missing = DevicePath("/dev/gpu0", "deny", 3, node(None, state="missing"))
    resolved = DevicePath("/dev/null", "allow", 4, node("char", 1, 3))
    metrics.record_device_paths([("gpu", missing), ("gpu", resolved)])
    value = metrics.registry.get_sample_value
    labels = {"policy": "gpu", "path": "/dev/gpu0", "action": "deny", "state": "missing"}
    assert value("cgpolicy_device_path_unresolved", labels) == 1
    null = {"policy": "gpu", "path": "/dev/null", "action": "allow", "state": "resolved"}
    assert value("cgpolicy_device_path_unresolved", null) is None
    metrics.record_device_paths([("gpu", resolved)])
    assert value("cgpolicy_device_path_unresolved", labels) is None


# --- describe and explain without the device ----------------------------------------------------


def test_describe_shows_paths_unresolved(write: WriteFile, make_policy: MakePolicy) -> None:
    spec = section_text("devices", "{action: deny, path: /dev/nvidia0, access: rw}")
    text = describe(load_policy_file(write(make_policy(spec=spec))))
    assert "    deny /dev/nvidia0 rw\n" in text
    assert "resolved on the node that applies the policy" in text


def cgpolicy(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "cgpolicy", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_explain_and_describe_work_without_the_device(
    tmp_path: Path, write: WriteFile, make_policy: MakePolicy
) -> None:
    spec = section_text(
        "devices",
        "{action: deny, path: /dev/nvidia0, access: rw}",
        "{action: allow, path: /dev/null, access: rw}",
        default="deny",
    )
    file = write(make_policy(spec=spec))
    dev = tmp_path / "host-dev"  # a node without any of these devices
    dev.mkdir()
    done = cgpolicy("--dev-root", str(dev), "explain", str(file), "device", "c", "195:0", "rw")
    assert done.returncode == 0, done.stderr
    assert "devices: no rule matches: default deny" in done.stdout
    assert "note: web: device path /dev/nvidia0 (deny rule, line 11) does not exist" in done.stdout
    done = cgpolicy(
        "--dev-root", str(dev), "explain", "--json", str(file), "device", "c", "1:3", "rw"
    )
    report = json.loads(done.stdout)
    assert report["verdict"] == "deny"  # /dev/null is not there to be allowed
    assert any("/dev/null (allow rule, line 12) does not exist" in n for n in report["notes"])
    # On this machine /dev/null exists: the same rule allows it.
    done = cgpolicy("explain", str(file), "device", "c", "1:3", "rw")
    assert "allow c 1:3 rw (/dev/null)" in done.stdout and "verdict: allow" in done.stdout
    done = cgpolicy("describe", str(file))
    assert done.returncode == 0 and "deny /dev/nvidia0 rw" in done.stdout


def test_explaining_an_absent_device_by_path_says_how_to_name_it() -> None:
    done = cgpolicy("explain", "--cgroup", "/", "device", "/dev/cgpolicy-no-such-device", "rw")
    assert done.returncode == 2
    assert "name the device by number instead" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_service_wakes_when_a_device_node_appears(tmp_path: Path) -> None:
    import select

    from cgpolicy.reconciler.watch import Watcher

    (tmp_path / "policies").mkdir()
    (tmp_path / "dev").mkdir()
    watcher = Watcher(tmp_path / "policies", follow_links=False)
    try:
        watcher.watch_devices(watch_folders(["/dev/nvidia0"], tmp_path / "dev"))
        (tmp_path / "dev" / "nvidia0").write_text("")  # a node as far as inotify cares
        ready, _, _ = select.select(watcher.fds(), [], [], 10)
        assert watcher.drain(ready)
        watcher.watch_devices(set())  # no device paths any more: the watch is dropped
        watcher.drain(select.select(watcher.fds(), [], [], 0.2)[0])  # its IN_IGNORED
        (tmp_path / "dev" / "nvidia1").write_text("")
        ready, _, _ = select.select(watcher.fds(), [], [], 0.2)
        assert not watcher.drain(ready)
    finally:
        watcher.close()
