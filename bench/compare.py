"""cgpolicy against iptables and nftables: one egress allow-list of N prefixes on one cgroup,
measured per packet between two network namespaces.

    python -m bench.compare           N = 1, 100, 1,000, 10,000, 100,000; IPv4 and IPv6;
                                      4 interleaved rounds (~20 min on 2 vCPUs); writes
                                      bench/RESULTS.md, bench/compare_ratios.png and
                                      bench/compare.json
    python -m bench.compare --quick   N = 1, 1,000; one round, 1 s loads; a temp folder

Every configuration enforces the same thing for one scratch cgroup: egress to N prefixes of
one family is allowed, everything else is dropped. The N prefixes are N-1 random
non-overlapping ones (IPv4 /24../32 anywhere; IPv6 /48../128 in fd00::/16, around the
destination) followed by the measured destination's own /32 or /128: it is allowed and it
is the LAST entry of the list, the worst case of a linear chain.

* ``cgpolicy``: a policy file (egress default deny, one allow rule with the N prefixes) in
  the policy folder of the reconcile service, run in this process (its ``Reconciler``):
  loaded by a reconcile pass, changed by what the service does on an event in its folder
  (``Reconciler.change_files``, the change in place, else a pass).
* ``iptables-nft`` / ``iptables-legacy``: a chain of one ``-d PREFIX -j ACCEPT`` rule per
  prefix, in list order, then ``-j DROP``; OUTPUT jumps to it with ``-m cgroup --path``.
  ``iptables`` for IPv4, ``ip6tables`` for IPv6; loaded with ``*-restore --noflush``.
* ``nftables``: a table of its own with an interval set of the N prefixes
  (``ipv4_addr``/``ipv6_addr``) and an output chain ``socket cgroupv2 level L "PATH" jump``
  to ``ip daddr @allow accept; drop`` (``ip6 daddr`` for IPv6).
* ``none``: no policy; the reference every ratio divides by.

The load (``bench/veth.py``): the client runs in the cgroup under test in network namespace
a, the servers in namespace b, joined by a veth pair; iptables and nftables rules live in
namespace a (netfilter is per namespace; cgroup programs are not). Client and servers are
pinned to different CPUs and receive processing is steered (RPS) to the reader's CPU, so the
client's CPU does the send path only and the filter is a visible share of it. Two loads,
64-byte payloads:

* packets per second: ``iperf3 -u -l 64 -b 0`` (one UDP stream as fast as the client
  sends); the figure is the client's send rate (datagrams the kernel accepted per second),
  and the client's CPU time per packet from iperf3's own CPU accounting;
* transactions per second: ``qperf udp_lat -m 64`` (one UDP request/response in flight at a
  time; tps = 1 / round-trip time).

Before measuring, every configuration is checked from the cgroup: a TCP connect to the
destination must succeed (its UDP is checked by the loads, which need replies), and neither
a TCP connect nor any of 20 UDP datagrams to a second address of the server (``.3``) may get
through (with no policy, they must). Arrivals are counted by the server namespace's UDP
counters, so a filter that fails the send but lets the packet out would be caught too.

Configurations are interleaved: each round visits both families and every N and, per N,
every configuration once, in an order rotated from cell to cell. A ratio divides by the
median of every no-policy run of that family (all rounds and N); the report shows the median
over rounds and the min-max spread, the no-policy column included (its spread is the noise).
Also timed per cell: loading the whole list, and changing one prefix (the first) in place.

Everything this creates is removed in ``finally``: the two namespaces (with the veth pair and
every iptables/nftables rule, all inside namespace a), the servers, the scratch cgroups and
pin folder (``<cgroup2>/cgpolicy-bench-<pid>/``, ``<bpffs>/cgpolicy-bench-<pid>/``). No rule,
chain or table of the host is read or changed.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.scratch import Scratch, remove_top_folders
from bench.veth import IPERF_PORT, PROBE_PORT, QPERF_PORT, VethPair
from cgpolicy.enforcer.engine import Enforcer
from cgpolicy.enforcer.ownership import Owner
from cgpolicy.reconciler.metrics import Metrics
from cgpolicy.reconciler.reconcile import Reconciler

SIZES = (1, 100, 1_000, 10_000, 100_000)
QUICK_SIZES = (1, 1_000)
FAMILIES = ("ipv4", "ipv6")
PAYLOAD = 64
PROBE_DATAGRAMS = 20
NFT_CGROUP_BASE = Path("/sys/fs/cgroup")  # nft resolves `socket cgroupv2` paths below this
BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
PLOT = "compare_ratios.png"
METRICS = (
    ("pps", "packets per second"),
    ("pps_cpu", "packets per client CPU-second"),
    ("tps", "transactions per second"),
)
SECTIONS = {  # key: (heading, how it is measured, unit of the none column, its scale)
    "pps": (
        "Small-packet UDP: packets per second, ratio to no policy",
        f"`iperf3 -u -l {PAYLOAD} -b 0`: the client's send rate (the filters run in the "
        "client's send path).",
        "kpps",
        1e3,
    ),
    "pps_cpu": (
        "Small-packet UDP: packets per client CPU-second, ratio to no policy",
        "The same runs, divided by the client's CPU time (iperf3's own user + system time "
        "accounting): about the rate the client would reach on a CPU of its own. Much less "
        "sensitive than the rate to the client being descheduled by other work on the "
        "machine; its inverse, in ns per packet, is tabled further down.",
        "kpps",
        1e3,
    ),
    "tps": (
        "Request/response: transactions per second, ratio to no policy",
        f"`qperf udp_lat -m {PAYLOAD}`: one UDP request and its response in flight at a time; "
        "tps = 1 / round-trip time.",
        "tps",
        1.0,
    ),
}


class BenchError(RuntimeError):
    pass


def run(cmd: Sequence[str], stdin: str | None = None, check: bool = True) -> str:
    done = subprocess.run(cmd, input=stdin, capture_output=True, text=True)
    if check and done.returncode != 0:
        shown = " ".join(c for c in cmd[:6] if not c.startswith("--net="))
        raise BenchError(f"{shown}...: exit {done.returncode}: {done.stderr.strip()[:500]}")
    return done.stdout


def timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


_V4_LENGTHS = (24, 24, 24, 24, 25, 26, 27, 28, 29, 30, 31, 32)
_V6_LENGTHS = (48, 48, 52, 56, 60, 64, 64, 96, 112, 128)


@functools.cache
def allow_list(family: str, n: int, destination: str) -> tuple[str, ...]:
    """N-1 random non-overlapping prefixes, then destination/32 or /128 (last: the deepest
    position in a linear list). Each random prefix lies in its own slot (a /24 of the whole
    IPv4 space; a /48 of the destination's /16 for IPv6, so that a trie walk towards the
    destination goes deep); the destination's slot is never drawn."""
    rng = random.Random(f"{family}-{n}")
    address = ipaddress.ip_address(destination)
    width, slot_bits, lengths = (
        (32, 24, _V4_LENGTHS) if family == "ipv4" else (128, 48, _V6_LENGTHS)
    )
    own = int(address) >> (width - slot_bits)
    # IPv4: any /24 of the space; IPv6: the /48s of the destination's /16
    free_bits = 24 if family == "ipv4" else 32
    base = 0 if family == "ipv4" else own >> free_bits << free_bits
    slots: set[int] = set()
    while len(slots) < n - 1:
        slot = base | rng.getrandbits(free_bits)
        if slot != own:
            slots.add(slot)
    found = []
    for slot in sorted(slots):
        length = rng.choice(lengths)
        host_bits = width - slot_bits
        network = ((slot << host_bits) | rng.getrandbits(host_bits)) >> (width - length)
        found.append(f"{ipaddress.ip_address(network << (width - length))}/{length}")
    return (*found, f"{address}/{width}")


@functools.cache
def replacement(family: str, prefixes: Sequence[str]) -> str:
    """A prefix not in the list and overlapping none of it."""
    taken = [ipaddress.ip_network(p) for p in prefixes]
    for index in range(256):
        text = f"100.64.{index}.0/24" if family == "ipv4" else f"2001:db8:{index:x}::/48"
        candidate = ipaddress.ip_network(text)
        if not any(candidate.overlaps(t) for t in taken):
            return text
    raise BenchError("no free replacement prefix")


# --- configurations ---------------------------------------------------------------------


class Config:
    name = ""
    enforces = True

    def available(self) -> str | None:
        """None if usable, else why not."""
        return None

    def setup(self, family: str, prefixes: Sequence[str]) -> float:
        """Install the allow-list; seconds for the whole list."""
        return 0.0

    def change(self, old: str, new: str) -> float:
        """Replace one prefix; seconds."""
        return 0.0

    def teardown(self) -> None:
        pass


class NoPolicy(Config):
    name = "none"
    enforces = False


def _which(*tools: str) -> str | None:
    for tool in tools:
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    return None


class Cgpolicy(Config):
    """The reconcile service, run in this process: its Reconciler over a policy folder
    holding the one policy file."""

    name = "cgpolicy"

    def __init__(self, scratch: Scratch, cgroup: str, folder: Path) -> None:
        self.scratch = scratch
        self.cgroup = cgroup
        self.folder = folder / "policies"
        self.folder.mkdir(exist_ok=True)
        self.file = self.folder / "compare.yaml"
        self.enforcer = Enforcer(
            scratch.root, scratch.bpf_dir, owner=Owner.service(), in_place=True
        )
        self.service = Reconciler(self.enforcer, self.folder, Metrics())
        self.prefixes: list[str] = []
        self.in_place = False  # whether the last change was made in place

    def _yaml(self, prefixes: list[str]) -> str:
        cidrs = "".join(f'            - "{p}"\n' for p in prefixes)
        return (
            "apiVersion: cgpolicy.dev/v1\n"
            "kind: CgroupPolicy\n"
            "metadata:\n  name: compare\n"
            "spec:\n"
            "  mode: enforce\n"
            f'  targets:\n    - path: "{self.cgroup}"\n'
            "  network:\n"
            "    egress:\n"
            "      default: deny\n"
            "      rules:\n"
            "        - action: allow\n"
            f"          cidrs:\n{cidrs}"
        )

    def _full_pass(self) -> None:
        """What the service does for a new file: a reconcile pass (read the folder,
        validate, plan, apply)."""
        report = self.service.reconcile()
        if report.failed:
            raise BenchError(f"reconcile failed: {report.failed}")

    def _files_changed(self) -> None:
        """What the service does on an event in its policy folder (reconciler/loop.py): the
        change in place of Reconciler.change_files, else a full pass."""
        self.in_place = self.service.change_files()
        if not self.in_place:
            self._full_pass()

    def setup(self, family: str, prefixes: Sequence[str]) -> float:
        self.prefixes = list(prefixes)
        self.file.write_text(self._yaml(self.prefixes))
        # a service started now: it knows nothing of earlier cells
        self.service = Reconciler(self.enforcer, self.folder, Metrics())
        return timed(self._full_pass)

    def change(self, old: str, new: str) -> float:
        self.prefixes[self.prefixes.index(old)] = new
        self.file.write_text(self._yaml(self.prefixes))
        return timed(self._files_changed)

    def change_cli(self, old: str, new: str) -> float:
        """The same change through a fresh `cgpolicy apply` process (Python start-up,
        imports and the one-time bcc compile included); --force, since the service applied
        the policy."""
        self.prefixes[self.prefixes.index(old)] = new
        self.file.write_text(self._yaml(self.prefixes))
        cmd = [
            str(REPO / ".venv" / "bin" / "cgpolicy"),
            "--cgroup-root",
            str(self.scratch.root),
            "--bpf-dir",
            str(self.scratch.bpf_dir),
            "apply",
            "--force",
            str(self.file),
        ]
        return timed(lambda: run(cmd))

    def teardown(self) -> None:
        removal = self.enforcer.plan_removal(None, force=True)
        for outcome in self.enforcer.apply(removal):
            if not outcome.ok:
                raise BenchError(f"cgpolicy removal: {outcome.error}")


class Iptables(Config):
    """One chain in the client's namespace; iptables or ip6tables by family."""

    def __init__(self, backend: str, cgroup: str, in_ns: Callable[[list[str]], list[str]]):
        self.name = f"iptables-{backend}"
        self.backend = backend
        self.chain = f"cgpolicy-bench-{os.getpid()}"
        self.cgroup = cgroup
        self.in_ns = in_ns
        self.binary = ""
        self.prefixes: list[str] = []

    def _tools(self, family: str) -> tuple[str, str]:
        stem = "iptables" if family == "ipv4" else "ip6tables"
        return f"{stem}-{self.backend}", f"{stem}-{self.backend}-restore"

    def _jump(self) -> list[str]:
        return ["OUTPUT", "-m", "cgroup", "--path", self.cgroup, "-j", self.chain]

    def available(self) -> str | None:
        return _which(*self._tools("ipv4"), *self._tools("ipv6"))

    def setup(self, family: str, prefixes: Sequence[str]) -> float:
        self.binary, restore = self._tools(family)
        self.prefixes = list(prefixes)
        lines = ["*filter", f":{self.chain} - [0:0]"]
        lines += [f"-A {self.chain} -d {p} -j ACCEPT" for p in prefixes]
        lines += [f"-A {self.chain} -j DROP", "-I " + " ".join(self._jump()), "COMMIT", ""]
        text = "\n".join(lines)
        return timed(lambda: run(self.in_ns([restore, "-w", "--noflush"]), stdin=text))

    def change(self, old: str, new: str) -> float:
        number = self.prefixes.index(old) + 1
        self.prefixes[number - 1] = new
        cmd = [self.binary, "-w", "-R", self.chain, str(number), "-d", new, "-j", "ACCEPT"]
        return timed(lambda: run(self.in_ns(cmd)))

    def teardown(self) -> None:
        if not self.binary:
            return
        run(self.in_ns([self.binary, "-w", "-D", *self._jump()]), check=False)
        if (
            subprocess.run(
                self.in_ns([self.binary, "-w", "-S", self.chain]), capture_output=True
            ).returncode
            == 0
        ):
            run(self.in_ns([self.binary, "-w", "-F", self.chain]))
            run(self.in_ns([self.binary, "-w", "-X", self.chain]))
        self.binary = ""


class Nftables(Config):
    name = "nftables"

    def __init__(
        self, cgroup_dir: Path, cgroup2_root: Path, in_ns: Callable[[list[str]], list[str]]
    ) -> None:
        self.table = f"cgpolicy_bench_{os.getpid()}"
        # nft resolves the path below /sys/fs/cgroup whatever the cgroup2 mount is; `level`
        # is the depth below the cgroup2 root
        self.path = os.path.relpath(cgroup_dir, NFT_CGROUP_BASE)
        self.level = len(cgroup_dir.relative_to(cgroup2_root).parts)
        self.in_ns = in_ns
        self.exists = False

    def available(self) -> str | None:
        return _which("nft")

    def setup(self, family: str, prefixes: Sequence[str]) -> float:
        kind, match = ("ipv4_addr", "ip daddr") if family == "ipv4" else ("ipv6_addr", "ip6 daddr")
        elements = ",\n".join(prefixes)
        text = (
            f"table inet {self.table} {{\n"
            f"  set allow {{\n    type {kind}\n    flags interval\n"
            f"    elements = {{ {elements} }}\n  }}\n"
            f"  chain filter {{\n    {match} @allow accept\n    drop\n  }}\n"
            "  chain output {\n    type filter hook output priority filter; policy accept;\n"
            f'    socket cgroupv2 level {self.level} "{self.path}" jump filter\n  }}\n'
            "}\n"
        )
        self.exists = True
        return timed(lambda: run(self.in_ns(["nft", "-f", "-"]), stdin=text))

    def change(self, old: str, new: str) -> float:
        text = (
            f"delete element inet {self.table} allow {{ {old} }}\n"
            f"add element inet {self.table} allow {{ {new} }}\n"
        )
        return timed(lambda: run(self.in_ns(["nft", "-f", "-"]), stdin=text))

    def teardown(self) -> None:
        if self.exists:
            run(self.in_ns(["nft", "delete", "table", "inet", self.table]), check=False)
            self.exists = False


# --- load -------------------------------------------------------------------------------


class Load:
    """The two loads and the filter check, each a client process started in the cgroup
    under test, in the client namespace, on the client CPU."""

    def __init__(self, pair: VethPair, cgroup_dir: Path, seconds: int) -> None:
        self.pair = pair
        self.procs_file = cgroup_dir / "cgroup.procs"
        self.seconds = seconds

    def _join(self) -> None:  # runs in the child between fork and exec
        self.procs_file.write_text(str(os.getpid()))

    def _in_cgroup(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.pair.client(argv),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=self._join,  # noqa: PLW1509 - no threads in this process
        )

    def packets(self, family: str) -> dict[str, float]:
        """iperf3 UDP, 64-byte payload, unlimited rate: the client's send rate and its CPU
        time per packet."""
        argv = ["iperf3", "-c", self.pair.server(family), "-p", str(IPERF_PORT), "-u"]
        argv += ["-l", str(PAYLOAD), "-b", "0", "-t", str(self.seconds), "-J"]
        done = self._in_cgroup(argv, self.seconds + 60)
        result = json.loads(done.stdout or "{}")
        if done.returncode != 0 or "error" in result:
            raise BenchError(f"iperf3 -c: {result.get('error', done.stderr.strip())}")
        sent = result["end"]["sum_sent"]
        cpu = result["end"]["cpu_utilization_percent"]["host_total"] / 100
        cpu_seconds = cpu * sent["seconds"]
        return {
            "pps": sent["packets"] / sent["seconds"],
            "pps_cpu": sent["packets"] / cpu_seconds,
            "cpu_ns": cpu_seconds / sent["packets"] * 1e9,
            "client_cpu": cpu,
        }

    def transactions(self, family: str) -> float:
        """qperf udp_lat: one 64-byte request/response in flight; transactions/s."""
        argv = ["qperf", "-lp", str(QPERF_PORT), "-t", str(self.seconds), "-e", "6", "-vv"]
        argv += ["-m", str(PAYLOAD), self.pair.server(family), "udp_lat"]
        done = self._in_cgroup(argv, self.seconds + 60)
        found = re.search(r"^\s*latency\s*=\s*([\d.]+)\s*(ns|us|ms|sec)\b", done.stdout, re.M)
        if done.returncode != 0 or found is None:
            raise BenchError(f"qperf: exit {done.returncode}: {done.stderr.strip()}")
        scale = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "sec": 1.0}[found.group(2)]
        return 1 / (2 * float(found.group(1)) * scale)  # latency is half the round trip

    def check(self, config: Config, family: str) -> dict[str, Any]:
        """The measured destination must be reachable (TCP; its UDP is what the loads
        send), and the second address must get no packet through (with no policy, it must):
        otherwise the run would measure nothing, or a filter that does not filter.

        The probe sends 20 UDP datagrams to the blocked address first and then connects to
        the destination: both are received on the server CPU's one backlog, in order, so
        once the connect is answered every blocked datagram that got out has been counted
        by the server namespace's UDP counters. A send refused with EPERM is not trusted:
        what counts is what arrived."""
        destination, blocked = self.pair.server(family), self.pair.blocked(family)
        before = self.pair.udp_received(family)
        argv = [sys.executable, "-m", "bench.veth", "probe", destination, blocked]
        done = self._in_cgroup([*argv, str(PROBE_PORT), str(PROBE_DATAGRAMS)], 30)
        if done.returncode != 0:
            raise BenchError(f"probe: {done.stderr.strip()}")
        result = json.loads(done.stdout)
        arrived = self.pair.udp_received(family) - before
        where = f"{config.name} {family}"
        if not result["reached"]:
            raise BenchError(f"{where}: {destination} is not reachable from the cgroup")
        if config.enforces and (result["blocked_tcp"] or arrived):
            raise BenchError(
                f"{where}: {blocked} is not blocked (TCP connect "
                f"{'succeeded' if result['blocked_tcp'] else 'failed'}, {arrived} of "
                f"{PROBE_DATAGRAMS} datagrams arrived)"
            )
        if not config.enforces and not (result["blocked_tcp"] and arrived):
            raise BenchError(f"{where}: {blocked} is blocked without a policy")
        return {"blocked_tcp": result["blocked_tcp"], "blocked_arrived": arrived}


# --- the run ----------------------------------------------------------------------------


def cell_order(configs: list[Config], rnd: int, index: int) -> list[Config]:
    shift = (rnd + index) % len(configs)
    return configs[shift:] + configs[:shift]


def measure(
    configs: list[Config],
    sizes: Sequence[int],
    families: Sequence[str],
    rounds: int,
    load: Load,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    samples: list[dict[str, Any]] = []
    cells = [(family, n) for family in families for n in sizes]
    for rnd in range(rounds):
        for index, (family, n) in enumerate(cells):
            prefixes = allow_list(family, n, load.pair.server(family))
            new = replacement(family, prefixes)
            for config in cell_order(configs, rnd, index):
                began = time.perf_counter()
                sample: dict[str, Any] = {
                    "round": rnd,
                    "family": family,
                    "n": n,
                    "config": config.name,
                    "load1": os.getloadavg()[0],
                }
                try:
                    sample["apply_s"] = config.setup(family, prefixes)
                    sample.update(load.check(config, family))
                    sample.update(load.packets(family))
                    sample["tps"] = load.transactions(family)
                    if config.enforces:
                        sample["change_s"] = config.change(prefixes[0], new)
                    if isinstance(config, Cgpolicy):
                        sample["change_in_place"] = config.in_place
                        sample["change_cli_s"] = config.change_cli(new, prefixes[0])
                finally:
                    config.teardown()
                sample["cell_s"] = time.perf_counter() - began
                samples.append(sample)
                log(
                    f"round {rnd + 1}/{rounds} {family} N={n:>7,} {config.name:<16}"
                    f" {sample['pps']:9,.0f} pps ({sample['cpu_ns']:5.0f} ns/pkt,"
                    f" cpu {sample['client_cpu']:.2f})"
                    f" {sample['tps']:7,.0f} tps  apply {sample['apply_s']:.4f} s"
                    + (f"  change {sample['change_s']:.4f} s" if "change_s" in sample else "")
                    + f"  [{sample['cell_s']:.1f} s]"
                )
    return samples


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


TIMES = ("apply_s", "change_s", "change_cli_s")


def summarize(
    samples: list[dict[str, Any]], names: list[str], sizes: Sequence[int], families: Sequence[str]
) -> dict[str, Any]:
    """Per family, config and N: median and min/max over rounds of each rate, of its ratio
    to the no-policy reference, of the CPU time per packet and of each time. The reference
    of a family does not depend on N, so it is the median of all its no-policy runs (every
    round and N): one noisy run does not skew a whole column."""
    out: dict[str, Any] = {}
    for family in families:
        nones = [s for s in samples if s["config"] == "none" and s["family"] == family]
        reference = {key: statistics.median(s[key] for s in nones) for key, _ in METRICS}
        out[family] = {"reference": reference}
        for name in names:
            out[family][name] = {}
            for n in sizes:
                rows = [
                    s for s in samples if (s["config"], s["family"], s["n"]) == (name, family, n)
                ]
                cell: dict[str, Any] = {"rounds": len(rows)}
                for key, _ in METRICS:
                    ratios = [s[key] / reference[key] for s in rows]
                    cell[key] = _median([s[key] for s in rows])
                    cell[f"{key}_ratio"] = _median(ratios)
                    cell[f"{key}_ratio_min"] = min(ratios, default=None)
                    cell[f"{key}_ratio_max"] = max(ratios, default=None)
                for key in ("cpu_ns", *TIMES):
                    values = [s[key] for s in rows if key in s]
                    cell[key] = _median(values)
                    cell[f"{key}_min"] = min(values, default=None)
                    cell[f"{key}_max"] = max(values, default=None)
                cell["changes_in_place"] = sum(1 for s in rows if s.get("change_in_place"))
                out[family][name][n] = cell
    return out


def targets(
    summary: dict[str, Any], sizes: Sequence[int], families: Sequence[str]
) -> list[tuple[str, bool | None, str]]:
    """(what, met, detail). None: not judged (a configuration or N was not run)."""
    found: list[tuple[str, bool | None, str]] = []
    for family in families:
        table = summary[family]
        if "cgpolicy" not in table or "nftables" not in table:
            continue
        cg, nft = table["cgpolicy"], table["nftables"]
        for key, what in METRICS:
            worse = [n for n in sizes if cg[n][f"{key}_ratio"] < nft[n][f"{key}_ratio"]]
            detail = ", ".join(
                f"N={n:,}: {cg[n][f'{key}_ratio']:.3f} vs {nft[n][f'{key}_ratio']:.3f}"
                for n in sizes
            )
            found.append(
                (f"{family}: cgpolicy {what} ratio >= nftables (set) at every N", not worse, detail)
            )
    ten = 10_000
    if ten not in sizes:
        return found
    for family in families:
        table = summary[family]
        if "cgpolicy" not in table:
            continue
        for name in ("iptables-legacy", "iptables-nft", "nftables"):
            if name not in table:
                continue
            for key, what in (
                ("apply_s", "load the whole list"),
                ("change_s", "change one prefix"),
            ):
                ours, theirs = table["cgpolicy"][ten][key], table[name][ten][key]
                found.append(
                    (
                        f"{family}: cgpolicy {what} at N = 10,000 faster than {name}",
                        ours < theirs,
                        f"{ours * 1000:.1f} ms vs {theirs * 1000:.1f} ms",
                    )
                )
    return found


# --- output -----------------------------------------------------------------------------


def _ratio_cell(cell: dict[str, Any], key: str) -> str:
    value = cell.get(f"{key}_ratio")
    if value is None:
        return "n/a"
    low, high = cell[f"{key}_ratio_min"], cell[f"{key}_ratio_max"]
    return f"{value:.3f} ({low:.2f}-{high:.2f})"


def _ns_cell(cell: dict[str, Any]) -> str:
    if cell.get("cpu_ns") is None:
        return "n/a"
    return f"{cell['cpu_ns']:,.0f} ({cell['cpu_ns_min']:,.0f}-{cell['cpu_ns_max']:,.0f})"


def _time_cell(cell: dict[str, Any], key: str) -> str:
    value = cell.get(key)
    if value is None:
        return "-"
    low, high = cell[f"{key}_min"], cell[f"{key}_max"]
    if value < 0.1:
        return f"{value * 1000:.1f} ms ({low * 1000:.1f}-{high * 1000:.1f})"
    return f"{value:.3f} s ({low:.3f}-{high:.3f})"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _family_tables(
    summary: dict[str, Any],
    sizes: Sequence[int],
    families: Sequence[str],
    names: list[str],
    title: Callable[[str], str],
    header: list[str],
    row: Callable[[dict[str, Any], int], list[str]],
) -> list[str]:
    parts: list[str] = []
    for family in families:
        parts += [
            f"**{title(family)}**",
            "",
            _table(header, [row(summary[family], n) for n in sizes]),
            "",
        ]
    return parts


def render(
    summary: dict[str, Any],
    sizes: Sequence[int],
    families: Sequence[str],
    params: dict[str, Any],
    command: str,
    with_plot: bool = True,
) -> str:
    names = [n for n in summary[families[0]] if n not in ("none", "reference")]
    label = {"ipv4": "IPv4", "ipv6": "IPv6"}
    parts = [
        "# cgpolicy vs iptables vs nftables: one egress allow-list on one cgroup",
        "",
        "Generated by one run of",
        "",
        "```sh",
        command,
        "```",
        "",
        f"which writes this file, `bench/{PLOT}` and the raw samples in `bench/compare.json`. "
        "Method and caveats: `bench/README.md` (section *compare*) and the docstring of "
        "`bench/compare.py`.",
        "",
        "Machine: "
        + ", ".join(
            f"{k} {params[k]}"
            for k in ("kernel", "cpus", "python", "iperf3", "qperf", "iptables", "nft", "started")
        )
        + f". Rounds: {params['rounds']}, each load {params['seconds']} s; wall time "
        f"{params['wall_s']} s; load average (1 min) {params['load_start']} at the start, "
        f"{params['load_end']} at the end, samples taken at {params['load_min']}-"
        f"{params['load_max']} (other work on the machine shares the 2 vCPUs).",
        "",
        "Client in the cgroup under test in one network namespace, servers in another, joined "
        "by a veth pair; " + params["placement"] + " Every cell: median over rounds "
        "(min-max over rounds in brackets). Ratios divide by the median of every no-policy run "
        "of the family (all rounds and N); the `none` column's own spread is the run-to-run "
        "noise. The measured destination is the last of the N prefixes (for iptables: the "
        "last ACCEPT rule, the worst case of a linear chain).",
        "",
    ]
    if with_plot:
        parts += [f"![pps and tps ratio vs N]({PLOT})", ""]
    for key, _ in METRICS:
        heading, how, unit, scale = SECTIONS[key]
        parts += [f"## {heading}", "", how, ""]

        def row(table: dict[str, Any], n: int, key: str = key, scale: float = scale) -> list[str]:
            base = f"{table['none'][n][key] / scale:,.{1 if scale > 1 else 0}f}"
            return [f"{n:,}", base] + [_ratio_cell(table[c][n], key) for c in ["none", *names]]

        def title(family: str, key: str = key, unit: str = unit, scale: float = scale) -> str:
            reference = summary[family]["reference"][key] / scale
            return f"{label[family]} (reference: {reference:,.{1 if scale > 1 else 0}f} {unit})"

        parts += _family_tables(
            summary, sizes, families, names, title, ["N", f"none ({unit})", "none", *names], row
        )
    parts += [
        "## Client CPU time per packet (ns)",
        "",
        "The client's CPU time (user + system) per packet sent in the packets-per-second "
        "runs. The difference to `none` is what the filter costs per packet.",
        "",
    ]
    parts += _family_tables(
        summary,
        sizes,
        families,
        names,
        lambda f: label[f],
        ["N", "none", *names],
        lambda t, n: [f"{n:,}"] + [_ns_cell(t[c][n]) for c in ["none", *names]],
    )
    parts += [
        "## Time to load the whole allow-list",
        "",
        "cgpolicy: a pass of the reconcile service (in this process) that finds the file new: "
        "read, validate, compile, plan, apply (the one-time bcc compile was paid before the "
        "first run; bench/parse.py and bench/enforce.py split such a load). "
        "iptables: `iptables-restore -w --noflush` (`ip6tables-restore` for IPv6) of the "
        "chain, its rules and the jump. nftables: `nft -f` of the table, set and chains. Each "
        "includes parsing its input.",
        "",
    ]
    parts += _family_tables(
        summary,
        sizes,
        families,
        names,
        lambda f: label[f],
        ["N", *names],
        lambda t, n: [f"{n:,}"] + [_time_cell(t[c][n], "apply_s") for c in names],
    )
    parts += [
        "## Time to change one prefix",
        "",
        "cgpolicy: the YAML file rewritten with the first prefix replaced, then what the "
        "reconcile service does on an event in its folder (`Reconciler.change_files`: the "
        "line spliced into the last reading, the prefix index changed, the change written "
        "in place; else a full pass); *cgpolicy CLI*: the same change through a fresh "
        "`cgpolicy apply --force` process (interpreter start-up, imports and the bcc compile "
        "included). iptables: "
        "`iptables -w -R CHAIN 1 -d NEW -j ACCEPT`. nftables: `delete element` + `add element` "
        "in one `nft -f` transaction.",
        "",
    ]
    cli = ["cgpolicy CLI"] if "cgpolicy" in names else []
    parts += _family_tables(
        summary,
        sizes,
        families,
        names,
        lambda f: label[f],
        ["N", *names, *cli],
        lambda t, n: (
            [f"{n:,}"]
            + [_time_cell(t[c][n], "change_s") for c in names]
            + ([_time_cell(t["cgpolicy"][n], "change_cli_s")] if cli else [])
        ),
    )
    if "cgpolicy" in names:
        in_place = [
            f"{label[family]} N={n:,}: {cell['changes_in_place']}/{cell['rounds']}"
            for family in families
            for n, cell in summary[family]["cgpolicy"].items()
        ]
        parts += ["cgpolicy's changes made in place (rounds): " + "; ".join(in_place) + ".", ""]
    parts += [
        "## Targets",
        "",
        _table(
            ["target", "result", "measured"],
            [
                [what, {True: "met", False: "**not met**", None: "not judged"}[ok], detail]
                for what, ok, detail in targets(summary, sizes, families)
            ],
        ),
        "",
        "## Notes",
        "",
        *[f"- {note}" for note in params["notes"]],
        "",
    ]
    return "\n".join(parts)


def _two_and_five(value: float, _: object) -> str:
    """Minor tick labels of a log axis: only 2x and 5x of each decade."""
    return f"{value:g}" if f"{value:.0e}"[0] in "25" else ""


def plot(
    summary: dict[str, Any], sizes: Sequence[int], families: Sequence[str], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    styles = {
        "none": ("x", "-", "grey"),
        "cgpolicy": ("o", "-", None),
        "nftables": ("s", "--", None),
        "iptables-nft": ("^", ":", None),
        "iptables-legacy": ("v", "-.", None),
    }
    fig, axes = plt.subplots(
        len(METRICS),
        len(families),
        figsize=(5.5 * len(families), 3.6 * len(METRICS)),
        squeeze=False,
    )
    label = {"ipv4": "IPv4", "ipv6": "IPv6"}
    for row, (key, what) in enumerate(METRICS):
        for column, family in enumerate(families):
            ax = axes[row][column]
            for name, (marker, line, color) in styles.items():
                if name not in summary[family]:
                    continue
                cells = [summary[family][name][n] for n in sizes]
                ys = [c[f"{key}_ratio"] for c in cells]
                low = [y - c[f"{key}_ratio_min"] for y, c in zip(ys, cells, strict=True)]
                high = [c[f"{key}_ratio_max"] - y for y, c in zip(ys, cells, strict=True)]
                ax.errorbar(
                    sizes,
                    ys,
                    yerr=[low, high],
                    marker=marker,
                    linestyle=line,
                    color=color,
                    capsize=3,
                    label=name,
                )
            ax.set_xscale("log")
            ax.set_yscale("log")  # from ~1 down to iptables' long chains at ~0.01
            ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(_two_and_five))
            ax.tick_params(axis="y", which="minor", labelsize=7)
            ax.set_xlabel("prefixes in the allow-list (N)")
            ax.set_ylabel("ratio to no policy")
            ax.set_title(f"{label[family]}: {what}, 64-byte UDP", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("client in one cgroup and netns, veth to the server; median, min-max")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _notes(
    samples: list[dict[str, Any]], families: Sequence[str], params: dict[str, Any]
) -> list[str]:
    notes = list(params.get("skipped", []))
    for family in families:
        for key, what in METRICS:
            values = [s[key] for s in samples if s["config"] == "none" and s["family"] == family]
            if len(values) > 1:
                middle = statistics.median(values)
                notes.append(
                    f"Run-to-run noise, {family} {what}: the {len(values)} no-policy runs span "
                    f"{min(values) / middle:.2f}-{max(values) / middle:.2f} of their median "
                    f"({(max(values) - min(values)) / middle * 100:.0f}%). Two configurations "
                    "whose spreads overlap are not told apart by this run."
                )
    notes += [
        "iptables: Debian 12's `iptables` is the nf_tables backend (`iptables-nft`, each rule "
        "translated to nftables expressions; `-m cgroup` goes through the xtables compat "
        "layer); `iptables-legacy` is the x_tables backend. Both were run, each family with "
        "its own tool (`iptables-*`, `ip6tables-*`).",
        "nftables: `socket cgroupv2` paths are resolved by nft below `/sys/fs/cgroup` "
        f"whatever the cgroup2 mount is, so the path is given as `{params['nft_path']}` and "
        f"`level {params['nft_level']}` counts from the cgroup2 root "
        f"(`{params['cgroup2_root']}`).",
        "All filters are egress only, on the client's cgroup: what is filtered is the client's "
        "datagrams (pps: every packet; tps: the request, not the response). The pps figure is "
        "the client's send rate: the server may drop part of it (its CPU does the receive "
        "path), which does not change what the filters cost the sender.",
        "Each family's list holds only that family's prefixes. cgpolicy's and nftables' "
        "default drop also covers the other family; the iptables chain of one family does "
        "not (it would be a second chain); no traffic of the other family is measured.",
        f"cgpolicy's one-time cost before the first figure (bcc import and compile, paid by "
        f"every fresh `cgpolicy` process): {params['cgpolicy_warmup_s']} s.",
    ]
    return notes


def _csv(text: str | None, default: Sequence[Any], kind: Callable[[str], Any]) -> tuple[Any, ...]:
    return tuple(kind(item) for item in text.split(",")) if text else tuple(default)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="N = 1, 1000; one round, 1 s loads")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 4; quick 1)")
    parser.add_argument("--seconds", type=int, help="length of each load (default 2; quick 1)")
    parser.add_argument(
        "--sizes", help="comma-separated N values (default 1,100,1000,10000,100000)"
    )
    parser.add_argument("--families", help="comma-separated: ipv4,ipv6 (default both)")
    parser.add_argument(
        "--out-dir",
        type=Path,
        help=f"where RESULTS.md, {PLOT} and compare.json go (default bench/; --quick: a new "
        "temp folder)",
    )
    parser.add_argument(
        "--no-plot", action="store_true", help=f"no {PLOT} (needs matplotlib, the bench extra)"
    )
    parser.add_argument(
        "--only",
        help="comma-separated configurations besides none and cgpolicy (always run): "
        "nftables,iptables-nft,iptables-legacy",
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("compare: needs root (bpf(), cgroupfs, netns, iptables, nft)", file=sys.stderr)
        return 1
    missing = _which("iperf3", "qperf", "nsenter", "taskset")
    if missing:
        print(f"compare: {missing} (make compare-deps installs it)", file=sys.stderr)
        return 1
    sizes = _csv(args.sizes, QUICK_SIZES if args.quick else SIZES, int)
    families = _csv(args.families, FAMILIES, str)
    if set(families) - set(FAMILIES):
        print(f"compare: --families takes {','.join(FAMILIES)}", file=sys.stderr)
        return 2
    rounds = args.rounds or (1 if args.quick else 4)
    seconds = args.seconds or (1 if args.quick else 2)
    out_dir = args.out_dir or (
        Path(tempfile.mkdtemp(prefix="cgpolicy-compare-")) if args.quick else BENCH_DIR
    )
    out_dir.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(line, flush=True)

    me = os.getpid()

    def on_term(signum: int, frame: object) -> None:
        if os.getpid() == me:  # not in pyroute2's forked helpers, which get SIGTERM to end
            raise KeyboardInterrupt(f"signal {signum}")
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    started = time.perf_counter()
    params: dict[str, Any] = {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "started": time.strftime("%Y-%m-%d %H:%M"),
        "rounds": rounds,
        "sizes": list(sizes),
        "families": list(families),
        "seconds": seconds,
        "load_start": round(os.getloadavg()[0], 2),
        "skipped": [],
    }
    pair: VethPair | None = None
    configs: list[Config] = []
    scratch: Scratch | None = None
    samples: list[dict[str, Any]] = []
    folder = Path(tempfile.mkdtemp(prefix="cgpolicy-compare-yaml-"))
    try:
        scratch = Scratch("compare")
        cgroup_dir = scratch.cgroup_dir / "client"
        cgroup_dir.mkdir()
        cgroup = scratch.relative("client")
        pair = VethPair.create()
        client_ns = functools.partial(pair.in_ns, pair.ns_client)
        cg = Cgpolicy(scratch, cgroup, folder)
        nft = Nftables(cgroup_dir, scratch.root, client_ns)
        candidates: list[Config] = [
            NoPolicy(),
            cg,
            nft,
            Iptables("nft", cgroup, client_ns),
            Iptables("legacy", cgroup, client_ns),
        ]
        wanted = set(args.only.split(",")) if args.only else None
        for config in candidates:
            if wanted is not None and config.name not in wanted | {"none", "cgpolicy"}:
                continue
            why = config.available()
            if why:
                params["skipped"].append(f"{config.name} not run: {why}")
                log(f"skipping {config.name}: {why}")
                continue
            configs.append(config)
        params["iperf3"] = run(["iperf3", "--version"]).splitlines()[0]
        params["qperf"] = run(["qperf", "--version"]).strip().removeprefix("qperf ")
        params["iptables"] = (
            run(["iptables", "--version"]).strip() if shutil.which("iptables") else "-"
        )
        params["nft"] = run(["nft", "--version"]).strip() if nft in configs else "-"
        params["nft_path"], params["nft_level"] = nft.path, nft.level
        params["cgroup2_root"] = str(scratch.root)
        params["placement"] = (
            f"servers pinned to CPU {pair.server_cpu}, client to CPU {pair.client_cpu} "
            "(taskset), receive processing of each veth end steered (RPS) to its reader's CPU."
            if pair.rps
            else "one CPU: client and servers share it (no pinning, no RPS)."
        )

        # one-time costs first, outside every figure: bcc import + compile of net.c, and the
        # first packets of each family (neighbour discovery, the servers' first accept)
        warm = time.perf_counter()
        cg.setup("ipv4", allow_list("ipv4", 2, pair.server4))
        cg.teardown()
        params["cgpolicy_warmup_s"] = round(time.perf_counter() - warm, 2)
        load = Load(pair, cgroup_dir, seconds)
        for family in families:
            load.check(NoPolicy(), family)
            load.packets(family)
            load.transactions(family)

        samples = measure(configs, sizes, families, rounds, load, log)
    finally:
        for config in configs:
            try:
                config.teardown()
            except Exception as error:  # keep cleaning the rest
                log(f"cleanup {config.name}: {error}")
        if pair is not None:
            pair.close()
        if scratch is not None:
            scratch.close()
        remove_top_folders()
        shutil.rmtree(folder, ignore_errors=True)

    params["wall_s"] = round(time.perf_counter() - started, 1)
    params["load_end"] = round(os.getloadavg()[0], 2)
    params["load_min"] = round(min(s["load1"] for s in samples), 2)
    params["load_max"] = round(max(s["load1"] for s in samples), 2)
    names = [c.name for c in configs]
    summary = summarize(samples, names, sizes, families)
    params["notes"] = _notes(samples, families, params)
    given = argv if argv is not None else sys.argv[1:]
    command = "make compare   # = .venv/bin/python -m bench.compare"
    if given:
        command = "sudo .venv/bin/python -m bench.compare " + " ".join(given)
    if not args.no_plot:
        plot(summary, sizes, families, out_dir / PLOT)
    (out_dir / "RESULTS.md").write_text(
        render(summary, sizes, families, params, command, with_plot=not args.no_plot)
    )
    (out_dir / "compare.json").write_text(
        json.dumps({"params": params, "summary": summary, "samples": samples}, indent=1) + "\n"
    )
    print()
    for what, ok, detail in targets(summary, sizes, families):
        print(f"{'MET' if ok else 'NOT MET' if ok is False else 'n/a':>8}  {what}: {detail}")
    print(f"\nwritten to {out_dir}/RESULTS.md, {PLOT}, compare.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
