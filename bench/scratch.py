"""Scratch cgroups and pins for one benchmark, and their removal.

    <cgroup2>/cgpolicy-bench-<pid>/<benchmark>/...   cgroups
    <bpffs>/cgpolicy-bench-<pid>/<benchmark>/...     the Enforcer's bpf_dir

``close()`` detaches everything through the Enforcer's own removal, then removes the
cgroups (killing anything left in them) and the pin folders.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from cgpolicy.enforcer.engine import Enforcer, Planned
from cgpolicy.kernel.cgroup import ensure_bpffs, remove_cgroup_tree
from cgpolicy.mounts import find_cgroup2_root
from cgpolicy.policy.model import Policy

log = logging.getLogger(__name__)

PREFIX = "cgpolicy-bench"


def top_folders() -> tuple[Path, Path, Path]:
    """(cgroup2 root, this process's cgroup parent, this process's bpffs folder)."""
    root = find_cgroup2_root()
    if root is None:
        raise RuntimeError("no cgroup2 mount (see /proc/self/mountinfo)")
    bpffs = ensure_bpffs()
    name = f"{PREFIX}-{os.getpid()}"
    return root, root / name, bpffs / name


class Scratch:
    """One benchmark's cgroups and Enforcer."""

    def __init__(self, benchmark: str) -> None:
        self.root, cgroup_top, bpf_top = top_folders()
        self.cgroup_dir = cgroup_top / benchmark
        self.bpf_dir = bpf_top / benchmark
        self.cgroup_dir.mkdir(parents=True)
        self.bpf_dir.mkdir(parents=True)
        self.enforcer = Enforcer(self.root, self.bpf_dir, in_place=True)  # as the service

    def relative(self, *parts: str) -> str:
        """A path below this benchmark's cgroup folder, as a policy target names it."""
        return str(self.cgroup_dir.relative_to(self.root).joinpath(*parts))

    def make_cgroups(self, names: list[str]) -> list[str]:
        for name in names:
            (self.cgroup_dir / name).mkdir()
        return [self.relative(name) for name in names]

    def plan_apply(self, policies: list[Policy]) -> list[Planned]:
        """Enforcer.plan then Enforcer.apply, raising if any policy was not applied."""
        planned = self.enforcer.plan(policies)
        outcomes = self.enforcer.apply(planned)
        failed = [f"{o.plan.name}: {o.error}" for o in outcomes if not o.ok]
        if failed:
            raise RuntimeError("apply failed: " + "; ".join(failed[:3]))
        return planned

    def close(self) -> None:
        try:
            removal = self.enforcer.plan_removal(None, force=True)  # a daemon's too
            for outcome in self.enforcer.apply(removal):
                if not outcome.ok:
                    log.warning("removing %s: %s", outcome.plan.name, outcome.error)
        finally:
            remove_cgroup_tree(self.cgroup_dir)
            shutil.rmtree(self.bpf_dir, ignore_errors=True)

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def remove_top_folders() -> None:
    """The per-process parents, once every benchmark has removed its own part."""
    _, cgroup_top, bpf_top = top_folders()
    remove_cgroup_tree(cgroup_top)
    shutil.rmtree(bpf_top, ignore_errors=True)
