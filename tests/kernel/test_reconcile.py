"""The reconcile service as it runs in production: a real daemon process on a policy folder,
real cgroups appearing and vanishing, real faults injected from outside."""

from __future__ import annotations

import os
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from service import (
    CGPOLICY,
    POLICY,
    Daemon,
    connect_denied,
    http_get,
    links_at,
    running,
    wait_until,
    write_policy,
)

from cgpolicy.kernel.bpf import CgroupLink
from cgpolicy.kernel.hooks import hook
from cgpolicy.kernel.syscall import prog_query


@pytest.fixture
def daemon(tmp_path: Path, bpf_dir: Path) -> Iterator[Daemon]:
    with running(Daemon(tmp_path / "policies.d", bpf_dir, tmp_path / "daemon.log")) as service:
        yield service


def test_new_matching_cgroup_is_enforced_and_removed_one_cleaned_up(
    daemon, scratch_cgroup, tcp_server
):
    write_policy(daemon, scratch_cgroup, denied="127.0.0.1")
    daemon.start()
    work = scratch_cgroup.child("work-1")
    other = scratch_cgroup.child("other")
    assert wait_until(lambda: connect_denied(work, "127.0.0.1", tcp_server.port)), daemon.log()
    assert other.probe("connect", "tcp", "127.0.0.1", tcp_server.port).ok
    pins = lambda: list(daemon.bpf_dir.glob("svc/connect4/link-*"))  # noqa: E731
    assert len(pins()) == 1
    work.path.rmdir()
    assert wait_until(lambda: not pins()), daemon.log()


def test_external_detach_and_deleted_pin_are_restored(daemon, scratch_cgroup, tcp_server):
    write_policy(daemon, scratch_cgroup, denied="127.0.0.1")
    work = scratch_cgroup.child("work-1")
    daemon.start()
    assert wait_until(lambda: connect_denied(work, "127.0.0.1", tcp_server.port)), daemon.log()
    (pin,) = daemon.bpf_dir.glob("svc/connect4/link-*")
    with CgroupLink.from_pin(pin) as link:
        subprocess.run(["bpftool", "link", "detach", "id", str(link.info().id)], check=True)
    assert wait_until(lambda: links_at(work.path, "connect4") == 1, timeout=5), daemon.log()
    assert connect_denied(work, "127.0.0.1", tcp_server.port)
    (daemon.bpf_dir / "svc" / "connect6").joinpath(pin.name).unlink()
    assert wait_until(lambda: (daemon.bpf_dir / "svc/connect6" / pin.name).exists(), timeout=5)
    assert links_at(work.path, "connect6") == 1
    repaired = daemon.metric('cgpolicy_drift_repaired_total{problem="missing"}')
    assert repaired is not None and repaired >= 2


def test_sigkill_then_restart_gives_exactly_one_attachment_per_hook(daemon, scratch_cgroup):
    hooks = ("connect4", "connect6", "sendmsg4", "sendmsg6")
    write_policy(daemon, scratch_cgroup)
    work = scratch_cgroup.child("work-1")
    daemon.start()
    assert wait_until(lambda: all(links_at(work.path, h) == 1 for h in hooks)), daemon.log()
    # Links are pinned before the metadata that describes them: killed in between, the
    # apply is an interrupted one, which the next service reloads whole (no drift to count).
    # Kill it once its first pass is over.
    assert wait_until(lambda: (daemon.metric("cgpolicy_reconcile_passes_total") or 0) >= 1)
    daemon.signal(signal.SIGKILL)
    assert all(links_at(work.path, h) == 1 for h in hooks)  # enforcement outlives the daemon
    # While no service runs: a link detached from outside and a new matching cgroup, which
    # only the restarted service can repair and enforce.
    (pin,) = daemon.bpf_dir.glob("svc/connect6/link-*")
    with CgroupLink.from_pin(pin) as link:
        subprocess.run(["bpftool", "link", "detach", "id", str(link.info().id)], check=True)
    assert links_at(work.path, "connect6") == 0
    late = scratch_cgroup.child("work-2")
    assert all(links_at(late.path, h) == 0 for h in hooks)
    daemon.start()

    def repaired() -> bool:
        return links_at(work.path, "connect6") == 1 and links_at(late.path, "connect4") == 1

    def passes() -> float:
        return daemon.metric("cgpolicy_reconcile_passes_total") or 0

    assert wait_until(repaired, timeout=30), daemon.log()
    # Its metrics start at zero, so 3 passes are its first and two resyncs: had it not known
    # the killed service's links for its own, any of them would have attached a second time.
    assert wait_until(lambda: passes() >= 3, timeout=30), daemon.log()
    for cgroup in (work, late):
        for name in hooks:
            assert links_at(cgroup.path, name) == 1, (cgroup.relative, name)
    # What it repaired: the detached link, nothing more. Attaching to the new cgroup is the
    # policy doing its job, not drift (issue 10, item 7).
    assert daemon.metric('cgpolicy_drift_repaired_total{problem="missing"}') == 1


def test_bad_file_keeps_previous_version_enforced_and_shows_in_metrics(
    daemon, scratch_cgroup, tcp_server
):
    path = write_policy(daemon, scratch_cgroup, denied="127.0.0.1")
    work = scratch_cgroup.child("work-1")
    daemon.start()
    assert wait_until(lambda: connect_denied(work, "127.0.0.1", tcp_server.port)), daemon.log()
    # The same policy turned into an allow-all by a typo'd, duplicated key: rejected.
    path.write_text(path.read_text() + "  sockets: {}\n")
    assert wait_until(lambda: daemon.metric("cgpolicy_invalid_policy_files") == 1), daemon.log()
    wait_for_passes(daemon, 2)  # passes that saw the bad file, and did not apply it
    assert connect_denied(work, "127.0.0.1", tcp_server.port)
    assert "last good version stays enforced" in daemon.log()
    assert "duplicate" in daemon.log()


def test_configmap_symlink_swap_is_picked_up(daemon, scratch_cgroup, tcp_server):
    # kubelet's layout: policy.yaml -> ..data/policy.yaml, ..data -> ..2026_1 (swapped atomically)
    first, second = daemon.policy_dir / "..2026_1", daemon.policy_dir / "..2026_2"
    first.mkdir()
    second.mkdir()
    glob = f"{scratch_cgroup.relative}/work-*"
    (first / "svc.yaml").write_text(POLICY.format(name="svc", glob=glob, denied="127.0.0.2"))
    (second / "svc.yaml").write_text(POLICY.format(name="svc", glob=glob, denied="127.0.0.1"))
    os.symlink("..2026_1", daemon.policy_dir / "..data")
    os.symlink("..data/svc.yaml", daemon.policy_dir / "svc.yaml")
    work = scratch_cgroup.child("work-1")
    daemon.start()
    assert wait_until(lambda: links_at(work.path, "connect4") == 1), daemon.log()
    assert work.probe("connect", "tcp", "127.0.0.1", tcp_server.port).ok
    os.symlink("..2026_2", daemon.policy_dir / "..data_tmp")
    os.rename(daemon.policy_dir / "..data_tmp", daemon.policy_dir / "..data")
    assert wait_until(lambda: connect_denied(work, "127.0.0.1", tcp_server.port)), daemon.log()


def test_deleted_file_removes_its_policy(daemon, scratch_cgroup):
    path = write_policy(daemon, scratch_cgroup)
    work = scratch_cgroup.child("work-1")
    daemon.start()
    assert wait_until(lambda: links_at(work.path, "connect4") == 1), daemon.log()
    path.unlink()
    assert wait_until(lambda: not (daemon.bpf_dir / "svc").exists()), daemon.log()
    assert links_at(work.path, "connect4") == 0


def test_deleted_file_removes_its_policy_when_its_glob_matches_nothing(daemon, scratch_cgroup):
    """Programs pinned, no link (no cgroup matches): the removal has no link to detach but
    must still drop the pins."""
    path = write_policy(daemon, scratch_cgroup)
    daemon.start()
    assert wait_until(lambda: (daemon.bpf_dir / "svc" / "connect4" / "prog").exists()), daemon.log()
    path.unlink()
    assert wait_until(lambda: not (daemon.bpf_dir / "svc").exists()), daemon.log()


def test_sigterm_exits_cleanly_and_leaves_enforcement(daemon, scratch_cgroup, tcp_server):
    write_policy(daemon, scratch_cgroup, denied="127.0.0.1")
    work = scratch_cgroup.child("work-1")
    daemon.start()
    assert wait_until(lambda: connect_denied(work, "127.0.0.1", tcp_server.port)), daemon.log()
    assert daemon.signal(signal.SIGTERM) == 0
    assert connect_denied(work, "127.0.0.1", tcp_server.port)


def test_metrics_endpoint_speaks_prometheus_text_and_health(daemon, scratch_cgroup, tcp_server):
    write_policy(daemon, scratch_cgroup, denied="127.0.0.1")
    work = scratch_cgroup.child("work-1")
    daemon.start()
    assert wait_until(lambda: connect_denied(work, "127.0.0.1", tcp_server.port)), daemon.log()
    assert connect_denied(work, "127.0.0.1", tcp_server.port)
    text = daemon.metrics() or ""
    assert "# TYPE cgpolicy_reconcile_duration_seconds histogram" in text
    assert 'cgpolicy_policies{state="valid"} 1.0' in text
    assert daemon.metric('cgpolicy_denied_actions{hook="connect4",policy="svc"}') == 2
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.port}/healthz", timeout=2) as response:
        assert response.status == 200


def test_missing_bpffs_is_mounted_and_said_so(tmp_path, scratch_cgroup):
    """In a private mount namespace without bpffs, a pass mounts it, says so, and enforces.
    (The namespace, and with it everything pinned there, ends with the command.)"""
    policy_dir = tmp_path / "policies.d"
    policy_dir.mkdir()
    glob = f"{scratch_cgroup.relative}/work-*"
    (policy_dir / "svc.yaml").write_text(POLICY.format(name="svc", glob=glob, denied="127.0.0.2"))
    work = scratch_cgroup.child("work-1")
    script = (
        "umount /sys/fs/bpf && ! grep -q ' /sys/fs/bpf bpf ' /proc/mounts"
        f" && {CGPOLICY} --log-level info reconcile --policy-dir {policy_dir} --once"
        f" && grep -q ' /sys/fs/bpf bpf ' /proc/mounts"
        f" && bpftool cgroup show {work.path}"
    )
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "bpffs was not mounted: mounted it at /sys/fs/bpf" in done.stderr
    assert "cgp_connect4" in done.stdout


IFACE_POLICY = """\
apiVersion: cgpolicy.dev/v1
kind: CgroupPolicy
metadata: {{name: ifaces}}
spec:
  targets: [{{glob: "{glob}"}}]
  network:
    egress:
      default: allow
      rules: [{{action: deny, interfaces: ["{pattern}"]}}]
"""


def egress_ifaces(bpf_dir: Path) -> set[int]:
    from test_enforce_network import ifaces_in_map

    pin = bpf_dir / "ifaces" / "egress" / "prog"
    return ifaces_in_map(pin) if pin.exists() else set()


def test_interfaces_created_renamed_and_recreated_are_followed(daemon, scratch_cgroup):
    """A rule naming an interface glob follows the interfaces netlink reports: veth pairs
    (no addresses, no traffic; the kernel here has no dummy driver) made and removed by this
    test only. Each pair's peer is named outside the glob."""
    from pyroute2 import IPRoute

    tag = f"cgpd{os.getpid() % 100000}"
    path = daemon.policy_dir / "ifaces.yaml"
    glob = f"{scratch_cgroup.relative}/work-*"
    path.write_text(IFACE_POLICY.format(glob=glob, pattern=f"{tag}*"))
    scratch_cgroup.child("work-1")
    names = [f"{tag}a", f"{tag}b", f"x{tag}", f"pa{tag}", f"pb{tag}"]
    with IPRoute() as ipr:
        try:
            daemon.start()
            assert wait_until(lambda: (daemon.bpf_dir / "ifaces/egress/prog").exists())
            assert egress_ifaces(daemon.bpf_dir) == set()
            ipr.link("add", ifname=names[0], kind="veth", peer=names[3])
            first = ipr.link_lookup(ifname=names[0])[0]
            assert wait_until(lambda: egress_ifaces(daemon.bpf_dir) == {first}), daemon.log()
            ipr.link("set", index=first, ifname=names[2])  # renamed out of the glob
            assert wait_until(lambda: egress_ifaces(daemon.bpf_dir) == set()), daemon.log()
            ipr.link("del", index=first)
            ipr.link("add", ifname=names[1], kind="veth", peer=names[4])
            second = ipr.link_lookup(ifname=names[1])[0]
            assert wait_until(lambda: egress_ifaces(daemon.bpf_dir) == {second}), daemon.log()
        finally:
            for name in names:
                for index in ipr.link_lookup(ifname=name):
                    ipr.link("del", index=index)


def test_vanished_policy_folder_removes_nothing_and_is_followed_when_back(
    daemon, scratch_cgroup, tcp_server
):
    path = write_policy(daemon, scratch_cgroup, denied="127.0.0.2")
    work = scratch_cgroup.child("work-1")
    daemon.start()
    assert wait_until(lambda: links_at(work.path, "connect4") == 1), daemon.log()
    away = daemon.policy_dir.with_name("away")
    daemon.policy_dir.rename(away)  # an unmounted volume looks like this
    wait_for_passes(daemon, 2)  # two passes that found no folder
    assert links_at(work.path, "connect4") == 1
    assert "is missing; enforcement left as it is" in daemon.log()
    away.rename(daemon.policy_dir)
    path.write_text(path.read_text().replace("127.0.0.2", "127.0.0.1"))
    assert wait_until(lambda: connect_denied(work, "127.0.0.1", tcp_server.port)), daemon.log()


def wait_for_passes(daemon, count: int) -> None:  # type: ignore[no-untyped-def]
    """Until the service has finished ``count`` more passes (of any outcome)."""
    name = "cgpolicy_reconcile_passes_total"
    target = (daemon.metric(name) or 0) + count
    assert wait_until(lambda: (daemon.metric(name) or 0) >= target, timeout=30), daemon.log()


def test_liveness_stays_up_while_readiness_names_failing_policies_until_fixed(
    daemon, scratch_cgroup
):
    """One good policy, one file that fails validation, one valid policy the kernel refuses
    (its target is a file in cgroupfs, not a cgroup): the loop is alive, the service is not
    ready and says which; fixed, it becomes ready."""
    write_policy(daemon, scratch_cgroup, name="svc")
    work = scratch_cgroup.child("work-1")
    bad = daemon.policy_dir / "bad.yaml"
    bad.write_text("apiVersion: cgpolicy.dev/v1\nkind: CgroupPolicy\nmetadata: {name: bad}\n")
    broken = daemon.policy_dir / "broken.yaml"
    not_a_cgroup = f"{work.relative}/cgroup.procs"
    broken.write_text(
        POLICY.format(name="broken", glob=not_a_cgroup, denied="127.0.0.3").replace(
            "{glob: ", "{path: "
        )
    )
    daemon.start()
    port = daemon.port
    assert wait_until(lambda: "policy broken" in http_get(port, "/readyz")[1]), daemon.log()
    status, body = http_get(port, "/readyz")
    assert status == 503, body
    # The file and how many problems, never their text (it may quote content): the log has it.
    assert "file bad.yaml: invalid: 1 problem (see the service log)" in body, body
    assert "spec" not in body and "spec" in daemon.log()
    assert "policy broken: not applied: " in body
    assert "svc" not in body
    assert http_get(port, "/healthz")[0] == 200
    assert daemon.metric('cgpolicy_policy_failing{policy="broken"}') == 1
    assert daemon.metric('cgpolicy_policy_failing{policy="svc"}') == 0
    assert daemon.metric('cgpolicy_invalid_policy_file{file="bad.yaml"}') == 1
    assert links_at(work.path, "connect4") == 1  # the good policy is enforced meanwhile
    assert "broken: not applied" in daemon.log()
    assert "not ready: " in daemon.log()

    bad.write_text(POLICY.format(name="bad", glob=f"{work.relative}", denied="127.0.0.4"))
    broken.write_text(POLICY.format(name="broken", glob=work.relative, denied="127.0.0.3"))
    assert wait_until(lambda: http_get(port, "/readyz")[0] == 200, timeout=60), daemon.log()
    assert http_get(port, "/readyz")[1] == "ready: 3 policies applied\n"
    assert http_get(port, "/healthz")[0] == 200
    assert daemon.metric('cgpolicy_policy_failing{policy="broken"}') == 0
    assert daemon.metric('cgpolicy_invalid_policy_file{file="bad.yaml"}') is None
    assert links_at(work.path, "connect4") == 3
    assert "ready: every policy in" in daemon.log()


def test_missing_policy_folder_is_alive_but_not_ready(daemon, scratch_cgroup):
    write_policy(daemon, scratch_cgroup)
    work = scratch_cgroup.child("work-1")
    daemon.start()
    port = daemon.port
    assert wait_until(lambda: http_get(port, "/readyz")[0] == 200), daemon.log()
    away = daemon.policy_dir.with_name("away")
    daemon.policy_dir.rename(away)  # an unmounted volume looks like this
    try:
        assert wait_until(lambda: http_get(port, "/readyz")[0] == 503), daemon.log()
        status, body = http_get(port, "/readyz")
        assert f"policy folder {daemon.policy_dir} is missing" in body, body
        assert http_get(port, "/healthz")[0] == 200
        assert links_at(work.path, "connect4") == 1
    finally:
        away.rename(daemon.policy_dir)
    assert wait_until(lambda: http_get(port, "/readyz")[0] == 200, timeout=30), daemon.log()


def test_a_new_cgroup_between_resyncs_is_attached_without_a_full_pass(
    daemon, scratch_cgroup, tcp_server
):
    """The fast path (enforcer/incremental.py): with no resync due, a new matching cgroup
    is enforced and recorded in the metadata without a pass; a non-matching one is left
    alone; a removed one still gets its pins dropped (by a full pass)."""
    from cgpolicy.kernel.pins import read_meta

    daemon.interval = "3600"
    write_policy(daemon, scratch_cgroup, denied="127.0.0.1")
    daemon.start()
    count = lambda: daemon.metric("cgpolicy_reconcile_passes_total") or 0  # noqa: E731
    assert wait_until(lambda: count() >= 1, timeout=30), daemon.log()  # the first pass
    daemon.process.send_signal(signal.SIGHUP)  # a second pass: the first one's watches are set
    assert wait_until(lambda: count() >= 2, timeout=30), daemon.log()
    passes = count()
    work = scratch_cgroup.child("work-1")
    other = scratch_cgroup.child("other")
    assert wait_until(lambda: connect_denied(work, "127.0.0.1", tcp_server.port)), daemon.log()
    assert other.probe("connect", "tcp", "127.0.0.1", tcp_server.port).ok
    assert f"svc: attached to {work.relative}" in daemon.log()
    assert count() == passes  # no full pass ran
    meta = read_meta(daemon.bpf_dir / "svc")
    assert meta is not None and meta.cgroups[os.stat(work.path).st_ino] == work.relative
    assert links_at(work.path, "connect4") == 1 and links_at(other.path, "connect4") == 0
    work.path.rmdir()
    assert wait_until(lambda: not list(daemon.bpf_dir.glob("svc/connect4/link-*"))), daemon.log()


def test_a_changed_rule_between_resyncs_is_changed_in_place_without_a_full_pass(
    daemon, scratch_cgroup, tcp_server
):
    """The fast path for a changed file (enforcer/incremental.py change_in_place): with no
    resync due, a new deny-list is put in force in the loaded programs' maps, with no full
    pass and the same programs attached, and the metadata records the new revision; a
    change that is more than new rules (a section added) still runs a full pass."""
    from cgpolicy.kernel.pins import read_meta

    daemon.interval = "3600"
    work = scratch_cgroup.child("work-1")
    policy = write_policy(daemon, scratch_cgroup, denied="127.0.0.1")
    daemon.start()
    count = lambda: daemon.metric("cgpolicy_reconcile_passes_total") or 0  # noqa: E731
    assert wait_until(lambda: count() >= 1, timeout=30), daemon.log()
    assert connect_denied(work, "127.0.0.1", tcp_server.port), daemon.log()
    passes = count()

    def attached() -> tuple[int, ...]:
        fd = os.open(work.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return prog_query(fd, hook("connect4").attach_type).prog_ids
        finally:
            os.close(fd)

    programs = attached()
    revisions = [read_meta(daemon.bpf_dir / "svc").revision]  # type: ignore[union-attr]
    for denied in ("127.0.0.3", "127.0.0.1"):
        write_policy(daemon, scratch_cgroup, denied=denied)
        assert wait_until(
            lambda d=denied: (
                connect_denied(work, "127.0.0.1", tcp_server.port) == (d == "127.0.0.1")
            )
        ), daemon.log()
        assert wait_until(lambda: read_meta(daemon.bpf_dir / "svc").revision != revisions[-1])
        revisions.append(read_meta(daemon.bpf_dir / "svc").revision)  # type: ignore[union-attr]
    assert daemon.log().count("svc: rules changed in place") == 2, daemon.log()
    assert count() == passes  # no full pass ran
    assert attached() == programs  # the same programs, their maps changed

    policy.write_text(
        policy.read_text()
        + "    bind:\n      default: allow\n      rules: [{action: deny, ports: [1]}]\n"
    )
    assert wait_until(lambda: links_at(work.path, "bind4") == 1, timeout=30), daemon.log()
    assert count() > passes
    assert connect_denied(work, "127.0.0.1", tcp_server.port), daemon.log()


def test_a_pass_that_did_not_complete_is_retried_at_the_next_changed_file(
    daemon, scratch_cgroup, tcp_server
):
    """A pass that raised (here: the pin folder writable by others, refused) is retried at
    the next wake-up, as its log line says, also when that wake-up is a changed file the
    fast path could put in force: /readyz says ready again once a pass completes, not
    at the next resync."""
    daemon.interval = "3600"
    work = scratch_cgroup.child("work-1")
    write_policy(daemon, scratch_cgroup, denied="127.0.0.1")
    daemon.start()
    assert wait_until(lambda: http_get(daemon.port, "/readyz")[0] == 200, timeout=30), daemon.log()
    mode = daemon.bpf_dir.stat().st_mode & 0o7777
    try:
        daemon.bpf_dir.chmod(0o777)
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGHUP)  # a full pass, which refuses the folder
        assert wait_until(lambda: "did not complete" in http_get(daemon.port, "/readyz")[1])
    finally:
        daemon.bpf_dir.chmod(mode)
    write_policy(daemon, scratch_cgroup, denied="127.0.0.3")
    assert wait_until(lambda: not connect_denied(work, "127.0.0.1", tcp_server.port)), daemon.log()
    assert wait_until(lambda: http_get(daemon.port, "/readyz")[0] == 200), (
        http_get(daemon.port, "/readyz"),
        daemon.log(),
    )
