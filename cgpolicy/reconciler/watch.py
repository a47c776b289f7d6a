"""Wake-ups for the reconcile loop: inotify on the policy folder and on the cgroup folders
where a target can appear, netlink link events for interfaces. Events are hints; the
periodic resync is the truth, so a missed or coalesced event costs latency, not safety."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from inotify_simple import INotify
from inotify_simple import flags as inotify_flags

from cgpolicy.kernel.cgroup import is_cgroup, matching_children
from cgpolicy.kernel.interfaces import link_monitor
from cgpolicy.policy.model import Target

log = logging.getLogger(__name__)

FOLDER_EVENTS = (
    inotify_flags.CREATE
    | inotify_flags.DELETE
    | inotify_flags.MOVED_TO
    | inotify_flags.MOVED_FROM
    | inotify_flags.CLOSE_WRITE
    | inotify_flags.ATTRIB
    | inotify_flags.DELETE_SELF
)
# The policy folder itself went away, or its watch did (a full pass says what that means).
_WATCH_GONE = inotify_flags.DELETE_SELF | inotify_flags.IGNORED
CGROUP_EVENTS = inotify_flags.CREATE | inotify_flags.DELETE | inotify_flags.DELETE_SELF
# A device node (or a symlink to one) created, removed or renamed in a folder a policy's
# device path goes through.
DEVICE_EVENTS = (
    inotify_flags.CREATE
    | inotify_flags.DELETE
    | inotify_flags.MOVED_TO
    | inotify_flags.MOVED_FROM
    | inotify_flags.DELETE_SELF
)
MAX_CGROUP_WATCHES = 20000


@dataclass
class Events:
    """What woke the loop since the last :meth:`Watcher.take_events`."""

    created: list[Path] = field(default_factory=list)  # cgroups created in watched folders
    policy_files: bool = False  # something in the policy folder (and only there)
    other: bool = False  # anything else: a device, a link, a cgroup removed, a lost watch


def watch_folders(root: Path, targets: Iterable[Target]) -> set[Path]:
    """The existing cgroup folders in which a target could appear next: for each target,
    every folder matching a proper prefix of its pattern (for a literal path that does not
    exist yet, its deepest existing ancestor)."""
    folders: set[Path] = set()
    for target in targets:
        level = [root]
        # the last component's matches are targets, not folders to watch: not listed
        for component in target.pattern.split("/")[:-1]:
            folders.update(level)
            following = []
            for folder in level:
                if not target.is_glob or not any(ch in component for ch in "*?["):
                    candidate = folder / component
                    if is_cgroup(candidate):
                        following.append(candidate)
                    continue
                try:
                    following.extend(matching_children(folder, component))
                except OSError:
                    continue  # cannot list it now: the resync looks again
            level = following
            if not level:
                break
        folders.update(level)
    return folders


class Watcher:
    """One inotify instance for the policy folder and the cgroup folders, and an optional
    netlink socket for link changes; `fds()` feed the loop's select()."""

    def __init__(self, policy_dir: Path, follow_links: bool = True) -> None:
        self.inotify = INotify()
        self.policy_dir = policy_dir
        self._cgroup_watches: dict[Path, int] = {}
        self._cgroup_folders: dict[int, Path] = {}  # the same, by watch descriptor
        self._events = Events()  # since take_events()
        self._device_watches: dict[Path, int] = {}
        self._policy_watch: int | None = None
        self.watch_policy_dir()
        self._netlink = link_monitor() if follow_links else None
        self.links_generation = 0

    def watch_policy_dir(self) -> None:
        """(Re)watch the policy folder; it may vanish (an unmounted volume) and come back."""
        if self._policy_watch is None:
            try:
                self._policy_watch = self.inotify.add_watch(self.policy_dir, FOLDER_EVENTS)
            except OSError:
                pass  # not there now: the resync looks again

    def fds(self) -> list[int]:
        fds = [self.inotify.fileno()]
        if self._netlink is not None:
            fds.append(self._netlink.fileno())
        return fds

    def drain(self, ready: Iterable[int]) -> bool:
        """Consume pending events; True when anything arrived."""
        woke = False
        ready = set(ready)
        if self.inotify.fileno() in ready:
            events = self.inotify.read(timeout=0)
            woke = woke or bool(events)
            for event in events:
                folder = self._cgroup_folders.get(event.wd)
                if folder is not None and event.mask & inotify_flags.CREATE:
                    self._events.created.append(folder / event.name)
                elif event.wd == self._policy_watch and not event.mask & _WATCH_GONE:
                    self._events.policy_files = True
                else:
                    self._events.other = True
            if any(e.wd == self._policy_watch and e.mask & inotify_flags.IGNORED for e in events):
                log.warning("policy folder %s was removed", self.policy_dir)
                self._policy_watch = None
        if self._netlink is not None and self._netlink.fileno() in ready:
            self._netlink.drain()
            self.links_generation += 1
            self._events.other = True
            woke = True
        return woke

    def take_events(self) -> Events:
        """What arrived since the last call."""
        events, self._events = self._events, Events()
        return events

    def watch_cgroups(self, folders: set[Path]) -> None:
        """Watch exactly ``folders`` (new ones added, vanished or unneeded ones dropped)."""
        self._watch(self._cgroup_watches, folders, CGROUP_EVENTS, "cgroup")
        self._cgroup_folders = {wd: folder for folder, wd in self._cgroup_watches.items()}

    def watch_devices(self, folders: set[Path]) -> None:
        """Watch exactly these device folders, so that a device node a policy names is
        seen when it appears, vanishes or is replaced (the resync catches anything else)."""
        self._watch(self._device_watches, folders, DEVICE_EVENTS, "device")

    def _watch(self, watches: dict[Path, int], folders: set[Path], mask: int, kind: str) -> None:
        for folder in list(watches):
            if folder not in folders:
                wd = watches.pop(folder)
                try:
                    self.inotify.rm_watch(wd)
                except OSError:
                    pass  # the folder is gone, and its watch with it
        for folder in sorted(folders - set(watches)):
            if len(watches) >= MAX_CGROUP_WATCHES:
                log.warning(
                    "watching %d %s folders; relying on resync for the rest",
                    MAX_CGROUP_WATCHES,
                    kind,
                )
                break
            try:
                watches[folder] = self.inotify.add_watch(folder, mask)
            except OSError:
                continue  # vanished meanwhile

    def close(self) -> None:
        self.inotify.close()
        if self._netlink is not None:
            self._netlink.close()
