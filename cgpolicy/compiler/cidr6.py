"""The prefix index of bpf/net.c (cgp_cidr_index), for both address families: an
open-addressed hash table in a BPF array, hashed by the program itself, whose entries list
the longer lengths to probe inside them; it replaces the LPM trie, whose lookup cost grows
with its size. An IPv4 prefix a.b.c.d/n is the IPv6 prefix ::ffff:a.b.c.d/(96 + n), looked
up from a root of its own within CIDR4_PROBES probes (:func:`cidr_maps`: the three roots).

Layout (the C comment above cgp_cidr_index says the same from the program's side):

- ``cidr6_root`` (CIDR_ROOTS entries per copy, struct cgp_root6): per root, the mask of
  the rules containing every address it serves (``::/0``, ``0.0.0.0/0``), the table's hash
  shift and the root's list of lengths to probe.
- ``cidr6_slots`` (struct cgp_slot6, 32 B): one slot per entry, an entry being a stored
  prefix or a marker (a prefix that is not stored but leads to stored longer ones), keyed
  by (length, address masked to it): the OR-propagated mask of every stored prefix
  containing the key, and the list of lengths (at most CIDR6_LIST - 1, longest first) to
  probe for a longer match inside it.

A lookup probes the root's lengths from the longest down; a hit replaces the result with
the hit's mask and goes on with the hit's own list; a miss goes on with the next length of
the current list. So it probes one list at a time, and every hit is the longest stored
prefix or marker found so far: the last hit's mask is the answer. The compiler makes each
node's list (the root's, a marker's) one of:

- flat: every length of the stored prefixes inside the node, when there are at most
  ``flat_max`` of them (the usual list: all /48, /64 or /128 is a one-probe root);
- a bucket: the node's shortest length alone, every longer prefix behind a marker at that
  length (a /32 holding them, say), when that splits the node (no marker region holds
  more than half of its prefixes) and the budget left allows it;
- balanced: segments of the node's lengths, each headed by its shortest length and the
  longer ones behind markers there, sized so that the worst address costs the fewest
  probes (a binary search on lengths: at most 8 probes for all 128 lengths).

Every address costs at most CIDR6_PROBES probes, an IPv4 or IPv4-mapped one CIDR4_PROBES (by
construction: each node is built within the budget its parent leaves;
tests/unit/test_cidr6_index.py checks it), each hashing the masked address and scanning at
most CIDR6_SPAN slots from its home slot.
"""

from __future__ import annotations

import collections
import functools
import operator
from itertools import accumulate

from cgpolicy.compiler.spec import CompileError, MapSpec
from cgpolicy.contract import (
    CIDR4_PROBES,
    CIDR6_HASH_LO,
    CIDR6_HASH_MUL,
    CIDR6_LIST,
    CIDR6_PROBES,
    CIDR6_ROOT,
    CIDR6_SLOT,
    CIDR6_SPAN,
    CIDR_ROOT_MAPPED,
    CIDR_ROOT_V4,
    CIDR_ROOT_V6,
    U32,
)

CIDR6_FLAT_MAX = 4  # a node with at most this many distinct lengths lists them all
_LENGTHS = CIDR6_LIST - 1  # lengths in a list: its last byte stays 0 (net.c reads 8 bytes)
_M64 = (1 << 64) - 1
_FULL = (1 << 128) - 1

Prefix = tuple[int, int]  # (length, network address as a 128-bit int)


@functools.cache
def _capacity(budget: int) -> int:
    """How many distinct lengths a node can hold and still answer within ``budget`` probes
    (balanced segments): the i-th segment from the top costs i probes before its own."""
    return sum(1 + _capacity(budget - i) for i in range(1, min(_LENGTHS, budget) + 1))


def _worst(count: int) -> int:
    """The fewest probes that a node of ``count`` distinct lengths can be bounded by."""
    budget = 0
    while _capacity(budget) < count:
        budget += 1
    return budget


def _keep(length: int) -> int:
    return _FULL ^ (_FULL >> length)


@functools.cache
def _list_bytes(lengths: tuple[int, ...]) -> bytes:
    return bytes(lengths).ljust(CIDR6_LIST, b"\0")


_EMPTY = _list_bytes(())
_LITTLE16 = operator.methodcaller("to_bytes", 16, "little")  # a slot's addr


class _Builder:
    """The entries (stored prefixes and markers) as parallel lists, with their masks
    propagated top-down: a node passes its own mask (that of every stored prefix
    containing it) to what lies inside it."""

    def __init__(self, own: dict[Prefix, int], flat_max: int) -> None:
        self.own = own
        self.flat_max = flat_max
        self.keys: list[Prefix] = []
        self.masks: list[int] = []
        self.lists: list[bytes] = []

    def emit(self, key: Prefix, mask: int, lengths: tuple[int, ...]) -> None:
        self.keys.append(key)
        self.masks.append(mask)
        self.lists.append(_list_bytes(lengths))

    def node(self, prefixes: list[Prefix], inherited: int, budget: int) -> tuple[int, ...]:
        """Emit the entries of a node holding ``prefixes`` (all inside it and longer than
        it; ``inherited``: the node's mask) and give its list; every address in the node
        costs at most ``budget`` probes."""
        lengths = sorted({length for length, _ in prefixes})
        count = len(lengths)
        if count <= min(self.flat_max, _LENGTHS, budget):
            self._flat(prefixes, lengths, inherited)
            return tuple(reversed(lengths))
        if budget - 1 >= _worst(count - 1) and self._bucket(
            prefixes, lengths[0], inherited, budget - 1
        ):
            return (lengths[0],)
        # balanced: from the longest, segment i holds at most 1 + _capacity(budget - i)
        worst = _worst(count)
        heads: list[int] = []
        top = count
        for i in range(1, _LENGTHS + 1):
            size = min(top, 1 + _capacity(worst - i))
            top -= size
            heads.append(lengths[top])
            if top == 0:
                break
        at_heads = set(heads)
        groups: dict[Prefix, tuple[int, list[Prefix]]] = {}
        for i, head in enumerate(heads):
            below = 129 if i == 0 else heads[i - 1]
            inside = [p for p in prefixes if head < p[0] < below]
            groups.update((key, (i, members)) for key, members in _groups(inside, head).items())
        masks = _propagate({*prefixes, *groups}, self.own, inherited)
        for prefix in prefixes:
            if prefix[0] in at_heads and prefix not in groups:
                self.emit(prefix, masks[prefix], ())
        for key, (i, members) in groups.items():
            self._children({key: members}, {key: masks[key]}, budget - 1 - i)
        return tuple(heads)

    def _bucket(self, prefixes: list[Prefix], head: int, inherited: int, budget: int) -> bool:
        """Put every prefix longer than ``head`` (the node's shortest length) behind a
        marker at ``head``, if no marker then holds more than half of the node's prefixes.
        Most markers of a wide list hold one prefix: those are done in bulk."""
        keep = _keep(head)
        longer = [p for p in prefixes if p[0] > head]
        regions = [value & keep for _, value in longer]
        counts = collections.Counter(regions)
        if max(counts.values(), default=0) * 2 > len(prefixes):
            return False
        own = self.own
        at_head = {value: own[(length, value)] for length, value in prefixes if length == head}
        marker_mask = {r: inherited | at_head.get(r, 0) for r in counts} if at_head else None
        # the stored prefixes at head with nothing behind them
        leaves = [(head, value) for value in at_head if value not in counts]
        self.keys += leaves
        self.masks += [own[key] | inherited for key in leaves]
        self.lists += [_EMPTY] * len(leaves)
        single = [(p, r) for p, r in zip(longer, regions, strict=True) if counts[r] == 1]
        markers = [(head, r) for _, r in single]
        if marker_mask is None:
            masks = [inherited] * len(single)
        else:
            masks = [marker_mask[r] for _, r in single]
        self.keys += [p for p, _ in single]
        self.masks += [own[p] | mask for (p, _), mask in zip(single, masks, strict=True)]
        self.lists += [_EMPTY] * len(single)
        self.keys += markers
        self.masks += masks
        self.lists += [_list_bytes((p[0],)) for p, _ in single]
        groups: dict[int, list[Prefix]] = {}
        for prefix, region in zip(longer, regions, strict=True):
            if counts[region] > 1:
                groups.setdefault(region, []).append(prefix)
        for region, inside in groups.items():
            mask = inherited if marker_mask is None else marker_mask[region]
            self.emit((head, region), mask, self.node(inside, mask, budget))
        return True

    def _flat(self, prefixes: list[Prefix], lengths: list[int], inherited: int) -> None:
        own = self.own
        self.keys.extend(prefixes)
        self.lists.extend([_EMPTY] * len(prefixes))
        if len(lengths) == 1:
            self.masks.extend([own[p] | inherited for p in prefixes])
            return
        for length, value in prefixes:  # a stored prefix inside it is of a length here
            mask = own[(length, value)] | inherited
            for shorter in lengths:
                if shorter >= length:
                    break
                mask |= own.get((shorter, value & _keep(shorter)), 0)
            self.masks.append(mask)

    def _children(
        self, groups: dict[Prefix, list[Prefix]], masks: dict[Prefix, int], budget: int
    ) -> None:
        own = self.own
        for key, inside in groups.items():
            mask = masks[key]
            if len(inside) == 1:
                child = inside[0]
                self.emit(child, own[child] | mask, ())
                self.emit(key, mask, (child[0],))
            else:
                self.emit(key, mask, self.node(inside, mask, budget))


def _groups(prefixes: list[Prefix], head: int) -> dict[Prefix, list[Prefix]]:
    """The prefixes longer than ``head``, by the marker (head, their first head bits)."""
    keep = _keep(head)
    groups: dict[Prefix, list[Prefix]] = {}
    for prefix in prefixes:
        if prefix[0] > head:
            key = (head, prefix[1] & keep)
            found = groups.get(key)
            if found is None:
                groups[key] = [prefix]
            else:
                found.append(prefix)
    return groups


def _propagate(entries: set[Prefix], own: dict[Prefix, int], base: int) -> dict[Prefix, int]:
    """Every entry's mask: the OR of ``base`` and the masks of the stored prefixes among
    ``entries`` containing it (itself included). One sweep in address order with a stack of
    the entries containing the current one: each entry's mask is its own and the innermost
    containing entry's (already propagated)."""
    masks: dict[Prefix, int] = {}
    stack: list[tuple[int, int]] = []  # (last address, mask)
    for key in sorted(value << 8 | length for length, value in entries):
        length, value = key & 0xFF, key >> 8
        while stack and value > stack[-1][0]:
            stack.pop()
        mask = own.get((length, value), 0) | (stack[-1][1] if stack else base)
        masks[(length, value)] = mask
        stack.append((value | (_FULL >> length), mask))
    return masks


def cidr6_layout(
    v6: dict[Prefix, int], flat_max: int = CIDR6_FLAT_MAX, probes: int = CIDR6_PROBES
) -> tuple[tuple[int, tuple[int, ...]], list[Prefix], list[int], list[bytes]]:
    """The index of ``v6`` ((length, address) -> rule mask): the root (mask of ::/0, list)
    and every entry's key, mask and packed list, in parallel lists; no address costs more
    than ``probes`` probes."""
    root_mask = v6.get((0, 0), 0)
    prefixes = [key for key in v6 if key[0]]
    builder = _Builder(v6, flat_max)
    root_list = builder.node(prefixes, root_mask, probes) if prefixes else ()
    return (root_mask, root_list), builder.keys, builder.masks, builder.lists


def _homes(keys: list[Prefix], shift: int) -> list[int]:
    """bpf/net.c cgp_cidr_hash: the slot each key hashes to."""
    return [
        (((value >> 64) ^ ((value & _M64) * CIDR6_HASH_LO & _M64) ^ length) * CIDR6_HASH_MUL & _M64)
        >> shift
        for length, value in keys
    ]


def _place(keys: list[Prefix]) -> tuple[int, list[int], list[int]]:
    """The table's hash shift, the keys' order in the table and their slots: linear
    probing with the keys in home order (each slot the first free one from its home), the
    table grown until every key lies within CIDR6_SPAN slots of its home."""
    bits = max(1, (2 * len(keys) - 1).bit_length())  # at most half full
    while bits <= 32:
        shift = 64 - bits
        homes = _homes(keys, shift)
        order = sorted(range(len(keys)), key=homes.__getitem__)
        ordered = [homes[i] for i in order]
        # slot k = k + max(home j - j, j <= k): the first free one from each home
        slots = [
            k + m
            for k, m in enumerate(accumulate([home - k for k, home in enumerate(ordered)], max))
        ]
        if not slots or max(map(int.__sub__, slots, ordered)) < CIDR6_SPAN:
            return shift, order, slots
        bits += 1
    raise CompileError("prefixes: no hash table layout found")  # cannot happen


MAPPED = 0xFFFF << 32  # ::ffff:0:0, the /96 of the IPv4-mapped IPv6 addresses
MAPPED_OWN = 64  # added to the lengths of the mapped root's own entries (161..192)


def mapped4(v4: dict[Prefix, int]) -> dict[Prefix, int]:
    """IPv4 prefixes as the index keys them: a.b.c.d/n as ::ffff:a.b.c.d/(96 + n), and
    0.0.0.0/0 as the root's mask (the key (0, 0))."""
    keyed = {(96 + length, MAPPED | value): mask for (length, value), mask in v4.items()}
    if (96, MAPPED) in keyed:
        keyed[(0, 0)] = keyed.pop((96, MAPPED))
    return keyed


def mapped_split(v6: dict[Prefix, int]) -> tuple[dict[Prefix, int], dict[Prefix, int], int]:
    """``v6`` seen from the mapped addresses: the prefixes outside ::ffff:0:0/96 (the IPv6
    root's), those longer than /96 inside it (as IPv4 prefixes: 32-bit addresses, length -
    96), and the mask of the rules whose prefixes contain all of it (::/0, ::ffff:0:0/96,
    ...)."""
    outside: dict[Prefix, int] = {}
    inside: dict[Prefix, int] = {}
    every = 0
    for (length, value), mask in v6.items():
        if length >= 96 and value >> 32 == 0xFFFF:  # inside ::ffff:0:0/96
            if length == 96:
                every |= mask
            else:
                inside[(length - 96, value & 0xFFFFFFFF)] = mask
            continue
        if MAPPED & _keep(length) == value:  # contains it
            every |= mask
        outside[(length, value)] = mask
    return outside, inside, every


@functools.cache
def _own(packed: bytes) -> bytes:
    """A packed list of the mapped root's own entries: every length + MAPPED_OWN."""
    return bytes(length + MAPPED_OWN if length else 0 for length in packed)


def cidr_maps(
    v4: dict[Prefix, int], v6: dict[Prefix, int], flat_max: int = CIDR6_FLAT_MAX
) -> dict[str, MapSpec]:
    """The maps of bpf/net.c's index, cidr6_root and cidr6_slots, for the IPv4 prefixes
    ``v4`` (32-bit addresses) and the IPv6 ones ``v6``: three roots per copy (contract
    CIDR_ROOT_*), all on one table of slots:

    - the IPv6 root: the IPv6 prefixes outside ::ffff:0:0/96 (only a mapped address is
      inside, and it never walks from here);
    - the IPv4 root: the IPv4 prefixes as ::ffff:a.b.c.d/(96 + n), lengths 97..128,
      within CIDR4_PROBES probes;
    - the mapped root, for ::ffff:a.b.c.d: the IPv4 prefixes, and the IPv6 ones inside
      ::ffff:0:0/96 (IPv4-mapped rules), its mask also holding the IPv6 rules whose
      prefixes contain all of it (::/0). When it holds nothing the IPv4 root does not
      (the usual case) it is the IPv4 root, sharing its entries; else it has entries of
      its own, their lengths + MAPPED_OWN (161..192, which the program masks as 97..128
      and hashes as they are): a plain IPv4 address never meets them.

    The IPv6 root's keys lie outside ::ffff:0:0/96 or contain it (markers), the others
    inside it at lengths the IPv6 root does not have: one table holds them all."""
    outside, inside, every = mapped_split(v6)
    (m6, l6), keys, masks, lists = cidr6_layout(outside, flat_max, CIDR6_PROBES)
    keyed4 = mapped4(v4)
    (m4, l4), k4, ms4, ls4 = cidr6_layout(keyed4, flat_max, CIDR4_PROBES)
    roots = {CIDR_ROOT_V6: (m6, l6), CIDR_ROOT_V4: (m4, l4), CIDR_ROOT_MAPPED: (m4, l4)}
    keys += k4
    masks += ms4
    lists += ls4
    if inside or every & ~m4:
        for key, mask in mapped4(inside).items():
            keyed4[key] = keyed4.get(key, 0) | mask
        keyed4[(0, 0)] = m4 | every
        (mm, ml), km, msm, lsm = cidr6_layout(keyed4, flat_max, CIDR4_PROBES)
        roots[CIDR_ROOT_MAPPED] = (mm, tuple(length + MAPPED_OWN for length in ml))
        keys += [(length + MAPPED_OWN, value) for length, value in km]
        masks += msm
        lists += map(_own, lsm)
    return _index_maps([roots[i] for i in sorted(roots)], keys, masks, lists)


def _index_maps(
    roots: list[tuple[int, tuple[int, ...]]],
    keys: list[Prefix],
    masks: list[int],
    lists: list[bytes],
) -> dict[str, MapSpec]:
    """cidr6_root (``roots``: (mask, list) each, per copy) and cidr6_slots holding the
    entries ``keys`` with their masks and packed lists."""
    shift, order, slots = _place(keys)
    values = list(
        map(
            CIDR6_SLOT.struct.pack,  # addr, mask, len, next
            map(_LITTLE16, [value for _, value in keys]),
            masks,
            [length for length, _ in keys],
            lists,
        )
    )
    ordered = operator.itemgetter(*order)(values) if len(values) > 1 else values
    size = (1 << (64 - shift)) + CIDR6_SPAN  # no wrap-around: a key's span stays inside
    packed = tuple(
        (U32.pack(i), CIDR6_ROOT.struct.pack(mask, shift, _list_bytes(lengths)))
        for i, (mask, lengths) in enumerate(roots)
    )
    return {
        # two copies of each (bpf/net.c `generation`): copy 1 at index max_entries / 2 + i
        "cidr6_root": MapSpec(
            "cidr6_root",
            "array",
            U32.size,
            CIDR6_ROOT.size,
            2 * len(roots),
            0,
            packed,
            two_copies=True,
        ),
        "cidr6_slots": MapSpec(
            "cidr6_slots",
            "array",
            U32.size,
            CIDR6_SLOT.size,
            2 * size,
            0,
            tuple(zip(map(U32.pack, slots), ordered, strict=True)),
            two_copies=True,
        ),
    }
