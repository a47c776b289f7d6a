"""Liveness and readiness of the reconcile service: the decisions (with a fake clock) and
the HTTP endpoints that report them (a real server on loopback, no privileges needed)."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from cgpolicy.reconciler.health import MAX_REASONS, Health, PassOutcome
from cgpolicy.reconciler.metrics import Metrics


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def health(clock: Clock) -> Health:
    return Health(stale_after=60.0, clock=clock)


def test_a_loop_that_beats_is_alive_whatever_its_policies(health: Health, clock: Clock) -> None:
    assert health.liveness().ok  # starting counts: the first pass may take a while
    health.pass_completed(PassOutcome(failing={"web": "attach failed"}))
    clock.now += 59
    assert health.liveness().ok
    health.pass_completed(PassOutcome(folder_missing="/etc/cgpolicy/policies.d"))
    assert health.liveness().ok
    health.pass_raised("mount -t bpf bpf /sys/fs/bpf: Operation not permitted")
    assert health.liveness().ok


def test_a_loop_without_a_recent_beat_is_stuck(health: Health, clock: Clock) -> None:
    health.beat()
    clock.now += 61
    verdict = health.liveness()
    assert not verdict.ok
    assert b"stuck: no heartbeat for 61 s (limit 60 s)" in verdict.body()
    assert not health.readiness().ok  # a stuck loop's last pass says nothing about now
    health.beat()
    assert health.liveness().ok


def test_a_stopped_loop_is_not_alive(health: Health) -> None:
    health.stopped()
    assert not health.liveness().ok
    assert b"stopped" in health.liveness().body()


def test_not_ready_before_the_first_pass(health: Health) -> None:
    verdict = health.readiness()
    assert not verdict.ok
    assert verdict.body() == b"not ready:\nno pass has completed yet\n"


def test_ready_when_every_policy_is_applied(health: Health) -> None:
    health.pass_completed(PassOutcome(frozenset({"web", "db"})))
    verdict = health.readiness()
    assert verdict.ok
    assert verdict.body() == b"ready: 2 policies applied\n"


def test_not_ready_names_every_reason(health: Health) -> None:
    health.pass_completed(
        PassOutcome(
            frozenset({"web", "db"}),
            failing={"web": "cannot open cgroup x: Not a directory"},
            invalid_files={"bad.yaml": "/p/bad.yaml:6:3: spec.nonsense: unknown field"},
        )
    )
    verdict = health.readiness()
    assert not verdict.ok
    assert verdict.body().decode().splitlines() == [
        "not ready:",
        "policy web: not applied: cannot open cgroup x: Not a directory",
        "file bad.yaml: invalid: /p/bad.yaml:6:3: spec.nonsense: unknown field",
    ]
    health.pass_completed(PassOutcome(frozenset({"web", "db"})))
    assert health.readiness().ok


def test_missing_folder_is_not_ready(health: Health) -> None:
    health.pass_completed(PassOutcome(folder_missing="/etc/cgpolicy/policies.d"))
    verdict = health.readiness()
    assert not verdict.ok
    assert b"policy folder /etc/cgpolicy/policies.d is missing" in verdict.body()


def test_a_pass_that_raised_is_not_ready_until_one_completes(health: Health) -> None:
    health.pass_completed(PassOutcome(frozenset({"web"})))
    health.pass_raised("mount -t bpf bpf /sys/fs/bpf: Operation not permitted")
    verdict = health.readiness()
    assert not verdict.ok
    assert b"the last pass did not complete: mount -t bpf" in verdict.body()
    health.pass_completed(PassOutcome(frozenset({"web"})))
    assert health.readiness().ok


def test_a_long_list_of_reasons_stays_short(health: Health) -> None:
    failing = {f"p{i:02}": "x" * 1000 + "\nsecond line" for i in range(25)}
    health.pass_completed(PassOutcome(frozenset(failing), failing=failing))
    lines = health.readiness().body().decode().splitlines()
    assert len(lines) == MAX_REASONS + 1
    assert lines[-1].startswith("... and 16 more")
    assert all(len(line) <= 300 for line in lines)


def test_reasons_keys_ignore_texts() -> None:
    first = PassOutcome(failing={"web": "error 1"}, invalid_files={"a.yaml": "1:1: x"})
    second = PassOutcome(failing={"web": "error 2"}, invalid_files={"a.yaml": "2:2: y"})
    assert first.keys() == second.keys()
    assert PassOutcome().keys() == frozenset()


def series(metrics: Metrics) -> list[str]:
    text = generate_latest(metrics.registry).decode()
    return [
        line
        for line in text.splitlines()
        if line.startswith(("cgpolicy_policy_failing{", "cgpolicy_invalid_policy_file{"))
    ]


def test_metrics_show_each_failing_policy_and_invalid_file_and_drop_gone_ones() -> None:
    metrics = Metrics()
    metrics.record_pass(
        PassOutcome(
            frozenset({"web", "db"}),
            failing={"web": "boom"},
            invalid_files={"bad.yaml": "1:1: x"},
        )
    )
    assert sorted(series(metrics)) == [
        'cgpolicy_invalid_policy_file{file="bad.yaml"} 1.0',
        'cgpolicy_policy_failing{policy="db"} 0.0',
        'cgpolicy_policy_failing{policy="web"} 1.0',
    ]
    # A missing folder changes nothing in the kernel, so the series stay as they were.
    metrics.record_pass(PassOutcome(folder_missing="/p"))
    assert len(series(metrics)) == 3
    metrics.record_pass(PassOutcome(frozenset({"web"})))
    assert series(metrics) == ['cgpolicy_policy_failing{policy="web"} 0.0']


def test_healthy_within_is_the_liveness_bound() -> None:
    metrics = Metrics()
    metrics.healthy_within = 90.0
    assert metrics.health.stale_after == 90.0


class Broken(Collector):
    def collect(self) -> Iterator[Metric]:
        raise PermissionError("cannot read /sys/fs/bpf/cgpolicy")


def get(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.fixture
def served() -> Iterator[tuple[Metrics, int]]:
    metrics = Metrics()
    server = metrics.serve("127.0.0.1", 0)
    try:
        yield metrics, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_endpoints_answer_liveness_and_readiness_apart(served: tuple[Metrics, int]) -> None:
    metrics, port = served
    assert get(port, "/healthz")[0] == 200
    assert get(port, "/readyz") == (503, "not ready:\nno pass has completed yet\n")
    metrics.record_pass(PassOutcome(frozenset({"web"}), failing={"web": "boom"}))
    assert get(port, "/healthz")[0] == 200
    assert get(port, "/readyz") == (503, "not ready:\npolicy web: not applied: boom\n")
    assert 'cgpolicy_policy_failing{policy="web"} 1.0' in get(port, "/metrics")[1]
    metrics.record_pass(PassOutcome(frozenset({"web"})))
    assert get(port, "/readyz?verbose") == (200, "ready: 1 policy applied\n")
    assert get(port, "/readyz", method="HEAD") == (200, "")
    assert get(port, "/nothing")[0] == 404
    assert get(port, "/readyz", method="POST")[0] == 501
    metrics.health.stopped()
    assert get(port, "/healthz") == (503, "the reconcile loop has stopped\n")


def test_a_failing_collector_gives_500_not_a_dead_endpoint(
    served: tuple[Metrics, int], caplog: pytest.LogCaptureFixture
) -> None:
    metrics, port = served
    metrics.registry.register(Broken())
    status, body = get(port, "/metrics")
    assert status == 500
    assert "cannot read /sys/fs/bpf/cgpolicy" in body
    assert get(port, "/healthz")[0] == 200
    assert "Traceback" not in caplog.text


def test_a_port_out_of_range_is_an_os_error_not_a_traceback() -> None:
    with pytest.raises(OSError, match="not in 0-65535"):
        Metrics().serve("127.0.0.1", 70000)
