"""The reconcile service's fast paths: for cgroups that just appeared, and for a changed
policy file whose rules change in place (docs/scale.md, docs/reconcile.md).

A full pass observes every link of every policy (one BPF_OBJ_GET and one LINK_INFO per
link): with one glob over 10,000 cgroups and a policy of 9 programs, that is 90,000 links
and a second or more, paid again for every new container. A cgroup that appeared needs
none of it when its policy is applied and unchanged: this module checks exactly that, from
the policy's metadata and program pins only, then attaches and pins the new links and
records the new cgroups in the metadata, as a full pass would have. Whatever it cannot
vouch for (a changed or interrupted policy, another owner's, one with fqdns rules, a link
already pinned) raises NotIncremental, and the caller runs a full pass instead. The
periodic resync stays a full pass, so drift is repaired within the interval as before.

A changed file costs a full pass the same way, though a change in place (inplace.py) touches
no link: :func:`change_in_place` checks the same metadata and pins, and that the policy's
targets still resolve to the cgroups the metadata lists, then changes the rules in place
and writes the new metadata.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from cgpolicy.compiler.spec import CompiledPolicy
from cgpolicy.contract import attach_hook
from cgpolicy.enforcer.apply import ApplyError, detach_pinned_link, policy_meta
from cgpolicy.enforcer.inplace import InPlace
from cgpolicy.enforcer.ownership import Owner
from cgpolicy.enforcer.targets import CgroupRef
from cgpolicy.kernel import pins
from cgpolicy.kernel.bpf import CgroupLink, Map, Program, close_all
from cgpolicy.kernel.cgroup import CgroupError, cgroup_id, open_cgroup
from cgpolicy.kernel.hooks import hook as hook_named
from cgpolicy.kernel.syscall import BpfError


class NotIncremental(Exception):
    """The fast path cannot vouch for this policy now: run a full pass."""


class MetaCache:
    """The metadata the fast path last read or wrote, by policy folder and the id of the
    map holding it. cgpolicy never writes a metadata map twice (write_meta pins a fresh one
    each time), so the same map id means the same metadata, and the 600 KB of JSON that
    10,000 cgroups make is decoded once, not at every new cgroup."""

    def __init__(self) -> None:
        self._known: dict[Path, tuple[int, pins.PolicyMeta]] = {}

    def read(self, folder: Path) -> pins.PolicyMeta | None:
        """The metadata pinned in ``folder`` now (None: none readable)."""
        try:
            with Map.from_pin(folder / pins.META_PIN) as meta_map:
                map_id = meta_map.id
        except (BpfError, OSError):
            return None
        known = self._known.get(folder)
        if known is not None and known[0] == map_id:
            return known[1]
        meta = pins.read_meta(folder)  # under the pin lock: the same map as above
        if meta is not None:
            self._known[folder] = (map_id, meta)
        return meta

    def write(self, bpf_dir: Path, meta: pins.PolicyMeta) -> None:
        """pins.write_meta, remembering what it wrote."""
        pins.write_meta(bpf_dir, meta)
        folder = pins.policy_dir(bpf_dir, meta.name)
        self._known.pop(folder, None)
        try:
            with Map.from_pin(folder / pins.META_PIN) as meta_map:
                self._known[folder] = (meta_map.id, meta)
        except (BpfError, OSError):
            pass  # read again next time


def attach_new_cgroups(
    compiled: CompiledPolicy,
    refs: list[CgroupRef],
    cgroup_root: Path,
    bpf_dir: Path,
    owner: Owner,
    source: str | None,
    cache: MetaCache,
) -> list[CgroupRef]:
    """Attach ``compiled`` (applied as it is, by ``owner`` from ``source``) to the new
    cgroups ``refs``; the ones it attached (those the metadata did not list yet). Call it
    under the pin folder's lock. ApplyError when attaching failed (what it attached is
    detached again); NotIncremental when a full pass must decide."""
    if compiled.dns_programs:
        raise NotIncremental("fqdns rules: the target cgroups are published to its maps")
    meta = _settled_meta(compiled, bpf_dir, owner, source, cache)
    if meta.revision != compiled.revision:
        raise NotIncremental("not applied as it is now")
    new = [ref for ref in refs if ref.cgroup_id not in meta.cgroups]
    if not new:
        return []
    programs = _pinned_programs(compiled, bpf_dir)
    try:
        if {hook: program.id for hook, program in programs.items()} != meta.programs:
            raise NotIncremental("the pinned programs are not those the metadata names")
        _attach(compiled.name, programs, new, cgroup_root, bpf_dir)
    finally:
        close_all(programs.values())
    cgroups = {**meta.cgroups, **{ref.cgroup_id: ref.relative for ref in new}}
    cache.write(bpf_dir, dataclasses.replace(meta, cgroups=cgroups))
    return new


def change_in_place(
    in_place: InPlace,
    compiled: CompiledPolicy,
    refs: tuple[CgroupRef, ...],
    bpf_dir: Path,
    owner: Owner,
    source: str | None,
    cache: MetaCache,
) -> None:
    """Put the new revision ``compiled`` of a policy applied by ``owner`` from ``source``
    in force in place, its targets resolving now to ``refs``; then write its metadata.
    Call it under the pin folder's lock. NotIncremental (nothing changed) when a full pass
    must decide: the policy is not applied as this process left it, its cgroups are not
    those it was applied to, or the new revision is more than new rules (inplace.py)."""
    meta = _settled_meta(compiled, bpf_dir, owner, source, cache)
    if {ref.cgroup_id for ref in refs} != meta.cgroups.keys():
        raise NotIncremental("its targets resolve to other cgroups now")
    programs = _pinned_programs(compiled, bpf_dir)
    try:
        pinned = {hook: program.id for hook, program in programs.items()}
    finally:
        close_all(programs.values())
    if pinned != meta.programs:
        raise NotIncremental("the pinned programs are not those the metadata names")
    kept = in_place.change_settled(compiled, meta)
    if kept is None:
        raise NotIncremental("not a change of rules this process can make in place")
    cache.write(bpf_dir, policy_meta(compiled, source, dict(meta.cgroups), kept, meta.owner))


def _settled_meta(
    compiled: CompiledPolicy, bpf_dir: Path, owner: Owner, source: str | None, cache: MetaCache
) -> pins.PolicyMeta:
    """The policy's metadata, if ``owner`` applied it from ``source``."""
    meta = cache.read(pins.policy_dir(bpf_dir, compiled.name))
    if meta is None or meta.owner != owner.to_json() or meta.source != source:
        raise NotIncremental("not applied, or not by this owner from this file")
    return meta


def _pinned_programs(compiled: CompiledPolicy, bpf_dir: Path) -> dict[str, Program]:
    """The program pinned for each hook of ``compiled``, opened (the caller closes them)."""
    programs: dict[str, Program] = {}
    for spec in compiled.programs:
        try:
            programs[spec.hook] = Program.from_pin(
                pins.hook_dir(bpf_dir, compiled.name, spec.hook) / pins.PROG_PIN
            )
        except (BpfError, OSError) as error:
            close_all(programs.values())
            raise NotIncremental(f"{spec.hook}: no program pinned") from error
    return programs


def _attach(
    name: str, programs: dict[str, Program], new: list[CgroupRef], root: Path, bpf_dir: Path
) -> None:
    """A link per hook and cgroup, each pinned at once; all detached again on a failure."""
    pinned: list[str] = []
    try:
        with pins.checked_once():
            for hook, program in programs.items():
                attach_type = hook_named(attach_hook(hook)).attach_type
                for ref in new:
                    path = pins.link_pin(bpf_dir, name, hook, ref.cgroup_id)
                    if os.path.lexists(path):
                        raise NotIncremental(f"a link is pinned already at {path}")
                    cgroup_fd = open_cgroup(ref.path(root))
                    try:
                        if cgroup_id(cgroup_fd) != ref.cgroup_id:
                            raise CgroupError(f"cgroup {ref.relative} was re-created meanwhile")
                        link = CgroupLink.create(program.fd, cgroup_fd, attach_type)
                    finally:
                        os.close(cgroup_fd)
                    with link:
                        try:
                            pins.pin_replacing(link, path)
                        except (BpfError, OSError):
                            link.detach()
                            raise
                    pinned.append(path)
    except (BpfError, OSError) as error:
        for link_pin in pinned:
            detach_pinned_link(link_pin)
        raise ApplyError(f"attaching to new cgroups failed, detached again: {error}") from error
    except NotIncremental:
        for link_pin in pinned:
            detach_pinned_link(link_pin)
        raise
