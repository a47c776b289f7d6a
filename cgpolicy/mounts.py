"""Where the cgroup v2 hierarchy and bpffs are mounted, read from /proc/self/mountinfo.

The cgroup2 mount point differs between hosts (`/sys/fs/cgroup` on unified hosts,
`/sys/fs/cgroup/unified` on hybrid ones), so it is always discovered, never assumed.
Reading mountinfo is a plain file read: this module makes no bpf() calls.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")
DEFAULT_BPFFS = Path("/sys/fs/bpf")
OWNED_BPF_FOLDER = "cgpolicy"


@dataclass(frozen=True, slots=True)
class Mount:
    mount_point: Path
    fs_type: str
    source: str
    options: str


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040 ...)."""
    return _OCTAL_ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        # "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue"
        pre, sep, post = line.partition(" - ")
        if not sep:
            continue
        pre_fields = pre.split()
        post_fields = post.split()
        if len(pre_fields) < 5 or len(post_fields) < 2:
            continue
        mounts.append(
            Mount(
                mount_point=Path(_unescape(pre_fields[4])),
                fs_type=post_fields[0],
                source=_unescape(post_fields[1]),
                options=post_fields[2] if len(post_fields) > 2 else "",
            )
        )
    return mounts


def read_mounts() -> list[Mount]:
    return parse_mountinfo(MOUNTINFO.read_text())


def find_cgroup2_root(mounts: list[Mount] | None = None) -> Path | None:
    """The first cgroup2 mount, preferring the conventional places when several exist."""
    candidates = [m.mount_point for m in (mounts or read_mounts()) if m.fs_type == "cgroup2"]
    for preferred in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        if preferred in candidates:
            return preferred
    return candidates[0] if candidates else None


def find_bpffs(mounts: list[Mount] | None = None) -> Path | None:
    candidates = [m.mount_point for m in (mounts or read_mounts()) if m.fs_type == "bpf"]
    if DEFAULT_BPFFS in candidates:
        return DEFAULT_BPFFS
    return candidates[0] if candidates else None


def default_bpf_dir(mounts: list[Mount] | None = None) -> Path:
    """cgpolicy's own folder on bpffs: everything it pins lives below it."""
    return (find_bpffs(mounts) or DEFAULT_BPFFS) / OWNED_BPF_FOLDER
