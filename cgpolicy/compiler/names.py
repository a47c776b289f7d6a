"""DNS names of `fqdns` rules as the kernel looks them up: a table from a keyed hash of a
name (or of the domain of a ``*.`` pattern) to the rules it matches.

The program hashes the question name of a DNS answer label by label, then folds the label
hashes right to left into one hash per suffix. The whole name's hash finds the rules that
name it exactly; the hash of a proper suffix (one or more labels cut off the front) finds
the rules whose ``*.`` pattern names that suffix. Both are SipHash-1-3 under a key drawn
at random for each load, which only the kernel holds: a workload may resolve names an
attacker chooses, and without the key no such name can be made to collide with an allowed
one. Pure: the caller gives the key.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

_MASK = (1 << 64) - 1
LABEL_WORDS = 8  # a label of at most 63 bytes, hashed as 8 words of 8 bytes


def _rotl(x: int, bits: int) -> int:
    return ((x << bits) | (x >> (64 - bits))) & _MASK


@dataclass
class SipHash13:
    """SipHash-1-3 over 64-bit words, as the program runs it: one round per word absorbed,
    three to finalize (a copy: absorbing may go on after a hash is taken)."""

    v0: int
    v1: int
    v2: int
    v3: int

    @classmethod
    def keyed(cls, key: bytes) -> SipHash13:
        k0, k1 = int.from_bytes(key[:8], "little"), int.from_bytes(key[8:16], "little")
        return cls(
            k0 ^ 0x736F6D6570736575,
            k1 ^ 0x646F72616E646F6D,
            k0 ^ 0x6C7967656E657261,
            k1 ^ 0x7465646279746573,
        )

    def _round(self) -> None:
        self.v0 = (self.v0 + self.v1) & _MASK
        self.v1 = _rotl(self.v1, 13) ^ self.v0
        self.v0 = _rotl(self.v0, 32)
        self.v2 = (self.v2 + self.v3) & _MASK
        self.v3 = _rotl(self.v3, 16) ^ self.v2
        self.v0 = (self.v0 + self.v3) & _MASK
        self.v3 = _rotl(self.v3, 21) ^ self.v0
        self.v2 = (self.v2 + self.v1) & _MASK
        self.v1 = _rotl(self.v1, 17) ^ self.v2
        self.v2 = _rotl(self.v2, 32)

    def absorb(self, word: int) -> None:
        self.v3 ^= word
        self._round()
        self.v0 ^= word

    def final(self) -> int:
        copy = SipHash13(self.v0, self.v1, self.v2 ^ 0xFF, self.v3)
        for _ in range(3):
            copy._round()
        return copy.v0 ^ copy.v1 ^ copy.v2 ^ copy.v3


def label_hash(key: bytes, label: bytes) -> int:
    """One label: its length, then 8 little-endian words of its bytes with A-Z lowercased
    (bytes.lower(): no other byte changes), past its end zero."""
    state = SipHash13.keyed(key)
    state.absorb(len(label))
    padded = label.lower() + bytes(8 * LABEL_WORDS - len(label))
    for index in range(LABEL_WORDS):
        state.absorb(int.from_bytes(padded[8 * index : 8 * index + 8], "little"))
    return state.final()


def suffix_hashes(key: bytes, name: str) -> list[int]:
    """The hash of every suffix of ``name`` that starts at a label, the whole name first."""
    labels = [label.encode() for label in name.split(".")]
    state, found = SipHash13.keyed(key), []
    for label in reversed(labels):
        state.absorb(label_hash(key, label))
        found.append(state.final())
    return found[::-1]


@dataclass(frozen=True, slots=True)
class NameEntry:
    """What one hash matches, per section slot (contract.DNS_SLOTS): rules naming it
    exactly, and rules whose ``*.`` pattern has it for domain (matched when the hash is of
    a proper suffix of the question name); with the ids (see pattern_ids) of the name and
    of its ``*.`` pattern, 0 where no rule has it."""

    exact: tuple[int, ...]
    wildcard: tuple[int, ...]
    exact_name: int = 0
    wildcard_name: int = 0


def pattern_ids(rules: Iterable[tuple[int, int, Iterable[str]]]) -> list[str]:
    """Every distinct pattern of ``rules``, sorted: the learned map says which one matched
    an answer by its 1-based index here (audit and explain read it back by the same rule)."""
    return sorted({name for _, _, names in rules for name in names})


def name_table(
    key: bytes, slots: int, rules: Iterable[tuple[int, int, Iterable[str]]]
) -> dict[int, NameEntry]:
    """Hash -> NameEntry for the `fqdns` of ``rules``: (section slot, rule index in its
    section, names as the model keeps them: lowercase, no trailing dot)."""
    rules = [(slot, index, tuple(names)) for slot, index, names in rules]
    ids = {name: number for number, name in enumerate(pattern_ids(rules), start=1)}
    exact: dict[int, list[int]] = {}
    wildcard: dict[int, list[int]] = {}
    exact_id: dict[int, int] = {}
    wildcard_id: dict[int, int] = {}
    for slot, index, names in rules:
        for name in names:
            wild = name.startswith("*.")
            hashed = suffix_hashes(key, name[2:] if wild else name)[0]
            masks = (wildcard if wild else exact).setdefault(hashed, [0] * slots)
            masks[slot] |= 1 << index
            (wildcard_id if wild else exact_id)[hashed] = ids[name]
    none = [0] * slots
    return {
        hashed: NameEntry(
            tuple(exact.get(hashed, none)),
            tuple(wildcard.get(hashed, none)),
            exact_id.get(hashed, 0),
            wildcard_id.get(hashed, 0),
        )
        for hashed in sorted(exact.keys() | wildcard.keys())
    }


def surely_matched(pattern: str, fqdns: Iterable[str]) -> bool:
    """Whether an answer whose question matched ``pattern`` (a learned entry's most specific
    pattern) certainly matches one of ``fqdns``. For ``*.domain`` the question is only known
    to lie under the domain, so only ``*.`` patterns of that domain or one above it are
    certain; the rest are not carried (fail closed)."""
    domain = pattern[2:] if pattern.startswith("*.") else None
    for other in fqdns:
        if other.startswith("*."):
            above = other[2:]
            if domain is None and pattern.endswith("." + above):
                return True
            if domain is not None and (domain == above or domain.endswith("." + above)):
                return True
        elif domain is None and other == pattern:
            return True
    return False


def carried_rules(
    pattern: str, slots: int, rules: Iterable[tuple[int, int, Iterable[str]]]
) -> tuple[int, ...]:
    """Per section slot, the rules of a new version of a policy that an address learned
    under ``pattern`` by the old version matches for sure (see surely_matched)."""
    masks = [0] * slots
    for slot, index, names in rules:
        if surely_matched(pattern, names):
            masks[slot] |= 1 << index
    return tuple(masks)
