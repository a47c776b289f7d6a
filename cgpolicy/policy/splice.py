"""A policy file read again when only items of its `cidrs` lists were rewritten.

The reconcile service keeps each file's last bytes and what was checked in it
(validate.FileMemo). When the new bytes differ from those only in whole lines, each of which
was one `cidrs` item of a valid policy and is one again, written the same way (same
indentation, same quoting, nothing else on the line, a plain one not ending in ':'), in a
file whose only line breaks are newlines (YAML's line numbers are then the file's), the
file's YAML structure is the same: only those items' values changed. Every check of a
CIDR item looks at that item alone (its schema: a string of the address pattern; its
semantics: :func:`~cgpolicy.policy.semantic.cidr_item_problem`), and the lists keep their
lengths, so checking the new items alone gives the answer that reading the whole file
would, and the policy is the old one with those items replaced. A change of one prefix in a
10,000-prefix list then costs what its line costs, not the file (the figure is
bench/compare.py's). Anything else, or any doubt, returns None: the file is read whole, as always.
"""

from __future__ import annotations

import dataclasses
import re
from array import array
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import yaml

from cgpolicy.policy.model import (
    AddressRule,
    CidrEdit,
    Derivation,
    Policy,
)
from cgpolicy.policy.prefixes import Prefixes, network_of
from cgpolicy.policy.problems import Path
from cgpolicy.policy.semantic import cidr_item_problem, cidr_key
from cgpolicy.policy.sourcemap import SourceMap

# One list item on its own line: indentation, "- ", a scalar of address characters, plain
# or quoted, and optional trailing blanks. No comment, no flow collection, no escape.
_ITEM = re.compile(rb"( *)- (\"|'|)([0-9A-Fa-f:./]{1,64})\2 *")
_STR = "tag:yaml.org,2002:str"
_LONE_CR = re.compile(rb"\r(?!\n)")
_OTHER_BREAKS = tuple(mark.encode() for mark in "\x85\u2028\u2029")  # NEL, LS, PS (UTF-8)
MAX_SPLICED_LINES = 1000  # more changed lines than this: read the file whole
# where a list of CIDR items may be, by path (spec, group, section, "rules", index, "cidrs")
_SECTIONS = {
    ("network", "ingress"),
    ("network", "egress"),
    ("sockets", "bind"),
    ("sockets", "connect"),
}


@dataclass(frozen=True)
class CidrList:
    """Where a `cidrs` list of a valid policy was written: its items' texts and positions
    (line << 32 | column, in file order)."""

    path: Path  # ("spec", "network", "egress", "rules", 3, "cidrs")
    positions: array[int]
    items: list[Any]

    @property
    def lines(self) -> tuple[int, int]:
        return self.positions[0] >> 32, self.positions[-1] >> 32


def cidr_lists(source_map: SourceMap) -> tuple[CidrList, ...]:
    """The `cidrs` lists of a document's rules (a valid policy's, so every item is a
    string)."""
    return tuple(
        CidrList(path, positions, items)
        for path, positions, items in source_map.lists_named("cidrs")
        if len(path) == 6 and path[0] == "spec" and path[1:3] in _SECTIONS and items
    )


Spliced = tuple[Policy, tuple[CidrList, ...]]


def splice(
    old: bytes,
    new: bytes,
    documents: Sequence[Spliced],
    item_valid: Callable[[str], bool],
) -> list[Spliced] | None:
    """The policies of ``new`` (with their lists), made from those of ``old`` when the two
    differ only in CIDR items (module docstring); None otherwise. ``documents``: the valid
    policies of ``old`` with their lists; ``item_valid``: the schema's check of one item."""
    changed = _changed_lines(old, new) if _lines_are_yamls(old) else None
    if not changed:
        return None
    edits: dict[tuple[int, int], dict[int, str]] = {}  # (document, list) -> item -> text
    for number, before, after in changed:
        found = _item(number, before, after, documents)
        if found is None:
            return None
        document, which, index, text = found
        edits.setdefault((document, which), {})[index] = text
    result = list(documents)
    by_document: dict[int, list[tuple[int, dict[int, str]]]] = {}
    for (document, which), items in edits.items():
        by_document.setdefault(document, []).append((which, items))
    for document, lists in by_document.items():
        made = _apply(documents[document], lists, item_valid)
        if made is None:
            return None
        result[document] = made
    return result


def _changed_lines(old: bytes, new: bytes) -> list[tuple[int, bytes, bytes]] | None:
    """(line number, old line, new line) of each line that differs; None when the files
    do not have the same number of lines or too many differ. Only the lines between the
    first and the last difference are split and compared."""
    head = _common_prefix(old, new)
    tail = _common_prefix(old[::-1], new[::-1], min(len(old), len(new)) - head)
    start = old.rfind(b"\n", 0, head) + 1  # the first changed line's start, in both
    before = old[start : old.find(b"\n", len(old) - tail) % (len(old) + 1)].split(b"\n")
    after = new[start : new.find(b"\n", len(new) - tail) % (len(new) + 1)].split(b"\n")
    if len(before) != len(after) or len(before) > MAX_SPLICED_LINES:
        return None
    first = old.count(b"\n", 0, start) + 1
    return [
        (number, was, now)
        for number, (was, now) in enumerate(zip(before, after, strict=True), first)
        if was != now
    ]


def _lines_are_yamls(content: bytes) -> bool:
    """Whether YAML's lines in ``content`` are its b"\\n" lines: YAML also ends a line at a
    lone CR, NEL, LS and PS, and then the line numbers of the source map are not those
    counted here (an item would be taken for the one a few lines up). The other lines of
    the new bytes are the same, or an item's, which has none of these."""
    if b"\r" in content and _LONE_CR.search(content):
        return False
    return content.isascii() or not any(mark in content for mark in _OTHER_BREAKS)


def _common_prefix(a: bytes, b: bytes, most: int | None = None) -> int:
    """How many first bytes ``a`` and ``b`` share (at most ``most``): a binary search of
    slice comparisons, each a memcmp."""
    low, high = 0, min(len(a), len(b)) if most is None else most
    while low < high:
        middle = (low + high + 1) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def _item(
    number: int, before: bytes, after: bytes, documents: Sequence[Spliced]
) -> tuple[int, int, int, str] | None:
    """(document, list, item index, new text) of a changed line that was a CIDR item
    alone on its line and is one again, written the same way; None otherwise."""
    was, now = _ITEM.fullmatch(before), _ITEM.fullmatch(after)
    if was is None or now is None or was.group(1, 2) != now.group(1, 2):
        return None
    text = now.group(3).decode()
    # plain: YAML must read it as a string, and a last ':' would end a key (`- fd00::` is
    # a mapping)
    if not was.group(2) and (_resolve(text) != _STR or text.endswith(":")):
        return None
    column = len(was.group(1)) + 3  # where the scalar (or its quote) starts, 1-based
    for document, (_, lists) in enumerate(documents):
        for which, found in enumerate(lists):
            first, last = found.lines
            if not first <= number <= last:
                continue
            index = bisect_left(found.positions, number << 32)
            if (
                index < len(found.positions)
                and found.positions[index] == (number << 32 | column)
                and found.items[index] == was.group(3).decode()
            ):
                return document, which, index, text
            return None
    return None


def _apply(
    document: Spliced, lists: list[tuple[int, dict[int, str]]], item_valid: Callable[[str], bool]
) -> Spliced | None:
    """The document's policy with the new items, if each is a valid item of its rule."""
    policy, cidrs = document
    new_lists = list(cidrs)
    edits: list[tuple[int, CidrEdit]] = []
    for which, items in lists:
        found = cidrs[which]
        where, index = f"{found.path[1]}.{found.path[2]}", found.path[4]
        rule = _rule(policy, where, index)
        if rule is None or not isinstance(index, int):
            return None
        protocol = rule.protocol if where.startswith("network.") else "any"
        texts = list(found.items)
        keys = list(rule.cidrs.keys)
        removed, added = [], []
        for item, text in items.items():
            if not item_valid(text) or cidr_item_problem(text, protocol) is not None:
                return None
            removed.append(network_of(keys[item]))
            keys[item] = cidr_key(text)
            added.append(network_of(keys[item]))
            texts[item] = text
        new_rule = dataclasses.replace(rule, cidrs=Prefixes(keys))
        edits.append((index, CidrEdit(where, rule, new_rule, tuple(removed), tuple(added))))
        new_lists[which] = CidrList(found.path, found.positions, texts)
    made = _replace_rules(policy, edits)
    made = dataclasses.replace(made, derived=Derivation(policy, tuple(e for _, e in edits)))
    return made, tuple(new_lists)


def section_at(policy: Policy, where: str) -> Any:
    """The section at ``where`` (network.egress, sockets.bind...), or None."""
    group, name = where.split(".")
    return getattr(getattr(policy, group), name, None)


def _rule(policy: Policy, where: str, index: Any) -> AddressRule | None:
    rules = getattr(section_at(policy, where), "rules", ())
    return rules[index] if isinstance(index, int) and 0 <= index < len(rules) else None


def _replace_rules(policy: Policy, edits: list[tuple[int, CidrEdit]]) -> Policy:
    """``policy`` with each edit's new rule at its index in its section."""
    for index, edit in edits:
        section = section_at(policy, edit.where)
        rules = section.rules[:index] + (edit.new,) + section.rules[index + 1 :]
        section = dataclasses.replace(section, rules=rules)
        network, sockets = policy.network, policy.sockets
        if edit.where == "network.ingress" and network is not None:
            policy = dataclasses.replace(
                policy, network=dataclasses.replace(network, ingress=section)
            )
        elif edit.where == "network.egress" and network is not None:
            policy = dataclasses.replace(
                policy, network=dataclasses.replace(network, egress=section)
            )
        elif edit.where == "sockets.bind" and sockets is not None:
            policy = dataclasses.replace(policy, sockets=dataclasses.replace(sockets, bind=section))
        elif edit.where == "sockets.connect" and sockets is not None:
            policy = dataclasses.replace(
                policy, sockets=dataclasses.replace(sockets, connect=section)
            )
    return policy


@cache
def _resolver() -> yaml.resolver.Resolver:
    return yaml.resolver.Resolver()


def _resolve(text: str) -> str:
    """The tag YAML gives a plain scalar (what the loader's resolver says)."""
    return str(_resolver().resolve(yaml.ScalarNode, text, (True, False)))
