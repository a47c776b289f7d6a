"""A change of rules written into the loaded programs' maps, not a reload.

When a new revision of a policy differs from the loaded one only in the contents of
net.c's two-copy rule maps (prefixes, ports, protocols, ICMP types, interfaces, actions,
defaults: everything in `config`, `cidr4_*`, `cidr6_*`, `ports`, `port_blocks`, `icmp_types`,
`ifaces`), the
change is the delta between the two contents: written into the copy not in force, put in
force with one update of the load's `generation` map (every program of the policy at
once: a packet or a syscall meets the old rules or the new ones, never a mix), and then,
after an RCU grace period, written into the other copy in the background. The cost is
that of the delta, not of the list.

Only the process that loaded or last changed a policy knows what its copies hold (reading
a 10,000-prefix index back would cost more than the reload), so only a long-lived
enforcer (the service) changes in place, and only a load it made or changed itself. Any
doubt means a reload, which is always correct: another process applied in between, a
program, a map size or a map outside the two-copy set differs, the targets change, a copy
would overflow, or a write failed.
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from cgpolicy.compiler.spec import CompiledPolicy, MapSpec, ProgramSpec
from cgpolicy.contract import COUNTER, COUNTER_SLOTS, U32
from cgpolicy.enforcer.plan import Action, PolicyPlan
from cgpolicy.kernel.applied import AppliedPolicy, program_maps
from cgpolicy.kernel.bpf import Map, close_all
from cgpolicy.kernel.inplace import (
    Delta,
    copy_entries,
    delta,
    fits,
    in_force,
    switch,
    wait_for_readers,
    write_copy,
)
from cgpolicy.kernel.pins import PolicyMeta
from cgpolicy.kernel.syscall import BpfError

log = logging.getLogger(__name__)


@dataclass
class _Load:
    """A policy load this process made or changed: what both copies hold (once level)."""

    compiled: CompiledPolicy
    programs: dict[str, int]  # hook -> program id
    gen: int = 0  # the copy in force
    # (hook, map) -> max_entries of the map as created (a later compile may size it anew)
    capacity: dict[tuple[str, str], int] = field(default_factory=dict)
    # the load's two-copy maps by (owner hook, name), its generation map and its counter
    # maps by hook: opened at its first change, kept open until it is forgotten
    maps: dict[tuple[str, str], Map] = field(default_factory=dict)
    generation: Map | None = None
    counters: dict[str, Map] = field(default_factory=dict)
    leveling: Future[None] | None = None  # copy 1 being filled, or the old copy leveled

    def close(self) -> None:
        if self.leveling is not None:
            self.leveling.exception()  # wait: it writes into these maps
        close_all([*self.maps.values(), *self.counters.values()])
        if self.generation is not None:
            self.generation.close()


class InPlace:
    """The loads an Enforcer may change in place, and the changes."""

    def __init__(self) -> None:
        self._loads: dict[str, _Load] = {}
        self._unfilled: dict[str, _Load] = {}  # remembered, copy 1 not yet being filled
        # brings old copies level after a grace period, off the caller's path
        self._leveler = ThreadPoolExecutor(1, thread_name_prefix="cgpolicy-level")

    def remember(self, compiled: CompiledPolicy, programs: dict[str, int]) -> None:
        """``compiled`` was just loaded whole as ``programs``, into copy 0 (the one in
        force); copy 1 is filled in the background once the caller's pass is over
        (:meth:`start_filling`), off the load's path: nothing reads it until a change
        switches to it, which waits for the fill."""
        self.forget(compiled.name)
        load = _Load(compiled, dict(programs))
        for spec in _owners(compiled):
            for m in spec.maps:
                load.capacity[(spec.hook, m.name)] = m.max_entries
        self._loads[compiled.name] = load
        self._unfilled[compiled.name] = load

    def start_filling(self) -> None:
        """Start filling copy 1 of the loads remembered since the last call. Called once a
        pass (or an apply outside one) is over: on the same CPUs and under the same GIL,
        the fill (a batch write and the prefix indexes made ready for a change: ~15 ms at
        10,000 prefixes) slowed what was left of the pass by about as much."""
        for name in list(self._unfilled):
            self._start_fill(name)

    def _start_fill(self, name: str) -> None:
        load = self._unfilled.pop(name, None)
        if load is not None:
            load.leveling = self._leveler.submit(_fill_copy_1, load)

    def forget(self, name: str) -> None:
        self._unfilled.pop(name, None)
        load = self._loads.pop(name, None)
        if load is not None:
            load.close()

    def apply(
        self, plan: PolicyPlan, compiled: CompiledPolicy, applied: AppliedPolicy | None
    ) -> dict[str, int] | None:
        """Put ``compiled`` in force in place if it can be, and say with which programs (by
        hook); None when it must be loaded whole (nothing was changed then)."""
        load = self._level_load(plan.name)
        if load is None:
            return None
        if not _same_load(load, plan, applied):
            self.forget(plan.name)
            return None
        return self._change(load, compiled)

    def change_settled(self, compiled: CompiledPolicy, meta: PolicyMeta) -> dict[str, int] | None:
        """:meth:`apply` for a caller that vouches, from the policy's metadata and program
        pins read now (``meta``), that the kernel holds it as this process left it, on the
        same cgroups (enforcer/incremental.py: the links are not read)."""
        load = self._level_load(compiled.name)
        if load is None:
            return None
        if meta.revision != load.compiled.revision or meta.programs != load.programs:
            self.forget(compiled.name)
            return None
        return self._change(load, compiled)

    def _level_load(self, name: str) -> _Load | None:
        """The load of ``name`` once its copies are level; None (and forgotten) when it is
        not known or a copy's contents are not."""
        self._start_fill(name)  # a change waits for the fill: it must have begun
        load = self._loads.get(name)
        if load is None or load.leveling is None:
            return load
        failed = load.leveling.exception()
        load.leveling = None
        if failed is not None:  # the old copy's contents are unknown
            log.warning("%s: old copy not brought level (%s)", name, failed)
            self.forget(name)
            return None
        return load

    def _change(self, load: _Load, compiled: CompiledPolicy) -> dict[str, int] | None:
        """The change itself, on a load whose copies are level and held as it was left."""
        pairs = _changed_maps(load, compiled)
        generation = _open(load) if pairs is not None else None
        if pairs is None or generation is None or in_force(generation) != load.gen:
            self.forget(compiled.name)
            return None
        writes = []
        for hook, old, new in pairs:
            as_created = dataclasses.replace(old, max_entries=load.capacity[(hook, old.name)])
            writes.append(_Write(load.maps[(hook, old.name)], as_created, _delta(old, new)))
        standby = 1 - load.gen
        try:
            for write in writes:
                write_copy(write.map, write.spec, standby, write.change)
            switch(generation, standby)
        except BpfError as error:  # the copy in force is untouched: reload instead
            # (and forget the load: its standby copy now holds neither revision)
            log.info("%s: no change in place (%s); reloading", compiled.name, error)
            self.forget(compiled.name)
            return None
        old_gen, load.gen = load.gen, standby
        _reset_counters(load, compiled)
        load.compiled = compiled
        load.leveling = self._leveler.submit(_level, writes, old_gen)
        return dict(load.programs)


@dataclass
class _Write:
    map: Map
    spec: MapSpec  # as the map was created (its max_entries place copy 1 of an array)
    change: Delta


def _delta(old: MapSpec, new: MapSpec) -> Delta:
    """What turns ``old``'s entries into ``new``'s: the compiler's own account of it when
    it made ``new`` by changing ``old`` (a prefix index changed in place, cidr6.py), else
    found by comparing the two."""
    change = new.change
    if change is not None and change.base is old.entries:
        return Delta(change.write, ())
    return delta(old.entries, new.entries)


def _open(load: _Load) -> Map | None:
    """Open the load's two-copy, generation and counter maps, once; its generation map, or
    None when the kernel no longer has them all."""
    if load.generation is not None:
        return load.generation
    for spec in _owners(load.compiled):
        if not any(m.name == "generation" for m in spec.maps):
            continue  # not a net.c program (sock.c, device.c...): no copies of rules
        wanted = {m.name for m in spec.maps if m.two_copies} | {"generation", "counters"}
        try:
            found = program_maps(load.programs[spec.hook], wanted)
        except BpfError:
            return None
        if found.keys() != wanted or (  # one switch must turn every program of the load
            load.generation is not None and found["generation"].id != load.generation.id
        ):
            close_all(found.values())
            return None
        for name, opened in found.items():
            if name == "counters":
                load.counters[spec.hook] = opened
            elif name == "generation" and load.generation is None:
                load.generation = opened
            elif name == "generation":
                opened.close()
            else:
                load.maps[(spec.hook, name)] = opened
    return load.generation


def _owners(compiled: CompiledPolicy) -> list[ProgramSpec]:
    """The programs that own their maps (not a connect check on egress's)."""
    return [spec for spec in compiled.programs if spec.maps_from is None]


def _same_load(load: _Load, plan: PolicyPlan, applied: AppliedPolicy | None) -> bool:
    """Whether the kernel still holds exactly the load this process knows, on the same
    cgroups: no other apply in between, nothing to attach or detach."""
    if applied is None or applied.interrupted or applied.revision != load.compiled.revision:
        return False
    if {hook: h.prog_id for hook, h in applied.hooks.items()} != load.programs:
        return False
    for step in plan.steps:
        if step.action is Action.KEEP:
            continue
        if step.action is not Action.UPDATE:
            return False
        link = applied.hooks[step.hook].links.get(step.cgroup_id)
        if link is None or link.prog_id != load.programs[step.hook]:
            return False
    return True


def _changed_maps(
    load: _Load, compiled: CompiledPolicy
) -> list[tuple[str, MapSpec, MapSpec]] | None:
    """(hook, old spec, new spec) of every two-copy map whose contents change, or None when
    the new revision is more than new contents of two-copy maps that fit."""
    old = load.compiled
    if (old.dns_programs, old.names, old.name_rules, old.dns_max_ttl) != (
        compiled.dns_programs,
        compiled.names,
        compiled.name_rules,
        compiled.dns_max_ttl,
    ):
        return None
    before = {spec.hook: spec for spec in old.programs}
    after = {spec.hook: spec for spec in compiled.programs}
    if before.keys() != after.keys():
        return None
    pairs = []
    for hook, new_spec in after.items():
        old_spec = before[hook]
        if _shape(old_spec) != _shape(new_spec):
            return None
        if new_spec.maps_from is not None:
            continue  # its maps are its owner's, compared there
        for was, now in zip(old_spec.maps, new_spec.maps, strict=True):
            if not now.two_copies:
                if was != now:
                    return None
                continue
            capacity = load.capacity[(hook, was.name)]
            if now.map_type == "array" and now.max_entries != capacity:
                return None
            if not fits(now.map_type, capacity, len(was.entries), len(now.entries)):
                return None
            if was.entries != now.entries:
                pairs.append((hook, was, now))
    return pairs


def _shape(spec: ProgramSpec) -> tuple[object, ...]:
    """What must be equal for a program to stay: its code and its maps' layouts."""
    maps = tuple((m.name, m.map_type, m.key_size, m.value_size, m.two_copies) for m in spec.maps)
    return (spec.source, spec.function, spec.prog_name, spec.maps_from, maps)


def _reset_counters(load: _Load, compiled: CompiledPolicy) -> None:
    """A hook whose rules changed counts from zero, as a reloaded one would: its counter
    slots may now stand for other rules."""
    labels_before = dict(load.compiled.rules)
    zero = bytes(COUNTER.size)
    for hook, labels in compiled.rules:
        counters = load.counters.get(hook)
        if counters is None or labels_before.get(hook) == labels:
            continue
        try:
            counters.update_batch([(U32.pack(slot), zero) for slot in range(COUNTER_SLOTS)])
        except BpfError as error:
            log.warning("%s %s: counters not reset: %s", compiled.name, hook, error)


def _fill_copy_1(load: _Load) -> None:
    """Copy 1 of a fresh load made equal to copy 0, which the compiled policy holds; the
    prefix indexes made ready for a change (compiler/cidr6.py CidrIndex.prepare)."""
    if _open(load) is None:
        raise LookupError(f"a map of {load.compiled.name} is gone")
    for spec in _owners(load.compiled):
        for m in spec.maps:
            if m.two_copies:
                load.maps[(spec.hook, m.name)].update_batch(copy_entries(m, 1))
            if m.index is not None:
                m.index.prepare(m)


def _level(writes: list[_Write], old: int) -> None:
    """Once no program still reads the old copy, write the same change into it."""
    wait_for_readers()
    for write in writes:
        write_copy(write.map, write.spec, old, write.change)
