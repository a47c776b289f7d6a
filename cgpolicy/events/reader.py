"""Deny events from every applied policy: open each policy's pinned ring buffer, decode,
name the cgroup and the rule, and report what the rate limit dropped."""

from __future__ import annotations

import logging
import os
import select
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cgpolicy.contract import DEFAULT_SLOT, RATELIMIT, U32
from cgpolicy.enforcer import pins
from cgpolicy.events.decode import Event, decode, monotonic_to_wall_ns
from cgpolicy.events.ringbuf import RingBuffer
from cgpolicy.kernel.bpf import HOOKS, BpfError, Map, Program

log = logging.getLogger(__name__)
_ZERO = U32.pack(0)


class CgroupNames:
    """cgroup id -> path relative to the cgroup2 root, from a walk of the tree; walked again
    (at most once a second) when an id is not known."""

    def __init__(self, root: Path, min_interval: float = 1.0) -> None:
        self.root = root
        self.min_interval = min_interval
        self._names: dict[int, str] = {}
        self._walked = float("-inf")

    def _walk(self) -> None:
        names: dict[int, str] = {}
        stack = [self.root]
        while stack:
            current = stack.pop()
            try:
                with os.scandir(current) as entries:
                    for entry in entries:
                        if entry.is_dir(follow_symlinks=False):
                            try:
                                names[entry.inode()] = os.path.relpath(entry.path, self.root)
                            except OSError:
                                continue
                            stack.append(Path(entry.path))
            except OSError:  # vanished meanwhile
                continue
        try:
            names[os.stat(self.root).st_ino] = "."
        except OSError:
            pass
        self._names = names
        self._walked = time.monotonic()

    def get(self, cgroup_id: int) -> str | None:
        if cgroup_id not in self._names and time.monotonic() - self._walked >= self.min_interval:
            self._walk()
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
                values = ratelimit.lookup_per_cpu(_ZERO) or []
            except BpfError:
                continue
            found[hook] = sum(RATELIMIT.unpack_from(v)["dropped"] for v in values)
        return found

    def close(self) -> None:
        self.ring.close()
        for ratelimit in self.ratelimits.values():
            ratelimit.close()


def _open_policy(folder: Path) -> PolicyEvents | None:
    try:
        ring_map = Map.from_pin(folder / pins.EVENTS_PIN)
    except (BpfError, OSError):
        return None  # applied before deny events existed, or being replaced
    meta = pins.read_meta(folder)
    events = PolicyEvents(
        folder.name, RingBuffer(ring_map), ring_map.id, meta.rules if meta else {}
    )
    for hook_folder in pins.real_subfolders(folder):
        if hook_folder.name not in HOOKS:
            continue
        try:
            with Program.from_pin(hook_folder / pins.PROG_PIN) as program:
                map_ids = program.info().map_ids
            for map_id in map_ids:
                candidate = Map.from_id(map_id)
                if candidate.name == "ratelimit":
                    events.ratelimits[hook_folder.name] = candidate
                    break
                candidate.close()
        except (BpfError, OSError):
            continue
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
        seen = set()
        for folder in pins.policy_folders(self.bpf_dir):
            seen.add(folder.name)
            current = self.policies.get(folder.name)
            try:
                pinned_id = Map.from_pin(folder / pins.EVENTS_PIN)
            except (BpfError, OSError):
                continue
            with pinned_id:
                if current is not None and pinned_id.id == current.ring_id:
                    continue
            opened = _open_policy(folder)
            if opened is None:
                continue
            if current is not None:
                self._retired.append(current)
            self.policies[folder.name] = opened
        for name in set(self.policies) - seen:
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
