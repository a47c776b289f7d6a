"""DNS names in rules (issue 12): what `fqdns` rules cost, on the real kernel.

A DNS responder (bench/dns_peers.py) answers on port 53 of a loopback address of its own,
in its own process; the clients run in scratch cgroups as workloads do. Four policies,
applied together (each its own load, so its own `learned` map):

* ``dns-cost``: egress default deny; allow UDP to the responder on port 53; allow
  ``fqdns``: 99 exact names and ``*.learn.bench.test`` (100 names in one rule: a section
  holds at most 64 rules). A client in its cgroup resolves ``b<N>.learn.bench.test``, 16 A
  records each, until ADDRESSES addresses are learned: real answers through the ingress
  program, nothing written to the map from outside.
* ``dns-cidrs``: the same, with those ADDRESSES addresses as /32 ``cidrs`` instead of names.
* ``dns-latency`` and ``dns-rate``: the ``dns-cost`` policy on their own cgroups.

1. **Per-packet cost.** BPF_PROG_TEST_RUN of the two pinned egress programs on an IPv4 TCP
   SYN to a learned (listed) address and to one that is not. A test run's skb belongs to a
   socket the kernel makes for the call, charged to the calling task's cgroup, and the
   program looks up ``learned`` under ``bpf_skb_cgroup_id``: so the runs are made by a
   process inside the ``dns-cost`` cgroup (from anywhere else the learned entries are not
   found and "match" would be a drop). Every verdict is checked.
2. **Latency added.** Blocking query/answer round trips, each for a name never asked before
   (each answer teaches an address: the worst case), from a cgroup under ``dns-latency``
   and from one with no policy, in interleaved blocks.
3. **Sustained learning.** A client in the ``dns-rate`` cgroup sends queries paced at
   10,000/s, each for a new name with its own address, and reads every answer. Then the
   pinned learned map is read: the addresses of the answers that reached the client, and
   those learned for that cgroup.
4. **Memory.** ``memlock`` of the learned map (/proc/self/fdinfo: the kernel's own
   accounting, ``htab_map_mem_usage``) empty and after the sustained run.

The TTLs are raised to minTTL 600 s, so nothing expires during the run.
"""

from __future__ import annotations

import ipaddress
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import packets, policies
from bench.dns_peers import BASE, PER_ANSWER
from bench.figures import Figure, Report
from bench.scratch import Scratch
from cgpolicy.contract import LEARNED, LEARNED_KEY
from cgpolicy.kernel import pins
from cgpolicy.kernel.bpf import Map, Program, close_all
from cgpolicy.kernel.cgroup import cgroup_id, join_cgroup
from cgpolicy.kernel.syscall import enable_run_time_stats
from cgpolicy.policy.model import DEFAULT_MAX_LEARNED

REPO = Path(__file__).resolve().parents[1]
DELTA_TARGET_NS = 20.0
LATENCY_TARGET_US = 1000.0
RATE = 10_000  # answers per second
MIN_TTL = 600  # seconds: longer than the whole benchmark
NAMES = (*(f"h{i}.names.bench.test" for i in range(99)), "*.learn.bench.test")
MISS = "100.127.0.1"  # never answered (the responder's addresses start at 100.64.0.0)


def _policy_yaml(name: str, target: str, server: str, allow: str) -> str:
    return (
        "apiVersion: cgpolicy.dev/v1\n"
        "kind: CgroupPolicy\n"
        f"metadata:\n  name: {name}\n"
        "spec:\n"
        "  mode: enforce\n"
        f'  targets:\n    - path: "{target}"\n'
        f"  dns:\n    minTTL: {MIN_TTL}\n    maxTTL: 3600\n"
        "  network:\n"
        "    egress:\n"
        "      default: deny\n"
        "      rules:\n"
        "        - action: allow\n          protocol: udp\n          ports: [53]\n"
        f'          cidrs: ["{server}/32"]\n'
        f"        - action: allow\n{allow}"
    )


def _list(key: str, items: list[str]) -> str:
    return f"          {key}:\n" + "".join(f'            - "{item}"\n' for item in items)


def _peer(*args: str) -> list[str]:
    return [sys.executable, "-m", "bench.dns_peers", *args]


def _cpus() -> set[int]:
    """The one CPU the responder and every client run on. A loopback round trip takes
    ~15 µs when both are on one CPU and ~60 µs across two (on this VM, mostly waking the
    other vCPU), and the scheduler switches between the two from one run to the next,
    which buries a few µs of added work under noise. Pinned, every run of both sides is
    the one-CPU case: the smallest round trip, so the largest share of it is the policy."""
    return {sorted(os.sched_getaffinity(0))[-1]}


def _other_cpus() -> set[int]:
    """The CPUs but the responder's: for the paced client, which spins between sends."""
    cpus = set(os.sched_getaffinity(0))
    return cpus - _cpus() or cpus


def _enter(cgroup: Path | None, cpus: set[int]) -> Callable[[], None]:
    def enter() -> None:
        os.sched_setaffinity(0, cpus)
        if cgroup is not None:
            join_cgroup(cgroup)

    return enter


def _run_in(cgroup: Path, *args: str, cpus: set[int] | None = None) -> dict[str, Any]:
    """Run a dns_peers client in ``cgroup`` (on the responder's CPU unless ``cpus``) and
    parse its line."""
    done = subprocess.run(
        _peer(*args),
        cwd=REPO,
        preexec_fn=_enter(cgroup, cpus or _cpus()),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"dns_peers {args[0]} failed: {done.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


class Responder:
    """The responder process: started on a free 127.53.0.N:53, stopped in ``close``."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            _peer("responder", "127.53.0"),
            cwd=REPO,
            preexec_fn=_enter(None, _cpus()),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().split()
        if not line or line[0] != "ready":
            self.close()
            raise RuntimeError(f"the DNS responder did not start: {self.process.stderr}")
        self.address = line[1]
        self.sent: int | None = None

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            out, _ = self.process.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, _ = self.process.communicate()
        for line in out.splitlines():
            if line.startswith("{"):
                self.sent = json.loads(line)["sent"]


def _learned_map(scratch: Scratch, policy: str) -> Map:
    return Map.from_pin(pins.policy_dir(scratch.bpf_dir, policy) / pins.LEARNED_PIN)


def learned_for(learned: Map, cgroup: int) -> tuple[set[int], int]:
    """(the IPv4 addresses, as integers, that ``learned`` holds unexpired for ``cgroup``;
    how many of its entries are that cgroup's, expired or not). The layouts are
    cgpolicy.contract's: an IPv4 address is stored as ::ffff:a.b.c.d."""
    now = time.monotonic_ns()  # bpf_ktime_get_coarse_ns: CLOCK_MONOTONIC, coarse
    live: set[int] = set()
    entries = 0
    for key, value in learned.items():
        k = LEARNED_KEY.unpack_from(key)
        if k["cgroup_id"] != cgroup:
            continue
        entries += 1
        if LEARNED.unpack_from(value)["expires_ns"] > now:
            address = ipaddress.IPv6Address(bytes(k["addr"]))
            if address.ipv4_mapped is not None:
                live.add(int(address.ipv4_mapped))
    return live, entries


def memlock(kernel_map: Map) -> int:
    """The kernel's accounting of the map's memory (``memlock`` in its fdinfo)."""
    for line in Path(f"/proc/self/fdinfo/{kernel_map.fd}").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == "memlock":
            return int(value)
    raise RuntimeError("no memlock in the map's fdinfo")


def _percentile(values: list[int], fraction: float) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))])


def run(report: Report, quick: bool) -> None:
    addresses = 1_008 if quick else 10_000  # a multiple of PER_ANSWER close to the round
    repeat = 100_000 if quick else 1_000_000
    rounds = 3 if quick else 7
    trips = 300 if quick else 10_000
    blocks = 2 if quick else 5
    seconds = 0.5 if quick else 3.0
    report.params["dns"] = {
        "learned_addresses": addresses,
        "names_in_rule": len(NAMES),
        "test_run_repeat": repeat,
        "rounds": rounds,
        "latency_round_trips_per_side": trips,
        "answers_per_s": RATE,
        "sustained_s": seconds,
        "min_ttl_s": MIN_TTL,
    }
    responder = Responder()
    try:
        with Scratch("dns") as scratch, tempfile.TemporaryDirectory() as folder:
            names = ["cost", "cidrs", "latency", "nopolicy", "rate"]
            targets = dict(zip(names, scratch.make_cgroups(names), strict=True))
            cgroups = {name: scratch.cgroup_dir / name for name in names}
            server = responder.address
            listed = [str(ipaddress.IPv4Address(BASE + i)) + "/32" for i in range(addresses)]
            by_names = _list("fqdns", list(NAMES))
            documents = {
                "dns-cost": _policy_yaml("dns-cost", targets["cost"], server, by_names),
                "dns-cidrs": _policy_yaml(
                    "dns-cidrs", targets["cidrs"], server, _list("cidrs", listed)
                ),
                "dns-latency": _policy_yaml("dns-latency", targets["latency"], server, by_names),
                "dns-rate": _policy_yaml("dns-rate", targets["rate"], server, by_names),
            }
            scratch.plan_apply(policies.load(Path(folder), documents))
            _per_packet(report, scratch, cgroups, server, addresses, repeat, rounds)
            _latency(report, cgroups, server, trips, blocks)
            _program_time(report, scratch, cgroups["latency"], server, trips // blocks)
            _sustained(report, scratch, cgroups["rate"], server, seconds)
    finally:
        responder.close()
    report.details["dns_responder_answers_sent"] = responder.sent


def _per_packet(
    report: Report,
    scratch: Scratch,
    cgroups: dict[str, Path],
    server: str,
    addresses: int,
    repeat: int,
    rounds: int,
) -> None:
    queries = addresses // PER_ANSWER
    taught = _run_in(cgroups["cost"], "latency", server, str(queries), "0", "b")
    with _learned_map(scratch, "dns-cost") as learned:
        live, _ = learned_for(learned, cgroup_id(cgroups["cost"]))
    if taught["errors"] or len(live) != addresses:
        raise RuntimeError(
            f"{len(live)} of {addresses} addresses learned ({taught['errors']} failed queries)"
        )
    match = str(ipaddress.IPv4Address(BASE + addresses // 2))
    # never answered, but in a /16 with learned (listed) addresses: the lookups cannot be
    # skipped, by the prefix index of cidrs or by dns_seen
    near_miss = str(ipaddress.IPv4Address(BASE + 2 * addresses))
    spec = {
        "programs": {
            policy: str(pins.hook_dir(scratch.bpf_dir, f"dns-{policy}", "egress") / pins.PROG_PIN)
            for policy in ("cidrs", "cost")
        },
        "cases": {
            "match": [packets.ipv4_tcp("192.0.2.2", match, 443).hex(), 1],
            "miss": [packets.ipv4_tcp("192.0.2.2", MISS, 443).hex(), 0],
            "near-miss": [packets.ipv4_tcp("192.0.2.2", near_miss, 443).hex(), 0],
        },
    }
    result = _run_in(cgroups["cost"], "testrun", str(repeat), str(rounds), json.dumps(spec))
    if result["wrong"]:
        raise RuntimeError("wrong verdicts in the test runs: " + "; ".join(result["wrong"][:4]))
    samples = result["samples"]
    report.details["dns_verdict_samples_ns"] = samples
    for outcome in ("match", "miss", "near-miss"):
        cidrs = statistics.median(samples[f"{outcome}.cidrs"])
        fqdns = statistics.median(samples[f"{outcome}.cost"])
        drop = "; dropped, so the deny-event path runs too" if outcome != "match" else ""
        report.add(
            Figure(
                f"dns_verdict_ns.ipv4.{outcome}.cidrs",
                cidrs,
                "ns",
                f"egress verdict, IPv4 TCP {outcome}, policy with the {addresses:,} addresses "
                f"as /32 cidrs (test_run, median of {rounds} x {repeat:,}){drop}",
            )
        )
        report.add(
            Figure(
                f"dns_verdict_ns.ipv4.{outcome}.fqdns",
                fqdns,
                "ns",
                f"egress verdict, IPv4 TCP {outcome}, policy with {len(NAMES)} fqdns and "
                f"{addresses:,} addresses learned from real answers (test_run, same rounds)"
                f"{drop}",
            )
        )
        report.add(
            Figure(
                f"dns_verdict_delta_ns.ipv4.{outcome}",
                fqdns - cidrs,
                "ns",
                f"fqdns minus cidrs, IPv4 {outcome}",
                ("<=", DELTA_TARGET_NS),
            )
        )


def _latency(
    report: Report, cgroups: dict[str, Path], server: str, trips: int, blocks: int
) -> None:
    per_block = max(1, trips // blocks)
    rtt: dict[str, list[int]] = {"nopolicy": [], "latency": []}
    errors = 0
    first = 1_000_000  # names not used by the other parts
    for block in range(blocks):  # interleaved, the order alternating
        order = ("nopolicy", "latency") if block % 2 == 0 else ("latency", "nopolicy")
        for side in order:
            got = _run_in(cgroups[side], "latency", server, str(per_block), str(first))
            first += per_block
            rtt[side].extend(got["rtt_ns"])
            errors += got["errors"]
    report.details["dns_latency_rtt_ns"] = rtt
    figures = {}
    for side, label in (("nopolicy", "none"), ("latency", "policy")):
        for name, fraction in (("p50", 0.5), ("p99", 0.99)):
            value = _percentile(rtt[side], fraction) / 1000
            figures[name, label] = value
            where = (
                "a cgroup with the fqdns policy (each answer teaches a new address)"
                if label == "policy"
                else "a cgroup with no policy"
            )
            report.add(
                Figure(
                    f"dns_latency_{name}_us.{label}",
                    value,
                    "µs",
                    f"DNS query/answer round trip on loopback from {where}, {name} of "
                    f"{len(rtt[side]):,}",
                    note=f"{errors} failed queries in all" if errors else "",
                )
            )
    report.add(
        Figure(
            "dns_latency_added_p99_us",
            figures["p99", "policy"] - figures["p99", "none"],
            "µs",
            "p99 round trip with the fqdns policy minus p99 without",
            ("<", LATENCY_TARGET_US),
            note=f"p50 added: {figures['p50', 'policy'] - figures['p50', 'none']:.1f} µs",
        )
    )


def _program_time(report: Report, scratch: Scratch, cgroup: Path, server: str, count: int) -> None:
    """What the latency figures' added time is made of: run_time_ns / run_cnt of the
    policy's egress program (the query: the rule lookup and the pending entry) and of its
    ingress program (the answer: the question and answers tail calls, which BPF_ENABLE_STATS
    counts in the program they start from), with run-time statistics on, over ``count``
    more round trips of the latency client."""
    programs = {
        hook: Program.from_pin(pins.hook_dir(scratch.bpf_dir, "dns-latency", hook) / pins.PROG_PIN)
        for hook in ("egress", "ingress")
    }
    stats_fd = enable_run_time_stats()
    try:
        before = {hook: program.info() for hook, program in programs.items()}
        _run_in(cgroup, "latency", server, str(count), "2000000")
        after = {hook: program.info() for hook, program in programs.items()}
    finally:
        os.close(stats_fd)
        close_all(programs.values())
    for hook, packet in (("egress", "query"), ("ingress", "answer")):
        runs = after[hook].run_cnt - before[hook].run_cnt
        ns = after[hook].run_time_ns - before[hook].run_time_ns
        report.add(
            Figure(
                f"dns_program_ns.{packet}",
                ns / runs if runs else None,
                "ns",
                f"the fqdns policy's {hook} program per DNS {packet} of a latency round trip "
                "(run_time_ns / run_cnt with BPF_ENABLE_STATS"
                + (", the question and answers tail calls included)" if hook == "ingress" else ")"),
                note=f"{runs} runs (the warm-up round trips included)",
            )
        )


def _sustained(report: Report, scratch: Scratch, cgroup: Path, server: str, seconds: float) -> None:
    with _learned_map(scratch, "dns-rate") as learned:
        empty = memlock(learned)
        got = _run_in(cgroup, "rate", server, str(RATE), str(seconds), "0", cpus=_other_cpus())
        live, entries = learned_for(learned, cgroup_id(cgroup))
        filled = memlock(learned)
        max_entries = learned.info.max_entries
    answered = set(got["answered"])
    lost = len(answered - live)
    sent_rate = got["sent"] / got["send_s"] if got["send_s"] else None
    report.details["dns_sustained"] = {
        key: value for key, value in got.items() if key != "answered"
    } | {"learned_entries": entries, "memlock_empty": empty, "memlock_filled": filled}
    behind_ms = got["late_max_s"] * 1e3
    pace = f"sent {got['sent']:,} queries at {sent_rate:,.0f}/s (at most {behind_ms:.1f} ms late)"
    report.add(
        Figure(
            "dns_sustained_answered",
            len(answered),
            "answers",
            f"answers (one new address each) that reached the client at {RATE:,}/s for "
            f"{seconds:g} s",
            note=pace + f"; {got['received']:,} replies read",
        )
    )
    report.add(
        Figure(
            "dns_sustained_learned",
            len(live),
            "addresses",
            "addresses the pinned learned map holds for the client's cgroup, unexpired",
            note=f"{len(live - answered)} learned whose answer the client did not read",
        )
    )
    report.add(
        Figure(
            "dns_sustained_lost",
            lost,
            "answers",
            "answers read by the client whose address was not learned",
            ("<=", 0),
        )
    )
    report.add(
        Figure(
            "dns_sustained_learned_per_s",
            len(live) / got["send_s"] if got["send_s"] else None,
            "/s",
            "addresses learned per second of sending",
        )
    )
    _memory(report, empty, filled, entries, max_entries)


def _memory(report: Report, empty: int, filled: int, entries: int, max_entries: int) -> None:
    """Bytes per learned entry from the kernel's memlock: the growth per entry if the map
    allocates as it fills, else (preallocated) its whole size over max_entries."""
    key_value = LEARNED_KEY.size + LEARNED.size
    grown = filled - empty
    if grown > 0 and entries:
        per_entry = grown / entries
        full = empty + per_entry * max_entries
        how = f"memlock grew {grown:,} B for {entries:,} entries (allocated as it fills)"
    else:
        per_entry = filled / max_entries
        full = filled
        how = (
            f"memlock {filled:,} B whether empty or holding {entries:,} entries "
            f"(preallocated at creation): the whole map over its {max_entries:,} entries"
        )
    report.add(
        Figure(
            "dns_learned_entry_bytes",
            per_entry,
            "B",
            f"kernel memory per learned entry (key {LEARNED_KEY.size} B + value "
            f"{LEARNED.size} B = {key_value} B of data, plus the hash table's own)",
            note=how,
        )
    )
    report.add(
        Figure(
            "dns_learned_map_mib",
            full / (1 << 20),
            "MiB",
            f"kernel memory of one policy's learned map at full size ({max_entries:,} "
            f"entries; spec.dns.maxLearned, default {DEFAULT_MAX_LEARNED:,}); one per policy load",
        )
    )
