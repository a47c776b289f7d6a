"""Deny events from every applied policy: open each policy's pinned ring buffer, decode,
name the cgroup and the rule, and report what the rate limit dropped."""

from __future__ import annotations

import logging
import select
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cgpolicy.contract import DEFAULT_SLOT, EGRESS_AT_CONNECT
from cgpolicy.events.decode import Event, decode, monotonic_to_wall_ns
from cgpolicy.kernel.applied import (
    AppliedPolicy,
    event_rings,
    events_dropped,
    program_maps,
    read_named,
)
from cgpolicy.kernel.bpf import Map
from cgpolicy.kernel.cgroup import cgroup_names
from cgpolicy.kernel.ringbuf import RingBuffer
from cgpolicy.kernel.syscall import BpfError

log = logging.getLogger(__name__)


class CgroupNames:
    """cgroup id -> path relative to the cgroup2 root, from a walk of the tree; walked again
    (at most once a second) when an id is not known."""

    def __init__(self, root: Path, min_interval: float = 1.0) -> None:
        self.root = root
        self.min_interval = min_interval
        self._names: dict[int, str] = {}
        self._walked = float("-inf")

    def get(self, cgroup_id: int) -> str | None:
        if cgroup_id not in self._names and time.monotonic() - self._walked >= self.min_interval:
            self._names = cgroup_names(self.root)
            self._walked = time.monotonic()
        return self._names.get(cgroup_id)


@dataclass
class PolicyEvents:
    """One applied policy's ring buffer and rate-limit maps."""

    name: str
    ring: RingBuffer
    ring_id: int
    rules: dict[str, list[dict[str, object]]]
    ratelimits: dict[str, Map] = field(default_factory=dict)  # hook -> its program's map

    def dropped(self) -> dict[str, int]:
        """hook -> events dropped so far (rate limit or full ring buffer), over all CPUs."""
        found = {}
        for hook, ratelimit in self.ratelimits.items():
            try:
                found[hook] = events_dropped(ratelimit)
            except BpfError:
                continue
        return found

    def close(self) -> None:
        self.ring.close()
        for ratelimit in self.ratelimits.values():
            ratelimit.close()


def _open_policy(applied: AppliedPolicy, ring_map: Map) -> PolicyEvents:
    events = PolicyEvents(
        applied.name,
        RingBuffer(ring_map),
        ring_map.id,
        applied.meta.rules if applied.meta else {},
    )
    for hook in applied.hooks.values():
        if hook.hook in EGRESS_AT_CONNECT:
            continue  # the egress program's rate limit: reported once, as egress
        maps = program_maps(hook.prog_id, {"ratelimit"}) if hook.prog_id else {}
        if "ratelimit" in maps:
            events.ratelimits[hook.hook] = maps["ratelimit"]
    return events


class EventReader:
    """Events of every policy under ``bpf_dir``; call :meth:`refresh` to pick up policies
    applied, reloaded or removed since."""

    def __init__(self, bpf_dir: Path, cgroup_root: Path) -> None:
        self.bpf_dir = bpf_dir
        self.names = CgroupNames(cgroup_root)
        self.policies: dict[str, PolicyEvents] = {}
        self._retired: list[PolicyEvents] = []  # replaced ring buffers, drained once more
        self.refresh()

    def refresh(self) -> None:
        rings = event_rings(self.bpf_dir)
        for name, ring_map in rings.items():
            current = self.policies.get(name)
            if ring_map is None:
                continue
            if current is not None and ring_map.id == current.ring_id:
                ring_map.close()
                continue
            try:
                opened = _open_policy(read_named(self.bpf_dir, name, links=False), ring_map)
            except OSError:  # removed meanwhile
                ring_map.close()
                continue
            if current is not None:
                self._retired.append(current)
            self.policies[name] = opened
        for name in set(self.policies) - set(rings):
            self._retired.append(self.policies.pop(name))

    def _annotate(self, policy: PolicyEvents, event: Event) -> Event:
        event.policy = policy.name
        event.cgroup = self.names.get(event.cgroup_id)
        labels = policy.rules.get(event.hook) or []
        if event.rule != DEFAULT_SLOT and event.rule < len(labels):
            label = labels[event.rule]
            text = str(label.get("text"))
            line = label.get("line")
            event.rule_text = f"{text}, line {line}" if line else text
        elif event.rule == DEFAULT_SLOT:
            event.rule_text = "section default"
        return event

    def drain(self) -> Iterator[Event]:
        """Every event now waiting, all policies, consuming them."""
        offset = monotonic_to_wall_ns()
        for policy in [*self._retired, *self.policies.values()]:
            for raw in policy.ring.drain():
                try:
                    yield self._annotate(policy, decode(raw, offset))
                except ValueError as error:
                    log.warning("%s: undecodable event: %s", policy.name, error)
        for retired in self._retired:
            retired.close()
        self._retired.clear()

    def dropped(self) -> dict[str, dict[str, int]]:
        """policy -> hook -> events dropped so far (counters live as long as the programs)."""
        return {name: p.dropped() for name, p in sorted(self.policies.items())}

    def follow(
        self,
        emit: Callable[[Event], None],
        on_dropped: Callable[[str, str, int], None],
        stop: Callable[[], bool] = lambda: False,
        rescan: float = 1.0,
    ) -> None:
        """Wait for events with epoll on the ring buffers, calling ``emit`` for each; every
        ``rescan`` seconds look for new or reloaded policies and report newly dropped
        events (policy, hook, how many since the last report)."""
        last_dropped = self.dropped()
        while not stop():
            with select.epoll() as poller:
                for policy in self.policies.values():
                    poller.register(policy.ring.fd, select.EPOLLIN)
                deadline = time.monotonic() + rescan
                while not stop() and time.monotonic() < deadline:
                    for event in self.drain():
                        emit(event)
                    poller.poll(max(0.0, min(rescan, deadline - time.monotonic())))
            for event in self.drain():
                emit(event)
            self.refresh()
            now = self.dropped()
            for name, hooks in now.items():
                for hook, count in hooks.items():
                    before = last_dropped.get(name, {}).get(hook, 0)
                    if count > before:
                        on_dropped(name, hook, count - before)
            last_dropped = now

    def close(self) -> None:
        for policy in [*self._retired, *self.policies.values()]:
            policy.close()
        self.policies.clear()
        self._retired.clear()
