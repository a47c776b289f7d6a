from pathlib import Path

from cgpolicy.mounts import default_bpf_dir, find_bpffs, find_cgroup2_root, parse_mountinfo

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 23 0:40 / /sys/fs/bpf rw,relatime shared:9 - bpf bpf rw
"""

UNIFIED_WITH_ESCAPES = """\
29 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate
77 29 0:50 / /mnt/my\\040bpf rw - bpf none rw
"""


def test_hybrid_host_finds_cgroup2_under_unified():
    mounts = parse_mountinfo(HYBRID)
    assert find_cgroup2_root(mounts) == Path("/sys/fs/cgroup/unified")
    assert find_bpffs(mounts) == Path("/sys/fs/bpf")
    assert default_bpf_dir(mounts) == Path("/sys/fs/bpf/cgpolicy")


def test_unified_host_and_octal_escapes_in_mount_points():
    mounts = parse_mountinfo(UNIFIED_WITH_ESCAPES)
    assert find_cgroup2_root(mounts) == Path("/sys/fs/cgroup")
    assert find_bpffs(mounts) == Path("/mnt/my bpf")


def test_no_cgroup2_and_no_bpffs():
    mounts = parse_mountinfo("31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n")
    assert find_cgroup2_root(mounts) is None
    assert find_bpffs(mounts) is None
    assert default_bpf_dir(mounts) == Path("/sys/fs/bpf/cgpolicy")
