"""Prometheus metrics and a health endpoint for the reconcile service."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
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
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class KernelCounters(Collector):
    """Allowed and denied counts from the programs' own per-CPU counters, read from the kernel
    at scrape time (not on every pass: that would cost syscalls nobody asked for)."""

    def __init__(self, bpf_dir: Path) -> None:
        self.bpf_dir = bpf_dir

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from cgpolicy.audit.collect import counter_totals

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
        for (policy, hook), (allowed_count, denied_count) in counter_totals(self.bpf_dir).items():
            allowed.add_metric([policy, hook], allowed_count)
            denied.add_metric([policy, hook], denied_count)
        yield denied
        yield allowed


class Metrics:
    def __init__(self, bpf_dir: Path | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        if bpf_dir is not None:
            r.register(KernelCounters(bpf_dir))
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
            "cgpolicy_invalid_policy_files", "Policy files failing validation", registry=r
        )
        self.apply_errors = Counter(
            "cgpolicy_apply_errors", "Failed applies, by policy", ["policy"], registry=r
        )
        self.last_success = Gauge(
            "cgpolicy_last_successful_pass_timestamp_seconds",
            "Unix time of the last pass that ended without errors",
            registry=r,
        )
        self.healthy_within = 60.0

    def healthy(self) -> bool:
        last = self.last_success._value.get()  # noqa: SLF001 - the gauge is ours
        return last > 0 and time.time() - last <= self.healthy_within

    def serve(self, host: str, port: int) -> ThreadingHTTPServer:
        """Serve /metrics (Prometheus text format) and /healthz in a daemon thread."""
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path.split("?")[0] == "/metrics":
                    body, status = generate_latest(metrics.registry), 200
                    content_type = CONTENT_TYPE_LATEST
                elif self.path.split("?")[0] == "/healthz":
                    ok = metrics.healthy()
                    body, status = (b"ok\n", 200) if ok else (b"no recent successful pass\n", 503)
                    content_type = "text/plain; charset=utf-8"
                else:
                    body, status, content_type = b"not found\n", 404, "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # scrapes every few seconds would drown the service log

        server = ThreadingHTTPServer((host, port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        return server
