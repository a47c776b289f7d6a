"""`cgpolicy learn`: what observing costs per action in the kernel, next to enforcing, and
what it keeps per distinct thing seen.

Per action: two scratch cgroups under the same enforcing policy (egress, connect, devices
and sysctl sections, each with default allow and one deny rule that the actions do not
meet, so every action takes the allow path), the learn programs of bpf/learn.c attached to
the second as well. A process in each does N actions of each kind: unconnected UDP
sendto() to one loopback port (sendmsg4 + egress), open() of /dev/null (device), read of
/proc/sys/kernel/ostype (sysctl). With BPF_ENABLE_STATS on, run_time_ns / run_cnt of each
program is its cost alone, as the hook runs it: ``learn_ns.<hook>`` for the learn program
(one hash lookup and atomic add of an entry that exists, the clock, the executable
check; the skb program also classifies by local port and looks the socket's executable
up), ``enforce_ns.<hook>`` for the policy's.

Per entry: ``learn_entry_bytes.<map>``: the kernel's memlock charge (fdinfo) of the
learn_addr and learn_egress maps after K distinct destinations (sendto() to K ports),
minus before, divided by K. The hash maps are BPF_F_NO_PREALLOC, so that is what a
distinct thing costs (element, key, value and the allocator's rounding); the empty maps'
bucket arrays are the fixed part, in the note.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from bench.figures import Figure, Report
from bench.scratch import Scratch
from cgpolicy.kernel.attachments import effective_programs
from cgpolicy.kernel.bpf import Program
from cgpolicy.kernel.cgroup import join_cgroup
from cgpolicy.kernel.learn import Observer
from cgpolicy.kernel.syscall import enable_run_time_stats
from cgpolicy.policy.validate import load_contents

HOOKS = ("sendmsg4", "egress", "device", "sysctl")
ENFORCE_NAMES = {
    "sendmsg4": "cgp_sendmsg4",
    "egress": "cgp_egress",
    "device": "cgp_device",
    "sysctl": "cgp_sysctl",
}

_ACTIONS = """
import socket, sys
port, count = int(sys.argv[1]), int(sys.argv[2])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(count):
    sock.sendto(b"x", ("127.0.0.1", port))
for _ in range(count):
    open("/dev/null", "rb").close()
for _ in range(count):
    with open("/proc/sys/kernel/ostype") as handle:
        handle.read()
"""

_DISTINCT = """
import socket, sys
count = int(sys.argv[1])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for port in range(1, count + 1):
    sock.sendto(b"x", ("127.0.0.1", port))
"""


def _policy(name: str, target: str) -> object:
    text = f"""
apiVersion: cgpolicy.dev/v1
kind: CgroupPolicy
metadata: {{name: {name}}}
spec:
  targets: [{{path: "{target}"}}]
  network:
    egress: {{default: allow, rules: [{{action: deny, cidrs: ["192.0.2.1"]}}]}}
  sockets:
    connect: {{default: allow, rules: [{{action: deny, cidrs: ["192.0.2.1"]}}]}}
  devices: {{default: allow, rules: [{{action: deny, type: block, major: 8}}]}}
  sysctl: {{default: allow, rules: [{{action: deny, name: "kernel.*", access: write}}]}}
"""
    result = load_contents([(f"{name}.yaml", text.encode())])
    assert result.ok, [p.format() for p in result.problems]
    return result.policies[0]


def _run_in(cgroup: Path, script: str, *args: object) -> None:
    subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        preexec_fn=lambda: join_cgroup(cgroup),
        check=True,
        timeout=600,
    )


def run(report: Report, quick: bool) -> None:
    count = 2_000 if quick else 100_000
    distinct = 500 if quick else 10_000
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    port = receiver.getsockname()[1]
    with Scratch("learn") as scratch:
        plain, learning = scratch.make_cgroups(["enforce", "enforce-and-learn"])
        scratch.plan_apply([_policy("bench-learn-a", plain), _policy("bench-learn-b", learning)])
        with Observer() as observer:
            observer.attach(scratch.root / learning)
            stats = enable_run_time_stats()
            try:
                before = _stats(observer)
                _run_in(scratch.root / plain, _ACTIONS, port, count)
                _run_in(scratch.root / learning, _ACTIONS, port, count)
                learn_ns = _delta(observer, before)
                enforce_ns = _enforce_stats(scratch.root / plain)
            finally:
                os.close(stats)
            seen = observer.read()
            for hook in HOOKS:
                report.add(
                    Figure(
                        f"learn_ns.{hook}",
                        learn_ns.get(hook),
                        "ns",
                        f"learn program per {hook} action (run_time_ns / run_cnt, {count:,} "
                        "actions, the entry exists)",
                    )
                )
                report.add(
                    Figure(
                        f"enforce_ns.{hook}",
                        enforce_ns.get(hook),
                        "ns",
                        f"the enforcing policy's {hook} program alone, same actions (allow path)",
                    )
                )
            counted = seen.seen.get("sendmsg4", 0)
            report.details["learn_counted_sendmsg4"] = counted
            memory_before = observer.memory()
            _run_in(scratch.root / learning, _DISTINCT, distinct)
            memory_after = observer.memory()
            for name in ("learn_addr", "learn_egress"):
                grown = memory_after[name] - memory_before[name]
                report.add(
                    Figure(
                        f"learn_entry_bytes.{name.removeprefix('learn_')}",
                        grown / distinct,
                        "B",
                        f"kernel memory (memlock) per distinct entry of {name}, {distinct:,} "
                        "distinct destinations",
                        note=f"the empty map's fixed part: {memory_before[name]:,} B",
                    )
                )
    receiver.close()


def _stats(observer: Observer) -> dict[str, tuple[int, int]]:
    out = {}
    for hook, program in observer.programs.items():
        info = program.info()
        out[hook] = (info.run_time_ns, info.run_cnt)
    return out


def _delta(observer: Observer, before: dict[str, tuple[int, int]]) -> dict[str, float | None]:
    after = _stats(observer)
    out: dict[str, float | None] = {}
    for hook in HOOKS:
        ns = after[hook][0] - before[hook][0]
        runs = after[hook][1] - before[hook][1]
        out[hook] = ns / runs if runs else None
    return out


def _enforce_stats(cgroup: Path) -> dict[str, float | None]:
    """run_time_ns / run_cnt of the enforcing programs on ``cgroup`` (loaded for this
    benchmark only, so their whole counts are this run's)."""
    out: dict[str, float | None] = {}
    for _, prog_id in effective_programs(cgroup, list(HOOKS)):
        with Program.from_id(prog_id) as program:
            info = program.info()
        for hook, name in ENFORCE_NAMES.items():
            if info.name == name and info.run_cnt:
                out[hook] = info.run_time_ns / info.run_cnt
    return out
