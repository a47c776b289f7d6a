"""cgpolicy against iptables and nftables: one allow-list of N IPv4 prefixes on one cgroup.

    python -m bench.compare                 N = 1, 100, 1,000, 10,000; 5 rounds (~10 min);
                                            writes bench/RESULTS.md, bench/throughput_ratio.png
                                            and bench/compare.json
    python -m bench.compare --quick         N = 1, 100; short runs; writes to a temp folder

Every configuration enforces the same thing for one scratch cgroup: egress to N prefixes is
allowed, everything else is dropped. The N prefixes are N-1 random non-overlapping IPv4
prefixes (/24../32) followed by ``127.0.0.1/32``, which the measured traffic goes to: it is
allowed, and it matches the last entry of the list.

* ``cgpolicy``: a policy file (egress default deny, one allow rule with the N prefixes),
  read with ``load_paths`` and applied with ``Enforcer.plan`` + ``Enforcer.apply``.
* ``iptables-nft`` / ``iptables-legacy``: a chain of one ``-d PREFIX -j ACCEPT`` rule per
  prefix, in list order (so the matching rule is the last one, the worst case for a linear
  list), then ``-j DROP``; OUTPUT jumps to it with ``-m cgroup --path``. Loaded with
  ``iptables-restore --noflush``.
* ``nftables``: a table of its own with an interval set of the N prefixes and an output
  chain ``socket cgroupv2 level L "PATH" jump`` to ``ip daddr @allow accept; drop``.
* ``none``: no policy; the reference every ratio divides by.

Measured with the traffic generator inside the cgroup and the server outside it: iperf3 TCP
throughput over loopback, and connections per second (``bench.connrate``). Configurations
are interleaved (each round visits every N and, per N, every configuration in a rotated
order, with its own ``none`` run); each ratio is taken against the ``none`` run of the same
round and N, and the median over rounds is reported with the min-max spread. Also timed:
loading the whole list, and changing one prefix (the first in the list) in place.

Everything this creates is removed in ``finally``: the scratch cgroups and pin folder
(``<cgroup2>/cgpolicy-bench-<pid>/``, ``<bpffs>/cgpolicy-bench-<pid>/``), the iptables chain
``cgpolicy-bench-<pid>`` and its jump rule, the nftables table ``cgpolicy_bench_<pid>``, the
servers; and iptables-nft's ``ip filter`` table if it did not exist before and is left empty.
No other rule, chain or table is read for anything but that check, or changed.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import policies
from bench.scratch import Scratch, remove_top_folders
from cgpolicy.policy.validate import load_paths

SIZES = (1, 100, 1_000, 10_000)
QUICK_SIZES = (1, 100)
MATCH = "127.0.0.1"
BLOCKED = "127.0.0.2"  # reachable without a policy; every policy must drop it
NFT_CGROUP_BASE = Path("/sys/fs/cgroup")  # nft resolves `socket cgroupv2` paths below this
THROUGHPUT_TARGET = 0.95
BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent


class BenchError(RuntimeError):
    pass


def run(cmd: Sequence[str], stdin: str | None = None, check: bool = True) -> str:
    done = subprocess.run(cmd, input=stdin, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise BenchError(f"{' '.join(cmd[:3])}...: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def allow_list(n: int) -> list[str]:
    """N-1 random non-overlapping IPv4 prefixes, then 127.0.0.1/32 (last: the deepest
    position in a linear list)."""
    found = policies.cidrs_v4(n, seed=n)
    found.remove(f"{MATCH}/32")
    return [*found, f"{MATCH}/32"]


def replacement(prefixes: list[str]) -> str:
    """A prefix not in the list (and not overlapping it: 100.64/10 is never drawn unless
    a random slot lands there, which is checked)."""
    taken = [ipaddress.ip_network(p) for p in prefixes]
    for third in range(256):
        candidate = ipaddress.ip_network(f"100.64.{third}.0/24")
        if not any(candidate.overlaps(t) for t in taken):
            return str(candidate)
    raise BenchError("no free replacement prefix")


# --- configurations ---------------------------------------------------------------------


class Config:
    name = ""
    enforces = True

    def available(self) -> str | None:
        """None if usable, else why not."""
        return None

    def version(self) -> str:
        return ""

    def setup(self, prefixes: list[str]) -> float:
        """Install the allow-list; seconds for the whole list."""
        return 0.0

    def change(self, old: str, new: str) -> float:
        """Replace one prefix; seconds."""
        return 0.0

    def teardown(self) -> None:
        pass

    def final_cleanup(self) -> None:
        self.teardown()


class NoPolicy(Config):
    name = "none"
    enforces = False


class Cgpolicy(Config):
    name = "cgpolicy"

    def __init__(self, scratch: Scratch, cgroup: str, folder: Path) -> None:
        self.scratch = scratch
        self.cgroup = cgroup
        self.file = folder / "compare.yaml"
        self.prefixes: list[str] = []
        self.split: dict[str, float] = {}

    def version(self) -> str:
        return "working tree"

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

    def _apply_file(self) -> None:
        """What `cgpolicy apply FILE` and a reconcile pass do: load, plan, apply."""
        start = time.perf_counter()
        loaded = load_paths([self.file])
        if loaded.problems:
            raise BenchError(f"policy does not validate: {loaded.problems[0]}")
        middle = time.perf_counter()
        planned = self.scratch.enforcer.plan(loaded.policies)
        end = time.perf_counter()
        self.split = {"load_paths_s": middle - start, "plan_s": end - middle}
        outcomes = self.scratch.enforcer.apply(planned)
        failed = [f"{o.plan.name}: {o.error}" for o in outcomes if not o.ok]
        if failed:
            raise BenchError("apply failed: " + "; ".join(failed))

    def setup(self, prefixes: list[str]) -> float:
        self.prefixes = list(prefixes)
        self.file.write_text(self._yaml(self.prefixes))
        return timed(self._apply_file)

    def change(self, old: str, new: str) -> float:
        self.prefixes[self.prefixes.index(old)] = new
        self.file.write_text(self._yaml(self.prefixes))
        return timed(self._apply_file)

    def change_cli(self, old: str, new: str) -> float:
        """The same change through a fresh `cgpolicy apply` process (Python start-up,
        imports and the one-time bcc compile included)."""
        self.prefixes[self.prefixes.index(old)] = new
        self.file.write_text(self._yaml(self.prefixes))
        cmd = [
            str(REPO / ".venv" / "bin" / "cgpolicy"),
            "--cgroup-root",
            str(self.scratch.root),
            "--bpf-dir",
            str(self.scratch.bpf_dir),
            "apply",
            str(self.file),
        ]
        return timed(lambda: run(cmd))

    def teardown(self) -> None:
        removal = self.scratch.enforcer.plan_removal(None)
        for outcome in self.scratch.enforcer.apply(removal):
            if not outcome.ok:
                raise BenchError(f"cgpolicy removal: {outcome.error}")


class Iptables(Config):
    def __init__(self, backend: str, cgroup: str) -> None:
        self.name = f"iptables-{backend}"
        self.binary = f"iptables-{backend}"
        self.restore = f"iptables-{backend}-restore"
        self.chain = f"cgpolicy-bench-{os.getpid()}"
        self.cgroup = cgroup
        self.prefixes: list[str] = []

    def _jump(self) -> list[str]:
        return ["OUTPUT", "-m", "cgroup", "--path", self.cgroup, "-j", self.chain]

    def available(self) -> str | None:
        for tool in (self.binary, self.restore):
            if subprocess.run(["which", tool], capture_output=True).returncode != 0:
                return f"{tool} not installed"
        return None

    def version(self) -> str:
        return run([self.binary, "--version"]).strip()

    def setup(self, prefixes: list[str]) -> float:
        self.prefixes = list(prefixes)
        lines = ["*filter", f":{self.chain} - [0:0]"]
        lines += [f"-A {self.chain} -d {p} -j ACCEPT" for p in prefixes]
        lines += [f"-A {self.chain} -j DROP", "-I " + " ".join(self._jump()), "COMMIT", ""]
        text = "\n".join(lines)
        return timed(lambda: run([self.restore, "-w", "--noflush"], stdin=text))

    def change(self, old: str, new: str) -> float:
        number = self.prefixes.index(old) + 1
        self.prefixes[number - 1] = new
        cmd = [self.binary, "-w", "-R", self.chain, str(number), "-d", new, "-j", "ACCEPT"]
        return timed(lambda: run(cmd))

    def _chain_exists(self) -> bool:
        done = subprocess.run([self.binary, "-w", "-S", self.chain], capture_output=True)
        return done.returncode == 0

    def teardown(self) -> None:
        for _ in range(10):  # our jump rule, however many times it got there
            check = subprocess.run([self.binary, "-w", "-C", *self._jump()], capture_output=True)
            if check.returncode != 0:
                break
            run([self.binary, "-w", "-D", *self._jump()])
        if self._chain_exists():
            run([self.binary, "-w", "-F", self.chain])
            run([self.binary, "-w", "-X", self.chain])


class Nftables(Config):
    name = "nftables"

    def __init__(self, cgroup_dir: Path, cgroup2_root: Path) -> None:
        self.table = f"cgpolicy_bench_{os.getpid()}"
        # nft resolves the path below /sys/fs/cgroup whatever the cgroup2 mount is; `level`
        # is the depth below the cgroup2 root
        self.path = os.path.relpath(cgroup_dir, NFT_CGROUP_BASE)
        self.level = len(cgroup_dir.relative_to(cgroup2_root).parts)
        self.exists = False

    def available(self) -> str | None:
        if subprocess.run(["which", "nft"], capture_output=True).returncode != 0:
            return "nft not installed"
        return None

    def version(self) -> str:
        return run(["nft", "--version"]).strip()

    def setup(self, prefixes: list[str]) -> float:
        elements = ",\n".join(prefixes)
        text = (
            f"table inet {self.table} {{\n"
            "  set allow {\n    type ipv4_addr\n    flags interval\n"
            f"    elements = {{ {elements} }}\n  }}\n"
            "  chain filter {\n    ip daddr @allow accept\n    drop\n  }\n"
            "  chain output {\n    type filter hook output priority filter; policy accept;\n"
            f'    socket cgroupv2 level {self.level} "{self.path}" jump filter\n  }}\n'
            "}\n"
        )
        self.exists = True
        return timed(lambda: run(["nft", "-f", "-"], stdin=text))

    def change(self, old: str, new: str) -> float:
        text = (
            f"delete element inet {self.table} allow {{ {old} }}\n"
            f"add element inet {self.table} allow {{ {new} }}\n"
        )
        return timed(lambda: run(["nft", "-f", "-"], stdin=text))

    def teardown(self) -> None:
        if self.exists:
            run(["nft", "delete", "table", "inet", self.table], check=False)
            self.exists = False

    def final_cleanup(self) -> None:
        done = subprocess.run(["nft", "list", "table", "inet", self.table], capture_output=True)
        if done.returncode == 0:
            run(["nft", "delete", "table", "inet", self.table])


class FilterTableGuard:
    """iptables-nft creates nftables' ``table ip filter`` on first use. If it was not there
    before this run and holds no rule afterwards, it is ours to delete."""

    def __init__(self) -> None:
        self.existed = self._exists()

    @staticmethod
    def _exists() -> bool:
        done = subprocess.run(["nft", "list", "table", "ip", "filter"], capture_output=True)
        return done.returncode == 0

    def cleanup(self) -> None:
        if self.existed or not self._exists():
            return
        listing = json.loads(run(["nft", "-j", "list", "table", "ip", "filter"]))
        items = listing.get("nftables", [])
        if any("rule" in item for item in items):
            return
        if any("chain" in item and "hook" not in item["chain"] for item in items):
            return
        run(["nft", "delete", "table", "ip", "filter"])


# --- load -------------------------------------------------------------------------------


class Servers:
    """The iperf3 server and the connection server, outside the cgroup under test."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.iperf_port = 0
        self.conn_port = 0

    def start(self) -> None:
        conn = subprocess.Popen(
            [sys.executable, "-m", "bench.connrate", "serve"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.procs.append(conn)
        assert conn.stdout is not None
        self.conn_port = int(conn.stdout.readline())
        # a free port for iperf3, chosen outside the range connect() draws from
        ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        low, high = int(ephemeral[0]), int(ephemeral[1])
        port = next(p for p in range(20_000, 32_000) if not (low <= p <= high) and _free(p))
        self.iperf_port = port
        iperf = subprocess.Popen(
            ["iperf3", "-s", "-B", MATCH, "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.procs.append(iperf)
        for _ in range(200):
            if _listening(port):
                return
            if iperf.poll() is not None:
                raise BenchError(f"iperf3 -s exited with {iperf.returncode}")
            time.sleep(0.02)
        raise BenchError("iperf3 -s did not start listening")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((MATCH, port))
            return True
        except OSError:
            return False


def _listening(port: int) -> bool:
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port:
            return True
    return False


class Load:
    def __init__(self, servers: Servers, cgroup_dir: Path, seconds: int, conn_seconds: float):
        self.servers = servers
        self.procs_file = cgroup_dir / "cgroup.procs"
        self.seconds = seconds
        self.conn_seconds = conn_seconds

    def _join(self) -> None:  # runs in the child between fork and exec
        self.procs_file.write_text(str(os.getpid()))

    def _in_cgroup(self, cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            cmd,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=self._join,  # noqa: PLW1509 - no threads in this process
        )

    def throughput_bps(self) -> float:
        port = str(self.servers.iperf_port)
        cmd = ["iperf3", "-c", MATCH, "-p", port, "-t", str(self.seconds), "-J"]
        done = self._in_cgroup(cmd, self.seconds + 30)
        result = json.loads(done.stdout or "{}")
        if done.returncode != 0 or "error" in result:
            raise BenchError(f"iperf3 -c: {result.get('error', done.stderr.strip())}")
        return float(result["end"]["sum_received"]["bits_per_second"])

    def connection_rate(self) -> float:
        port = str(self.servers.conn_port)
        cmd = [sys.executable, "-m", "bench.connrate", "connect", MATCH, port]
        done = self._in_cgroup([*cmd, str(self.conn_seconds)], self.conn_seconds + 30)
        if done.returncode != 0:
            raise BenchError(f"connrate: {done.stderr.strip()}")
        result = json.loads(done.stdout)
        if result["errors"]:
            raise BenchError(f"connrate: {result['errors']} connects failed")
        return float(result["rate"])

    def reaches(self, address: str) -> bool:
        port = str(self.servers.conn_port)
        cmd = [sys.executable, "-m", "bench.connrate", "probe", address, port, "0.5"]
        return self._in_cgroup(cmd, 30).returncode == 0

    def check(self, config: Config) -> None:
        """The measured destination must pass, and a destination outside the list must
        not (only with a policy): otherwise the run would measure nothing."""
        if not self.reaches(MATCH):
            raise BenchError(f"{config.name}: {MATCH} is not reachable from the cgroup")
        if self.reaches(BLOCKED) == config.enforces:
            state = "reachable" if config.enforces else "blocked"
            raise BenchError(f"{config.name}: {BLOCKED} is {state} from the cgroup")


# --- the run ----------------------------------------------------------------------------


def measure(
    configs: list[Config], sizes: Sequence[int], rounds: int, load: Load, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    samples: list[dict[str, Any]] = []
    for rnd in range(rounds):
        for n in sizes:
            prefixes = allow_list(n)
            new = replacement(prefixes)
            shift = (rnd + sizes.index(n)) % len(configs)
            for config in configs[shift:] + configs[:shift]:
                sample: dict[str, Any] = {"round": rnd, "n": n, "config": config.name}
                try:
                    sample["apply_s"] = config.setup(prefixes)
                    if isinstance(config, Cgpolicy):
                        sample.update(config.split)
                    load.check(config)
                    sample["throughput_bps"] = load.throughput_bps()
                    sample["conn_per_s"] = load.connection_rate()
                    if config.enforces:
                        sample["change_s"] = config.change(prefixes[0], new)
                    if isinstance(config, Cgpolicy):
                        sample["change_cli_s"] = config.change_cli(new, prefixes[0])
                finally:
                    config.teardown()
                samples.append(sample)
                log(
                    f"round {rnd + 1}/{rounds} N={n:>6,} {config.name:<16}"
                    f" {sample['throughput_bps'] / 1e9:6.2f} Gbit/s"
                    f" {sample['conn_per_s']:8,.0f} conn/s"
                    f"  apply {sample['apply_s']:.4f} s"
                    + (f"  change {sample['change_s']:.4f} s" if "change_s" in sample else "")
                )
    return samples


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(samples: list[dict[str, Any]], names: list[str], sizes: Sequence[int]) -> dict:
    """Per (config, N): median and min/max of each value, of each value's ratio to the
    no-policy median, and of each time. The no-policy reference does not depend on N, so
    it is the median of all its runs (every round and N): one noisy run does not skew a
    whole column, and interleaving spreads drift over every configuration alike."""
    reference = {
        key: statistics.median(s[key] for s in samples if s["config"] == "none")
        for key in ("throughput_bps", "conn_per_s")
    }
    out: dict[str, Any] = {"reference": reference}
    for name in names:
        out[name] = {}
        for n in sizes:
            rows = [s for s in samples if s["config"] == name and s["n"] == n]
            cell: dict[str, Any] = {"rounds": len(rows)}
            for key, ratio_key in (("throughput_bps", "tp"), ("conn_per_s", "cps")):
                values = [s[key] for s in rows]
                ratios = [v / reference[key] for v in values]
                cell[key] = _median(values)
                cell[f"{ratio_key}_ratio"] = _median(ratios)
                cell[f"{ratio_key}_ratio_min"] = min(ratios, default=None)
                cell[f"{ratio_key}_ratio_max"] = max(ratios, default=None)
            for key in ("apply_s", "change_s", "change_cli_s", "load_paths_s", "plan_s"):
                values = [s[key] for s in rows if key in s]
                cell[key] = _median(values)
                cell[f"{key}_min"] = min(values, default=None)
                cell[f"{key}_max"] = max(values, default=None)
            out[name][n] = cell
    return out


def targets(summary: dict, sizes: Sequence[int]) -> list[tuple[str, bool | None, str]]:
    """(what, met, detail). None: not judged (a configuration was not run)."""
    found: list[tuple[str, bool | None, str]] = []
    if "cgpolicy" not in summary:
        return found
    cg = summary["cgpolicy"]
    top = max(sizes)
    ratio = cg.get(top, {}).get("tp_ratio")
    found.append(
        (
            f"cgpolicy throughput ratio at N = {top:,} >= {THROUGHPUT_TARGET}",
            None if ratio is None else ratio >= THROUGHPUT_TARGET,
            "n/a" if ratio is None else f"{ratio:.3f}",
        )
    )
    if "nftables" in summary:
        worse = [n for n in sizes if cg[n]["tp_ratio"] < summary["nftables"][n]["tp_ratio"]]
        detail = ", ".join(
            f"N={n:,}: {cg[n]['tp_ratio']:.3f} vs {summary['nftables'][n]['tp_ratio']:.3f}"
            for n in sizes
        )
        found.append(("cgpolicy throughput ratio >= nftables (set) at every N", not worse, detail))
    for name in ("iptables-nft", "iptables-legacy"):
        if name not in summary:
            continue
        for key, what in (("apply_s", "apply the whole list"), ("change_s", "change one rule")):
            ours, theirs = cg[top][key], summary[name][top][key]
            found.append(
                (
                    f"cgpolicy {what} at N = {top:,} faster than {name}",
                    ours < theirs,
                    f"{ours:.4f} s vs {theirs:.4f} s",
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


def _split_text(cells: dict[int, dict[str, Any]], sizes: Sequence[int]) -> str:
    parts = []
    for n in sizes:
        cell = cells[n]
        rest = cell["apply_s"] - cell["load_paths_s"] - cell["plan_s"]
        parts.append(
            f"N={n:,}: load_paths {cell['load_paths_s'] * 1000:.0f} ms, "
            f"plan {cell['plan_s'] * 1000:.0f} ms, apply {rest * 1000:.0f} ms"
        )
    return (
        "cgpolicy's split (medians): "
        + "; ".join(parts)
        + ". plan includes compiling the policy (the LPM trie's contents); apply creates and "
        "fills the map, loads the program and attaches it."
    )


def render(
    summary: dict, sizes: Sequence[int], params: dict[str, Any], command: str, plot: str
) -> str:
    names = [n for n in summary if n not in ("none", "reference")]
    base = summary["none"]
    parts = [
        "# cgpolicy vs iptables vs nftables: one allow-list on one cgroup",
        "",
        "Generated by one run of",
        "",
        "```sh",
        command,
        "```",
        "",
        "which writes this file, `bench/throughput_ratio.png` and the raw samples in "
        "`bench/compare.json`. Method and caveats: `bench/README.md` (section *compare*) and "
        "the docstring of `bench/compare.py`.",
        "",
        "Machine: "
        + ", ".join(
            f"{k} {params[k]}"
            for k in ("kernel", "cpus", "python", "iperf3", "iptables", "nft", "started")
        )
        + f". {params['rounds']} rounds, iperf3 `-t {params['iperf_seconds']}`, connection "
        f"rate over {params['conn_seconds']} s; wall time {params['wall_s']} s.",
        "",
        "Every cell: median over rounds (min-max over rounds in brackets). Ratios divide by "
        "the median of every no-policy run (all rounds and N: "
        f"{summary['reference']['throughput_bps'] / 1e9:.1f} Gbit/s, "
        f"{summary['reference']['conn_per_s']:,.0f} conn/s); the `none` column's own spread "
        "is the run-to-run noise. The measured destination "
        f"`{MATCH}/32` is the last of the N prefixes (for iptables: the last ACCEPT rule, the "
        "worst case of a linear chain).",
        "",
        "## Loopback TCP throughput (iperf3), ratio to no policy",
        "",
        f"![throughput ratio vs N]({plot})",
        "",
        _table(
            ["N", "none (Gbit/s)", "none", *names],
            [
                [f"{n:,}", f"{base[n]['throughput_bps'] / 1e9:.1f}", _ratio_cell(base[n], "tp")]
                + [_ratio_cell(summary[c][n], "tp") for c in names]
                for n in sizes
            ],
        ),
        "",
        "## Connection rate (connect + RST close), ratio to no policy",
        "",
        _table(
            ["N", "none (conn/s)", "none", *names],
            [
                [f"{n:,}", f"{base[n]['conn_per_s']:,.0f}", _ratio_cell(base[n], "cps")]
                + [_ratio_cell(summary[c][n], "cps") for c in names]
                for n in sizes
            ],
        ),
        "",
        "## Time to load the whole allow-list",
        "",
        "cgpolicy: `load_paths` + `Enforcer.plan` + `Enforcer.apply` in one process (what "
        "`cgpolicy reconcile` pays; the one-time bcc compile was paid before the first run). "
        "iptables: `iptables-restore -w --noflush` of the chain, its rules and the jump. "
        "nftables: `nft -f` of the table, set and chains. Each includes parsing its input.",
        "",
        _table(
            ["N", *names],
            [[f"{n:,}"] + [_time_cell(summary[c][n], "apply_s") for c in names] for n in sizes],
        ),
        "",
        _split_text(summary["cgpolicy"], sizes),
        "",
        "## Time to change one prefix",
        "",
        "cgpolicy: the YAML file rewritten with one prefix replaced, then `load_paths` + plan + "
        "apply (a new program instance and an atomic link update); *cgpolicy CLI*: the same "
        "change through a fresh `cgpolicy apply` process (interpreter start-up, imports and the "
        "bcc compile included). iptables: `iptables -w -R CHAIN 1 -d NEW -j ACCEPT`. nftables: "
        "`delete element` + `add element` in one `nft -f` transaction.",
        "",
        _table(
            ["N", *names, "cgpolicy CLI"],
            [
                [f"{n:,}"]
                + [_time_cell(summary[c][n], "change_s") for c in names]
                + [_time_cell(summary["cgpolicy"][n], "change_cli_s")]
                for n in sizes
            ],
        ),
        "",
        "## Targets (issue 6)",
        "",
        _table(
            ["target", "result", "measured"],
            [
                [what, {True: "met", False: "**not met**", None: "not judged"}[ok], detail]
                for what, ok, detail in targets(summary, sizes)
            ],
        ),
        "",
        "## Notes",
        "",
        *[f"- {note}" for note in params["notes"]],
        "",
    ]
    return "\n".join(parts)


def plot(summary: dict, sizes: Sequence[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {
        "cgpolicy": ("o", "-"),
        "nftables": ("s", "--"),
        "iptables-nft": ("^", ":"),
        "iptables-legacy": ("v", "-."),
    }
    for name, (marker, line) in styles.items():
        if name not in summary:
            continue
        cells = [summary[name][n] for n in sizes]
        ys = [c["tp_ratio"] for c in cells]
        low = [y - c["tp_ratio_min"] for y, c in zip(ys, cells, strict=True)]
        high = [c["tp_ratio_max"] - y for y, c in zip(ys, cells, strict=True)]
        ax.errorbar(
            sizes, ys, yerr=[low, high], marker=marker, linestyle=line, capsize=3, label=name
        )
    ax.axhline(THROUGHPUT_TARGET, color="grey", linewidth=0.8, linestyle="--")
    ax.text(sizes[0], THROUGHPUT_TARGET, " target 0.95", va="bottom", fontsize=8, color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("prefixes in the allow-list (N)")
    ax.set_ylabel("loopback TCP throughput / no policy")
    ax.set_title("iperf3 from one cgroup, matching the last prefix (median, min-max)")
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _notes(
    samples: list[dict[str, Any]], sizes: Sequence[int], params: dict[str, Any]
) -> list[str]:
    notes = list(params.get("skipped", []))
    for key, what in (("throughput_bps", "throughput"), ("conn_per_s", "connection rate")):
        values = [s[key] for s in samples if s["config"] == "none"]
        if len(values) > 1:
            spread = (max(values) - min(values)) / statistics.median(values)
            notes.append(
                f"Run-to-run noise: the {len(values)} no-policy {what} runs span "
                f"{min(values) / statistics.median(values):.2f}-"
                f"{max(values) / statistics.median(values):.2f} of their median "
                f"({spread * 100:.0f}%). A median ratio within that band of 1.0, or two "
                "configurations closer than that, are not told apart by this run."
            )
    notes += [
        "iptables: Debian 12's `iptables` is the nf_tables backend (`iptables-nft`, "
        "translating each rule to nftables expressions; `-m cgroup` goes through the xtables "
        "compat layer); `iptables-legacy` is the x_tables backend. Both were run.",
        "nftables: `socket cgroupv2` paths are resolved by nft below `/sys/fs/cgroup` "
        f"whatever the cgroup2 mount is, so the path is given as `{params['nft_path']}` and "
        f"`level {params['nft_level']}` counts from the cgroup2 root "
        f"(`{params['cgroup2_root']}`).",
        "All filters are egress only and the server is outside the cgroup: the traffic "
        "filtered is the client's data/SYN/ACK/RST packets. Loopback has a 64 KiB MTU, so "
        "throughput is limited by copies, not per-packet cost; the connection rate (three "
        "filtered packets per connection, client written in Python) is the more per-packet "
        "sensitive of the two.",
        "Only IPv4 is listed; cgpolicy's and nftables' default drop also covers IPv6 here, "
        "the iptables chain does not (ip6tables would be a second chain).",
    ]
    return notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="N = 1, 100; short runs")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5; quick 1)")
    parser.add_argument("--sizes", help="comma-separated N values (default 1,100,1000,10000)")
    parser.add_argument(
        "--out-dir",
        type=Path,
        help="where RESULTS.md, throughput_ratio.png and compare.json go "
        "(default bench/; --quick: a new temp folder)",
    )
    parser.add_argument(
        "--only",
        help="comma-separated configurations besides none and cgpolicy (always run): "
        "nftables,iptables-nft,iptables-legacy",
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("compare: needs root (bpf(), cgroupfs, iptables, nft)", file=sys.stderr)
        return 1
    sizes = QUICK_SIZES if args.quick else SIZES
    if args.sizes:
        sizes = tuple(int(n) for n in args.sizes.split(","))
    rounds = args.rounds or (1 if args.quick else 5)
    iperf_seconds = 1 if args.quick else 3
    conn_seconds = 0.5 if args.quick else 2.0
    out_dir = args.out_dir or (
        Path(tempfile.mkdtemp(prefix="cgpolicy-compare-")) if args.quick else BENCH_DIR
    )
    out_dir.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(line, flush=True)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    started = time.perf_counter()
    params: dict[str, Any] = {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "started": time.strftime("%Y-%m-%d %H:%M"),
        "rounds": rounds,
        "sizes": list(sizes),
        "iperf_seconds": iperf_seconds,
        "conn_seconds": conn_seconds,
        "skipped": [],
    }
    servers = Servers()
    configs: list[Config] = []
    guard: FilterTableGuard | None = None
    scratch: Scratch | None = None
    samples: list[dict[str, Any]] = []
    folder = Path(tempfile.mkdtemp(prefix="cgpolicy-compare-yaml-"))
    try:
        scratch = Scratch("compare")
        cgroup_dir = scratch.cgroup_dir / "client"
        cgroup_dir.mkdir()
        cgroup = scratch.relative("client")
        cg = Cgpolicy(scratch, cgroup, folder)
        nft = Nftables(cgroup_dir, scratch.root)
        candidates: list[Config] = [
            NoPolicy(),
            cg,
            nft,
            Iptables("nft", cgroup),
            Iptables("legacy", cgroup),
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
        if any(isinstance(c, Nftables | Iptables) for c in configs):
            guard = FilterTableGuard()
        params["iperf3"] = run(["iperf3", "--version"]).splitlines()[0]
        params["iptables"] = run(["iptables", "--version"]).strip()
        params["nft"] = run(["nft", "--version"]).strip() if nft in configs else "-"
        params["nft_path"], params["nft_level"] = nft.path, nft.level
        params["cgroup2_root"] = str(scratch.root)

        # one-time costs first, outside every figure: bcc import + compile of net.c
        warm = time.perf_counter()
        cg.setup(allow_list(2))
        cg.teardown()
        params["cgpolicy_warmup_s"] = round(time.perf_counter() - warm, 2)

        servers.start()
        load = Load(servers, cgroup_dir, iperf_seconds, conn_seconds)
        samples = measure(configs, sizes, rounds, load, log)
    finally:
        for config in configs:
            try:
                config.final_cleanup()
            except Exception as error:  # keep cleaning the rest
                log(f"cleanup {config.name}: {error}")
        servers.stop()
        if guard is not None:
            try:
                guard.cleanup()
            except Exception as error:
                log(f"cleanup ip filter table: {error}")
        if scratch is not None:
            scratch.close()
        remove_top_folders()
        shutil.rmtree(folder, ignore_errors=True)

    params["wall_s"] = round(time.perf_counter() - started, 1)
    names = [c.name for c in configs]
    summary = summarize(samples, names, sizes)
    params["notes"] = _notes(samples, sizes, params) + [
        f"cgpolicy's one-time cost before the first figure (bcc import and compile, paid by "
        f"every fresh `cgpolicy` process): {params['cgpolicy_warmup_s']} s."
    ]
    command = "make compare   # = .venv/bin/python -m bench.compare"
    if args.quick or args.out_dir or args.rounds or args.only or args.sizes:
        command = "sudo .venv/bin/python -m bench.compare " + " ".join(argv or sys.argv[1:])
    plot_path = out_dir / "throughput_ratio.png"
    plot(summary, sizes, plot_path)
    (out_dir / "RESULTS.md").write_text(render(summary, sizes, params, command, plot_path.name))
    (out_dir / "compare.json").write_text(
        json.dumps({"params": params, "summary": summary, "samples": samples}, indent=1) + "\n"
    )
    print()
    for what, ok, detail in targets(summary, sizes):
        print(f"{'MET' if ok else 'NOT MET' if ok is False else 'n/a':>8}  {what}: {detail}")
    print(f"\nwritten to {out_dir}/RESULTS.md, throughput_ratio.png, compare.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
