"""Read back what cgpolicy has applied, from its pins and the kernel's own answers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cgpolicy.enforcer import pins
from cgpolicy.kernel.bpf import CgroupLink, Program
from cgpolicy.kernel.hooks import HOOKS
from cgpolicy.kernel.syscall import BpfError


@dataclass(frozen=True)
class AppliedLink:
    cgroup_id: int
    pin: Path
    link_id: int
    prog_id: int
    attached: bool  # False once the link was detached from outside or its cgroup is gone


@dataclass
class AppliedHook:
    hook: str
    prog_id: int | None  # None when the program pin is missing
    links: dict[int, AppliedLink] = field(default_factory=dict)


@dataclass
class AppliedPolicy:
    name: str
    folder: Path
    meta: pins.PolicyMeta | None  # None: a folder without readable metadata (a broken apply)
    hooks: dict[str, AppliedHook] = field(default_factory=dict)

    @property
    def revision(self) -> str | None:
        return self.meta.revision if self.meta else None

    @property
    def interrupted(self) -> bool:
        """An apply stopped half-way (a crash, SIGKILL): links or programs are pinned but
        the metadata is missing or was written for other programs. The next apply of the
        policy reloads it whole; `audit` reports it; `remove` undoes it."""
        pinned = {hook.hook: hook.prog_id for hook in self.hooks.values()}
        return self.meta is None or self.meta.programs != pinned


def _read_link(cgroup_id: int, pin: Path) -> AppliedLink:
    try:
        with CgroupLink.from_pin(pin) as link:
            info = link.info()
    except (BpfError, OSError):
        return AppliedLink(cgroup_id, pin, 0, 0, attached=False)
    attached = info.cgroup_id == cgroup_id
    return AppliedLink(cgroup_id, pin, info.id, info.prog_id, attached)


def _read_prog_id(pin: Path) -> int | None:
    try:
        with Program.from_pin(pin) as program:
            return program.id
    except (BpfError, OSError):
        return None


def observe_policy(folder: Path) -> AppliedPolicy:
    applied = AppliedPolicy(folder.name, folder, pins.read_meta(folder))
    for hook_folder in pins.real_subfolders(folder):
        if hook_folder.name not in HOOKS:
            continue
        hook = AppliedHook(hook_folder.name, _read_prog_id(hook_folder / pins.PROG_PIN))
        for cgroup_id, pin in sorted(pins.link_pins(hook_folder).items()):
            hook.links[cgroup_id] = _read_link(cgroup_id, pin)
        applied.hooks[hook.hook] = hook
    return applied


def observe(bpf_dir: Path) -> dict[str, AppliedPolicy]:
    """Every policy cgpolicy has pinned under ``bpf_dir``, by name."""
    return {folder.name: observe_policy(folder) for folder in pins.policy_folders(bpf_dir)}
