"""What a policy's device paths name on this node: the one place that looks into /dev.

Validation checks only the syntax of a device path (:mod:`cgpolicy.policy.semantic`), so a
policy is valid or invalid the same way on every machine, including a container that sees no
``/dev`` of the node. The node that applies the policy looks each path up here, following
symlinks as ``open()`` would, with two differences that keep the answer the node's own:

- The lookup happens inside the device folder ``dev_root`` (``/dev``, or wherever the node's
  ``/dev`` is mounted: the DaemonSet mounts it at ``/host/dev``). An absolute symlink target
  under ``/dev`` is followed there too; a target anywhere else (``/dev/stdin`` ->
  ``/proc/self/fd/0``) is not followed: it would name this process's files, not the node's.
- Only folders and symlinks that nobody but root can change are gone through. A path
  through a world-writable folder (``/dev/shm``, ``/dev/mqueue``) could be pointed at any
  device by any local user, which would let them decide what an ``allow`` rule allows.

A ``deny`` rule whose path names no device now keeps the numbers it was last applied with
(recorded in the policy's pinned metadata), so that a node vanishing for a moment (udev
re-creating it, a driver reload, a ``--dev-root`` mount gone missing after an upgrade) never
lifts a deny that was enforced. See docs/policy.md, "spec.devices".
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cgpolicy.compiler.spec import DeviceNode
from cgpolicy.policy.model import DeviceRule, Policy

DEV_ROOT = Path("/dev")
MAX_SYMLINKS = 40  # as the kernel's path walk (ELOOP)
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


def _missing(detail: str) -> DeviceNode:
    return DeviceNode(None, state="missing", detail=detail)


def _not_a_device(detail: str) -> DeviceNode:
    return DeviceNode(None, state="not-a-device", detail=detail)


def _unsafe(detail: str) -> DeviceNode:
    return DeviceNode(None, state="unsafe", detail=detail)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a device node"


def device_at(path: str) -> tuple[str, int, int] | None:
    """("char" or "block", major, minor) of the device node ``path`` names here, symlinks
    followed (as `explain device /dev/PATH` means it); None when it is not a device node.
    OSError when it cannot be looked at, ValueError for a path with a NUL."""
    info = os.stat(path)
    if stat.S_ISCHR(info.st_mode):
        return "char", os.major(info.st_rdev), os.minor(info.st_rdev)
    if stat.S_ISBLK(info.st_mode):
        return "block", os.major(info.st_rdev), os.minor(info.st_rdev)
    return None


def resolve_device_path(path: str, dev_root: Path = DEV_ROOT) -> DeviceNode:
    """What ``path`` (``/dev/...``, as validation allows) names under ``dev_root``: a
    character or block device's numbers, or why it names none. Never raises for what it
    finds on disk."""
    parts = path.split("/")
    if parts[:2] != ["", "dev"]:
        return _unsafe("is not under /dev")
    try:
        root_is_folder = stat.S_ISDIR(os.stat(dev_root).st_mode)
    except OSError:
        root_is_folder = False
    if not root_is_folder:
        return _missing(f"cannot be looked up: the device folder {dev_root} is missing")
    pending = list(reversed(parts[2:]))
    done: list[str] = []
    followed = 0
    try:
        while pending:
            name = pending.pop()
            if name in ("", "."):
                continue
            if name == "..":
                if not done:
                    return _unsafe("leads out of /dev through '..'")
                done.pop()
                continue
            where = dev_root.joinpath(*done, name)
            shown = "/dev/" + "/".join([*done, name])
            try:
                info = os.lstat(where)
            except FileNotFoundError:
                where_missing = "" if shown == path else f" (no {shown})"
                return _missing(f"does not exist{where_missing}")
            if stat.S_ISLNK(info.st_mode):
                if info.st_uid != 0:
                    return _unsafe(f"goes through the symlink {shown}, which root does not own")
                followed += 1
                if followed > MAX_SYMLINKS:
                    return _not_a_device("goes through too many symlinks")
                target = os.readlink(where)
                if target.startswith("/"):
                    target_parts = target.split("/")
                    if target_parts[1:2] != ["dev"]:
                        return _unsafe(
                            f"goes through the symlink {shown}, which points out of /dev "
                            f"(to {target})"
                        )
                    done = []
                    pending.extend(reversed(target_parts[2:]))
                else:
                    pending.extend(reversed(target.split("/")))
                continue
            if any(rest not in ("", ".") for rest in pending):  # a folder on the way
                if not stat.S_ISDIR(info.st_mode):
                    return _not_a_device(f"goes through {shown}, which is not a folder")
                if info.st_uid != 0 or info.st_mode & _WRITABLE_BY_OTHERS:
                    return _unsafe(f"goes through {shown}, which others than root can write")
                done.append(name)
                continue
            if stat.S_ISCHR(info.st_mode):
                return DeviceNode("char", os.major(info.st_rdev), os.minor(info.st_rdev))
            if stat.S_ISBLK(info.st_mode):
                return DeviceNode("block", os.major(info.st_rdev), os.minor(info.st_rdev))
            return _not_a_device(f"is {_kind(info.st_mode)}, not a device node")
    except (OSError, ValueError) as error:  # EACCES, ELOOP...; ValueError: a NUL byte
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        return _missing(f"cannot be looked up ({reason})")
    return _not_a_device("is a folder, not a device node")


@dataclass(frozen=True)
class DeviceBinding:
    """What every path rule of one policy resolved to: a value (the reconciler compares it
    between passes to know when to recompile) and the compiler's device resolver."""

    nodes: tuple[tuple[str, str, DeviceNode], ...] = ()  # (rule action, path, node)

    def __call__(self, rule: DeviceRule) -> DeviceNode:
        for action, path, node in self.nodes:
            if action == rule.action and path == rule.path:
                return node
        return _missing("was not looked up")  # a rule not in the policy bound: cannot happen


def device_paths(policy: Policy) -> list[tuple[str, str]]:
    """(action, path) of every unresolved ``path:`` device rule, without repeats."""
    if policy.devices is None:
        return []
    found = [
        (rule.action, rule.path)
        for rule in policy.devices.rules
        if rule.type is None and rule.path is not None
    ]
    return list(dict.fromkeys(found))


def remembered_denies(entries: Sequence[Mapping[str, object]]) -> dict[str, DeviceNode]:
    """path -> the device a deny rule's path named when the policy was last applied, from
    the ``devices`` entries of its pinned metadata (anything malformed is ignored)."""
    found: dict[str, DeviceNode] = {}
    types: dict[str, Literal["char", "block"]] = {"c": "char", "b": "block"}
    for entry in entries:
        path, device = entry.get("path"), entry.get("device")
        if entry.get("action") != "deny" or not isinstance(path, str):
            continue
        if not isinstance(device, str):
            continue
        kind, _, numbers = device.partition(" ")
        major, _, minor = numbers.partition(":")
        if kind in types and major.isdigit() and minor.isdigit():
            found[path] = DeviceNode(types[kind], int(major), int(minor))
    return found


def bind_devices(
    policy: Policy,
    dev_root: Path = DEV_ROOT,
    remembered: Mapping[str, DeviceNode] | None = None,
) -> DeviceBinding:
    """Resolve the policy's device paths on this node. A deny rule's path that names no
    device now keeps the device in ``remembered`` (what it named when last applied)."""
    looked_up: dict[str, DeviceNode] = {}
    nodes = []
    for action, path in device_paths(policy):
        if path not in looked_up:
            looked_up[path] = resolve_device_path(path, dev_root)
        node = looked_up[path]
        before = (remembered or {}).get(path)
        if node.type is None and action == "deny" and before is not None:
            node = DeviceNode(before.type, before.major, before.minor, "kept", node.detail)
        nodes.append((action, path, node))
    return DeviceBinding(tuple(nodes))


def watch_folders(paths: Iterable[str], dev_root: Path = DEV_ROOT) -> set[Path]:
    """The folders to watch for the device nodes these paths name appearing, vanishing or
    being replaced: for each path, its deepest existing folder under ``dev_root`` (symlinks
    elsewhere are left to the periodic resync)."""
    folders: set[Path] = set()
    for path in paths:
        folder = dev_root
        for part in path.split("/")[2:-1]:
            candidate = folder / part
            try:
                if not stat.S_ISDIR(os.lstat(candidate).st_mode):
                    break
            except (OSError, ValueError):
                break
            folder = candidate
        folders.add(folder)
    return folders
