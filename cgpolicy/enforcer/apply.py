"""Execute a plan: make-before-break, all or nothing per policy.

Order for one policy:
1. Load every new program instance (fresh maps). A verifier rejection or a full map stops
   here, before anything enforced has changed.
2. Pin the new programs and event ring over the old pins (the old objects are kept open).
3. Swap existing links to the new programs (BPF_LINK_UPDATE with BPF_F_REPLACE: atomic per
   link, so a cgroup hook is never without a program and never runs half old, half new
   rules), create links on newly covered cgroups, pinning each at once (no descriptor is
   held per link: a glob may cover thousands of cgroups). If any of 2-3 fails, every
   link already swapped is swapped back, every new link is detached and the old pins are
   put back: the old state stays.
4. Detach links that are no longer wanted, then record the new metadata last, naming the
   program ids it was written for.

A process killed anywhere leaves each cgroup hook with either the old program or the new
one, never none where one was. Links not yet pinned die with the process. What is pinned
but not yet described by matching metadata is an *interrupted* apply (kernel/applied.py): the next
apply of the policy reloads it whole, `audit` reports it, `remove` undoes it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cgpolicy.compiler.maps import EVENTS_RING_BYTES, generation_map
from cgpolicy.compiler.spec import CompiledPolicy, RuleLabel
from cgpolicy.contract import U32, attach_hook
from cgpolicy.enforcer.dns import (
    DnsError,
    DnsMaps,
    LearnedCarry,
    check_hierarchy_root,
    publish_targets,
)
from cgpolicy.enforcer.plan import GONE, Action, PolicyPlan, Step
from cgpolicy.kernel import pins
from cgpolicy.kernel.bpf import CgroupLink, Map, Program, close_all
from cgpolicy.kernel.cgroup import CgroupError, cgroup_id, open_cgroup
from cgpolicy.kernel.hooks import hook as hook_named
from cgpolicy.kernel.loader import (
    LoadedProgram,
    LoaderError,
    PreparedProgram,
    create_map,
    load_prepared,
    load_program,
    prepare_program,
)
from cgpolicy.kernel.syscall import BpfError, MapType

log = logging.getLogger(__name__)


class ApplyError(Exception):
    """One policy could not be applied; what was enforced before is still enforced."""


@dataclass(slots=True)
class _Swap:
    """A link (by its plan step) switched to a new program, and the program to switch it
    back to. Only the step is kept, which the plan holds anyway: a glob over thousands of
    cgroups must not hold a descriptor per link (nor per old program: links that ran the
    same one share it), nor a path."""

    step: Step
    old_program: Program


@dataclass
class _Work:
    events: Map | None = None  # the new programs' shared ring buffer of deny events
    generation: Map | None = None  # and their copy of the rules in force (bpf/net.c)
    dns: DnsMaps | None = None  # with fqdns rules: the new programs' shared DNS maps
    carry: LearnedCarry | None = None  # and what they take over from the old load's
    # and where the target cgroups are published: dns_scope and dns_targets, of the new
    # load or (opened here) of the current one
    scope: tuple[Map, Map] | None = None
    dns_programs: list[LoadedProgram] = field(default_factory=list)
    new_programs: dict[str, LoadedProgram] = field(default_factory=dict)
    current_programs: dict[str, Program] = field(default_factory=dict)
    swapped: list[_Swap] = field(default_factory=list)
    old_programs: dict[int, Program] = field(default_factory=dict)  # theirs, by id
    # pins replaced by the new programs, with what was pinned there before (None: nothing)
    replaced: list[tuple[Path, Map | Program | None]] = field(default_factory=list)
    pinned_links: list[Step] = field(default_factory=list)  # the steps that made links

    def close(self) -> None:
        if self.events is not None:
            self.events.close()
        if self.generation is not None:
            self.generation.close()
        if self.carry is not None:
            self.carry.close()
        if self.dns is not None:
            self.dns.close()
        elif self.scope is not None:
            for opened in self.scope:
                opened.close()
        for loaded in self.dns_programs:
            loaded.close()
        for loaded in self.new_programs.values():
            loaded.close()
        for program in self.current_programs.values():
            program.close()
        for program in self.old_programs.values():
            program.close()
        for _, previous in self.replaced:
            if previous is not None:
                previous.close()


def _open_checked_cgroup(root: Path, step: Step) -> int:
    """An fd for the step's cgroup, refusing a different cgroup re-created at the same path."""
    fd = open_cgroup(root / step.cgroup)
    if cgroup_id(fd) != step.cgroup_id:
        os.close(fd)
        raise CgroupError(f"cgroup {step.cgroup} was re-created while applying")
    return fd


def apply_policy(
    plan: PolicyPlan,
    compiled: CompiledPolicy,
    cgroup_root: Path,
    bpf_dir: Path,
    source: str | None = None,
) -> dict[str, int]:
    """Make the kernel match ``plan``; raise ApplyError (with the old state intact) if not.
    Returns the policy's program ids by hook."""
    if plan.blocked:
        raise ApplyError("; ".join(plan.problems))
    work = _Work()
    try:
        _prepare_programs(plan, compiled, cgroup_root, bpf_dir, work)
        try:
            _publish_targets(plan, work, with_old=True)
            _pin_new_programs(plan, bpf_dir, work)
            with pins.checked_once():  # one check of each hook folder, not one per link
                _switch_links(plan, compiled, cgroup_root, bpf_dir, work)
            if work.carry is not None:
                work.carry.after_links_moved()
        except (BpfError, OSError, DnsError) as error:
            _roll_back(work, bpf_dir, compiled.name)  # as _switch_links named the pins
            raise ApplyError(f"attaching failed, previous state restored: {error}") from error
        _detach_unwanted(plan, bpf_dir, {spec.hook for spec in compiled.programs})
        if plan.reload and not compiled.dns_programs:  # a version without names
            for name in pins.DNS_PINS:
                pins.unpin(pins.policy_dir(bpf_dir, plan.name) / name)
        try:
            _publish_targets(plan, work, with_old=False)
        except (BpfError, DnsError) as error:  # the old targets stay listed: nothing opens
            log.warning("policy %s: target cgroups not updated: %s", plan.name, error)
        programs = {hook: loaded.program.id for hook, loaded in work.new_programs.items()}
        programs.update({hook: program.id for hook, program in work.current_programs.items()})
        record_applied(plan, compiled, bpf_dir, source, programs)
        return programs
    finally:
        work.close()


def record_applied(
    plan: PolicyPlan,
    compiled: CompiledPolicy,
    bpf_dir: Path,
    source: str | None,
    programs: dict[str, int],
) -> None:
    """Write the policy's metadata, last: what it now enforces, with which programs."""
    cgroups = {s.cgroup_id: s.cgroup for s in plan.steps if s.action is not Action.DETACH}
    pins.write_meta(bpf_dir, policy_meta(compiled, source, cgroups, programs, plan.owner))


def policy_meta(
    compiled: CompiledPolicy,
    source: str | None,
    cgroups: dict[int, str],
    programs: dict[str, int],
    owner: dict[str, object] | None,
) -> pins.PolicyMeta:
    """The metadata of ``compiled`` applied from ``source`` by ``owner`` with ``programs``
    (by hook) on ``cgroups`` (by id)."""
    rules = {hook: [_label(label) for label in labels] for hook, labels in compiled.rules}
    devices = [device.to_json() for device in compiled.device_paths]
    return pins.PolicyMeta(
        compiled.name,
        compiled.revision,
        compiled.mode,
        source,
        cgroups,
        rules,
        devices,
        programs,
        owner=owner,
        names=list(compiled.names),
    )


def _label(label: RuleLabel) -> dict[str, object]:
    """A rule label as the metadata records it (and audit and events read it)."""
    recorded: dict[str, object] = {"text": label.text, "line": label.line}
    if label.note:
        recorded["note"] = label.note
    return recorded


def _prepare_programs(
    plan: PolicyPlan,
    compiled: CompiledPolicy,
    cgroup_root: Path,
    bpf_dir: Path,
    work: _Work,
) -> None:
    if plan.reload and compiled.programs:
        # One ring buffer per policy load, shared by all of its programs (pinned with them).
        try:
            work.events = Map.create(MapType.RINGBUF, 0, 0, EVENTS_RING_BYTES, name="cgp_events")
        except BpfError as error:
            raise ApplyError(f"creating the deny event ring buffer failed: {error}") from error
    shared: dict[str, Map] = {"events": work.events} if work.events is not None else {}
    if plan.reload and any(m.name == "generation" for s in compiled.programs for m in s.maps):
        # Which copy of net.c's rule maps is in force: one switch for the whole load.
        try:
            work.generation = create_map(generation_map())
        except (LoaderError, BpfError) as error:
            raise ApplyError(f"creating the rule generation map failed: {error}") from error
        shared["generation"] = work.generation
    if compiled.dns_programs:
        _prepare_dns(plan, compiled, cgroup_root, bpf_dir, work)
        if work.dns is not None:
            shared |= work.dns.shared()
    if plan.reload:
        _load_programs(compiled, shared, work)
    else:
        for spec in compiled.programs:
            prog_pin = pins.hook_dir(bpf_dir, compiled.name, spec.hook) / pins.PROG_PIN
            work.current_programs[spec.hook] = Program.from_pin(prog_pin)
    if plan.reload and compiled.dns_programs:
        _load_dns_programs(compiled, work, shared)


def _load_programs(compiled: CompiledPolicy, shared: dict[str, Map], work: _Work) -> None:
    """Every program of the policy: maps made and filled one program after the other (a
    connect check takes the egress program's), then all verified at once."""
    prepared: dict[str, PreparedProgram] = {}
    try:
        for spec in compiled.programs:
            with_maps = shared
            if spec.maps_from is not None:  # a connect check: the egress program's maps
                made = prepared[spec.maps_from].maps
                with_maps = {
                    **shared,
                    **{m.name: made[m.name] for m in spec.maps if m.name in made},
                }
            prepared[spec.hook] = prepare_program(spec, shared_maps=with_maps or None)
        loaded = load_prepared(list(prepared.values()))
    except (LoaderError, BpfError) as error:
        for unloaded in prepared.values():  # (closing twice is nothing)
            close_all(unloaded.maps.values())
        raise ApplyError(f"loading the programs failed: {error}") from error
    except BaseException:
        for unloaded in prepared.values():
            close_all(unloaded.maps.values())
        raise
    work.new_programs.update((program.spec.hook, program) for program in loaded)


def _prepare_dns(
    plan: PolicyPlan, compiled: CompiledPolicy, cgroup_root: Path, bpf_dir: Path, work: _Work
) -> None:
    """The DNS maps: new ones for a new load, filled from the old load's learned map;
    otherwise the current load's scope maps, for the targets to come and go."""
    folder = pins.policy_dir(bpf_dir, compiled.name)
    try:
        check_hierarchy_root(cgroup_root)
        if plan.reload:
            work.dns = DnsMaps.create(compiled, folder)
            work.carry = LearnedCarry(folder, compiled, work.dns)
            work.carry.before_links_move()
            work.scope = (work.dns.dns_scope, work.dns.dns_targets)
        else:
            scope = Map.from_pin(folder / pins.DNS_SCOPE_PIN)
            try:
                work.scope = (scope, Map.from_pin(folder / pins.DNS_TARGETS_PIN))
            except BaseException:
                scope.close()
                raise
    except (DnsError, CgroupError, BpfError, OSError) as error:
        raise ApplyError(str(error)) from error


def _publish_targets(plan: PolicyPlan, work: _Work, *, with_old: bool) -> None:
    """The target cgroups the DNS programs key learned addresses by (enforcer/dns.py)."""
    if work.scope is None:
        return
    wanted = {s.cgroup_id: s.cgroup for s in plan.steps if s.action is not Action.DETACH}
    if with_old:  # a cgroup gone meanwhile has no path, and no socket either
        wanted |= {
            s.cgroup_id: s.cgroup
            for s in plan.steps
            if s.action is Action.DETACH and s.cgroup != GONE
        }
    publish_targets(*work.scope, wanted)


def _load_dns_programs(compiled: CompiledPolicy, work: _Work, shared: dict[str, Map]) -> None:
    """The programs the ingress program tail-calls for DNS answers: loaded with its scratch
    and config, put in the dns_jump slots the C names (question, then answers)."""
    ingress = work.new_programs["ingress"]
    with_ingress = {**shared, "dns_scratch": ingress.maps["dns_scratch"]}
    with_ingress["config"] = ingress.maps["config"]
    assert work.dns is not None
    try:
        for spec in compiled.dns_programs:
            loaded = load_program(spec, shared_maps=with_ingress)
            work.dns_programs.append(loaded)
        for slot, loaded in enumerate(work.dns_programs):  # the dns_jump slots, in order
            work.dns.dns_jump.update(U32.pack(slot), U32.pack(loaded.program.fd))
    except (LoaderError, BpfError) as error:
        raise ApplyError(f"loading the DNS programs failed: {error}") from error


def _program_fd(work: _Work, hook: str) -> int:
    if hook in work.new_programs:
        return work.new_programs[hook].fd
    return work.current_programs[hook].fd


def _switch_links(
    plan: PolicyPlan, compiled: CompiledPolicy, root: Path, bpf_dir: Path, work: _Work
) -> None:
    for step in plan.steps:
        link_path = pins.link_pin(bpf_dir, compiled.name, step.hook, step.cgroup_id)
        if step.action is Action.UPDATE:
            with CgroupLink.from_pin(link_path) as link:
                old_id = link.info().prog_id
                if old_id not in work.old_programs:
                    work.old_programs[old_id] = Program.from_id(old_id)
                old_program = work.old_programs[old_id]
                link.update(_program_fd(work, step.hook), old_program.fd)
            work.swapped.append(_Swap(step, old_program))
        elif step.action in (Action.ATTACH, Action.REATTACH):
            cgroup_fd = _open_checked_cgroup(root, step)
            try:
                attach_type = hook_named(attach_hook(step.hook)).attach_type
                link = CgroupLink.create(_program_fd(work, step.hook), cgroup_fd, attach_type)
            finally:
                os.close(cgroup_fd)
            with link:  # pinned at once, so that no descriptor is held per new link
                try:
                    pins.pin_replacing(link, link_path)
                except (BpfError, OSError):
                    link.detach()  # not pinned, so the roll-back would not find it
                    raise
            work.pinned_links.append(step)


def _roll_back(work: _Work, bpf_dir: Path, name: str) -> None:
    for swap in reversed(work.swapped):
        try:
            pin = pins.link_pin(bpf_dir, name, swap.step.hook, swap.step.cgroup_id)
            with CgroupLink.from_pin(pin) as link:
                link.update(swap.old_program.fd)
        except (BpfError, OSError) as error:  # nothing better to do than say so
            log.error("could not restore a link to program %d: %s", swap.old_program.id, error)
    for step in work.pinned_links:
        detach_pinned_link(pins.link_pin(bpf_dir, name, step.hook, step.cgroup_id))
    for path, previous in reversed(work.replaced):
        try:
            if previous is None:
                pins.unpin(path)
            else:
                pins.pin_replacing(previous, path)
        except (BpfError, OSError) as error:
            log.error("could not restore the pin %s: %s", path, error)


def _pin_new_programs(plan: PolicyPlan, bpf_dir: Path, work: _Work) -> None:
    """Pin the new event ring and programs *before* any link moves to them: from here until
    the metadata is written, pins and metadata disagree, which is what makes an apply
    killed in between an *interrupted* one (kernel/applied.py), whichever links had moved."""
    folder = pins.policy_dir(bpf_dir, plan.name)
    shared = [(work.events, pins.EVENTS_PIN)] if work.events is not None else []
    shared += work.dns.pinned() if work.dns is not None else []
    for map_, name in shared:
        _replace_pin(work, map_, folder / name, Map.from_pin)
    for hook, loaded in work.new_programs.items():
        path = pins.hook_dir(bpf_dir, plan.name, hook) / pins.PROG_PIN
        _replace_pin(work, loaded.program, path, Program.from_pin)


def _replace_pin(
    work: _Work,
    new: Map | Program,
    path: Path,
    reopen: Callable[[Path], Map | Program],
) -> None:
    try:
        previous: Map | Program | None = reopen(path)
    except (BpfError, OSError):
        previous = None  # nothing pinned there yet
    work.replaced.append((path, previous))
    pins.pin_replacing(new, path)


def _detach_unwanted(plan: PolicyPlan, bpf_dir: Path, wanted_hooks: set[str]) -> None:
    for step in plan.steps:
        if step.action is not Action.DETACH:
            continue
        link_path = pins.link_pin(bpf_dir, plan.name, step.hook, step.cgroup_id)
        detach_pinned_link(link_path)
    for hook_folder in pins.real_subfolders(pins.policy_dir(bpf_dir, plan.name)):
        if hook_folder.name not in wanted_hooks:
            for pin in pins.link_pins(hook_folder).values():  # links of gone cgroups
                detach_pinned_link(pin)
            pins.remove_folder(hook_folder)  # the program pin, anything else


def detach_pinned_link(link_path: str | os.PathLike[str]) -> None:
    """End an attachment cgpolicy made and drop its pin (a link already defunct is fine)."""
    try:
        with CgroupLink.from_pin(link_path) as link:
            if link.info().cgroup_id:
                link.detach()
    except BpfError as error:
        log.warning("link %s: %s", link_path, error)
    pins.unpin(link_path)


def remove_policy(plan: PolicyPlan, bpf_dir: Path) -> None:
    """Detach every link of an applied policy, then drop all of its pins."""
    folder = pins.policy_dir(bpf_dir, plan.name)
    _detach_unwanted(plan, bpf_dir, wanted_hooks=set())
    pins.remove_folder(folder)
