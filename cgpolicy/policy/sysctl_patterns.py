"""The sysctl name patterns of a section as one automaton: what bpf/sysctl.c runs (the
compiler packs it into the program's maps) and what validation builds to refuse pattern
sets whose automaton would be too large. Pure, so that the policy layer needs no compiler.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cgpolicy.contract import SYSCTL_DEAD_STATE, SYSCTL_START_STATE

SYSCTL_MAX_STATES = 16384  # DFA states over all sysctl patterns of a section


class TooManyStates(ValueError):
    """The patterns need an automaton with more than SYSCTL_MAX_STATES states."""


@dataclass(frozen=True, slots=True)
class SysctlDfa:
    """All patterns of a section as one DFA over byte classes (bpf/sysctl.c), whose state
    ids the program knows: SYSCTL_DEAD_STATE and SYSCTL_START_STATE (contract.py)."""

    byte_class: bytes  # 256 entries: byte -> class; class 0 = bytes no pattern names
    nclasses: int
    next: tuple[int, ...]  # state * nclasses + class -> state
    accept: tuple[int, ...]  # state -> mask of rules matching

    def match(self, name: str) -> int:
        """The rules whose pattern matches ``name`` (what the program computes)."""
        state = SYSCTL_START_STATE
        for byte in name.encode():
            state = self.next[state * self.nclasses + self.byte_class[byte]]
        return self.accept[state]


def _collapse_stars(pattern: str) -> str:
    while "**" in pattern:
        pattern = pattern.replace("**", "*")
    return pattern


def sysctl_dfa(patterns: Sequence[str]) -> SysctlDfa:
    """Subset construction over a bit-parallel NFA: bit j of a rule's slice means "the
    pattern's first j characters match what was read"; '*' positions keep their bit on any
    byte and, matching the empty string too, also set the next bit. Raises TooManyStates."""
    encoded = [_collapse_stars(p).encode() for p in patterns]
    literals = sorted({byte for pattern in encoded for byte in pattern if byte != ord("*")})
    byte_class = bytearray(256)
    for number, byte in enumerate(literals, start=1):
        byte_class[byte] = number
    nclasses = len(literals) + 1

    starts = stars = 0
    class_bits = [0] * nclasses
    accept_bits: list[int] = []
    offset = 0
    for pattern in encoded:
        starts |= 1 << offset
        for j, byte in enumerate(pattern):
            if byte == ord("*"):
                stars |= 1 << (offset + j)
            else:
                class_bits[byte_class[byte]] |= 1 << (offset + j)
        accept_bits.append(offset + len(pattern))
        offset += len(pattern) + 1

    def closure(state: int) -> int:
        return state | (state & stars) << 1

    def accepting(state: int) -> int:
        mask = 0
        for rule, bit in enumerate(accept_bits):
            if state >> bit & 1:
                mask |= 1 << rule
        return mask

    sets = [0, 0]  # state id -> NFA position set
    sets[SYSCTL_DEAD_STATE], sets[SYSCTL_START_STATE] = 0, closure(starts)
    ids = {0: SYSCTL_DEAD_STATE}
    ids.setdefault(sets[SYSCTL_START_STATE], SYSCTL_START_STATE)
    next_states: list[int] = []
    current = 0
    while current < len(sets):
        nfa = sets[current]
        for cls in range(nclasses):
            target = closure((nfa & class_bits[cls]) << 1 | (nfa & stars))
            found = ids.get(target)
            if found is None:
                if len(sets) >= SYSCTL_MAX_STATES:
                    raise TooManyStates(
                        f"the sysctl patterns need more than {SYSCTL_MAX_STATES} matcher "
                        "states; use fewer '*' or fewer rules"
                    )
                found = ids[target] = len(sets)
                sets.append(target)
            next_states.append(found)
        current += 1
    return SysctlDfa(
        bytes(byte_class), nclasses, tuple(next_states), tuple(accepting(s) for s in sets)
    )
