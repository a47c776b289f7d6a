"""Issue 14 part 3, the alternative shape: one program per hook at the common parent with a
cgroup id -> rule set map (Tetragon's per-workload policy shape), against one attachment per
cgroup (what cgpolicy does). A throwaway prototype, compiled here by bcc, never in ``bpf/``:

* ``direct_*``: ``return 1``, attached (BPF link, pinned as cgpolicy pins) on each of the
  10,000 cgroups: the rule work is the same in both shapes, so the difference is the cost;
* ``ancestor_*``: the cgroup id (``bpf_skb_cgroup_id`` on egress, the socket's cgroup;
  ``bpf_get_current_cgroup_id`` on connect4, the only one sock_addr programs may call) looked
  up in a 10,000-entry hash, attached once on the parent.

Measured: per-run cost with real traffic (both shapes attached at once, so the same packets
and connects run both; run_time_ns / run_cnt, BPF_ENABLE_STATS), from a matched cgroup and
from an unmatched sibling (the ancestor program runs there too, and misses); cold start
(10,000 LINK_CREATE + pin per hook vs 10,000 map updates, one by one and in one batch);
one new cgroup (a LINK_CREATE + pin per hook vs one map update); kernel memory (map memlock
vs the host's Slab + Percpu growth for the links and pins); the removal (unpinning 10,000
links vs deleting 10,000 entries). What it means for cgpolicy's semantics: docs/scale.md.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import packets
from bench.figures import Figure, Report
from bench.scale import _slab_kib, memlock
from bench.scratch import Scratch
from cgpolicy.kernel.bpf import CgroupLink, Map, Program
from cgpolicy.kernel.cgroup import open_cgroup
from cgpolicy.kernel.processes import sigterm_as_interrupt
from cgpolicy.kernel.syscall import AttachType, enable_run_time_stats

SOURCE = """
#include <uapi/linux/bpf.h>
BPF_HASH(rulesets, u64, u32, 16384);  /* cgroup id -> index of its rule set */

static __always_inline int verdict(u64 id) {
    u32 *set = rulesets.lookup(&id);
    if (!set)
        return 1;  /* not a cgroup the glob matches: not this policy's business */
    return *set != 0xffffffff;  /* stands for "run rule set *set" */
}
int direct_egress(struct __sk_buff *skb) { return 1; }
int ancestor_egress(struct __sk_buff *skb) { return verdict(bpf_skb_cgroup_id(skb)); }
int direct_connect4(struct bpf_sock_addr *ctx) { return 1; }
int ancestor_connect4(struct bpf_sock_addr *ctx) { return verdict(bpf_get_current_cgroup_id()); }
"""
HOOKS = {
    "egress": AttachType.CGROUP_INET_EGRESS,
    "connect4": AttachType.CGROUP_INET4_CONNECT,
}
SENDER = """\
import socket, sys
count = int(sys.argv[1])
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    for _ in range(count):
        sock.sendto(b"x" * 64, ("127.0.0.1", 9))
for _ in range(count // 10):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("127.0.0.1", 9))
"""


def run(report: Report, quick: bool) -> None:
    count = 300 if quick else 10_000
    traffic = 5_000 if quick else 100_000
    rounds = 2 if quick else 5
    samples = 20 if quick else 200
    report.params["ancestor"] = {
        "cgroups": count,
        "datagrams_per_round": traffic,
        "connects_per_round": traffic // 10,
        "rounds": rounds,
        "new_cgroup_samples": samples,
    }
    with sigterm_as_interrupt(), Scratch("ancestor") as scratch:
        links = scratch.bpf_dir / "_links"  # not a policy folder: Scratch.close skips it
        try:
            _run(report, scratch, links, count, traffic, rounds, samples)
        finally:
            shutil.rmtree(links, ignore_errors=True)  # unpinned links detach themselves


def _load() -> tuple[dict[str, Program], Map]:
    """The four programs (fds of our own) and the map, compiled by bcc."""
    import bcc  # noqa: PLC0415 (only this bench needs it, and only here)

    module = bcc.BPF(text=SOURCE)
    try:
        programs = {}
        for name in ("direct_egress", "ancestor_egress"):
            fn = module.load_func(name, bcc.BPF.CGROUP_SKB)
            programs[name] = Program(os.dup(fn.fd))
        for name in ("direct_connect4", "ancestor_connect4"):
            fn = module.load_func(
                name, bcc.BPF.CGROUP_SOCK_ADDR, attach_type=AttachType.CGROUP_INET4_CONNECT
            )
            programs[name] = Program(os.dup(fn.fd))
        rulesets = Map(os.dup(module["rulesets"].map_fd))
    finally:
        module.cleanup()
    return programs, rulesets


def _key(cgroup_id: int) -> bytes:
    return cgroup_id.to_bytes(8, sys.byteorder)


VALUE = (7).to_bytes(4, sys.byteorder)


def _attach_pinned(program: Program, cgroup: Path, hook: str, pin: Path) -> None:
    fd = open_cgroup(cgroup)
    try:
        with CgroupLink.create(program.fd, fd, HOOKS[hook]) as link:
            link.pin(pin)
    finally:
        os.close(fd)


def _run(
    report: Report,
    scratch: Scratch,
    links: Path,
    count: int,
    traffic: int,
    rounds: int,
    samples: int,
) -> None:
    parent = scratch.cgroup_dir
    paths = [parent / f"c-{i:05d}" for i in range(count)]
    for path in paths:
        path.mkdir()
    other = parent / "other"  # a sibling the glob c-* does not match
    other.mkdir()
    links.mkdir()
    programs, rulesets = _load()
    try:
        ids = [os.stat(path).st_ino for path in paths]
        # cold start: direct, 10,000 LINK_CREATE + pin per hook
        slab_before = _slab_kib()
        direct_s = {}
        for hook in HOOKS:
            start = time.perf_counter()
            for path, cid in zip(paths, ids, strict=True):
                _attach_pinned(programs[f"direct_{hook}"], path, hook, links / f"{hook}-{cid}")
            direct_s[hook] = time.perf_counter() - start
        slab_direct = _slab_kib() - slab_before
        # cold start: ancestor, 10,000 map updates (one by one, then one batch), 1 link a hook
        entries = [(_key(cid), VALUE) for cid in ids]
        start = time.perf_counter()
        for key, value in entries:
            rulesets.update(key, value)
        one_by_one_s = time.perf_counter() - start
        for key, _ in entries:
            rulesets.delete(key)
        start = time.perf_counter()
        rulesets.update_batch(entries)
        batch_s = time.perf_counter() - start
        for hook in HOOKS:
            _attach_pinned(programs[f"ancestor_{hook}"], parent, hook, links / f"{hook}-parent")
        _cold_figures(report, count, direct_s, one_by_one_s, batch_s)
        _per_run(report, programs, paths[count // 2], other, traffic, rounds, count)
        _test_run(report, programs, rulesets, rounds, count)
        _new_cgroup(report, programs, rulesets, parent, links, samples, count)
        _memory(report, rulesets, slab_direct, count)
        _removal(report, rulesets, links, entries, count)
    finally:
        for program in programs.values():
            program.close()
        rulesets.close()


def _cold_figures(
    report: Report,
    count: int,
    direct_s: dict[str, float],
    one_by_one_s: float,
    batch_s: float,
) -> None:
    per_hook = statistics.mean(direct_s.values())
    report.add(
        Figure(
            "ancestor_cold_direct_s",
            per_hook,
            "s",
            f"one attachment per cgroup: {count:,} x (open cgroup, BPF_LINK_CREATE, pin) for "
            "one hook (mean of egress and connect4); cgpolicy pays this once per program",
            note=", ".join(f"{hook} {s:.2f} s" for hook, s in direct_s.items()),
        )
    )
    report.add(
        Figure(
            "ancestor_cold_map_s",
            one_by_one_s,
            "s",
            f"one program at the parent: {count:,} BPF_MAP_UPDATE_ELEMs of cgroup id -> rule "
            "set (one map for every hook)",
        )
    )
    report.add(
        Figure(
            "ancestor_cold_map_batch_s",
            batch_s,
            "s",
            f"the same {count:,} entries in one BPF_MAP_UPDATE_BATCH",
        )
    )


def _per_run(
    report: Report,
    programs: dict[str, Program],
    matched: Path,
    unmatched: Path,
    traffic: int,
    rounds: int,
    count: int,
) -> None:
    """Both shapes are attached, so each datagram and connect runs both programs; the
    kernel times each one (run_time_ns / run_cnt) on the same traffic, in rounds."""
    stats_fd = enable_run_time_stats()
    ns: dict[str, list[float]] = {}
    try:
        for _ in range(rounds):
            for where, cgroup in (("matched", matched), ("unmatched", unmatched)):
                before = {name: program.info() for name, program in programs.items()}
                _traffic_from(cgroup, traffic)
                for name, program in programs.items():
                    after = program.info()
                    runs = after.run_cnt - before[name].run_cnt
                    if runs:
                        spent = after.run_time_ns - before[name].run_time_ns
                        ns.setdefault(f"{name}.{where}", []).append(spent / runs)
    finally:
        os.close(stats_fd)
    report.details["ancestor_run_ns"] = {k: [round(v, 1) for v in vs] for k, vs in ns.items()}
    for hook, helper in (("egress", "bpf_skb_cgroup_id"), ("connect4", "current cgroup id")):
        direct = statistics.median(ns[f"direct_{hook}.matched"])
        report.add(
            Figure(
                f"ancestor_run_ns.{hook}.direct",
                direct,
                "ns",
                f"per {hook} run, real traffic from one of {count:,} cgroups: the program "
                "attached on the cgroup itself (return 1)",
            )
        )
        for where in ("matched", "unmatched"):
            value = statistics.median(ns[f"ancestor_{hook}.{where}"])
            report.add(
                Figure(
                    f"ancestor_run_ns.{hook}.{where}",
                    value,
                    "ns",
                    f"the program at the parent: {helper} + a hash lookup in {count:,} "
                    f"entries, from a {where} cgroup (median of rounds)",
                    note=f"{value - direct:+.1f} ns vs direct",
                )
            )


def _test_run(
    report: Report, programs: dict[str, Program], rulesets: Map, rounds: int, count: int
) -> None:
    """The same two egress programs under BPF_PROG_TEST_RUN (no per-run clock reads): the
    test packet's socket has no cgroup, so bpf_skb_cgroup_id() gives the root's id (1),
    looked up with and without an entry for it among the 10,000."""
    packet = packets.ipv4_tcp("192.0.2.2", "127.0.0.1", 443)
    repeat = 1_000_000
    ns: dict[str, list[float]] = {}
    root = _key(1)
    try:
        for _ in range(rounds):
            for case in ("direct", "miss", "hit"):
                if case == "hit":
                    rulesets.update(root, VALUE)
                name = "direct_egress" if case == "direct" else "ancestor_egress"
                result = programs[name].test_run(packet, repeat=repeat)
                ns.setdefault(case, []).append(result.duration_ns)
                if case == "hit":
                    rulesets.delete(root)
    finally:
        rulesets.delete(root)
    direct = statistics.median(ns["direct"])
    for case, values in ns.items():
        value = statistics.median(values)
        report.add(
            Figure(
                f"ancestor_testrun_ns.egress.{case}",
                value,
                "ns",
                "BPF_PROG_TEST_RUN ns per run (median of rounds, repeat 1,000,000): "
                + (
                    "return 1"
                    if case == "direct"
                    else f"bpf_skb_cgroup_id + lookup ({case}) in {count:,} entries"
                ),
                note="" if case == "direct" else f"{value - direct:+.1f} ns vs direct",
            )
        )


def _traffic_from(cgroup: Path, count: int) -> None:
    def enter() -> None:
        (cgroup / "cgroup.procs").write_text("0")

    subprocess.run(
        [sys.executable, "-c", SENDER, str(count)],
        preexec_fn=enter,
        capture_output=True,
        timeout=300,
        check=True,
    )


def _new_cgroup(
    report: Report,
    programs: dict[str, Program],
    rulesets: Map,
    parent: Path,
    links: Path,
    samples: int,
    count: int,
) -> None:
    """The kernel side of one new cgroup: a link (+ pin) per hook, or one map update."""
    direct, mapped = [], []
    for i in range(samples):
        path = parent / f"c-new-{i:04d}"
        path.mkdir()
        start = time.perf_counter()
        cid = os.stat(path).st_ino
        for hook in HOOKS:
            _attach_pinned(programs[f"direct_{hook}"], path, hook, links / f"{hook}-{cid}")
        direct.append((time.perf_counter() - start) * 1e6)
        start = time.perf_counter()
        rulesets.update(_key(os.stat(path).st_ino), VALUE)
        mapped.append((time.perf_counter() - start) * 1e6)
    for key, values, what in (
        ("direct", direct, f"stat + {len(HOOKS)} x (open, BPF_LINK_CREATE, pin)"),
        ("map", mapped, "stat + 1 BPF_MAP_UPDATE_ELEM"),
    ):
        report.add(
            Figure(
                f"ancestor_new_cgroup_us.{key}",
                statistics.median(values),
                "us",
                f"kernel work for one new cgroup with {count:,} in place: {what} (median)",
                note=f"p99 {sorted(values)[max(0, round(0.99 * len(values)) - 1)]:.0f} us",
            )
        )


def _memory(report: Report, rulesets: Map, slab_direct_kib: int, count: int) -> None:
    report.add(
        Figure(
            "ancestor_map_kib",
            memlock(rulesets.fd) / 1024,
            "KiB",
            f"memlock of the cgroup id -> rule set hash with {count:,} entries (16,384 max)",
        )
    )
    report.add(
        Figure(
            "ancestor_direct_links_kib",
            slab_direct_kib,
            "KiB",
            f"the host's Slab + Percpu growth while attaching and pinning {len(HOOKS)} x "
            f"{count:,} links (links, bpffs inodes and dentries, effective program arrays; "
            "noisy: other processes run too)",
            note=f"{slab_direct_kib * 1024 / (len(HOOKS) * count):.0f} B per link",
        )
    )


def _removal(
    report: Report,
    rulesets: Map,
    links: Path,
    entries: list[tuple[bytes, bytes]],
    count: int,
) -> None:
    start = time.perf_counter()
    for pin in links.iterdir():
        if not pin.name.endswith("-parent"):
            pin.unlink()  # the last reference: the link detaches
    unpin_s = time.perf_counter() - start
    start = time.perf_counter()
    for key, _ in entries:
        rulesets.delete(key)
    delete_s = time.perf_counter() - start
    report.add(
        Figure(
            "ancestor_remove_direct_s",
            unpin_s,
            "s",
            f"removal, one attachment per cgroup: unpin {len(HOOKS)} x {count:,} links "
            "(each detaches as its last reference goes)",
        )
    )
    report.add(
        Figure(
            "ancestor_remove_map_s",
            delete_s,
            "s",
            f"removal, one program at the parent: {count:,} BPF_MAP_DELETE_ELEMs (then one "
            "link per hook)",
        )
    )
