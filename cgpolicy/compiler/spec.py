"""What the compiler hands the kernel layer (see notes/kernel-contract.md): program sources,
functions and map contents, as plain frozen values without file descriptors."""

from __future__ import annotations

from dataclasses import dataclass

from cgpolicy.policy.model import Target


@dataclass(frozen=True, slots=True)
class MapSpec:
    """One map of one program instance, named as the template map in the C source."""

    name: str
    map_type: str  # "lpm_trie" | "array" | "hash" | "percpu_array" | "ringbuf"
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    entries: tuple[tuple[bytes, bytes], ...]  # packed exactly as the C structs lay them out


@dataclass(frozen=True, slots=True)
class ProgramSpec:
    """One program for one hook: a function of a C file in bpf/ and the maps it uses."""

    hook: str  # bpftool's attach-type name: egress, connect4, device, ...
    source: str  # file name in bpf/, e.g. "net.c"
    function: str  # C function name
    prog_name: str  # kernel name, <= 15 chars, starts with "cgp_"
    maps: tuple[MapSpec, ...]  # every map the function references


@dataclass(frozen=True, slots=True)
class RuleLabel:
    """What a counter slot counts, for people: a rule in short form and where it was written."""

    text: str  # "deny any to 169.254.169.254/32"
    line: int | None  # 1-based line in the policy file


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    name: str
    revision: str  # first 16 hex chars of a sha256 over the canonical policy content
    mode: str  # "enforce" | "audit"
    targets: tuple[Target, ...]
    programs: tuple[ProgramSpec, ...]
    # per hook: the rules in canonical order (label i = rule i = counter slot i)
    rules: tuple[tuple[str, tuple[RuleLabel, ...]], ...] = ()
