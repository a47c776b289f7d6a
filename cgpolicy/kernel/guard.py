"""What `cgpolicy test --kernel` needs from the kernel to perform actions for real without
their effects: a guard that refuses them after every program has decided, and device nodes
to open.

The guard is a two-instruction program that returns 0 ("deny"), attached through a BPF
link to a cgroup at the hooks of actions whose effect must not happen (a sysctl write, a
device open, a bind, a connect or send to an address that may leave the host). The kernel
runs *every* program on a hook's path, from the leaf up to the root, before it acts on the
AND of their verdicts (``bpf_prog_run_array_cg`` does not stop at the first denial): so a
policy's program attached above the guard still decides, and counts its decision in its
per-rule counters, while the action itself always fails with EPERM before any driver's
open, sysctl handler or packet runs. The links are not pinned: closing them (or the
process ending) detaches the guard.
"""

from __future__ import annotations

import os
import stat
import struct
import tempfile
from pathlib import Path

from cgpolicy.kernel.bpf import CgroupLink, Program, close_all
from cgpolicy.kernel.cgroup import open_cgroup
from cgpolicy.kernel.hooks import hook

GUARDED_HOOKS = (
    "bind4",
    "bind6",
    "connect4",
    "connect6",
    "sendmsg4",
    "sendmsg6",
    "device",
    "sysctl",
)
GUARD_NAME = "cgp_test_guard"
# BPF_ALU64 | BPF_MOV | BPF_K r0 = 0; BPF_JMP | BPF_EXIT
_RETURN_0 = struct.pack("<BBhi", 0xB7, 0, 0, 0) + struct.pack("<BBhi", 0x95, 0, 0, 0)


def attach_guard(cgroup: Path) -> list[CgroupLink]:
    """Attach the deny-everything guard to every hook of GUARDED_HOOKS of ``cgroup``; the
    caller closes the links (which detaches them)."""
    links: list[CgroupLink] = []
    fd = open_cgroup(cgroup)
    try:
        for name in GUARDED_HOOKS:
            spec = hook(name)
            with Program.load(spec.prog_type, _RETURN_0, GUARD_NAME, spec.attach_type) as program:
                links.append(CgroupLink.create(program.fd, fd, spec.attach_type))
    except BaseException:
        close_all(links)
        raise
    finally:
        os.close(fd)
    return links


def node_folder() -> Path:
    """A new private folder (0700) on a file system that allows device nodes (not
    mounted ``nodev``): /var/tmp, /tmp or /dev, the first that does."""
    for candidate in ("/var/tmp", "/tmp", "/dev"):
        try:
            if os.statvfs(candidate).f_flag & os.ST_NODEV:
                continue
            return Path(tempfile.mkdtemp(prefix="cgpolicy-test-", dir=candidate))
        except OSError:
            continue
    raise OSError("no folder for device nodes: /var/tmp, /tmp and /dev are all nodev")


def make_node(folder: Path, kind: str, major: int, minor: int) -> Path:
    """A device node of that type and number in ``folder`` (made by this process, outside
    any test cgroup), mode 0600."""
    path = folder / f"{kind[0]}{major}_{minor}"
    if not path.exists():
        mode = (stat.S_IFCHR if kind == "char" else stat.S_IFBLK) | 0o600
        os.mknod(path, mode, os.makedev(major, minor))
    return path
