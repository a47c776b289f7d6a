"""`cgpolicy learn` from start to end: observe, write, check that what was written is a
valid policy. The CLI only parses options and prints."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cgpolicy.kernel.cgroup import CgroupError, resolve
from cgpolicy.kernel.learn import DEFAULT_SIZES, Observations, Sizes, device_nodes
from cgpolicy.learn.against import defaults, denied
from cgpolicy.learn.session import LearnError, learn_cgroup, learn_command
from cgpolicy.learn.write import (
    PrefixMerge,
    Source,
    lost_warning,
    with_connects_as_egress,
    write_policy,
)
from cgpolicy.policy.model import Policy
from cgpolicy.policy.validate import load_contents


@dataclass
class Outcome:
    text: str
    warnings: list[str]
    observations: Observations
    status: int = 0  # the command's exit status (``-- CMD``), as Popen gives it
    interrupted: bool = False


def policy_name(base: str) -> str:
    """A valid metadata.name from a command or cgroup name ("learned" if nothing is left)."""
    name = re.sub(r"[^a-z0-9-]+", "-", base.lower()).strip("-")
    name = re.sub(r"-{2,}", "-", name)[:63].strip("-")
    return name or "learned"


def learn(
    cgroup_root: Path,
    dev_root: Path,
    *,
    command: Sequence[str] | None = None,
    cgroup: str | None = None,
    seconds: float | None = None,
    name: str | None = None,
    merge: PrefixMerge | None = None,
    against: Policy | None = None,
    linger: float = 1.0,
    sizes: Sizes = DEFAULT_SIZES,
) -> Outcome:
    """Observe a command (``command``) or a cgroup (``cgroup`` for ``seconds``) and write
    the policy; with ``against``, only what that policy would deny."""
    interrupted = False
    status = 0
    if command:
        base = name or policy_name(Path(command[0]).name)
        observations, book, status = learn_command(cgroup_root, list(command), base, linger, sizes)
        source = Source(command=command, status=status)
    else:
        assert cgroup is not None and seconds is not None
        relative = _cgroup_target(cgroup_root, cgroup)
        base = name or policy_name(Path(relative).name)
        observations, book, interrupted = learn_cgroup(cgroup_root / relative, seconds, sizes)
        source = Source(cgroup=relative)
    heading: list[str] = []
    section_defaults: dict[tuple[str, ...], str] = {}
    shown = with_connects_as_egress(observations)
    if against is not None:
        shown = denied(against, observations, dev_root, book)
        section_defaults = defaults(against)
        where = against.source.file if against.source else against.name
        heading = [
            f"Only what {where} (policy {against.name}) would deny: the rules to add to it.",
            "Defaults are the policy's own; a matching deny rule wins over any allow rule.",
        ]
        base = name or against.name
    learned = write_policy(
        shown, base, source, device_nodes(dev_root), merge, heading, section_defaults, book
    )
    _check(learned.text)
    warnings = list(learned.warnings)
    lost = lost_warning(observations)
    if lost:
        warnings.insert(0, lost)
    if interrupted:
        warnings.append("interrupted: the observation ended early")
    if not any(n for hook, n in observations.seen.items() if hook != "dns"):
        warnings.append("nothing was observed: the policy has no section and enforces nothing")
    elif against is not None and not _anything(shown):
        warnings.append(f"{against.name} allows everything that was observed: nothing to add")
    lost_answers = observations.lost.get("dns", 0)
    if lost_answers:
        warnings.append(
            f"{lost_answers:,} DNS answers were not read (the ring buffer was full): the "
            "addresses they gave stay addresses"
        )
    return Outcome(learned.text, warnings, observations, status, interrupted)


def _cgroup_target(cgroup_root: Path, given: str) -> str:
    """``given`` as a policy target writes it (relative to the cgroup2 mount); LearnError
    (exit 2) for the root or a path out of the hierarchy."""
    try:
        path = resolve(given.lstrip("/"), cgroup_root)
    except CgroupError as error:
        raise LearnError(f"--cgroup {given!r}: {error}", 2) from None
    relative = path.relative_to(cgroup_root).as_posix()
    if relative == ".":
        raise LearnError("--cgroup: the root cgroup cannot be a policy's target", 2)
    return relative


def _anything(observations: Observations) -> bool:
    return any(
        (
            observations.network,
            observations.create,
            observations.addresses,
            observations.devices,
            observations.sysctls,
        )
    )


def _check(text: str) -> None:
    """What learn writes must be a valid policy; if not, that is a bug here, said loudly."""
    result = load_contents([("learned.yaml", text.encode())])
    if result.problems:
        shown = "; ".join(p.format() for p in result.problems[:5])
        raise LearnError(f"internal error: the learned policy is not valid: {shown}")


__all__ = ["LearnError", "Outcome", "learn", "policy_name"]
