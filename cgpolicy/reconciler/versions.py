"""Which version of each policy file is enforced, and what is said about it.

source.py reads the folder and the last-good store; this module decides, from what was
read, without touching either (docs/reconcile.md, "Bad input never weakens enforcement"):

- a **valid** file: its content now is enforced, and becomes its last good version;
- a **bad** file (invalid or unreadable): its last good version is enforced, from this
  process's memory, else from the store; with neither, nothing from it is enforced, and
  what the kernel has from it stays as it is (decide.py never removes it);
- a name a valid file defines now is that file's: a bad file's last good version does not
  also enforce it, nor does a second bad file's.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cgpolicy.policy.model import Policy
from cgpolicy.policy.validate import LoadResult, Problem

UNREADABLE = "cannot read the file"  # how the problem of a file that is not read begins


@dataclass(frozen=True)
class FileVersion:
    """What one file of the folder contributes to a pass."""

    policies: list[Policy]  # enforced from it: its own if valid, else its last good version
    problems: list[Problem]  # why its content now is not used; empty when it is valid
    last_good: list[Policy] | None  # None: no last good version of it is known


@dataclass(frozen=True)
class Conflict:
    """A policy of a bad file's last good version that another file's policy overrides."""

    name: str
    file: str  # the bad file whose last good version defines it too
    enforced_from: str  # the file whose policy of that name is enforced


def folder_changed(known: Mapping[str, object], present: Mapping[str, object]) -> bool:
    """Whether the folder must be read again: a file appeared or went, or what identifies
    a file's content without reading it (its signature) differs from the last reading."""
    return set(present) != set(known) or any(
        known[file] != signature for file, signature in present.items() if file in known
    )


def judge(
    result: LoadResult, readable: Iterable[str], unreadable: Mapping[str, str]
) -> tuple[dict[str, list[Policy]], dict[str, list[Problem]]]:
    """Split one validation of every readable file into the policies of each valid file and
    the problems of each bad one; ``unreadable`` says why each file that was not read could
    not be (its only problem)."""
    readable = sorted(readable)
    policies: dict[str, list[Policy]] = {file: [] for file in readable}
    for policy in result.policies:
        if policy.source and policy.source.file in policies:
            policies[policy.source.file].append(policy)
    problems: dict[str, list[Problem]] = {}
    for problem in result.problems:
        if problem.file in policies:
            problems.setdefault(problem.file, []).append(problem)
    for file, why in unreadable.items():
        problems[file] = [Problem(file, 0, 0, "", f"{UNREADABLE}: {why}")]
    good = {file: found for file, found in policies.items() if file not in problems}
    return good, problems


def last_good_sources(
    bad: Iterable[str], remembered: Mapping[str, list[Policy]], stored: Collection[str]
) -> tuple[dict[str, list[Policy]], list[str]]:
    """Where each bad file's last good version comes from: this process's memory first
    (``remembered``: what it last saw valid, or took from the store), else the store
    (``stored``: its entries' names), else nowhere. Returns the versions from memory and
    the files whose store entry is to be validated again and used."""
    from_memory: dict[str, list[Policy]] = {}
    from_store: list[str] = []
    for file in sorted(bad):
        if file in remembered:
            from_memory[file] = remembered[file]
        elif Path(file).name in stored:
            from_store.append(file)
    return from_memory, from_store


def enforced_versions(
    good: Mapping[str, list[Policy]],
    problems: Mapping[str, list[Problem]],
    last_good: Mapping[str, list[Policy]],
) -> tuple[dict[str, FileVersion], list[Conflict]]:
    """The version of each file (valid: ``good``; bad: ``problems``) that is enforced,
    by file name order, given the last good versions known of bad files; and the policies
    of last good versions that a valid file's (or an earlier bad file's) override."""
    kept, conflicts = _without_conflicts(good, last_good)
    versions: dict[str, FileVersion] = {}
    for file in sorted({*good, *problems}):
        if file in good:
            versions[file] = FileVersion(good[file], [], good[file])
        elif file in kept:
            versions[file] = FileVersion(kept[file], problems[file], kept[file])
        else:
            versions[file] = FileVersion([], problems[file], None)
    return versions, conflicts


def _without_conflicts(
    good: Mapping[str, list[Policy]], last_good: Mapping[str, list[Policy]]
) -> tuple[dict[str, list[Policy]], list[Conflict]]:
    owner = {policy.name: file for file, policies in good.items() for policy in policies}
    kept: dict[str, list[Policy]] = {}
    conflicts: list[Conflict] = []
    for file in sorted(last_good):
        kept[file] = []
        for policy in last_good[file]:
            if owner.get(policy.name, file) != file:
                conflicts.append(Conflict(policy.name, file, owner[policy.name]))
                continue
            owner[policy.name] = file
            kept[file].append(policy)
    return kept, conflicts
