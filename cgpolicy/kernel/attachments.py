"""Which programs run at which cgroup hooks, whoever attached them: the kernel's answers to
PROG_QUERY per cgroup and the list of BPF links. Cgroups and links vanish while they are
read (containers exit): whatever disappears mid-way is skipped, never an error."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from cgpolicy.kernel import syscall
from cgpolicy.kernel.bpf import Program
from cgpolicy.kernel.hooks import HOOKS
from cgpolicy.kernel.hooks import hook as hook_named
from cgpolicy.kernel.syscall import BpfError, QueryResult

log = logging.getLogger(__name__)


def links_by_hook() -> dict[tuple[int, int], set[int]]:
    """(cgroup id, attach type) -> ids of programs attached there through a link; empty
    (with a warning) when the kernel cannot list links."""
    found: dict[tuple[int, int], set[int]] = {}
    try:
        link_ids = list(syscall.link_ids())
    except BpfError as error:
        log.warning("cannot list BPF links (%s); every attachment is shown as legacy", error)
        return found
    for link_id in link_ids:
        try:
            fd = syscall.link_get_fd_by_id(link_id)
        except BpfError:
            continue  # gone meanwhile
        try:
            info = syscall.link_info(fd)
        except BpfError:
            continue
        finally:
            os.close(fd)
        if info.type == syscall.LinkType.CGROUP and info.cgroup_id:
            found.setdefault((info.cgroup_id, info.attach_type), set()).add(info.prog_id)
    return found


def own_attachments(path: Path) -> tuple[int, dict[str, QueryResult]] | None:
    """(cgroup id, hook -> the cgroup's own programs and the hook's attach flags) for every
    hook with programs attached at the cgroup itself; None when it vanished."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    states: dict[str, QueryResult] = {}
    try:
        cgroup_id = os.fstat(fd).st_ino
        for name, hook in HOOKS.items():
            try:
                result = syscall.prog_query(fd, hook.attach_type)
            except BpfError as error:
                if error.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOENT):
                    continue  # hook unknown to this kernel, or the cgroup went away
                raise
            if result.prog_ids:
                states[name] = result
    finally:
        os.close(fd)
    return cgroup_id, states


def effective_programs(path: Path, hooks: list[str]) -> list[tuple[str, int]]:
    """(hook, program id) of every program that runs at these hooks for the cgroup at
    ``path``, its own and inherited ones; empty when the cgroup is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return []
    found: list[tuple[str, int]] = []
    try:
        for name in hooks:
            try:
                result = syscall.prog_query(fd, hook_named(name).attach_type, effective=True)
            except BpfError:
                continue
            found.extend((name, prog_id) for prog_id in result.prog_ids)
    finally:
        os.close(fd)
    return found


def program_name(prog_id: int) -> str:
    """The name a program was loaded with; "" when it is gone."""
    try:
        with Program.from_id(prog_id) as program:
            return program.info().name
    except (BpfError, OSError):
        return ""
