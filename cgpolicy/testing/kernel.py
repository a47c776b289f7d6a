"""`cgpolicy test --kernel`: every case also through the real programs, applied (under
transient names, as `cgpolicy run` applies) to a throwaway cgroup made for the test file.

- Packets: BPF_PROG_TEST_RUN of each policy's cgroup_skb program on a frame built from the
  action (:mod:`cgpolicy.testing.packets`); its return value is the effect.
- Everything else: a probe process (:mod:`cgpolicy.testing.probe`) in a child cgroup does
  the action. Actions whose effect must not happen (a sysctl write, a device open or
  mknod, a bind, connect or send that is not a socket on loopback) run in a child cgroup
  with the deny-everything guard below them (:mod:`cgpolicy.kernel.guard`): every program
  still decides and counts, and then the action fails with EPERM. The others (socket
  creation, sysctl reads, TCP/UDP bind and connect on loopback) run unguarded, and their
  errno is checked against the effect the reference predicts too.

Which rule decided is read from the programs' per-rule counters (what `audit` shows):
the counter slots that moved during the case, in the compiler's canonical order.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cgpolicy import reference
from cgpolicy.compiler.canonical import ordered_rules
from cgpolicy.contract import COUNTER, DEFAULT_SLOT, SECTION_HOOKS, U32
from cgpolicy.enforcer.engine import Enforcer
from cgpolicy.enforcer.transient import applied_in_throwaway
from cgpolicy.kernel.applied import program_maps, read_named
from cgpolicy.kernel.bpf import Map, Program, close_all
from cgpolicy.kernel.cgroup import make_cgroup
from cgpolicy.kernel.guard import attach_guard, make_node, node_folder
from cgpolicy.kernel.processes import popen_in_cgroup
from cgpolicy.policy.model import Policy
from cgpolicy.reference import DeviceAccess, Packet, SocketAddress, SocketCreate, SysctlAccess
from cgpolicy.testing import probe
from cgpolicy.testing.evaluate import (
    CaseResult,
    Evaluator,
    KernelDecision,
    KernelRun,
    file_index,
)
from cgpolicy.testing.packets import frame
from cgpolicy.testing.spec import TestFile

log = logging.getLogger(__name__)

Snapshot = dict[tuple[str, str, int], tuple[int, int]]  # (policy, hook, slot) -> counts


@dataclass
class _Program:
    policy: Policy  # the policy as given (its name, not the transient one)
    hook: str
    program: Program
    counters: Map
    slots: int  # the section's canonical rules


class _Probe:
    """One probe process in a cgroup, serving actions line by line."""

    def __init__(self, cgroup: Path) -> None:
        self.process = popen_in_cgroup(
            [sys.executable, "-I", probe.__file__],
            cgroup,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            process_group=0,  # Ctrl-C reaches cgpolicy, which ends the probe itself
        )

    def perform(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise OSError(f"the probe process ended (status {self.process.poll()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class _FileRun:
    """The kernel side of one test file, while its policies are applied."""

    def __init__(
        self,
        test: TestFile,
        cgroup: Path,
        names: dict[str, str],
        bpf_dir: Path,
        evaluator: Evaluator,
        stack: ExitStack,
    ) -> None:
        self.test = test
        self.cgroup = cgroup
        self.evaluator = evaluator
        self.stack = stack
        self.programs: dict[str, list[_Program]] = {}  # hook -> programs
        for policy in test.policies:
            applied = read_named(bpf_dir, names[policy.name], links=False)
            for hook, state in applied.hooks.items():
                if not state.prog_id:
                    continue
                maps = program_maps(state.prog_id, {"counters"})
                stack.callback(close_all, list(maps.values()))
                program = Program.from_id(state.prog_id)
                stack.callback(program.close)
                self.programs.setdefault(hook, []).append(
                    _Program(policy, hook, program, maps["counters"], 0)
                )
        self._probes: dict[bool, _Probe] = {}
        self._nodes: Path | None = None

    # -- the parts made on first use ------------------------------------------------------

    def probe(self, guarded: bool) -> _Probe:
        if guarded not in self._probes:
            child = self.cgroup / ("guarded" if guarded else "plain")
            make_cgroup(child)
            if guarded:
                links = attach_guard(child)
                self.stack.callback(close_all, links)
            started = _Probe(child)
            self.stack.callback(started.close)
            self._probes[guarded] = started
        return self._probes[guarded]

    def nodes(self) -> Path:
        if self._nodes is None:
            self._nodes = node_folder()
            self.stack.callback(shutil.rmtree, self._nodes, True)
        return self._nodes

    # -- counters --------------------------------------------------------------------------

    def _programs(self, sections: list[str], action: reference.Action) -> list[_Program]:
        """The programs whose counters say how ``sections`` decided (a connect can be
        decided by sockets.connect or, refused at connect, by network.egress)."""
        found = []
        for section in dict.fromkeys(sections):
            for hook in SECTION_HOOKS[section]:
                for program in self.programs.get(hook, []):
                    bound = self.evaluator.policy_for(program.policy, action)
                    rules = reference.section_of(bound, section)
                    if rules is None:
                        continue
                    program.slots = len(ordered_rules(rules.rules))
                    found.append(program)
        return found

    @staticmethod
    def _snapshot(programs: list[_Program]) -> Snapshot:
        counts: Snapshot = {}
        for p in programs:
            for slot in [*range(p.slots), DEFAULT_SLOT]:
                values = p.counters.lookup_per_cpu(U32.pack(slot)) or []
                allowed = denied = 0
                for value in values:
                    counter = COUNTER.unpack_from(value)
                    allowed += counter["allowed"]
                    denied += counter["denied"]
                counts[p.policy.name, p.hook, slot] = (allowed, denied)
        return counts

    # -- one case --------------------------------------------------------------------------

    def run(self, result: CaseResult) -> KernelRun:
        action = result.case.action
        reason = self._not_runnable(result)
        if reason:
            return KernelRun(False, reason)
        programs = self._programs([v.section for v in result.verdicts], action.action)
        before = self._snapshot(programs)
        effects: dict[str, bool] | None
        if isinstance(action.action, Packet):
            effects, detail, skipped = self._packet(action.action, programs), "", None
        else:
            effects, detail, skipped = self._probe_action(result)
            if skipped:
                return KernelRun(False, skipped)
        after = self._snapshot(programs)
        return self._compare(result, programs, before, after, effects, detail)

    def _not_runnable(self, result: CaseResult) -> str | None:
        act = result.case.action.action
        if result.case.names:
            return "names: the kernel learns names only from real DNS answers"
        if isinstance(act, Packet):
            if act.interface is not None:
                try:
                    socket.if_nametoindex(act.interface)
                except OSError:
                    return f"no interface {act.interface} here to run the packet on"
                return None
            named = any(
                rule.interfaces
                for policy in result.file.policies
                if policy.network is not None
                and (section := getattr(policy.network, act.direction)) is not None
                for rule in section.rules
            )
            if named:
                return (
                    "rules name interfaces and the case gives none (a packet with no "
                    "device), while BPF_PROG_TEST_RUN runs every packet on a device: "
                    "give --interface NAME"
                )
        if isinstance(act, SocketAddress) and act.protocol not in (reference.TCP, reference.UDP):
            return "only TCP and UDP sockets are probed"
        return None

    def _packet(self, packet: Packet, programs: list[_Program]) -> dict[str, bool]:
        data = frame(packet)
        ifindex = socket.if_nametoindex(packet.interface) if packet.interface else 0
        return {
            p.policy.name: bool(p.program.test_run(data, ifindex=ifindex).retval & 1)
            for p in programs
        }

    def _probe_action(self, result: CaseResult) -> tuple[dict[str, bool] | None, str, str | None]:
        """Perform the action in a probe: (the observed effect, or None when guarded;
        a description; why it could not be run)."""
        act = result.case.action.action
        guarded, requests, why = self._requests(result)
        if why:
            return None, "", why
        runner = self.probe(guarded)
        answers = [runner.perform(request) for request in requests]
        detail = ", ".join(
            f"{r['op']}: {'ok' if a['ok'] else errno.errorcode.get(a['errno'], a['errno'])}"
            for r, a in zip(requests, answers, strict=True)
        ) + (" (guarded)" if guarded else "")
        failed_early = [a for a in answers if a["stage"] == "socket"]
        if failed_early and not isinstance(act, SocketCreate):
            code = errno.errorcode.get(failed_early[0]["errno"], "?")
            return None, detail, f"the probe could not create its socket ({code})"
        if guarded:
            if any(a["ok"] for a in answers):  # never: the guard refuses every such action
                raise OSError(f"the guard did not refuse {result.case.name!r}: {detail}")
            return None, detail, None
        allowed = all(a["ok"] or a["errno"] != errno.EPERM for a in answers)
        return {"*": allowed}, detail, None

    def _requests(self, result: CaseResult) -> tuple[bool, list[dict[str, Any]], str | None]:
        act = result.case.action.action
        if isinstance(act, SocketCreate):
            return (
                False,
                [
                    {
                        "op": "socket",
                        "family": act.family,
                        "type": act.type,
                        "protocol": act.protocol,
                    }
                ],
                None,
            )
        if isinstance(act, SysctlAccess):
            if not act.write:
                return False, [{"op": "sysctl-read", "name": act.name}], None
            try:
                value = Path("/proc/sys", act.name).read_text()
            except (OSError, UnicodeDecodeError) as error:
                why = error.strerror if isinstance(error, OSError) else "not text"
                return True, [], f"its current value cannot be read here ({why})"
            return True, [{"op": "sysctl-write", "name": act.name, "value": value}], None
        if isinstance(act, DeviceAccess):
            requests: list[dict[str, Any]] = []
            folder = self.nodes()
            if "m" in act.access:
                requests.append(
                    {
                        "op": "mknod",
                        "path": str(folder / "made"),
                        "kind": act.type,
                        "major": act.major,
                        "minor": act.minor,
                    }
                )
            rw = act.access.replace("m", "")
            if rw:
                node = make_node(folder, act.type, act.major, act.minor)
                flags = {"r": os.O_RDONLY, "w": os.O_WRONLY, "rw": os.O_RDWR}[rw]
                requests.append({"op": "open", "path": str(node), "flags": flags})
            return True, requests, None
        assert isinstance(act, SocketAddress)
        views = result.case.action.views or [act]
        kind = 1 if act.protocol == reference.TCP else 2  # SOCK_STREAM, SOCK_DGRAM
        family = 10 if act.address.version == 6 else 2
        loopback = act.address.is_loopback or (
            isinstance(act.address, ipaddress.IPv6Address)
            and act.address.ipv4_mapped is not None
            and act.address.ipv4_mapped.is_loopback
        )
        plain = loopback and act.operation in ("bind", "connect") and len(views) == 1
        requests = []
        for view in views:
            assert isinstance(view, SocketAddress)
            op = "sendto" if view.operation == "sendmsg" else view.operation
            # every view is of the one system call on one AF_INET6/AF_INET socket
            requests.append(
                {
                    "op": op,
                    "family": family,
                    "type": kind,
                    "address": str(act.address),
                    "port": act.port,
                }
            )
        return not plain, requests, None

    # -- what the counters say --------------------------------------------------------------

    def _compare(
        self,
        result: CaseResult,
        programs: list[_Program],
        before: Snapshot,
        after: Snapshot,
        effects: dict[str, bool] | None,
        detail: str,
    ) -> KernelRun:
        act = result.case.action.action
        run = KernelRun(True, detail=detail)
        by_policy: dict[str, list[_Program]] = {}
        for p in programs:
            by_policy.setdefault(p.policy.name, []).append(p)
        for expected, verdict, policy in zip(
            result.decisions, result.verdicts, result.file.policies, strict=True
        ):
            allowed_slots, denied_slots = set(), set()
            for key, (allowed, denied) in after.items():
                if key[0] != policy.name or key[1] not in SECTION_HOOKS[expected.section]:
                    continue
                was = before.get(key, (0, 0))
                if allowed > was[0]:
                    allowed_slots.add(key[2])
                if denied > was[1]:
                    denied_slots.add(key[2])
            section = reference.section_of(self.evaluator.policy_for(policy, act), expected.section)
            slots = denied_slots or allowed_slots
            got = "deny" if denied_slots else "allow" if allowed_slots else None
            names = sorted(_slot_name(section, slot, expected.section) for slot in slots)
            run.decisions.append(KernelDecision(policy.name, got, tuple(names)))
            who = f"{policy.name}: " if len(result.file.policies) > 1 else ""
            if expected.verdict is None:
                if got is not None:
                    run.disagreements.append(
                        f"{who}the reference says {expected.rule_name}, but the kernel's "
                        f"program counted {got} by {', '.join(names)}"
                    )
                continue
            if got is None:
                if isinstance(act, Packet):
                    run.disagreements.append(f"{who}the program counted nothing")
                    continue
                run.ran = False
                run.reason = f"the kernel never ran the {expected.section} hook ({detail})"
                return run
            if got != expected.verdict:
                run.disagreements.append(
                    f"{who}verdict: reference {expected.verdict} by {expected.rule_name}, "
                    f"kernel {got} by {', '.join(names)}"
                )
            elif expected.slot not in slots:
                run.disagreements.append(
                    f"{who}deciding rule: reference {expected.rule_name}, kernel {', '.join(names)}"
                )
            if effects is not None:
                observed = effects.get(policy.name, effects.get("*"))
                wanted = (
                    all(v.effective for v in result.verdicts)
                    if "*" in effects
                    else (verdict.effective)
                )
                if observed is not None and observed != wanted:
                    predicted = "lets it through" if wanted else "refuses it"
                    seen = "let it through" if observed else "refused it"
                    run.disagreements.append(
                        f"{who}effect: the reference {predicted}, the kernel {seen} ({detail})"
                    )
        return run


def _slot_name(section: object, slot: int, section_name: str) -> str:
    if slot == DEFAULT_SLOT:
        return f"{section_name}.default"
    rules = ordered_rules(section.rules)  # type: ignore[attr-defined]
    if slot >= len(rules):
        return f"{section_name} slot {slot}"
    return f"{section_name}.rules[{file_index(section, rules[slot])}]"


def run_in_kernel(
    enforcer: Enforcer, evaluator: Evaluator, test: TestFile, results: list[CaseResult]
) -> None:
    """Run ``results``' cases (of ``test``) in the kernel; each gets its ``kernel``."""
    with ExitStack() as stack:
        cgroup, names = stack.enter_context(applied_in_throwaway(enforcer, test.policies, "test"))
        run = _FileRun(test, cgroup, names, enforcer.bpf_dir, evaluator, stack)
        # Packets first: before any probe's loopback connect sends a packet that the
        # cgroup_skb programs also count (its replies may still be in flight after it)
        for result in sorted(results, key=lambda r: not isinstance(r.case.action.action, Packet)):
            result.kernel = run.run(result)
