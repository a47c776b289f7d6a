"""What the compiler hands the kernel layer: program sources, functions and map contents, as
plain frozen values without file descriptors. The layouts of the packed map entries, shared
with the C in bpf/, are stated once in cgpolicy/contract.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from cgpolicy.policy.model import Target

if TYPE_CHECKING:  # they build specs: imported for annotations only
    from cgpolicy.compiler.canonical import RuleKeys
    from cgpolicy.compiler.cidr6 import CidrIndex


class CompileError(Exception):
    """The policy cannot be turned into map contents (e.g. interfaces without a resolver)."""


# What a device rule's path names on the node that applies the policy (docs/policy.md,
# "spec.devices"): a device node (resolved), nothing it may use (missing, not-a-device,
# unsafe), or, for a deny rule, nothing now but a device when last applied (kept).
DeviceState = Literal["resolved", "missing", "not-a-device", "unsafe", "kept"]


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
    # a rule map of net.c holding two copies (contract.copy_key): ``entries`` are copy 0's,
    # and ``max_entries`` holds both copies, with room for a change in place
    two_copies: bool = False
    # a prefix index's slots (cidr6.CidrIndex): what a change of its prefixes starts from
    index: CidrIndex | None = field(default=None, compare=False, repr=False)
    # made by changing the map whose entries are ``change.base``: what differs (cidr6.py)
    change: EntryChange | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class EntryChange:
    """The entries to write that turn ``base`` (another spec's entries tuple, compared by
    identity) into a map's own; no entry is dropped."""

    base: tuple[tuple[bytes, bytes], ...]
    write: tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True, slots=True)
class ProgramSpec:
    """One program for one hook: a function of a C file in bpf/ and the maps it uses."""

    # the policy's program slot: bpftool's attach-type name (egress, connect4, device, ...),
    # or a connect check's (egress@connect4: contract.EGRESS_AT_CONNECT)
    hook: str
    source: str  # file name in bpf/, e.g. "net.c"
    function: str  # C function name
    prog_name: str  # kernel name, <= 15 chars, starts with "cgp_"
    maps: tuple[MapSpec, ...]  # every map the function references
    # the slot of another program of the policy whose maps of the same names this one uses
    # (loaded after it); its specs are repeated in ``maps``
    maps_from: str | None = None


@dataclass(frozen=True, slots=True)
class RuleLabel:
    """What a counter slot counts, for people: a rule in short form and where it was written."""

    text: str  # "deny any to 169.254.169.254/32"
    line: int | None  # 1-based line in the policy file
    note: str | None = None  # e.g. why a device path rule matches nothing on this node


@dataclass(frozen=True, slots=True)
class DeviceNode:
    """What a device rule's path names on this node: a node's type and numbers (``type``
    set), or nothing, and why (``detail``, e.g. "does not exist")."""

    type: Literal["char", "block"] | None
    major: int = 0
    minor: int = 0
    state: DeviceState = "resolved"
    detail: str = ""

    def numbers(self) -> str | None:
        """``c 195:0``, as `ls -l` and the device rules' labels write a device."""
        if self.type is None:
            return None
        return f"{self.type[0]} {self.major}:{self.minor}"


@dataclass(frozen=True, slots=True)
class DevicePath:
    """One ``path:`` device rule of a compiled policy and what its path resolved to."""

    path: str
    action: str
    line: int | None
    node: DeviceNode

    @property
    def resolved(self) -> bool:
        return self.node.state == "resolved"

    def note(self) -> str | None:
        """A short remark for the rule's label (audit, events); None when resolved."""
        if self.node.state == "resolved":
            return None
        if self.node.state == "kept":
            return f"path {self.node.detail} now: still denies {self.node.numbers()}, as before"
        return f"path {self.node.detail}: matches nothing on this node"

    def warning(self) -> str | None:
        """What `plan`, `apply` and the service report about this rule; None when resolved."""
        if self.node.state == "resolved":
            return None
        rule = f"{self.action} rule" + (f", line {self.line}" if self.line else "")
        head = f"device path {self.path} ({rule}) {self.node.detail}"
        if self.node.state == "kept":
            return (
                f"{head} now: the rule keeps denying {self.node.numbers()}, the device it "
                "named when last applied"
            )
        verb = "denies" if self.action == "deny" else "allows"
        return f"{head}: on this node the rule {verb} nothing until the path names a device"

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "action": self.action,
            "line": self.line,
            "state": self.node.state,
            "device": self.node.numbers(),
            "detail": self.node.detail or None,
        }


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    name: str
    revision: str  # first 16 hex chars of a sha256 over the canonical policy content
    mode: str  # "enforce" | "audit"
    targets: tuple[Target, ...]
    programs: tuple[ProgramSpec, ...]
    # per hook: the rules in canonical order (label i = rule i = counter slot i)
    rules: tuple[tuple[str, tuple[RuleLabel, ...]], ...] = ()
    # every `path:` device rule and what its path named on the node it was compiled for
    device_paths: tuple[DevicePath, ...] = ()
    # the programs the ingress program tail-calls to learn from DNS answers (question,
    # answers), loaded with its maps; empty when no rule names fqdns
    dns_programs: tuple[ProgramSpec, ...] = ()
    # the distinct fqdns patterns, sorted: a learned entry's name_id is a 1-based index here
    names: tuple[str, ...] = ()
    # (section slot, rule index, fqdns) of every rule naming fqdns (contract.DNS_SLOTS)
    name_rules: tuple[tuple[int, int, tuple[str, ...]], ...] = ()
    dns_max_ttl: int = 0  # seconds a learned address may match at most (spec.dns.maxTTL)
    # the canonical.RuleKeys it was made with, for a change of CIDRs (compile.recompile)
    keys: RuleKeys | None = field(default=None, compare=False, repr=False)

    def dns_map(self, name: str) -> MapSpec:
        """A map of DNS names as the programs of a policy with fqdns rules declare it: the
        spec of the maps the enforcer makes once per load and shares (learned, dns_stats,
        dns_pending, ...)."""
        programs = self.dns_programs + self.programs
        return next(m for spec in programs for m in spec.maps if m.name == name)
