"""`cgpolicy learn` on the real kernel, with real processes.

The property that proves it (issue 13): a workload that touches every hook, learned with
`cgpolicy learn -- CMD`, runs again under the learned policy (`cgpolicy run`) and succeeds
with zero denials; the same workload doing one thing more is denied (so the test can fail).
Zero denials is read from the kernel: the learned policy is applied to a scratch cgroup,
the workload runs there, and the per-rule counters of every program on the cgroup (exact
per-CPU counters, not the rate-limited events) must show no denial at all.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml
from enforcement import CGPOLICY, attachments, denied_count, enforced, program_names, run_cli
from service import wait_until

from cgpolicy.kernel.learn import AddrKey, NetKey, Observer
from cgpolicy.learn.write import PLACEHOLDER_TARGET
from cgpolicy.policy.validate import load_paths

WORKLOAD = Path(__file__).with_name("learn_workload.py")


def free_ports(count: int) -> int:
    """A base port below the ephemeral range with ``count`` ports free for TCP and UDP on
    127.0.0.1 and ::1 (a port the kernel could hand out as ephemeral would be ambiguous)."""
    for base in range(20000 + os.getpid() % 5000, 32000, 7):
        try:
            for port in range(base, base + count):
                for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
                    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                        with socket.socket(family, kind) as probe:
                            probe.bind((host, port))
        except OSError:
            continue
        return base
    raise AssertionError("no free ports")


def workload(port: int, folder: Path, *extra: str) -> list[str]:
    return [sys.executable, str(WORKLOAD), str(port), str(folder), *extra]


def learned_policy(tmp_path: Path, scratch, port: int) -> Path:
    out = tmp_path / "learned.yaml"
    done = run_cli(
        "--cgroup-root", scratch.path, "learn", "-o", out, "--", *workload(port, tmp_path)
    )
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "workload done" in done.stdout
    assert load_paths([out]).ok
    return out


def targeted(learned: Path, target: str) -> Path:
    text = learned.read_text()
    assert f'"{PLACEHOLDER_TARGET}"' in text
    moved = learned.with_name("targeted.yaml")
    moved.write_text(text.replace(f'"{PLACEHOLDER_TARGET}"', f'"{target}"'))
    return moved


def denials(cgroup: Path) -> int:
    ids = {i for ids in attachments(cgroup).values() for i in ids}
    assert ids and all(name.startswith("cgp_") for name in program_names(sorted(ids)))
    return sum(denied_count(i) for i in ids)


def test_a_learned_policy_lets_the_workload_run_again_with_zero_denials(
    tmp_path, scratch_cgroup, cgroup_root, bpf_dir
):
    port = free_ports(3)
    learned = learned_policy(tmp_path, scratch_cgroup.child("learn"), port)
    doc = yaml.safe_load(learned.read_text())
    spec = doc["spec"]
    # every hook the workload touched has a section, with default deny
    assert set(spec["network"]) == {"egress", "ingress"}
    assert set(spec["sockets"]) == {"create", "bind", "connect"}
    for section in (
        *spec["network"].values(),
        *spec["sockets"].values(),
        spec["devices"],
        spec["sysctl"],
    ):
        assert section["default"] == "deny"
    assert {"action": "allow", "path": "/dev/null", "access": "rwm"} in spec["devices"]["rules"]
    assert {"action": "allow", "name": "kernel.ostype", "access": "read"} in spec["sysctl"]["rules"]
    # no ephemeral port anywhere: only the workload's own ports
    ports = {
        p
        for section in (*spec["network"].values(), *spec["sockets"].values())
        for rule in section.get("rules", [])
        for p in rule.get("ports", [])
    }
    assert ports <= {port, port + 1}, ports

    # The property, as a user runs it.
    again = run_cli("--bpf-dir", bpf_dir, "run", learned, "--", *workload(port, tmp_path))
    assert again.returncode == 0, (again.stdout, again.stderr)
    assert "workload done" in again.stdout

    # Zero denials, read from the kernel's exact counters.
    rerun = scratch_cgroup.child("rerun")
    with enforced(cgroup_root, bpf_dir, targeted(learned, rerun.relative)):
        done = rerun.run(workload(port, tmp_path))
        assert done.returncode == 0, done.stderr
        assert denials(rerun.path) == 0

    # One thing more is denied: by `run`, and in the counters.
    more = run_cli("--bpf-dir", bpf_dir, "run", learned, "--", *workload(port, tmp_path, "--extra"))
    assert more.returncode != 0
    assert "PermissionError" in more.stderr
    extra = scratch_cgroup.child("extra")
    with enforced(cgroup_root, bpf_dir, targeted(learned, extra.relative)):
        done = extra.run(workload(port, tmp_path, "--extra"))
        assert done.returncode != 0
        assert denials(extra.path) > 0


def test_counting_is_exact_for_a_burst(scratch_cgroup, udp_server):
    """100,000 connects and 100,000 sendmsgs in a burst: every one counted."""
    count = 100_000
    port = udp_server.port
    burst = (
        "import socket\n"
        f"a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"for _ in range({count}):\n"
        f"    a.connect(('127.0.0.1', {port}))\n"
        f"    b.sendto(b'x', ('127.0.0.1', {port}))\n"
    )
    with Observer() as observer:
        observer.attach(scratch_cgroup.path)
        done = scratch_cgroup.run([sys.executable, "-c", burst])
        assert done.returncode == 0, done.stderr
        observer.detach()
        seen = observer.read()
    loopback = seen.addresses
    assert loopback[AddrKey("connect", _ip("127.0.0.1"), 17, port)].count == count
    assert loopback[AddrKey("sendmsg", _ip("127.0.0.1"), 17, port)].count == count
    assert seen.network[NetKey("egress", _ip("127.0.0.1"), 17, "port", port)].count == count
    assert seen.seen["connect4"] == count and seen.seen["sendmsg4"] == count
    assert seen.total_lost == 0
    assert "python" in " ".join(loopback[AddrKey("sendmsg", _ip("127.0.0.1"), 17, port)].comms)


def test_a_full_map_is_counted_as_lost_and_reported(scratch_cgroup, tmp_path):
    from cgpolicy.kernel.learn import Sizes
    from cgpolicy.learn.write import Source, lost_warning, write_policy

    names = ["kernel/ostype", "kernel/hostname", "net/core/somaxconn", "kernel/osrelease"]
    reads = "".join(f"open('/proc/sys/{n}').read()\n" for n in names)
    with Observer(Sizes(sysctls=2)) as observer:
        observer.attach(scratch_cgroup.path)
        done = scratch_cgroup.run([sys.executable, "-c", reads])
        assert done.returncode == 0, done.stderr
        observer.detach()
        seen = observer.read()
    assert len(seen.sysctls) == 2
    assert seen.lost["sysctl"] == seen.seen["sysctl"] - sum(s.count for s in seen.sysctls.values())
    assert seen.lost["sysctl"] >= 2
    assert "INCOMPLETE" in (lost_warning(seen) or "")
    assert "# INCOMPLETE" in write_policy(seen, "x", Source(command=["x"])).text


def test_learn_on_a_cgroup_ends_on_ctrl_c_writes_and_leaves_nothing_attached(
    tmp_path, scratch_cgroup, cgroup_root
):
    """--cgroup --for: a server already listening there is known as a server (its port is
    named on ingress, its responses go without ports); Ctrl-C ends early and still writes;
    nothing stays attached."""
    port = free_ports(1)
    server = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket\n"
            f"s = socket.create_server(('127.0.0.1', {port}))\n"
            "print('ready', flush=True)\n"
            "while True:\n"
            "    c, _ = s.accept()\n"
            "    c.sendall(c.recv(10)); c.close()\n",
        ],
        preexec_fn=lambda: (scratch_cgroup.path / "cgroup.procs").write_text("0"),
        stdout=subprocess.PIPE,
        text=True,
    )
    out = tmp_path / "cgroup.yaml"
    learner = None
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        assert attachments(scratch_cgroup.path) == {}
        learner = subprocess.Popen(
            [CGPOLICY, "learn", "--cgroup", scratch_cgroup.relative, "--for", "10m", "-o", out],
            stderr=subprocess.PIPE,
            text=True,
        )
        assert wait_until(lambda: len(attachments(scratch_cgroup.path)) == 11, timeout=30)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"hi")
            assert client.recv(10) == b"hi"
        scratch_cgroup.run([sys.executable, "-c", "open('/proc/sys/kernel/ostype').read()"])
        learner.send_signal(signal.SIGINT)
        _, stderr = learner.communicate(timeout=60)
        assert learner.returncode == 0, stderr
        assert "interrupted" in stderr
    finally:
        if learner is not None and learner.poll() is None:
            learner.kill()
        server.kill()
        server.wait()
    assert attachments(scratch_cgroup.path) == {}
    spec = yaml.safe_load(out.read_text())["spec"]
    assert spec["targets"] == [{"path": scratch_cgroup.relative}]
    assert {"action": "allow", "protocol": "tcp", "cidrs": ["127.0.0.1"], "ports": [port]} in spec[
        "network"
    ]["ingress"]["rules"]
    assert {"action": "allow", "protocol": "tcp", "cidrs": ["127.0.0.1"]} in spec["network"][
        "egress"
    ]["rules"]
    assert any(r.get("name") == "kernel.ostype" for r in spec["sysctl"]["rules"])


def test_a_hostile_executable_name_stays_in_its_comment(tmp_path, scratch_cgroup):
    hostile = 'x\n- {a: "b #'
    script = (
        f"open('/proc/self/comm', 'w').write({hostile!r})\nopen('/proc/sys/kernel/ostype').read()\n"
    )
    out = tmp_path / "hostile.yaml"
    done = run_cli(
        "--cgroup-root", scratch_cgroup.path, "learn", "-o", out, "--", sys.executable, "-c", script
    )
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert load_paths([out]).ok
    assert "by x\\x0a- \\x7ba: \\x22b \\x23" in text
    spec = yaml.safe_load(text)["spec"]
    assert spec["sysctl"]["rules"] == [
        {"action": "allow", "name": "kernel.ostype", "access": "read"}
    ]


def test_learn_returns_the_commands_status_and_rejects_bad_options(tmp_path, scratch_cgroup):
    done = run_cli(
        "--cgroup-root", scratch_cgroup.path, "learn", "--", sys.executable, "-c", "exit(3)"
    )
    assert done.returncode == 3
    assert "apiVersion: cgpolicy.dev/v1" in done.stdout
    missing = run_cli("--cgroup-root", scratch_cgroup.path, "learn", "--", str(tmp_path / "none"))
    assert missing.returncode == 127
    for args in (
        ["learn"],
        ["learn", "--cgroup", scratch_cgroup.relative],
        ["learn", "--cgroup", scratch_cgroup.relative, "--for", "soon"],
        ["learn", "--for", "1s", "--", "true"],
        ["learn", "--name", "Bad_Name", "--", "true"],
        ["learn", "--cgroup", "../../etc", "--for", "1s"],
        ["learn", "--cgroup", "/", "--for", "1s"],
        ["learn", "--cgroup", f"{scratch_cgroup.relative}/missing", "--for", "1s"],
    ):
        bad = run_cli(*args)
        assert bad.returncode == 2, (args, bad.stderr)
        assert "Traceback" not in bad.stderr
    assert not (scratch_cgroup.path / "cgpolicy.learn").exists()


def _ip(text: str):
    import ipaddress

    return ipaddress.ip_address(text)


NAMES_CLIENT = Path(__file__).with_name("dns_names_client.py")


def test_an_address_a_dns_answer_gave_is_written_as_the_name(
    tmp_path, scratch_cgroup, cgroup_root, bpf_dir, dns_server
):
    """The workload resolves api.test at the test's DNS server and connects to the answer:
    the learned connect rule names api.test (not 198.51.100.7), the server stays an address
    and is the policy's only teaching server; under the learned policy the same workload
    connects, with zero denials, and an address of another name is refused."""
    server = dns_server.addresses[0]
    out = tmp_path / "names.yaml"
    resolve = [sys.executable, str(NAMES_CLIENT), "resolve", server]
    done = run_cli(
        "--cgroup-root", scratch_cgroup.path, "learn", "-o", out, "--", *resolve, "api.test"
    )
    assert done.returncode == 0, done.stderr
    assert load_paths([out]).ok
    spec = yaml.safe_load(out.read_text())["spec"]
    assert spec["dns"] == {"servers": [server]}
    connect = spec["sockets"]["connect"]["rules"]
    assert {"action": "allow", "protocol": "udp", "fqdns": ["api.test"], "ports": [9]} in connect
    assert {"action": "allow", "protocol": "udp", "cidrs": [server], "ports": [53]} in connect
    assert "198.51.100.7" not in str(spec)

    rerun = scratch_cgroup.child("rerun")
    with enforced(cgroup_root, bpf_dir, targeted(out, rerun.relative)):
        again = rerun.run([*resolve, "api.test"])
        assert json.loads(again.stdout.splitlines()[-1]) == [["api.test", "198.51.100.7", "ok"]]
        assert denials(rerun.path) == 0
        other = rerun.run([*resolve, "db.other.test"])
        assert json.loads(other.stdout.splitlines()[-1]) == [
            ["db.other.test", "198.51.100.8", "EPERM"]
        ]


NETNS_WORKLOAD = """
import socket, sys
b4, b6, ports, extra = sys.argv[1], sys.argv[2], [int(p) for p in sys.argv[3:6]], sys.argv[6:]
for host, port in ((b4, ports[0]), (b6, ports[2])):
    with socket.create_connection((host, port), timeout=10) as conn:
        assert conn.recv(100) == b""  # the server accepts and closes
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
    udp.settimeout(10)
    udp.sendto(b"ping", (b4, ports[1]))
    assert udp.recv(100) == b"ping"
if extra:
    socket.create_connection((b4, int(extra[0])), timeout=10).close()
print("workload done")
"""


def test_learned_policy_for_traffic_between_namespaces(
    tmp_path, scratch_cgroup, cgroup_root, bpf_dir, veth_net
):
    """Not loopback: the workload in one network namespace talks TCP (IPv4 and IPv6) and
    UDP to echo servers in another over a veth pair; the learned policy names the servers'
    addresses and ports, allows the replies by address, and runs the workload again with
    zero denials; a connect to another port of the same server is denied."""
    script = tmp_path / "netns_workload.py"
    script.write_text(NETNS_WORKLOAD)
    p = veth_net.ports
    command = [
        *veth_net.exec_argv(veth_net.ns_a, [sys.executable, str(script)]),
        veth_net.b4,
        veth_net.b6,
        *map(str, p[:3]),
    ]
    out = tmp_path / "netns.yaml"
    done = run_cli("--cgroup-root", scratch_cgroup.path, "learn", "-o", out, "--", *command)
    assert done.returncode == 0, done.stderr
    spec = yaml.safe_load(out.read_text())["spec"]
    egress = spec["network"]["egress"]["rules"]
    assert {"action": "allow", "protocol": "tcp", "cidrs": [veth_net.b4], "ports": [p[0]]} in egress
    assert {"action": "allow", "protocol": "tcp", "cidrs": [veth_net.b6], "ports": [p[2]]} in egress
    assert {"action": "allow", "protocol": "udp", "cidrs": [veth_net.b4], "ports": [p[1]]} in egress
    ingress = spec["network"]["ingress"]["rules"]
    assert {"action": "allow", "protocol": "tcp", "cidrs": [veth_net.b4, veth_net.b6]} in ingress
    assert {"action": "allow", "protocol": "udp", "cidrs": [veth_net.b4]} in ingress

    rerun = scratch_cgroup.child("rerun")
    with enforced(cgroup_root, bpf_dir, targeted(out, rerun.relative)):
        again = rerun.run(command)
        assert again.returncode == 0, again.stderr
        assert denials(rerun.path) == 0
        more = rerun.run([*command, str(p[3])])
        assert more.returncode != 0
        assert denials(rerun.path) > 0


def test_against_writes_only_what_the_policy_would_deny(tmp_path, scratch_cgroup):
    existing = tmp_path / "existing.yaml"
    existing.write_text(
        "apiVersion: cgpolicy.dev/v1\n"
        "kind: CgroupPolicy\n"
        "metadata: {name: existing}\n"
        "spec:\n"
        "  targets: [{path: somewhere}]\n"
        "  sysctl:\n"
        "    default: deny\n"
        "    rules: [{action: allow, name: kernel.ostype, access: read}]\n"
    )
    reads = "open('/proc/sys/kernel/ostype').read(); open('/proc/sys/kernel/osrelease').read()"
    out = tmp_path / "additions.yaml"
    done = run_cli(
        "--cgroup-root",
        scratch_cgroup.path,
        "learn",
        "--against",
        existing,
        "-o",
        out,
        "--",
        sys.executable,
        "-c",
        reads,
    )
    assert done.returncode == 0, done.stderr
    doc = yaml.safe_load(out.read_text())
    assert doc["metadata"]["name"] == "existing"
    assert doc["spec"]["sysctl"]["rules"] == [
        {"action": "allow", "name": "kernel.osrelease", "access": "read"}
    ]
    assert set(doc["spec"]) == {"mode", "targets", "sysctl"}  # the rest: no sysctl section
    assert "the rules to add to it" in out.read_text()
    bad = run_cli("learn", "--against", tmp_path / "missing.yaml", "--", "true")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_the_learn_structs_are_what_the_python_reads(tmp_path):
    """cgpolicy/kernel/learn.py's layouts and constants against what the compiler makes of
    bpf/learn.c: a mismatch fails the compile, naming the member."""
    from cgpolicy.kernel.learn import C_CONSTANTS, LAYOUTS
    from cgpolicy.kernel.loader import SOURCE_DIR, compile_file

    lines = ['#include "learn.c"']
    for layout in LAYOUTS:
        c_type = f"struct {layout.c_name}"
        for member in layout.fields.values():
            what = f"learn: {c_type}.{member.name}"
            lines += [
                f"_Static_assert(offsetof({c_type}, {member.name}) == {member.offset}, "
                f'"{what} offset {member.offset}");',
                f"_Static_assert(sizeof((({c_type} *)0)->{member.name}) == {member.size}, "
                f'"{what} size {member.size}");',
            ]
        lines.append(f'_Static_assert(sizeof({c_type}) == {layout.size}, "learn: {c_type}");')
    lines += [f'_Static_assert({k} == {v}, "learn: {k}");' for k, v in C_CONSTANTS.items()]
    unit = tmp_path / "learn_check.c"
    unit.write_text("\n".join(lines) + "\n")
    compile_file(unit, [f"-I{SOURCE_DIR}"])  # LoaderError names any failed assertion


def test_hostile_sysctl_names_from_interface_names_are_left_out(tmp_path, scratch_cgroup):
    """Interface names may hold '*', '#', '"', '{' ...; their sysctls' names cannot be
    written as a rule exactly (a '*' would be a glob): left out with a warning, and nothing
    of them reaches the YAML's structure. In a network namespace made for the test."""
    netns = f"cgpl-{os.getpid()}"
    hostile = 'x*#"{'
    reads = (
        "import subprocess, sys\n"
        f"link = ['ip', 'link', 'add', {hostile!r}, 'type', 'veth', 'peer', 'name', 'p0']\n"
        "subprocess.run(link, check=True)\n"
        f"open('/proc/sys/net/ipv4/conf/' + {hostile!r} + '/forwarding').read()\n"
        "open('/proc/sys/kernel/ostype').read()\n"
    )
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        out = tmp_path / "hostile-sysctl.yaml"
        command = ["ip", "netns", "exec", netns, sys.executable, "-c", reads]
        done = run_cli("--cgroup-root", scratch_cgroup.path, "learn", "-o", out, "--", *command)
        assert done.returncode == 0, done.stderr
    finally:
        subprocess.run(["ip", "netns", "delete", netns], check=True)
    assert load_paths([out]).ok
    shown = "sysctl net/ipv4/conf/x*\\x23\\x22\\x7b/forwarding (read, 2 accesses): not expressible"
    assert shown in done.stderr
    text = out.read_text()
    assert f"# WARNING: {shown}" in text
    rules = yaml.safe_load(text)["spec"]["sysctl"]["rules"]
    assert rules == [{"action": "allow", "name": "kernel.ostype", "access": "read"}]


def test_a_server_on_a_port_nobody_bound_is_still_a_server(scratch_cgroup):
    """listen() without bind(): the kernel picks the port, no bind program sees it; the
    connection request reaching the listening socket makes it a server port, so its
    clients' ephemeral ports are never learned."""
    script = (
        "import socket\n"
        "server = socket.socket()\n"
        "server.listen()\n"
        "port = server.getsockname()[1]\n"
        "client = socket.create_connection(('127.0.0.1', port))\n"
        "conn, _ = server.accept()\n"
        "client.sendall(b'x'); conn.recv(1); conn.sendall(b'y'); client.recv(1)\n"
        "print(port, client.getsockname()[1])\n"
    )
    with Observer() as observer:
        observer.attach(scratch_cgroup.path)
        done = scratch_cgroup.run([sys.executable, "-c", script])
        assert done.returncode == 0, done.stderr
        observer.detach()
        seen = observer.read()
    port, ephemeral = map(int, done.stdout.split())
    loopback = _ip("127.0.0.1")
    ports = {(k.direction, k.port) for k in seen.network if k.kind == "port"}
    assert ports == {("egress", port), ("ingress", port)}, ports
    assert NetKey("ingress", loopback, 6, "reply") in seen.network  # the client's side
    assert NetKey("egress", loopback, 6, "reply") in seen.network  # the server's answers
    assert all(k.port != ephemeral for k in seen.network)


def test_the_output_file_replaces_a_planted_link_and_never_writes_through_it(
    tmp_path, scratch_cgroup
):
    # root writes -o into a folder others can write (/tmp): a symlink or a hard link planted
    # under that name must not make it overwrite the file the link points at
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    victim = tmp_path / "victim"
    victim.write_text("root's own file\n")
    (shared / "by-symlink.yaml").symlink_to(victim)
    os.link(victim, shared / "by-hardlink.yaml")
    for name in ("by-symlink.yaml", "by-hardlink.yaml"):
        out = shared / name
        done = run_cli("--cgroup-root", scratch_cgroup.path, "learn", "-o", out, "--", "true")
        assert done.returncode == 0, done.stderr
        assert victim.read_text() == "root's own file\n"
        assert not out.is_symlink() and out.stat().st_nlink == 1
        assert "kind: CgroupPolicy" in out.read_text()
    assert sorted(p.name for p in shared.iterdir()) == ["by-hardlink.yaml", "by-symlink.yaml"]


def test_sigterm_or_a_closed_terminal_ends_learning_early_and_writes_the_policy(
    scratch_cgroup, tmp_path
):
    """Also when the signal comes while the observers are being attached (the first link
    seen, polled tightly): the policy is still written."""
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        out = tmp_path / f"learned-{int(signum)}.yaml"
        out.unlink(missing_ok=True)
        learner = subprocess.Popen(
            [CGPOLICY, "learn", "--cgroup", scratch_cgroup.relative, "--for", "10m", "-o", out],
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 30
            while attachments(scratch_cgroup.path) == {} and time.monotonic() < deadline:
                time.sleep(0.001)
            learner.send_signal(signum)
            _, stderr = learner.communicate(timeout=60)
        finally:
            if learner.poll() is None:
                learner.kill()
                learner.wait()
        assert learner.returncode == 0, (signum, stderr)
        assert "interrupted" in stderr and "Traceback" not in stderr
        assert out.read_text().startswith("# Learned by `cgpolicy learn`")
        assert attachments(scratch_cgroup.path) == {}
