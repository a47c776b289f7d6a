"""Resolve a policy's targets (cgroup paths and globs) to cgroup folders that exist now."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from cgpolicy.kernel.cgroup import NotACgroup, cgroup_at, is_cgroup, matching_child_ids
from cgpolicy.policy.model import Target


@dataclass(frozen=True, slots=True, order=True)
class CgroupRef:
    """A cgroup as cgpolicy names it: relative to the cgroup2 mount, plus its kernel id."""

    relative: str
    cgroup_id: int  # the cgroup folder's inode number, which is the kernel's cgroup id

    def path(self, root: Path) -> Path:
        return root / self.relative


@dataclass(frozen=True, slots=True)
class Resolution:
    cgroups: tuple[CgroupRef, ...]
    missing: tuple[str, ...]  # literal target paths that do not exist
    not_cgroups: tuple[str, ...] = ()  # literal target paths that name a file, not a cgroup


def _ref(root: Path, relative: str) -> CgroupRef | None:
    cgroup_id = cgroup_at(root / relative)
    return None if cgroup_id is None else CgroupRef(relative, cgroup_id)


def _glob(root: Path, pattern: str) -> list[tuple[str, int | None]]:
    """Match one path component at a time, so '*' never crosses a '/' (as in a shell).
    Each match with its cgroup id where the folder listing gave it (the last component a
    pattern), else None."""
    matches: list[tuple[str, int | None]] = [("", None)]
    for component in pattern.split("/"):
        next_matches: list[tuple[str, int | None]] = []
        for base, _ in matches:
            if not any(ch in component for ch in "*?["):
                candidate = f"{base}/{component}" if base else component
                if is_cgroup(root / candidate):
                    next_matches.append((candidate, None))
                continue
            for name, cgroup_id in matching_child_ids(root / base if base else root, component):
                next_matches.append((f"{base}/{name}" if base else name, cgroup_id))
        matches = next_matches
    return matches


def resolve_targets(root: Path, targets: tuple[Target, ...]) -> Resolution:
    found: dict[str, CgroupRef] = {}
    missing = []
    not_cgroups = []
    for target in targets:
        matches = _glob(root, target.pattern) if target.is_glob else [(target.pattern, None)]
        for relative, listed_id in matches:
            if listed_id is not None:
                found[relative] = CgroupRef(relative, listed_id)
                continue
            try:
                ref = _ref(root, relative)
            except NotACgroup:
                not_cgroups.append(relative)
                continue
            if ref is not None:
                found[relative] = ref
            elif not target.is_glob:
                missing.append(target.pattern)
    return Resolution(tuple(sorted(found.values())), tuple(missing), tuple(not_cgroups))


def target_covers(target: Target, relative: str) -> bool | None:
    """Whether the cgroup at ``relative`` is one ``target`` resolves to (True), a folder in
    which cgroups it resolves to can appear deeper (None), or neither (False). The same
    matching as :func:`resolve_targets`: one component at a time, '*' never crosses a '/'."""
    wanted = target.pattern.split("/")
    given = relative.split("/")
    if len(given) > len(wanted):
        return False
    for pattern, name in zip(wanted, given, strict=False):
        if not (fnmatchcase(name, pattern) if target.is_glob else name == pattern):
            return False
    return True if len(given) == len(wanted) else None
