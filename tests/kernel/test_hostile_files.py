"""Hostile files in the reconcile service's folder (issue 10, item 2): a file whose numbers
cannot be read (a port range or a prefix length of 5,000 digits) is reported as invalid,
and every other policy in the folder stays enforced through new cgroups and drift."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from service import (
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

NINES = "9" * 5000
HOSTILE = {
    "ports.yaml": POLICY.replace(
        'cidrs: ["{denied}/32"]', 'protocol: tcp, ports: ["1-' + NINES + '"]'
    ),
    "prefix.yaml": POLICY.replace("{denied}/32", "{denied}/" + NINES),
}


@pytest.fixture
def service(tmp_path: Path, bpf_dir: Path) -> Iterator[Daemon]:
    with running(Daemon(tmp_path / "policies.d", bpf_dir, tmp_path / "daemon.log")) as daemon:
        yield daemon


def test_hostile_files_do_not_stop_the_other_policies(service, scratch_cgroup, tcp_server):
    write_policy(service, scratch_cgroup, name="svc", denied="127.0.0.1")
    for name, template in HOSTILE.items():
        stem = name.removesuffix(".yaml")
        write_policy(service, scratch_cgroup, name=stem, denied="127.0.0.3", template=template)
    service.start()
    # A cgroup that appears after the service started gets the valid policy.
    work = scratch_cgroup.child("work-1")
    assert wait_until(lambda: connect_denied(work, "127.0.0.1", tcp_server.port)), service.log()
    # A link detached from outside is restored.
    (pin,) = service.bpf_dir.glob("svc/connect4/link-*")
    with CgroupLink.from_pin(pin) as link:
        subprocess.run(["bpftool", "link", "detach", "id", str(link.info().id)], check=True)
    assert wait_until(lambda: links_at(work.path, "connect4") == 1, timeout=10), service.log()
    assert connect_denied(work, "127.0.0.1", tcp_server.port)
    # The hostile files are reported, each at FILE:LINE:COL, and nothing raised.
    for name in HOSTILE:
        metric = f'cgpolicy_invalid_policy_file{{file="{name}"}}'
        assert wait_until(lambda m=metric: service.metric(m) == 1), service.log()
        assert f"{service.policy_dir / name}:9:" in service.log()
    status, body = http_get(service.port, "/readyz")
    assert status == 503 and "file ports.yaml: invalid: " in body, body
    assert "Traceback" not in service.log()
    assert "reconcile pass failed" not in service.log()
    assert not list(service.bpf_dir.glob("ports*")) and not list(service.bpf_dir.glob("prefix*"))


def test_a_file_turned_hostile_keeps_its_last_good_version(service, scratch_cgroup, tcp_server):
    write_policy(service, scratch_cgroup, name="svc", denied="127.0.0.1")
    victim = write_policy(service, scratch_cgroup, name="victim", denied="127.0.0.2")
    work = scratch_cgroup.child("work-1")
    service.start()
    assert wait_until(lambda: connect_denied(work, "127.0.0.2", tcp_server.port)), service.log()
    glob = f"{scratch_cgroup.relative}/work-*"
    victim.write_text(HOSTILE["prefix.yaml"].format(name="victim", glob=glob, denied="127.0.0.3"))
    metric = 'cgpolicy_invalid_policy_file{file="victim.yaml"}'
    assert wait_until(lambda: service.metric(metric) == 1), service.log()
    late = scratch_cgroup.child("work-2")
    # The new cgroup gets both policies: svc as its file says, victim as it last was.
    assert wait_until(lambda: links_at(late.path, "connect4") == 2), service.log()
    assert connect_denied(late, "127.0.0.1", tcp_server.port)
    assert connect_denied(late, "127.0.0.2", tcp_server.port)
    assert connect_denied(work, "127.0.0.2", tcp_server.port)
    assert "Traceback" not in service.log()
