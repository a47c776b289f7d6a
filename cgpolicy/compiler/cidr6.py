"""The prefix indexes of bpf/net.c (cgp_cidr_index), one per address family: an
open-addressed hash table in a BPF array, hashed by the program itself, whose entries list
the longer lengths to probe inside them; it replaces the LPM trie, whose lookup cost grows
with its size. IPv4 uses the same index in maps of its own (cidr4_root, cidr4_slots), an
IPv4 prefix a.b.c.d/n being the 128-bit prefix with a.b.c.d as its top 32 bits and the
same length (0..32), probed at most CIDR4_PROBES times.

Layout (the C comment above cgp_cidr_index says the same from the program's side):

- ``cidr6_root`` (1 entry per copy, struct cgp_root6): the mask of the rules listing
  ``::/0``, the table's hash shift and the root's list of lengths to probe.
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

Every address costs at most CIDR6_PROBES probes, an IPv4 one CIDR4_PROBES (by
construction: each node is built within the budget its parent leaves;
tests/unit/test_cidr6_index.py checks it), each hashing the masked address and scanning at
most CIDR6_SPAN slots from its home slot.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import operator
import threading
from itertools import accumulate

from cgpolicy.compiler.spec import CompileError, EntryChange, MapSpec
from cgpolicy.contract import (
    CIDR4_PROBES,
    CIDR6_HASH_LO,
    CIDR6_HASH_MUL,
    CIDR6_LIST,
    CIDR6_PROBES,
    CIDR6_ROOT,
    CIDR6_SLOT,
    CIDR6_SPAN,
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


def widen4(v4: dict[Prefix, int]) -> dict[Prefix, int]:
    """IPv4 prefixes as the index keys them: the address as the top 32 of 128 bits."""
    return {(length, value << 96): mask for (length, value), mask in v4.items()}


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


def cidr6_maps(v6: dict[Prefix, int], flat_max: int = CIDR6_FLAT_MAX) -> dict[str, MapSpec]:
    """The IPv6 maps of bpf/net.c: cidr6_root and cidr6_slots."""
    return _index_maps("cidr6", v6, flat_max, CIDR6_PROBES)


def cidr4_maps(v4: dict[Prefix, int], flat_max: int = CIDR6_FLAT_MAX) -> dict[str, MapSpec]:
    """The IPv4 maps of bpf/net.c: cidr4_root and cidr4_slots (``v4``: 32-bit addresses)."""
    return _index_maps("cidr4", widen4(v4), flat_max, CIDR4_PROBES)


def _index_maps(
    family: str, prefixes: dict[Prefix, int], flat_max: int, probes: int
) -> dict[str, MapSpec]:
    """``family``_root and ``family``_slots holding the index of ``prefixes``."""
    (root_mask, root_list), keys, masks, lists = cidr6_layout(prefixes, flat_max, probes)
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
    root = CIDR6_ROOT.struct.pack(root_mask, shift, _list_bytes(root_list))
    index = CidrIndex(prefixes, (keys, masks, lists, order, slots), shift, root_list)
    return {
        # two copies of each (bpf/net.c `generation`): copy 1 of the table at index size + i
        f"{family}_root": MapSpec(
            f"{family}_root",
            "array",
            U32.size,
            CIDR6_ROOT.size,
            2,
            0,
            ((U32.pack(0), root),),
            two_copies=True,
        ),
        f"{family}_slots": MapSpec(
            f"{family}_slots",
            "array",
            U32.size,
            CIDR6_SLOT.size,
            2 * size,
            0,
            tuple(zip(map(U32.pack, slots), ordered, strict=True)),
            two_copies=True,
            index=index,
        ),
    }


# -- changes in place -----------------------------------------------------------------------
#
# A change of a few prefixes (a one-line edit of a long list) changes the built index rather
# than building it again. Two invariants make an index exact: every entry's mask is the OR
# of the masks of the stored prefixes containing it (itself included), and every address
# inside an entry ends its lookup at an entry inside that one (the builder makes both
# hold). A change keeps both:
#
# - bits of a prefix that is an entry change: the masks of that entry and of every entry
#   inside it are computed again; a prefix no rule lists any more stays as an entry (a
#   marker holding what contains it), so that no lookup changes its way;
# - a prefix that is not an entry, with no entry inside it, is inserted where the lookup of
#   its addresses probes its length (every probe of a longer length misses there): its
#   addresses now end on it, and no other address's lookup changes. Where no list probes
#   its length, or no slot within CIDR6_SPAN of its home is free, there is no change in
#   place: the compiler builds the index again.
#
# tests/unit/test_splice.py checks changed indexes against the prefixes' meaning.


class CidrIndex:
    """An index as :func:`_index_maps` built it, for :meth:`changed`. Its entries by slot
    and by address are listed at its first change, not at the build."""

    def __init__(
        self,
        own: dict[Prefix, int],
        built: tuple[list[Prefix], list[int], list[bytes], list[int], list[int]] | None,
        shift: int,
        root_list: tuple[int, ...],
        state: _State | None = None,
    ) -> None:
        self.own = own  # (length, address) -> mask of the rules listing it
        self.shift = shift
        self.root_list = root_list
        # keys, masks, lists (in build order), the build order by slot, the slots
        self._built = built
        self._state = state
        self._listing = threading.Lock()

    def prepare(self, spec: MapSpec) -> None:
        """List the entries now (an enforcer does it off the load's path, once the load
        is done), so that the first change does not pay for it."""
        self._entries(spec)

    def _entries(self, spec: MapSpec) -> _State:
        with self._listing:
            return self._list(spec)

    def _list(self, spec: MapSpec) -> _State:
        if self._state is None:
            assert self._built is not None
            keys, masks, lists, order, slots = self._built
            pick = operator.itemgetter(*order) if len(order) > 1 else list
            self._state = _State(
                slots=list(slots),
                keys=list(pick(keys)),
                masks=list(pick(masks)),
                lists=list(pick(lists)),
                entries=list(spec.entries),
                by_address=sorted(value << 8 | length for length, value in keys),
                lengths=collections.Counter(map(operator.itemgetter(0), self.own)),
            )
            self._built = None
        return self._state

    def changed(self, spec: MapSpec, bits: list[tuple[Prefix, int, bool]]) -> MapSpec | None:
        """``spec`` (this index's slots map) with each (prefix, rule bit, listed) of
        ``bits`` set or cleared: a new spec, with its own index and the change from
        ``spec``'s entries; None when that cannot be done in place (above)."""
        own = dict(self.own)
        state = self._entries(spec).copy()
        for prefix, bit, listed in bits:
            if prefix[0] == 0:
                return None  # ::/0 or 0.0.0.0/0: the root's mask, under every entry
            had = own.get(prefix, 0)
            now = had | bit if listed else had & ~bit
            if now:
                own[prefix] = now
            else:
                own.pop(prefix, None)
            if bool(now) != bool(had):
                state.lengths[prefix[0]] += 1 if now else -1
        touched: set[Prefix] = set()
        fresh: set[Prefix] = set()
        for prefix, _, _ in bits:
            if state.find(prefix, self.shift) is None:
                if not state.insert(prefix, self.shift, self.root_list):
                    return None
                fresh.add(prefix)
            touched.update(state.inside(prefix))
        lengths = sorted(length for length, count in state.lengths.items() if count > 0)
        write = []
        for key in touched:
            at = state.find(key, self.shift)
            assert at is not None
            mask = _mask_of(key, own, lengths)
            if mask == state.masks[at] and key not in fresh:
                continue
            state.masks[at] = mask
            value = CIDR6_SLOT.struct.pack(_LITTLE16(key[1]), mask, key[0], state.lists[at])
            state.entries[at] = (state.entries[at][0], value)
            write.append(state.entries[at])
        return dataclasses.replace(
            spec,
            entries=tuple(state.entries),
            index=CidrIndex(own, None, self.shift, self.root_list, state),
            change=EntryChange(spec.entries, tuple(sorted(write))),
        )


@dataclasses.dataclass
class _State:
    """An index's entries by slot (parallel lists, slots ascending) and by address."""

    slots: list[int]
    keys: list[Prefix]
    masks: list[int]
    lists: list[bytes]
    entries: list[tuple[bytes, bytes]]  # the map's, packed
    by_address: list[int]  # address << 8 | length of every entry, ascending
    lengths: collections.Counter[int]  # stored prefixes of each length

    def copy(self) -> _State:
        return _State(
            self.slots.copy(),
            self.keys.copy(),
            self.masks.copy(),
            self.lists.copy(),
            self.entries.copy(),
            self.by_address.copy(),
            collections.Counter(self.lengths),
        )

    def find(self, key: Prefix, shift: int) -> int | None:
        """The position of ``key``'s entry: in the run of taken slots from its home, as
        bpf/net.c finds it (every entry lies within CIDR6_SPAN of its home)."""
        home = _homes([key], shift)[0]
        at = bisect.bisect_left(self.slots, home)
        while at < len(self.slots) and self.slots[at] == home:
            if self.keys[at] == key:
                return at
            at, home = at + 1, home + 1
        return None

    def inside(self, prefix: Prefix) -> list[Prefix]:
        """The entries inside ``prefix``, itself included if it is one."""
        length, value = prefix
        low = bisect.bisect_left(self.by_address, value << 8 | length)
        high = bisect.bisect_right(self.by_address, (value | _FULL >> length) << 8 | 0xFF)
        return [(key & 0xFF, key >> 8) for key in self.by_address[low:high]]

    def insert(self, key: Prefix, shift: int, root_list: tuple[int, ...]) -> bool:
        """Make ``key`` (no entry yet) an entry, if no entry lies inside it, a list its
        addresses' lookup walks probes its length, and a slot near its home is free."""
        if self.inside(key) or not self._probed(key, shift, root_list):
            return False
        home = _homes([key], shift)[0]
        at = bisect.bisect_left(self.slots, home)
        slot = home
        while at < len(self.slots) and self.slots[at] == slot:
            at, slot = at + 1, slot + 1
        if slot - home >= CIDR6_SPAN:
            return False
        self.slots.insert(at, slot)
        self.keys.insert(at, key)
        self.masks.insert(at, 0)
        self.lists.insert(at, _EMPTY)
        self.entries.insert(at, (U32.pack(slot), b""))  # its value: written by the caller
        bisect.insort(self.by_address, key[1] << 8 | key[0])
        return True

    def _probed(self, key: Prefix, shift: int, lengths: tuple[int, ...]) -> bool:
        """Whether the lookup of an address in ``key`` probes ``key``'s length, when no
        entry lies inside ``key`` (so every probe of a longer length misses)."""
        length, value = key
        while True:
            for probed in lengths:
                if probed > length:
                    continue
                if probed == length:
                    return True
                at = self.find((probed, value & _keep(probed)), shift)
                if at is not None:  # a hit: its list next
                    lengths = tuple(self.lists[at].rstrip(b"\0"))
                    break
            else:
                return False


def _mask_of(key: Prefix, own: dict[Prefix, int], lengths: list[int]) -> int:
    """The OR of the masks of the stored prefixes containing ``key`` (of ``lengths``)."""
    mask = 0
    for length in lengths:
        if length > key[0]:
            break
        mask |= own.get((length, key[1] & _keep(length)), 0)
    return mask
