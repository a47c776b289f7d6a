"""Helpers for the enforcement tests: policies through the real product path, probes in a
scratch cgroup (optionally in another network namespace), and what the kernel holds.

Policies are written as files and loaded with the validator the CLI uses
(`cgpolicy.policy.validate.load_paths`), then planned and applied with the `Enforcer` on the
test's private bpffs folder. `enforced()` always removes what it applied.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from netns import PROBE_EXTRA

from cgpolicy.contract import COUNTER
from cgpolicy.enforcer.engine import Enforcer, Outcome
from cgpolicy.kernel import bpf, syscall
from cgpolicy.kernel.cgroup import open_cgroup
from cgpolicy.kernel.hooks import HOOKS
from cgpolicy.kernel.hooks import hook as hook_named
from cgpolicy.kernel.lock import LOCK_FOLDER
from cgpolicy.policy.model import Policy
from cgpolicy.policy.validate import load_paths

ALLOWED = 0
EPERM = errno.EPERM
ETIMEDOUT = errno.ETIMEDOUT
CGPOLICY = Path(sys.executable).with_name("cgpolicy")


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    errno: int
    error: str


class ScratchCgroup(Protocol):  # conftest.ScratchCgroup; conftest is not importable
    path: Path

    def run(self, argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]: ...


def load(*paths: Path) -> list[Policy]:
    result = load_paths(list(paths))
    assert result.ok, "\n".join(problem.format() for problem in result.problems)
    return result.policies


def apply(enforcer: Enforcer, *paths: Path) -> list[Outcome]:
    return enforcer.apply(enforcer.plan(load(*paths)))


def apply_ok(enforcer: Enforcer, *paths: Path) -> list[Outcome]:
    outcomes = apply(enforcer, *paths)
    failed = [f"{o.plan.name}: {o.error or o.plan.problems}" for o in outcomes if not o.ok]
    assert not failed, failed
    return outcomes


def remove(enforcer: Enforcer, *names: str) -> None:
    """Remove what a test applied, whoever applied it (a service it ran, say)."""
    present = [name for name in names if name in enforcer.observe()]
    if present:
        outcomes = enforcer.apply(enforcer.plan_removal(present, force=True))
        assert all(o.ok for o in outcomes), [o.error for o in outcomes]


@contextmanager
def enforced(cgroup_root: Path, bpf_dir: Path, *paths: Path) -> Iterator[Enforcer]:
    """Apply the policies in ``paths``; remove them afterwards, also when the test fails."""
    enforcer = Enforcer(cgroup_root, bpf_dir)
    names = [policy.name for policy in load(*paths)]
    try:
        apply_ok(enforcer, *paths)
        yield enforcer
    finally:
        remove(enforcer, *names)


# --- what the kernel holds ----------------------------------------------------------------


def attached(cgroup: Path, hook: str) -> tuple[int, ...]:
    """Program ids attached directly to one hook of a cgroup (PROG_QUERY)."""
    fd = open_cgroup(cgroup)
    try:
        return syscall.prog_query(fd, hook_named(hook).attach_type).prog_ids
    finally:
        os.close(fd)


def attachments(cgroup: Path, hooks: Sequence[str] = tuple(HOOKS)) -> dict[str, tuple[int, ...]]:
    """Every hook of ``cgroup`` with something attached, and the program ids there."""
    found = {}
    for hook in hooks:
        try:
            ids = attached(cgroup, hook)
        except syscall.BpfError:  # a hook this kernel does not know
            continue
        if ids:
            found[hook] = ids
    return found


def cgroup_links(cgroup_id: int) -> list[syscall.LinkInfo]:
    """The cgroup links attached to one cgroup, from every owner.

    PROG_QUERY on a cgroup reports program ids but (up to at least 6.18) no link ids, so
    this is how a program attached through a link is told from a legacy attachment.
    """
    found = []
    for link_id in syscall.link_ids():
        try:
            fd = syscall.link_get_fd_by_id(link_id)
        except syscall.BpfError as error:
            if error.errno == errno.ENOENT:  # gone meanwhile
                continue
            raise
        try:
            info = syscall.link_info(fd)
        finally:
            os.close(fd)
        if info.type == syscall.LinkType.CGROUP and info.cgroup_id == cgroup_id:
            found.append(info)
    return found


def pins(bpf_dir: Path) -> set[str]:
    """Everything pinned below ``bpf_dir``, as relative paths (not the lock's folder)."""
    return {str(p.relative_to(bpf_dir)) for p in bpf_dir.rglob("*") if p.name != LOCK_FOLDER}


def program_names(ids: Sequence[int]) -> list[str]:
    names = []
    for prog_id in ids:
        with bpf.Program.from_id(prog_id) as program:
            names.append(program.info().name)
    return names


def denied_count(prog_id: int) -> int:
    """Denials (would-be denials in audit mode) counted by one of cgpolicy's programs."""
    with bpf.Program.from_id(prog_id) as program:
        map_ids = program.info().map_ids
    total = 0
    for map_id in map_ids:
        with bpf.Map.from_id(map_id) as counters:
            if counters.name != "counters":
                continue
            for key in counters.keys():
                for value in counters.lookup_per_cpu(key) or []:
                    total += COUNTER.unpack_from(value)["denied"]
    return total


# --- probes -------------------------------------------------------------------------------


def in_netns(ns: str | None, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv] if ns else argv


def probe(cgroup: ScratchCgroup, *args: str | int, netns: str | None = None) -> ProbeResult:
    """One probe_extra.py action in ``cgroup`` (and in network namespace ``netns``)."""
    done = cgroup.run(in_netns(netns, [sys.executable, str(PROBE_EXTRA), *map(str, args)]))
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"probe {args} failed to run: {done.stderr}")
    return ProbeResult(**json.loads(lines[-1]))


def _name(outcome: int) -> str:
    return "allowed" if outcome == ALLOWED else errno.errorcode.get(outcome, str(outcome))


def expect(
    cgroup: ScratchCgroup,
    table: Sequence[tuple[tuple[str | int, ...], int]],
    netns: str | None = None,
) -> None:
    """Run every probe of ``table`` concurrently (timeouts overlap) and check each outcome:
    ALLOWED, or the errno the probe must fail with. Reports every mismatch at once."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda row: probe(cgroup, *row[0], netns=netns), table))
    wrong = []
    for (args, wanted), result in zip(table, results, strict=True):
        got = ALLOWED if result.ok else result.errno
        if got != wanted:
            wrong.append(f"{' '.join(map(str, args))}: {_name(got)}, expected {_name(wanted)}")
    assert not wrong, "wrong verdicts:\n  " + "\n  ".join(wrong)


def serve_in_cgroup(
    cgroup: ScratchCgroup,
    protocol: str,
    host: str,
    port: int,
    netns: str | None = None,
    client_netns: str | None = None,
) -> tuple[ProbeResult, ProbeResult]:
    """A listener inside ``cgroup`` and a client outside it (in ``client_netns``): what
    each saw. Exercises ingress on the local port, which the client side cannot show."""
    argv = in_netns(netns, [sys.executable, str(PROBE_EXTRA), "serve", protocol, host, str(port)])
    server = subprocess.Popen(
        argv,
        preexec_fn=lambda: (cgroup.path / "cgroup.procs").write_text("0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        ready = server.stdout.readline()
        if not ready.strip().startswith('{"ready"'):
            raise RuntimeError(f"serve {protocol} {host} {port}: {ready!r} {server.stderr}")
        action = ["connect", "tcp"] if protocol == "tcp" else ["sendto"]
        client_argv = [sys.executable, str(PROBE_EXTRA), *action, host, str(port)]
        done = subprocess.run(
            in_netns(client_netns, client_argv), capture_output=True, text=True, timeout=30
        )
        client = ProbeResult(**json.loads(done.stdout.strip().splitlines()[-1]))
        out, _ = server.communicate(timeout=30)
        served = ProbeResult(**json.loads(out.strip().splitlines()[-1]))
    finally:
        server.kill()
        server.wait()
    return served, client


def kill_and_remove_cgroup(path: Path) -> None:
    """Remove a leaf cgroup something else made (what `cgpolicy run` left after a failure)."""
    (path / "cgroup.kill").write_text("1")
    for _ in range(100):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:  # busy while the killed processes exit
            time.sleep(0.02)
    path.rmdir()


def run_cli(*args: str | Path, check: bool = False) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(CGPOLICY), *map(str, args)], capture_output=True, text=True, timeout=120
    )
    if check:
        assert done.returncode == 0, (done.stdout, done.stderr)
    return done
