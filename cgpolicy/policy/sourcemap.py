"""Where each node of a YAML document was written: the loader records it while it builds the
data, and validation and the model builder ask it for the FILE:LINE:COL of any field path.

A position is one int, ``line << 32 | column`` (both 1-based).
"""

from __future__ import annotations

from array import array
from typing import Any

from cgpolicy.policy.problems import Path


class SourceMap:
    """Where each node of one document was written, stored compactly.

    A position per list item or mapping entry costs 8 or 16 bytes (in arrays beside the
    data); only collections get a dict entry.
    """

    def __init__(self, root: int = 0) -> None:
        self.root = root  # the document's top node, set once it is finished
        self._collections: dict[Path, tuple[array[int], list[Any] | dict[str, Any]]] = {}

    def add(self, path: Path, positions: array[int], container: list[Any] | dict[str, Any]) -> None:
        """Record a finished collection: `positions` holds, per list item, its position,
        and per mapping entry, its key's position then its value's."""
        self._collections[path] = (positions, container)

    def lists_named(self, name: str) -> list[tuple[Path, array[int], list[Any]]]:
        """Every list that is the value of a key ``name``: its path, its items' positions
        and the list itself."""
        return [
            (path, positions, container)
            for path, (positions, container) in self._collections.items()
            if path and path[-1] == name and isinstance(container, list)
        ]

    def locate(self, path: Path, *, key: bool = False) -> tuple[int, int]:
        """(line, column) of the node at `path`, or of its deepest existing ancestor.

        With key=True, a mapping entry is located by its key rather than its value.
        """
        position = self.root
        for depth, part in enumerate(path):
            entry = self._collections.get(path[:depth])
            if entry is None:
                break
            positions, container = entry
            if isinstance(container, dict):
                if part not in container:
                    break
                index = list(container).index(part)
                last = depth == len(path) - 1
                position = positions[2 * index + (0 if key and last else 1)]
            else:
                if not isinstance(part, int) or not 0 <= part < len(container):
                    break
                position = positions[part]
        return position >> 32, position & 0xFFFFFFFF
