"""The policy folder as the reconciler sees it: valid files, and the last good version of
files that have turned bad.

A file that fails validation must never weaken what is enforced: its policies keep their
last good version (from this process's memory, or simply left as the kernel has them
after a restart), and nothing that came from it is removed while it exists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cgpolicy.policy.model import Policy
from cgpolicy.policy.validate import POLICY_SUFFIXES, Problem, load_paths

# What identifies a file's content without reading it: device, inode, size, mtime, ctime.
# A ConfigMap's symlink swap changes the inode behind the name.
Signature = tuple[int, int, int, int, int]


def _signature(path: Path) -> Signature | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass
class FileState:
    signature: Signature | None
    policies: list[Policy]  # the policies in force for this file (last good if invalid)
    problems: list[Problem]


@dataclass
class Snapshot:
    """One reading of the folder."""

    policies: list[Policy]  # everything to enforce
    invalid_files: dict[str, list[Problem]]  # file -> its current problems
    files: set[str]  # every policy file present now
    changed: bool  # anything differs from the previous reading
    signatures: dict[str, Signature | None] = field(default_factory=dict)


class PolicySource:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._files: dict[str, FileState] = {}

    def _list(self) -> list[Path]:
        try:
            entries = sorted(self.folder.iterdir())
        except OSError:
            return []
        return [
            p
            for p in entries
            if p.suffix in POLICY_SUFFIXES and not p.name.startswith(".") and p.is_file()
        ]

    def read(self) -> Snapshot:
        """Re-read the files that changed; keep each bad file's last good policies."""
        present = {str(p): _signature(p) for p in self._list()}
        changed = set(present) != set(self._files) or any(
            self._files[f].signature != sig for f, sig in present.items() if f in self._files
        )
        if changed:
            self._reload(present)
        policies = [p for state in self._files.values() for p in state.policies]
        invalid = {f: s.problems for f, s in self._files.items() if s.problems}
        return Snapshot(policies, invalid, set(present), changed, present)

    def _reload(self, present: dict[str, Signature | None]) -> None:
        # Every file is validated together, so that names must be unique across files.
        result = load_paths(sorted(present))
        by_file: dict[str, list[Policy]] = {f: [] for f in present}
        problems: dict[str, list[Problem]] = {f: [] for f in present}
        for policy in result.policies:
            if policy.source and policy.source.file in by_file:
                by_file[policy.source.file].append(policy)
        for problem in result.problems:
            problems.setdefault(problem.file, []).append(problem)
        files = {}
        for file, signature in present.items():
            file_problems = problems.get(file, [])
            if file_problems:
                previous = self._files.get(file)
                kept = previous.policies if previous else []
                files[file] = FileState(signature, kept, file_problems)
            else:
                files[file] = FileState(signature, by_file[file], [])
        self._files = files
