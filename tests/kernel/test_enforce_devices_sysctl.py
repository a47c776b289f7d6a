"""devices (cgroup_device) and sysctl (cgroup_sysctl) enforced on the real kernel.

Device nodes are made with mknod in the test's tmp_path (outside the cgroup, so unrestricted)
and opened by a probe inside it. Sysctl probes run in a private network namespace, so that
the net.* values they write belong to that namespace and never change the host's.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from enforcement import ALLOWED, EPERM, apply_ok, enforced, expect
from policy_builders import policy_file


def make_node(folder: Path, name: str, kind: str, major: int, minor: int) -> str:
    path = folder / name
    mode = (stat.S_IFCHR if kind == "char" else stat.S_IFBLK) | 0o666
    os.mknod(path, mode, os.makedev(major, minor))
    return str(path)


def test_device_open_and_mknod(scratch_cgroup, bpf_dir, cgroup_root, tmp_path):
    nodes = tmp_path / "dev"
    nodes.mkdir()
    null = make_node(nodes, "null", "char", 1, 3)
    zero = make_node(nodes, "zero", "char", 1, 5)
    full = make_node(nodes, "full", "char", 1, 7)
    urandom = make_node(nodes, "urandom", "char", 1, 9)
    loop = make_node(nodes, "loop", "block", 7, 200)
    path = policy_file(
        tmp_path,
        "devices",
        [scratch_cgroup.relative],
        {
            "devices": {
                "default": "deny",
                "rules": [
                    {"action": "allow", "type": "char", "major": 1, "minor": 3},  # rwm
                    # by node: /dev/zero is 1:5, as `zero` is; resolved when applied
                    {"action": "allow", "path": "/dev/zero", "access": "r"},
                    {"action": "allow", "type": "char", "major": 1, "minor": 9, "access": "rw"},
                    {"action": "deny", "type": "char", "major": 1, "minor": 9, "access": "w"},
                    {"action": "allow", "type": "char", "access": "m"},  # mknod of any char
                    {"action": "deny", "type": "char", "major": 1, "minor": 7, "access": "m"},
                ],
            }
        },
    )
    mk = str(nodes / "made")
    with enforced(cgroup_root, bpf_dir, path):
        expect(
            scratch_cgroup,
            [
                (("open", null, "rw"), ALLOWED),
                (("open", "/dev/null", "w"), ALLOWED),
                (("open", zero, "r"), ALLOWED),
                (("open", zero, "w"), EPERM),
                (("open", zero, "rw"), EPERM),  # allow r does not cover rw
                (("open", urandom, "r"), ALLOWED),
                (("open", urandom, "w"), EPERM),
                (("open", urandom, "rw"), EPERM),  # deny w stops a read-write open
                (("open", full, "r"), EPERM),  # default
                (("open", "/dev/full", "r"), EPERM),
                (("open", loop, "r"), EPERM),
                (("mknod", f"{mk}-1", "char", 1, 3), ALLOWED),
                (("mknod", f"{mk}-2", "char", 1, 8), ALLOWED),
                (("mknod", f"{mk}-3", "char", 1, 7), EPERM),
                (("mknod", f"{mk}-4", "block", 7, 0), EPERM),
            ],
        )
    # Removed: the default deny is gone (the block node has no device behind it: ENXIO).
    expect(scratch_cgroup, [(("open", full, "r"), ALLOWED), (("open", urandom, "rw"), ALLOWED)])


def _read_in(ns: str, name: str) -> str:
    done = subprocess.run(
        ["ip", "netns", "exec", ns, "cat", f"/proc/sys/{name}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def test_sysctl_read_and_write(scratch_cgroup, bpf_dir, cgroup_root, tmp_path, veth_net):
    ns = veth_net.ns_a  # a private netns: its net.* sysctls are its own
    ttl = _read_in(ns, "net/ipv4/ip_default_ttl")
    forwarding = _read_in(ns, "net/ipv4/conf/lo/forwarding")
    fin_timeout = int(_read_in(ns, "net/ipv4/tcp_fin_timeout"))
    host_fin_timeout = Path("/proc/sys/net/ipv4/tcp_fin_timeout").read_text().strip()
    new_ttl = "63" if ttl != "63" else "62"
    spec = {
        "sysctl": {
            "default": "allow",
            "rules": [
                {"action": "deny", "name": "net.ipv4.ip_default_ttl", "access": "write"},
                {"action": "deny", "name": "net/ipv4/conf/*", "access": "write"},
                {"action": "deny", "name": "kernel.ostype", "access": "read"},
                {"action": "deny", "name": "net.ipv4.tcp_keepalive_*"},  # rw
            ],
        }
    }
    path = policy_file(tmp_path, "sysctl", [scratch_cgroup.relative], spec)
    with enforced(cgroup_root, bpf_dir, path) as enforcer:
        expect(
            scratch_cgroup,
            [
                (("sysctl-read", "net/ipv4/ip_default_ttl"), ALLOWED),
                (("sysctl-write", "net/ipv4/ip_default_ttl", new_ttl), EPERM),
                (("sysctl-read", "net/ipv4/conf/lo/forwarding"), ALLOWED),
                (("sysctl-write", "net/ipv4/conf/lo/forwarding", forwarding), EPERM),
                (("sysctl-read", "kernel/ostype"), EPERM),
                (("sysctl-read", "kernel/osrelease"), ALLOWED),
                (("sysctl-read", "net/ipv4/tcp_keepalive_time"), EPERM),
                (("sysctl-write", "net/ipv4/tcp_keepalive_intvl", "75"), EPERM),
                (("sysctl-write", "net/ipv4/tcp_fin_timeout", str(fin_timeout + 1)), ALLOWED),
            ],
            netns=ns,
        )
        assert _read_in(ns, "net/ipv4/ip_default_ttl") == ttl  # the denied write did nothing
        assert _read_in(ns, "net/ipv4/tcp_fin_timeout") == str(fin_timeout + 1)

        # Revision 2 of the same policy: reads only.
        spec["sysctl"] = {
            "default": "deny",
            "rules": [{"action": "allow", "name": "*", "access": "read"}],
        }
        apply_ok(enforcer, policy_file(tmp_path, "sysctl", [scratch_cgroup.relative], spec))
        expect(
            scratch_cgroup,
            [
                (("sysctl-read", "kernel/ostype"), ALLOWED),
                (("sysctl-read", "net/ipv4/tcp_keepalive_time"), ALLOWED),
                (("sysctl-write", "net/ipv4/tcp_fin_timeout", str(fin_timeout)), EPERM),
            ],
            netns=ns,
        )
        assert _read_in(ns, "net/ipv4/tcp_fin_timeout") == str(fin_timeout + 1)
    # Removed: the write goes through again (restoring the namespace's value).
    expect(
        scratch_cgroup,
        [(("sysctl-write", "net/ipv4/tcp_fin_timeout", str(fin_timeout)), ALLOWED)],
        netns=ns,
    )
    assert _read_in(ns, "net/ipv4/tcp_fin_timeout") == str(fin_timeout)
    assert Path("/proc/sys/net/ipv4/tcp_fin_timeout").read_text().strip() == host_fin_timeout
