"""Figure 1: what the egress program costs per packet, one CIDR against many.

Method 1 (the headline): BPF_PROG_TEST_RUN with a large repeat; the kernel runs the program
``repeat`` times on one packet and reports the mean duration per run, which includes the
test_run loop's own per-iteration overhead. That overhead is measured with a trivial
``return 1`` cgroup_skb program and reported next to it, not subtracted.

Method 2 (context, and a cross-check): the same programs attached to scratch cgroups and
real datagrams sent from a process inside them, with run-time statistics on
(BPF_ENABLE_STATS): run_time_ns / run_cnt is the program alone, as the hook runs it.
The datagrams are UDP to port 443, which the TCP-only allow rules never match, so every
one is dropped at egress (nothing leaves the host) after the full lookup path has run:
CIDR index, port table, interface map, decision, counter and the rate-limited deny event.
"match"/"miss" still say whether the CIDR index lookup finds the address.

The IPv6 index (issue 14): 100,000 IPv6 prefixes of several length mixes (all /64, all
/128, random /32-/128, random /16-/128: bench/policies.py V6_MIXES), each in its own
egress program loaded for test_run only, with an address inside a prefix (match) and one
just outside the longest ones (miss); ratios against the 1-prefix program's IPv6 figures,
measured in the same interleaved rounds.

The deny path (issue 4: the targets hold with counters and events on): the IPv4 miss
packet, which the policy drops, once with every run emitting a deny event (the rate limit
raised, the ring buffer drained between batches) and once over the rate limit (limit 0:
every run is counted and refused an event, what a flood costs). The allow path is the
"match" figure. The events of those runs are drained and decoded (cgpolicy.events.decode),
which gives the reader's decode rate.
"""

from __future__ import annotations

import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import packets, policies
from bench.figures import Figure, Report
from bench.scratch import Scratch
from cgpolicy.compiler.compile import compile_policy
from cgpolicy.compiler.maps import EVENTS_PER_SECOND
from cgpolicy.contract import RATELIMIT
from cgpolicy.events.decode import decode
from cgpolicy.kernel import pins
from cgpolicy.kernel.bpf import Map, Program
from cgpolicy.kernel.hooks import hook
from cgpolicy.kernel.loader import LoadedProgram, load_program
from cgpolicy.kernel.ringbuf import RingBuffer
from cgpolicy.kernel.syscall import enable_run_time_stats

NS_TARGET = 100.0
RATIO_TARGET = 2.0
MIX_RATIO_TARGET = 1.4  # issue 14: IPv6, any mix of prefix lengths
STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")
EVENT_BATCH = 500  # runs per test_run while every run emits an event: well within the ring

# BPF_ALU64 | BPF_MOV | BPF_K r0 = 1; BPF_JMP | BPF_EXIT
_RETURN_1 = struct.pack("<BBhi", 0xB7, 0, 0, 1) + struct.pack("<BBhi", 0x95, 0, 0, 0)

_SENDER = """
import socket, sys
address, count = sys.argv[1], int(sys.argv[2])
sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM)
denied = 0
for _ in range(count):
    try:
        sock.sendto(b"x", (address, 443))
    except PermissionError:
        denied += 1
print(denied)
"""


@dataclass(frozen=True)
class Case:
    family: str  # ipv4 | ipv6
    outcome: str  # match | miss
    address: str
    packet: bytes
    verdict: int  # what the program must return


CASES = (
    Case("ipv4", "match", policies.MATCH4, packets.ipv4_tcp("192.0.2.2", policies.MATCH4, 443), 1),
    Case("ipv4", "miss", policies.MISS4, packets.ipv4_tcp("192.0.2.2", policies.MISS4, 443), 0),
    Case("ipv6", "match", policies.MATCH6, packets.ipv6_tcp("fd00::2", policies.MATCH6, 443), 1),
    Case("ipv6", "miss", policies.MISS6, packets.ipv6_tcp("fd00::2", policies.MISS6, 443), 0),
)
SIZES = ("one_cidr", "many_cidrs")


def _stats_enabled() -> str:
    try:
        return STATS_SYSCTL.read_text().strip()
    except OSError:
        return "unknown"


def _window(limit: int) -> bytes:
    """A fresh struct cgp_ratelimit: ``limit`` events a second per CPU may go out."""
    return RATELIMIT.pack(window_start=0, dropped=0, sent=0, limit=limit)


def _test_run(program: Program, packet: bytes, repeat: int, expect: int | None) -> int:
    result = program.test_run(packet, repeat=repeat)
    if expect is not None and result.retval != expect:
        raise RuntimeError(f"program returned {result.retval}, expected {expect}")
    return result.duration_ns


def _send_from(cgroup: Path, address: str, count: int) -> int:
    def enter() -> None:
        (cgroup / "cgroup.procs").write_text("0")

    done = subprocess.run(
        [sys.executable, "-c", _SENDER, address, str(count)],
        preexec_fn=enter,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return int(done.stdout.strip())


def run(report: Report, quick: bool) -> None:
    many = 1_000 if quick else 100_000
    repeat = 100_000 if quick else 1_000_000
    rounds = 3 if quick else 5
    datagrams = 2_000 if quick else 50_000
    report.params["verdict"] = {
        "many_cidrs_per_family": many,
        "test_run_repeat": repeat,
        "rounds": rounds,
        "statistic": "median over rounds of the kernel's mean ns per run",
        "real_traffic_datagrams": datagrams,
    }
    with Scratch("verdict") as scratch, tempfile.TemporaryDirectory() as folder:
        one_cg, many_cg = scratch.make_cgroups(["one", "many"])
        documents = {
            "verdict-one": policies.network_yaml(
                "verdict-one",
                [("path", one_cg)],
                [f"{policies.MATCH4}/32"],
                [f"{policies.MATCH6}/128"],
                fail_fast=False,  # real datagrams must reach the packet program
            ),
            "verdict-many": policies.network_yaml(
                "verdict-many",
                [("path", many_cg)],
                policies.cidrs_v4(many),
                policies.cidrs_v6(many),
                fail_fast=False,
            ),
        }
        start = time.perf_counter()
        loaded = policies.load(Path(folder), documents)
        validate_s = time.perf_counter() - start
        start = time.perf_counter()
        scratch.plan_apply(loaded)
        apply_s = time.perf_counter() - start
        report.details["verdict_policy_setup"] = {
            "validate_both_s": round(validate_s, 3),
            "plan_apply_both_s": round(apply_s, 3),
        }

        programs = {
            "one_cidr": Program.from_pin(
                pins.hook_dir(scratch.bpf_dir, "verdict-one", "egress") / pins.PROG_PIN
            ),
            "many_cidrs": Program.from_pin(
                pins.hook_dir(scratch.bpf_dir, "verdict-many", "egress") / pins.PROG_PIN
            ),
        }
        egress = hook("egress")
        nop = Program.load(egress.prog_type, _RETURN_1, "cgp_bench_nop", egress.attach_type)
        try:
            stats_before = _stats_enabled()
            samples: dict[str, list[int]] = {}
            for case in CASES:  # warm-up, and the verdicts are checked once
                for size in SIZES:
                    _test_run(programs[size], case.packet, max(1, repeat // 10), case.verdict)
            for _ in range(rounds):  # interleaved, so drift hits every case alike
                samples.setdefault("nop", []).append(_test_run(nop, CASES[0].packet, repeat, 1))
                for case in CASES:
                    for size in SIZES:
                        key = f"{case.family}.{case.outcome}.{size}"
                        ns = _test_run(programs[size], case.packet, repeat, case.verdict)
                        samples.setdefault(key, []).append(ns)
            stats_after = _stats_enabled()
            report.details["verdict_test_run_samples_ns"] = samples
            if stats_before != "0" or stats_after != "0":
                report.notes.append(
                    f"kernel.bpf_stats_enabled was {stats_before}/{stats_after} during test_run:"
                    " every run then also pays for run-time accounting; figures are inflated"
                )
            median = {key: statistics.median(values) for key, values in samples.items()}

            report.add(
                Figure(
                    "testrun_overhead_ns.return_1",
                    median["nop"],
                    "ns",
                    "BPF_PROG_TEST_RUN per-run cost of a trivial `return 1` cgroup_skb program "
                    "(context: included in every verdict figure, not subtracted)",
                )
            )
            for case in CASES:
                base_key = f"{case.family}.{case.outcome}"
                one = median[f"{base_key}.one_cidr"]
                big = median[f"{base_key}.many_cidrs"]
                report.add(
                    Figure(
                        f"verdict_ns.{base_key}.one_cidr",
                        one,
                        "ns",
                        f"egress verdict, {case.family} TCP {case.outcome}, policy with 1 CIDR "
                        "per family (test_run, raw)",
                    )
                )
                report.add(
                    Figure(
                        f"verdict_ns.{base_key}.many_cidrs",
                        big,
                        "ns",
                        f"egress verdict, {case.family} TCP {case.outcome} among the longest "
                        f"prefixes, policy with {many:,} CIDRs per family (test_run, raw)",
                        ("<", NS_TARGET),
                        f"{big - median['nop']:.0f} ns above the return-1 program"
                        + ("; a drop: includes the deny-event path" if case.verdict == 0 else ""),
                    )
                )
                report.add(
                    Figure(
                        f"verdict_ratio.{base_key}",
                        big / one if one else None,
                        "x",
                        f"many-CIDR cost / 1-CIDR cost, {case.family} {case.outcome}",
                        ("<=", RATIO_TARGET),
                    )
                )
            _deny_path(report, scratch, programs, repeat, rounds)
            _v6_mixes(report, Path(folder), programs["one_cidr"], many, repeat, rounds)
        finally:
            nop.close()

        _real_traffic(report, scratch, programs, datagrams)
        for program in programs.values():
            program.close()


def _v6_mixes(
    report: Report, folder: Path, one: Program, many: int, repeat: int, rounds: int
) -> None:
    """verdict_ns.ipv6_mix.<mix>.match/miss: ``many`` IPv6 prefixes of each length mix in
    an egress program (test_run only, not attached), against the 1-prefix program."""
    loaded: dict[str, LoadedProgram] = {}
    packets_of: dict[str, tuple[bytes, bytes]] = {}
    setup: dict[str, dict[str, float | int]] = {}
    try:
        for mix, (low, high) in policies.V6_MIXES.items():
            cidrs, match, miss = policies.cidrs_v6_mix(many, low, high)
            name = f"mix-{mix.replace('_', '-')}"
            (policy,) = policies.load(
                folder, {name: policies.network_yaml(name, [("path", "x")], [], cidrs)}
            )
            start = time.perf_counter()
            compiled = compile_policy(policy)
            compile_s = time.perf_counter() - start
            spec = next(p for p in compiled.programs if p.hook == "egress")
            start = time.perf_counter()
            loaded[mix] = load_program(spec)
            slots = next(m for m in spec.maps if m.name == "cidr6_slots")
            setup[mix] = {
                "compile_s": round(compile_s, 3),
                "load_s": round(time.perf_counter() - start, 3),
                "index_entries": len(slots.entries),
                "index_slots": slots.max_entries,
                "index_bytes": slots.max_entries * slots.value_size,
            }
            packets_of[mix] = (
                packets.ipv6_tcp("fd00::2", match, 443),
                packets.ipv6_tcp("fd00::2", miss, 443),
            )
        report.details["verdict_v6_mix_setup"] = setup
        base = {c.outcome: c.packet for c in CASES if c.family == "ipv6"}
        samples: dict[str, list[int]] = {}
        for _ in range(rounds):  # interleaved with the 1-prefix program
            for outcome, verdict_expected in (("match", 1), ("miss", 0)):
                samples.setdefault(f"one.{outcome}", []).append(
                    _test_run(one, base[outcome], repeat, verdict_expected)
                )
                for mix, program in loaded.items():
                    packet = packets_of[mix][0 if outcome == "match" else 1]
                    samples.setdefault(f"{mix}.{outcome}", []).append(
                        _test_run(program.program, packet, repeat, verdict_expected)
                    )
        report.details["verdict_v6_mix_samples_ns"] = samples
        median = {key: statistics.median(values) for key, values in samples.items()}
        for mix, (low, high) in policies.V6_MIXES.items():
            lengths = f"/{low}" if low == high else f"/{low}-/{high}"
            for outcome in ("match", "miss"):
                ns = median[f"{mix}.{outcome}"]
                one_ns = median[f"one.{outcome}"]
                report.add(
                    Figure(
                        f"verdict_ns.ipv6_mix.{mix}.{outcome}",
                        ns,
                        "ns",
                        f"egress verdict, ipv6 TCP {outcome}, {many:,} prefixes of {lengths} "
                        "(test_run, raw)",
                        ("<", NS_TARGET),
                        f"{setup[mix]['index_entries']:,} index entries, compiled in "
                        f"{setup[mix]['compile_s']} s",
                    )
                )
                report.add(
                    Figure(
                        f"verdict_ratio.ipv6_mix.{mix}.{outcome}",
                        ns / one_ns if one_ns else None,
                        "x",
                        f"{lengths} mix cost / 1-prefix cost ({one_ns} ns), ipv6 {outcome}",
                        ("<=", MIX_RATIO_TARGET),
                    )
                )
    finally:
        for program in loaded.values():
            program.close()


def _program_map(program: Program, name: str) -> Map:
    for map_id in program.info().map_ids:
        candidate = Map.from_id(map_id)
        if candidate.name == name:
            return candidate
        candidate.close()
    raise RuntimeError(f"the program has no map {name!r}")


def _deny_path(
    report: Report, scratch: Scratch, programs: dict[str, Program], repeat: int, rounds: int
) -> None:
    """verdict_ns.ipv4.deny_event.* and .deny_over_limit.*: the IPv4 miss (dropped) packet
    with every run emitting an event, and with the rate limit exhausted."""
    case = next(c for c in CASES if c.family == "ipv4" and c.verdict == 0)
    policy = {"one_cidr": "verdict-one", "many_cidrs": "verdict-many"}
    samples: dict[str, list[int]] = {}
    zero = bytes(4)
    decoded, decode_s = 0, 0.0
    for size, program in programs.items():
        ratelimit = _program_map(program, "ratelimit")
        events = Map.from_pin(pins.policy_dir(scratch.bpf_dir, policy[size]) / pins.EVENTS_PIN)
        ring = RingBuffer(events)
        try:
            list(ring.drain())
            ratelimit.update(zero, _window(limit=0))
            limited = samples.setdefault(f"ipv4.deny_over_limit.{size}", [])
            for _ in range(rounds):
                limited.append(_test_run(program, case.packet, repeat, 0))
            ratelimit.update(zero, _window(limit=1 << 31))
            emitting = samples.setdefault(f"ipv4.deny_event.{size}", [])
            for _ in range(max(10, rounds * 8)):
                emitting.append(_test_run(program, case.packet, EVENT_BATCH, 0))
                start = time.perf_counter()
                emitted = 0
                for raw in ring.drain():
                    decode(raw)
                    emitted += 1
                decode_s += time.perf_counter() - start
                decoded += emitted
                if emitted != EVENT_BATCH:
                    raise RuntimeError(f"{emitted} events for {EVENT_BATCH} denied runs")
        finally:
            ratelimit.update(zero, _window(limit=EVENTS_PER_SECOND))
            ratelimit.close()
            ring.close()
            events.close()
    report.details["verdict_deny_path_samples_ns"] = samples
    for key, values in samples.items():
        _, path, size = key.split(".")
        many = size == "many_cidrs"
        if path == "deny_event":
            what = (
                f"egress verdict, ipv4 TCP dropped, {size.replace('_', ' ')}: every run "
                f"emits a deny event (ring drained every {EVENT_BATCH} runs; test_run, raw)"
            )
            target = None
        else:
            what = (
                f"egress verdict, ipv4 TCP dropped, {size.replace('_', ' ')}: over the "
                "rate limit, counted and refused an event, as in a flood (test_run, raw)"
            )
            target = ("<", NS_TARGET) if many else None
        report.add(Figure(f"verdict_ns.{key}", statistics.median(values), "ns", what, target))
    report.add(
        Figure(
            "event_decode_per_s",
            decoded / decode_s if decode_s else None,
            "events/s",
            "deny events drained from the ring buffer and decoded, per second of one reader "
            f"(the {decoded:,} events of the deny_event runs, {EVENT_BATCH} at a time)",
        )
    )


def _real_traffic(
    report: Report, scratch: Scratch, programs: dict[str, Program], datagrams: int
) -> None:
    cgroups = {"one_cidr": scratch.cgroup_dir / "one", "many_cidrs": scratch.cgroup_dir / "many"}
    stats_fd = enable_run_time_stats()
    try:
        for case in CASES:
            for size in SIZES:
                before = programs[size].info()
                denied = _send_from(cgroups[size], case.address, datagrams)
                after = programs[size].info()
                runs = after.run_cnt - before.run_cnt
                ns = (after.run_time_ns - before.run_time_ns) / runs if runs else None
                note = f"{runs} runs, {denied} of {datagrams} sends denied (EPERM)"
                report.add(
                    Figure(
                        f"real_traffic_ns.{case.family}.{case.outcome}.{size}",
                        ns,
                        "ns",
                        f"run_time_ns/run_cnt with real UDP datagrams, {case.family} "
                        f"{case.outcome}, {size.replace('_', ' ')} (program alone)",
                        note=note,
                    )
                )
    finally:
        os.close(stats_fd)
