"""What cgpolicy has applied, read back from its pins and the kernel's own answers.

This is the one reader of applied state: plan, audit, explain, events and the service's
metrics all start from :func:`read_applied`, so a change of the pin layout (``pins``) or of
what a program's maps hold is made here and nowhere else. The kernel is the only state:
nothing is cached between calls.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cgpolicy.contract import COUNTER, DEFAULT_SLOT, MAX_RULES, RATELIMIT, U32
from cgpolicy.kernel import pins
from cgpolicy.kernel.bpf import CgroupLink, Map, Program, close_all
from cgpolicy.kernel.hooks import HOOKS
from cgpolicy.kernel.syscall import BpfError
from cgpolicy.kernel.trusted import check_real_folder

log = logging.getLogger(__name__)

_ZERO = U32.pack(0)


@dataclass(frozen=True)
class AppliedLink:
    cgroup_id: int
    pin: Path
    link_id: int
    prog_id: int
    attached: bool  # False once the link was detached from outside or its cgroup is gone


@dataclass
class AppliedHook:
    hook: str
    prog_id: int | None  # None when the program pin is missing
    links: dict[int, AppliedLink] = field(default_factory=dict)


@dataclass
class AppliedPolicy:
    name: str
    folder: Path
    meta: pins.PolicyMeta | None  # None: a folder without readable metadata (a broken apply)
    hooks: dict[str, AppliedHook] = field(default_factory=dict)

    @property
    def revision(self) -> str | None:
        return self.meta.revision if self.meta else None

    @property
    def interrupted(self) -> bool:
        """An apply stopped half-way (a crash, SIGKILL): links or programs are pinned but
        the metadata is missing or was written for other programs. The next apply of the
        policy reloads it whole; `audit` reports it; `remove` undoes it."""
        pinned = {hook.hook: hook.prog_id for hook in self.hooks.values()}
        return self.meta is None or self.meta.programs != pinned

    def program_ids(self) -> set[int]:
        """Every program of this policy: the pinned ones and those its links hold."""
        found = {hook.prog_id for hook in self.hooks.values() if hook.prog_id}
        for hook in self.hooks.values():
            found.update(link.prog_id for link in hook.links.values() if link.prog_id)
        return found


def _read_link(cgroup_id: int, pin: Path) -> AppliedLink:
    try:
        with CgroupLink.from_pin(pin) as link:
            info = link.info()
    except (BpfError, OSError):
        return AppliedLink(cgroup_id, pin, 0, 0, attached=False)
    attached = info.cgroup_id == cgroup_id
    return AppliedLink(cgroup_id, pin, info.id, info.prog_id, attached)


def _read_prog_id(pin: Path) -> int | None:
    try:
        with Program.from_pin(pin) as program:
            return program.id
    except (BpfError, OSError):
        return None


def read_policy(folder: Path, links: bool = True) -> AppliedPolicy:
    """One policy folder; without ``links`` only the metadata and the programs."""
    applied = AppliedPolicy(folder.name, folder, pins.read_meta(folder))
    for hook_folder in pins.real_subfolders(folder):
        if hook_folder.name not in HOOKS:
            continue
        hook = AppliedHook(hook_folder.name, _read_prog_id(hook_folder / pins.PROG_PIN))
        if links:
            for cgroup_id, pin in sorted(pins.link_pins(hook_folder).items()):
                hook.links[cgroup_id] = _read_link(cgroup_id, pin)
        applied.hooks[hook.hook] = hook
    return applied


def read_applied(bpf_dir: Path, links: bool = True) -> dict[str, AppliedPolicy]:
    """Every policy cgpolicy has pinned under ``bpf_dir``, by name. Raises UntrustedFolder
    when the folder could be changed by someone other than root. ``links=False`` skips
    reading each link (for readers that need only metadata and programs)."""
    return {folder.name: read_policy(folder, links) for folder in pins.policy_folders(bpf_dir)}


def read_named(bpf_dir: Path, name: str, links: bool = True) -> AppliedPolicy:
    """The applied policy ``name`` (its folder is checked like every other)."""
    folder = pins.policy_dir(bpf_dir, name)
    check_real_folder(folder)
    return read_policy(folder, links)


def event_rings(bpf_dir: Path) -> dict[str, Map | None]:
    """Every applied policy's ring buffer of deny events, opened (the caller closes them);
    None for a policy without one now (applied before deny events, or being replaced).
    Cheaper than :func:`read_applied` for a reader that polls for new rings."""
    rings: dict[str, Map | None] = {}
    for folder in pins.policy_folders(bpf_dir):
        try:
            rings[folder.name] = Map.from_pin(folder / pins.EVENTS_PIN)
        except (BpfError, OSError):
            rings[folder.name] = None
    return rings


# --- what a program's maps hold ---------------------------------------------------------


def program_maps(prog_id: int, names: set[str]) -> dict[str, Map]:
    """The maps called ``names`` that program ``prog_id`` uses (the first of each name),
    opened; the caller closes them. Empty when the program is gone."""
    try:
        with Program.from_id(prog_id) as program:
            map_ids = program.info().map_ids
    except BpfError:
        return {}
    found: dict[str, Map] = {}
    try:
        for map_id in map_ids:
            try:
                candidate = Map.from_id(map_id)
            except BpfError:
                continue
            if candidate.name in names and candidate.name not in found:
                found[candidate.name] = candidate
            else:
                candidate.close()
    except BaseException:
        close_all(found.values())
        raise
    return found


def events_dropped(ratelimit: Map) -> int:
    """Deny events a program dropped so far (rate limit or full ring buffer), all CPUs."""
    values = ratelimit.lookup_per_cpu(_ZERO) or []
    return sum(RATELIMIT.unpack_from(v)["dropped"] for v in values)


def _sum(values: list[bytes] | None) -> tuple[int, int]:
    allowed = denied = 0
    for value in values or ():
        counter = COUNTER.unpack_from(value)
        allowed += counter["allowed"]
        denied += counter["denied"]
    return allowed, denied


def read_counters(prog_id: int, applied: AppliedPolicy | None, hook: str) -> dict[str, Any] | None:
    """Per-rule and default allowed/denied counts of one of a policy's programs, labelled
    with the rule text its metadata recorded, and the deny events it dropped; None when the
    program has no counters (or is gone). Raises BpfError when a map cannot be read."""
    maps = program_maps(prog_id, {"counters", "ratelimit"})
    try:
        if "counters" not in maps:
            return None
        return _label_counters(maps["counters"], maps.get("ratelimit"), applied, hook)
    finally:
        for opened in maps.values():
            opened.close()


def _label_counters(
    counters: Map, ratelimit: Map | None, applied: AppliedPolicy | None, hook: str
) -> dict[str, Any]:
    meta = applied.meta if applied else None
    # An interrupted apply's metadata may describe other programs: no rule text then, only
    # the slots that counted something (the drift says why)
    trusted = meta if applied is not None and not applied.interrupted else None
    labels = (trusted.rules.get(hook) if trusted else None) or []
    rules = []
    for slot in range(MAX_RULES):
        if slot >= len(labels) and labels:
            break
        allowed, denied = _sum(counters.lookup_per_cpu(U32.pack(slot)))
        if slot >= len(labels) and not (allowed or denied):
            continue  # no labels recorded: show the slots that counted something
        label = labels[slot] if slot < len(labels) else {}
        rules.append(
            {
                "rule": slot,
                "text": label.get("text"),
                "line": label.get("line"),
                "note": label.get("note"),  # e.g. a device path that names nothing here
                "allowed": allowed,
                "denied": denied,
            }
        )
    allowed, denied = _sum(counters.lookup_per_cpu(U32.pack(DEFAULT_SLOT)))
    return {
        "mode": meta.mode if meta else None,
        "rules": rules,
        "default": {"allowed": allowed, "denied": denied},
        "events_dropped": events_dropped(ratelimit) if ratelimit is not None else None,
    }


def counter_totals(applied: dict[str, AppliedPolicy]) -> dict[tuple[str, str], tuple[int, int]]:
    """(policy, hook) -> (allowed, denied) summed over rules, default and CPUs, for every
    pinned program; what the service exports to Prometheus. Programs gone meanwhile, or
    whose maps cannot be read, are left out."""
    totals = {}
    for name, policy in applied.items():
        for hook, state in policy.hooks.items():
            if not state.prog_id:
                continue
            try:
                counters = read_counters(state.prog_id, policy, hook)
            except BpfError as error:
                log.warning("counters of program %d: %s", state.prog_id, error)
                continue
            if counters is None:
                continue
            slots = [*counters["rules"], counters["default"]]
            totals[name, hook] = (
                sum(slot["allowed"] for slot in slots),
                sum(slot["denied"] for slot in slots),
            )
    return totals
