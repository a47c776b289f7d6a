"""`cgpolicy test --kernel`: the shipped test files through the real programs, and what the
command makes (a throwaway cgroup, transient policies, a guard, device nodes) removed after
a pass, a failure and an interrupt. The command runs as an operator runs it, with its
cgroups under the test's scratch cgroup (--cgroup-root) and its pins in the test's folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from functools import partial
from pathlib import Path

from enforcement import CGPOLICY, pins, run_cli
from service import wait_until

POLICIES = Path(__file__).resolve().parents[2] / "policies"
# socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP) fails with EACCES before the hook runs while
# net.ipv4.ping_group_range excludes root's group (the default): reference only then.
MAY_NOT_RUN = {"ping sockets"}

POLICY = """\
apiVersion: cgpolicy.dev/v1
kind: CgroupPolicy
metadata: {name: many}
spec:
  targets: [{path: x}]
  network:
    egress:
      default: deny
      rules: [{action: allow, cidrs: ["10.0.0.0/8"], protocol: tcp, ports: [443]}]
  devices:
    default: deny
    rules: [{action: allow, type: char, major: 1, minor: 3, access: rw}]
  sysctl:
    default: allow
    rules: [{action: deny, name: "net.*", access: write}]
"""


def _test_file(folder: Path, cases: list[dict[str, str]]) -> Path:
    (folder / "many.yaml").write_text(POLICY)
    path = folder / "many.test.yaml"
    body = {"apiVersion": "cgpolicy.dev/v1", "kind": "CgroupPolicyTest"}
    path.write_text(json.dumps({**body, "policies": ["many.yaml"], "cases": cases}))
    return path


def _left_behind(scratch: Path, bpf_dir: Path) -> list[str]:
    cgroups = [str(p.relative_to(scratch)) for p in scratch.rglob("*") if p.is_dir()]
    return cgroups + sorted(pins(bpf_dir))


def test_the_shipped_test_files_pass_in_the_kernel_without_disagreement(
    scratch_cgroup, bpf_dir: Path, tmp_path: Path
) -> None:
    junit = tmp_path / "junit.xml"
    done = run_cli(
        "--bpf-dir", bpf_dir, "--cgroup-root", scratch_cgroup.path,
        "test", "--kernel", "--json", "--junit", junit, POLICIES,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout, done.stderr)
    report = json.loads(done.stdout)
    assert report["kernel"] and report["ok"]
    assert report["summary"]["disagreements"] == 0 and report["summary"]["failed"] == 0
    cases = [case for file in report["files"] for case in file["cases"]]
    assert len(cases) == report["summary"]["cases"] >= 50
    not_run = {case["name"] for case in cases if not case["kernel"]["ran"]}
    assert not_run <= MAY_NOT_RUN, not_run
    by_name = {case["name"]: case["kernel"] for case in cases}
    # guarded: the policy decided (its counters), then the guard refused: no driver open,
    # no sysctl write, no SYN to a remote address
    assert by_name["/dev/tty"]["detail"] == "open: EPERM (guarded)"
    assert by_name["/dev/tty"]["decisions"][0] == {
        "policy": "container-baseline",
        "verdict": "allow",
        "rules": ["devices.rules[7]"],
    }
    assert by_name["connect to an upstream"]["detail"] == "connect: EPERM (guarded)"
    # unguarded on loopback: the errno is the effect, and it matches the reference
    assert by_name["connect to a local database"]["detail"] in (
        "connect: ok",
        "connect: ECONNREFUSED",
    )
    assert by_name["no raw IPv4 sockets"]["detail"] == "socket: EPERM"
    assert junit.read_text().count("<testcase ") == len(cases)
    assert _left_behind(scratch_cgroup.path, bpf_dir) == []


def test_a_failing_case_exits_1_and_leaves_nothing(
    scratch_cgroup, bpf_dir: Path, tmp_path: Path
) -> None:
    path = _test_file(
        tmp_path,
        [
            {"name": "https", "action": "egress tcp 10.1.2.3:443", "expect": "allow"},
            {"name": "wrong", "action": "sysctl write net.ipv4.ip_forward", "expect": "allow"},
        ],
    )
    before = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    done = run_cli(
        "--bpf-dir", bpf_dir, "--cgroup-root", scratch_cgroup.path, "test", "--kernel", path
    )
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "FAIL  wrong: sysctl write net/ipv4/ip_forward (line 1) [kernel agrees]" in done.stdout
    assert "1 failed, 0 disagreements" in done.stdout
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == before
    assert _left_behind(scratch_cgroup.path, bpf_dir) == []


def _probing_or_ended(process: subprocess.Popen[bytes], guarded: Path) -> bool:
    """`test --kernel`'s guarded probe runs (the kernel run is under way), or it ended."""
    if process.poll() is not None:
        return True
    try:
        return bool((guarded / "cgroup.procs").read_text().split())
    except OSError:
        return False


def test_an_interrupted_kernel_run_removes_what_it_made(
    scratch_cgroup, bpf_dir: Path, tmp_path: Path
) -> None:
    actions = ["egress tcp 10.1.2.3:443", "device c 1:3 r", "sysctl read kernel.hostname"]
    cases = [
        {"name": f"case {n}", "action": actions[n % 3], "expect": "allow"} for n in range(30000)
    ]
    path = _test_file(tmp_path, cases)
    for signum in (signal.SIGINT, signal.SIGTERM):
        command = [
            str(CGPOLICY), "--bpf-dir", str(bpf_dir), "--cgroup-root", str(scratch_cgroup.path),
            "test", "--kernel", str(path),
        ]  # fmt: skip
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            guarded = scratch_cgroup.path / "cgpolicy.run" / f"test-{process.pid}" / "guarded"
            under_way = partial(_probing_or_ended, process, guarded)
            assert wait_until(under_way, timeout=120), "the kernel run did not start"
            assert process.poll() is None, process.communicate()  # 30,000 cases: still running
            os.kill(process.pid, signum)
            _, stderr = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert process.returncode == 130, stderr
        assert b"interrupted; what the kernel run made was removed" in stderr
        assert _left_behind(scratch_cgroup.path, bpf_dir) == []


def test_packets_run_on_the_interface_the_case_names(
    scratch_cgroup, bpf_dir: Path, tmp_path: Path, veth_net
) -> None:
    interface = veth_net.veth_root
    (tmp_path / "iface.yaml").write_text(
        "apiVersion: cgpolicy.dev/v1\nkind: CgroupPolicy\nmetadata: {name: iface}\n"
        "spec:\n  targets: [{path: x}]\n  network:\n    egress:\n      default: deny\n"
        "      rules:\n"
        '        - {action: allow, interfaces: ["lo"]}\n'
        f'        - {{action: allow, protocol: tcp, ports: [443], interfaces: ["{interface}"]}}\n'
        f'        - {{action: deny, cidrs: ["10.9.0.0/16"], interfaces: ["{interface[:3]}*"]}}\n'
    )
    cases = [
        ("lo", "egress udp 10.0.0.1:53 --interface lo", "allow", "rules[0]"),
        ("https", f"egress tcp 10.0.0.1:443 --interface {interface}", "allow", "rules[1]"),
        ("denied", f"egress tcp 10.9.0.1:443 --interface {interface}", "deny", "rules[2]"),
        ("other", f"egress udp 10.0.0.1:53 --interface {interface}", "deny", "default"),
        ("no device", "egress tcp 10.9.0.1:443", "deny", "rules[2]"),
    ]
    path = tmp_path / "iface.test.yaml"
    path.write_text(
        json.dumps(
            {
                "apiVersion": "cgpolicy.dev/v1",
                "kind": "CgroupPolicyTest",
                "policies": ["iface.yaml"],
                "cases": [{"name": n, "action": a, "expect": e, "rule": r} for n, a, e, r in cases],
            }
        )
    )
    done = run_cli(
        "--bpf-dir", bpf_dir, "--cgroup-root", scratch_cgroup.path, "test", "--kernel", "--json",
        path,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout, done.stderr)
    kernel = {c["name"]: c["kernel"] for c in json.loads(done.stdout)["files"][0]["cases"]}
    assert {name for name, run in kernel.items() if not run["ran"]} == {"no device"}
    assert "give --interface NAME" in kernel["no device"]["reason"]
    assert kernel["https"]["decisions"][0]["rules"] == ["network.egress.rules[1]"]
    assert kernel["denied"]["decisions"][0]["rules"] == ["network.egress.rules[2]"]
    assert _left_behind(scratch_cgroup.path, bpf_dir) == []


def test_a_sysctl_name_cannot_climb_out_of_proc_sys(
    scratch_cgroup, bpf_dir: Path, tmp_path: Path
) -> None:
    # a test file's writer must not make root's kernel run open or write a file elsewhere
    # (the sysctl hook guards only /proc/sys; a device opened as a "sysctl read" is not
    # guarded at all): `..` names no sysctl and is refused as bad input
    victim = tmp_path / "victim"
    victim.write_text("kept\n")
    os.utime(victim, (0, 1_000_000_000))  # atime before mtime: relatime records a read
    climb = "../.." + str(victim)
    for access in ("read", "write"):
        path = _test_file(
            tmp_path, [{"name": "climb", "action": f"sysctl {access} {climb}", "expect": "allow"}]
        )
        done = run_cli(
            "--bpf-dir", bpf_dir, "--cgroup-root", scratch_cgroup.path, "test", "--kernel", path
        )
        assert done.returncode == 2, (done.stdout, done.stderr)
        assert "'..'" in done.stdout + done.stderr, (done.stdout, done.stderr)
        status = victim.stat()
        assert (status.st_atime, status.st_mtime) == (0, 1_000_000_000)
        assert _left_behind(scratch_cgroup.path, bpf_dir) == []


def test_the_junit_file_replaces_a_planted_link_and_never_writes_through_it(
    tmp_path: Path,
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    victim = tmp_path / "victim"
    victim.write_text("root's own file\n")
    junit = shared / "junit.xml"
    junit.symlink_to(victim)
    done = run_cli("test", "--junit", junit, POLICIES / "web-egress.test.yaml")
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert victim.read_text() == "root's own file\n"
    assert not junit.is_symlink() and "<testcase " in junit.read_text()


def test_a_test_file_cannot_make_root_print_a_file_its_writer_cannot_read(
    tmp_path: Path,
) -> None:
    # whoever writes a test file (not root) names its policies: root running `cgpolicy
    # test` must not quote, in the problems it prints, a file that writer cannot read
    nobody = 65534
    tmp_path.chmod(0o755)
    secret = tmp_path / "secret.yaml"
    secret.write_text("root-only-token-5f3a: 1\n")
    secret.chmod(0o600)
    mine = tmp_path / "mine.yaml"
    mine.write_text(POLICY)
    mine.chmod(0o600)
    os.chown(mine, nobody, nobody)
    case = {"name": "hostname", "action": "sysctl read kernel.hostname", "expect": "allow"}
    body = {"apiVersion": "cgpolicy.dev/v1", "kind": "CgroupPolicyTest", "cases": [case]}
    for policies, status in ((["secret.yaml"], 2), (["/etc/shadow"], 2), (["mine.yaml"], 0)):
        path = tmp_path / "theirs.test.yaml"
        path.write_text(json.dumps({**body, "policies": policies}))
        os.chown(path, nobody, nobody)
        done = run_cli("test", path)
        assert done.returncode == status, (policies, done.stdout, done.stderr)
        output = done.stdout + done.stderr
        assert "root-only-token" not in output and "root:" not in output, output
        if status == 2:
            assert "could not read it themselves" in output or "not a regular file" in output, (
                output
            )


def test_a_test_file_cannot_make_root_open_a_device_or_fifo_as_a_policy(tmp_path: Path) -> None:
    # a test file others than root write may name /dev/watchdog (opening it arms a reboot)
    # or a tty (a read that never ends) as a policy: nothing but a regular file is opened
    import ctypes

    nobody = 65534
    tmp_path.chmod(0o755)
    fifo = tmp_path / "policy.yaml"
    os.mkfifo(fifo, 0o644)
    os.chown(fifo, nobody, nobody)
    libc = ctypes.CDLL(None, use_errno=True)
    watch = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert watch >= 0
    try:
        assert libc.inotify_add_watch(watch, bytes(fifo), 0x20) >= 0  # IN_OPEN
        case = {"name": "hostname", "action": "sysctl read kernel.hostname", "expect": "allow"}
        path = tmp_path / "theirs.test.yaml"
        body = {"apiVersion": "cgpolicy.dev/v1", "kind": "CgroupPolicyTest", "cases": [case]}
        path.write_text(json.dumps({**body, "policies": ["policy.yaml"]}))
        os.chown(path, nobody, nobody)
        done = run_cli("test", path)
        assert done.returncode == 2, (done.stdout, done.stderr)
        assert "not a regular file" in done.stdout + done.stderr
        try:
            events = os.read(watch, 4096)
        except BlockingIOError:
            events = b""
        assert events == b"", "the FIFO was opened"
    finally:
        os.close(watch)
