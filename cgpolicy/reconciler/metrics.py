"""Prometheus metrics and the health endpoints (liveness, readiness) of the reconcile
service."""

from __future__ import annotations

import errno
import ipaddress
import logging
import re
import socket
import threading
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cgpolicy.compiler.spec import DevicePath
from cgpolicy.reconciler.health import Health, PassOutcome, Verdict

log = logging.getLogger("cgpolicy.reconcile")


LOOPBACK = "127.0.0.1"
_PORT = re.compile(r"[0-9]{1,5}")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def parse_metrics_addr(text: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port). An empty HOST (``:9464``) is the IPv4 loopback: the
    endpoints name policies and count their denials, so serving them beyond this node is
    an explicit choice (``0.0.0.0:PORT``, ``[::]:PORT`` or a given address). An IPv6
    address may be given in brackets or not. Raises ValueError with what is expected."""
    shown = repr(text if len(text) <= 80 else text[:77] + "...")
    host, colon, port = text.strip().rpartition(":")
    if not colon or not _PORT.fullmatch(port) or int(port) > 65535:
        raise ValueError(f"--metrics-addr wants HOST:PORT with PORT in 0-65535, not {shown}")
    if host.startswith("[") != host.endswith("]"):
        raise ValueError(f"--metrics-addr: unbalanced brackets in {shown}")
    host = host.strip("[]")
    if not host:
        return LOOPBACK, int(port)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in host.split(".")):
            raise ValueError(
                f"--metrics-addr: {shown} names neither an IP address nor a host name"
            ) from None
    return host, int(port)


def every_address(host: str) -> bool:
    """Whether a socket bound to ``host`` (an address as the kernel reports it) listens on
    every address of this host: the unspecified address, IPv4 or IPv6, or IPv4's mapped
    into IPv6 (``::ffff:0.0.0.0``)."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host == ""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_unspecified
    return address.is_unspecified


def describe_bind(host: str, port: int) -> str:
    """Where the endpoints listen, as a log line says it. ``host`` is the address the socket
    is bound to (``getsockname``), not how it was spelled: ``0``, ``0x0`` and ``0.0`` are
    ``0.0.0.0`` too."""
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if every_address(host):
        return f"{shown} (every address of this host: whoever can reach it reads /metrics)"
    return shown


class KernelCounters(Collector):
    """Allowed and denied counts from the programs' own per-CPU counters, read from the kernel
    at scrape time (not on every pass: that would cost syscalls nobody asked for)."""

    def __init__(self, bpf_dir: Path) -> None:
        self.bpf_dir = bpf_dir

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from cgpolicy.kernel.applied import counter_totals, read_applied

        labels = ["policy", "hook"]
        denied = GaugeMetricFamily(
            "cgpolicy_denied_actions",
            "Actions denied (in audit mode: that would be) since the program was loaded",
            labels=labels,
        )
        allowed = GaugeMetricFamily(
            "cgpolicy_allowed_actions",
            "Actions allowed since the program was loaded",
            labels=labels,
        )
        totals = counter_totals(read_applied(self.bpf_dir, links=False))
        for (policy, hook), (allowed_count, denied_count) in totals.items():
            allowed.add_metric([policy, hook], allowed_count)
            denied.add_metric([policy, hook], denied_count)
        yield denied
        yield allowed


class LearnedNames(Collector):
    """Each policy's learned map of DNS answers (fqdns rules), read from the kernel at
    scrape time: how full it is, and what learning did since the policy was loaded (the
    counters start again from 0 when a changed policy is reloaded with new maps)."""

    def __init__(self, bpf_dir: Path) -> None:
        self.bpf_dir = bpf_dir

    def collect(self) -> Iterator[Metric]:
        from cgpolicy.kernel.applied import monotonic_ns, read_applied, read_learned

        labels = ["policy"]
        entries = GaugeMetricFamily(
            "cgpolicy_dns_learned_entries",
            "Live addresses learned from DNS answers (what fqdns rules match now)",
            labels=labels,
        )
        expired = GaugeMetricFamily(
            "cgpolicy_dns_learned_expired_entries",
            "Learned addresses expired and not yet deleted (they match nothing, but take room)",
            labels=labels,
        )
        capacity = GaugeMetricFamily(
            "cgpolicy_dns_learned_capacity",
            "Entries the learned map holds at most (spec.dns.maxLearned)",
            labels=labels,
        )
        learned = CounterMetricFamily(
            "cgpolicy_dns_learned",
            "Addresses learned or refreshed from DNS answers",
            labels=labels,
        )
        refused = CounterMetricFamily(
            "cgpolicy_dns_refused_full",
            "Addresses NOT learned because the learned map was full: they stay refused by "
            "allow rules naming fqdns (fails closed); raise spec.dns.maxLearned",
            labels=labels,
        )
        unasked = CounterMetricFamily(
            "cgpolicy_dns_unasked_answers",
            "DNS answers that taught nothing because no query was noted for them: from a "
            "server not in spec.dns.servers, later than 30 s, or forged",
            labels=labels,
        )
        now = monotonic_ns()
        for name, policy in sorted(read_applied(self.bpf_dir, links=False).items()):
            state = read_learned(policy)
            if state is None:
                continue
            live = sum(1 for entry in state.entries if entry.live(now))
            entries.add_metric([name], live)
            expired.add_metric([name], len(state.entries) - live)
            capacity.add_metric([name], state.capacity)
            learned.add_metric([name], state.learned)
            refused.add_metric([name], state.refused_full)
            unasked.add_metric([name], state.unasked)
        yield from (entries, expired, capacity, learned, refused, unasked)


class Metrics:
    def __init__(self, bpf_dir: Path | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        if bpf_dir is not None:
            r.register(KernelCounters(bpf_dir))
            r.register(LearnedNames(bpf_dir))
        self.passes = Counter("cgpolicy_reconcile_passes", "Reconcile passes run", registry=r)
        self.duration = Histogram(
            "cgpolicy_reconcile_duration_seconds",
            "Duration of a reconcile pass",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.drift_found = Counter(
            "cgpolicy_drift_found", "Drift found, by kind", ["problem"], registry=r
        )
        self.drift_repaired = Counter(
            "cgpolicy_drift_repaired", "Drift repaired, by kind", ["problem"], registry=r
        )
        self.policies = Gauge(
            "cgpolicy_policies", "Policies in the folder, by state", ["state"], registry=r
        )
        self.invalid_files = Gauge(
            "cgpolicy_invalid_policy_files",
            "Policy files failing validation or that cannot be read",
            registry=r,
        )
        self.last_good_store_failing = Gauge(
            "cgpolicy_last_good_store_failing",
            "1 when the last-good store could not be read or written; a file that turns bad "
            "then keeps its last good version only while this process runs",
            registry=r,
        )
        self.apply_errors = Counter(
            "cgpolicy_apply_errors", "Failed applies, by policy", ["policy"], registry=r
        )
        self.last_success = Gauge(
            "cgpolicy_last_successful_pass_timestamp_seconds",
            "Unix time of the last pass that ended without errors",
            registry=r,
        )
        self.policy_failing = Gauge(
            "cgpolicy_policy_failing",
            "1 when the last pass could not apply (or remove) the policy, which keeps its "
            "previous state; 0 when it is applied as its file says",
            ["policy"],
            registry=r,
        )
        self.invalid_file = Gauge(
            "cgpolicy_invalid_policy_file",
            "1 for each policy file that fails validation or cannot be read (its last good "
            "version stays enforced)",
            ["file"],
            registry=r,
        )
        self.device_path_unresolved = Gauge(
            "cgpolicy_device_path_unresolved",
            "1 for each path: device rule whose path names no device node on this node; "
            "state missing, not-a-device or unsafe: the rule matches nothing; kept: a deny "
            "rule still denying the device its path named when last applied",
            ["policy", "path", "action", "state"],
            registry=r,
        )
        self.dns_expired_deleted = Counter(
            "cgpolicy_dns_expired_deleted",
            "Expired learned DNS entries the service deleted, giving their room back",
            ["policy"],
            registry=r,
        )
        self.rollbacks = Counter(
            "cgpolicy_confirm_rollbacks",
            "Applies with --confirm-within not confirmed in time that a reconcile pass rolled "
            "back itself (their rollback process was gone); result: done or failed",
            ["policy", "result"],
            registry=r,
        )
        self._failing_series: set[str] = set()
        self._invalid_series: set[str] = set()
        self._device_series: set[tuple[str, str, str, str]] = set()
        self.health = Health()
        self.healthy_within = 60.0

    @property
    def healthy_within(self) -> float:
        """Seconds without a heartbeat from the loop after which /healthz says it is stuck."""
        return self.health.stale_after

    @healthy_within.setter
    def healthy_within(self, seconds: float) -> None:
        self.health.stale_after = seconds

    def record_pass(self, outcome: PassOutcome) -> None:
        """Per-policy and per-file state of a completed pass, for /metrics and /readyz. A pass
        that found the folder missing changed nothing, so the series stay as they were."""
        if outcome.folder_missing is None:
            failing = {name: 1 for name in outcome.failing}
            _set_series(self.policy_failing, self._failing_series, outcome.policies, failing)
            invalid = dict.fromkeys(outcome.invalid_files, 1)
            _set_series(self.invalid_file, self._invalid_series, invalid, invalid)
        self.health.pass_completed(outcome)

    def record_device_paths(self, found: Iterable[tuple[str, DevicePath]]) -> None:
        """(policy, device path rule) of the last pass: a series for each one that is not
        resolved; series of rules resolved or gone since are dropped."""
        wanted: set[tuple[str, str, str, str]] = {
            (name, d.path, d.action, d.node.state) for name, d in found if not d.resolved
        }
        for labels in sorted(wanted):
            self.device_path_unresolved.labels(*labels).set(1)
        for labels in self._device_series - wanted:
            self.device_path_unresolved.remove(*labels)
        self._device_series = wanted

    def serve(self, host: str, port: int) -> ThreadingHTTPServer:
        """Serve /metrics (Prometheus text format), /healthz (liveness) and /readyz
        (readiness) in a daemon thread."""
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def _respond(self, send_body: bool) -> None:
                path = self.path.split("?")[0]
                content_type = "text/plain; charset=utf-8"
                if path == "/metrics":
                    try:
                        body, status = generate_latest(metrics.registry), 200
                        content_type = CONTENT_TYPE_LATEST
                    except Exception as error:  # a collector's failure is not the server's
                        log.warning("metrics scrape failed: %s", error)
                        body, status = f"metrics unavailable: {error}\n".encode(), 500
                elif path in ("/healthz", "/readyz"):
                    health = metrics.health
                    verdict: Verdict = (
                        health.liveness() if path == "/healthz" else health.readiness()
                    )
                    body, status = verdict.body(), 200 if verdict.ok else 503
                else:
                    body, status = b"not found\n", 404
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                if send_body:
                    self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                self._respond(send_body=True)

            def do_HEAD(self) -> None:  # noqa: N802
                self._respond(send_body=False)

            def log_message(self, format: str, *args: object) -> None:
                pass  # scrapes every few seconds would drown the service log

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

            def handle_error(self, request: object, client_address: object) -> None:
                # A client that hangs up mid-answer is no reason for a traceback in the log.
                log.debug("metrics request from %s failed", client_address, exc_info=True)

        if not 0 <= port <= 65535:
            raise OSError(errno.EINVAL, f"metrics port {port} is not in 0-65535")
        server = Server((host, port), Handler)
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        bound = server.socket.getsockname()  # what was bound, however it was spelled
        log.info("serving /metrics, /healthz and /readyz on %s", describe_bind(bound[0], bound[1]))
        return server


def _set_series(
    gauge: Gauge, present: set[str], labels: Iterable[str], values: dict[str, int]
) -> None:
    """Set one series per label (0 unless ``values`` says otherwise) and drop the series of
    labels gone since the last call, so a deleted policy or fixed file leaves no stale 1."""
    wanted = set(labels) | set(values)
    for label in sorted(wanted):
        gauge.labels(label).set(values.get(label, 0))
    for label in present - wanted:
        gauge.remove(label)
    present.clear()
    present.update(wanted)
