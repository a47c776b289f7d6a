"""Liveness and readiness of the reconcile service, for ``/healthz`` and ``/readyz``.

They answer different questions because a kubelet acts differently on each: a failing
liveness probe restarts the container, a failing readiness probe only marks the pod not
ready. So liveness says only whether the loop is alive (it beats at every pass and every
wake-up). A policy that fails to apply, an invalid file or a missing policy folder are
readiness problems: a restart would not fix them, and restarting in a loop would only
hide them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

MAX_REASONS = 10  # lines of a /readyz body; the rest is counted, metrics and logs have all
MAX_LINE = 300  # characters per line: a body is for a person reading a probe's output


def _clip(line: str) -> str:
    line = " ".join(line.split())  # an error text may span lines; a reason is one line
    return line if len(line) <= MAX_LINE else line[: MAX_LINE - 3] + "..."


@dataclass(frozen=True)
class PassOutcome:
    """What a completed pass left, as far as readiness is concerned."""

    policies: frozenset[str] = frozenset()  # the policies the folder asks for
    failing: Mapping[str, str] = field(default_factory=dict)  # policy -> why not applied
    # file -> how bad it is (readable or not, how many problems), never a problem's text
    invalid_files: Mapping[str, str] = field(default_factory=dict)
    folder_missing: str | None = None  # the folder, when it was missing
    store_error: str | None = None  # why the last-good store cannot be used, when it cannot

    def reasons(self) -> list[str]:
        """Why the folder is not fully applied, one line each; empty when it is."""
        reasons = []
        if self.folder_missing is not None:
            reasons.append(f"policy folder {self.folder_missing} is missing")
        reasons += [
            f"policy {name}: not applied: {why}" for name, why in sorted(self.failing.items())
        ]
        reasons += [
            f"file {name}: invalid: {why}" for name, why in sorted(self.invalid_files.items())
        ]
        if self.store_error is not None:
            reasons.append(f"last-good store: {self.store_error}")
        return reasons

    def keys(self) -> frozenset[tuple[str, str]]:
        """The reasons without their texts (which can change from pass to pass)."""
        keys = {("folder", self.folder_missing)} if self.folder_missing is not None else set()
        keys |= {("policy", name) for name in self.failing}
        keys |= {("file", name) for name in self.invalid_files}
        keys |= {("store", "")} if self.store_error is not None else set()
        return frozenset(keys)


@dataclass(frozen=True)
class Verdict:
    ok: bool
    lines: tuple[str, ...]

    def body(self) -> bytes:
        shown = [_clip(line) for line in self.lines[:MAX_REASONS]]
        if len(self.lines) > MAX_REASONS:
            shown.append(f"... and {len(self.lines) - MAX_REASONS} more (see the log and /metrics)")
        return ("\n".join(shown) + "\n").encode("utf-8", "replace")


class Health:
    """The loop's heartbeat and the outcome of its last pass. The loop writes, the HTTP
    server's threads read; a lock keeps each answer consistent."""

    def __init__(
        self, stale_after: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.stale_after = stale_after  # seconds without a beat after which the loop is stuck
        self._clock = clock  # monotonic: a wall-clock step must not look like a stuck loop
        self._lock = threading.Lock()
        self._beat = clock()  # starting counts as a beat: the first pass may compile for a while
        self._stopped = False
        self._outcome: PassOutcome | None = None
        self._error: str | None = None  # why the last pass did not complete

    def beat(self) -> None:
        with self._lock:
            self._beat = self._clock()

    def stopped(self) -> None:
        with self._lock:
            self._stopped = True

    def pass_completed(self, outcome: PassOutcome) -> None:
        with self._lock:
            self._beat = self._clock()
            self._outcome = outcome
            self._error = None

    def pass_raised(self, error: str) -> None:
        with self._lock:
            self._beat = self._clock()
            self._error = error or "unknown error"

    def liveness(self) -> Verdict:
        with self._lock:
            return self._liveness()

    def _liveness(self) -> Verdict:
        if self._stopped:
            return Verdict(False, ("the reconcile loop has stopped",))
        age = max(0.0, self._clock() - self._beat)
        if age > self.stale_after:
            return Verdict(
                False,
                (
                    f"the reconcile loop is stuck: no heartbeat for {age:.0f} s "
                    f"(limit {self.stale_after:.0f} s)",
                ),
            )
        return Verdict(True, (f"alive: last heartbeat {age:.1f} s ago",))

    def readiness(self) -> Verdict:
        """Ready when the loop is alive, its last pass completed, and that pass found the
        folder present, every file valid and every policy applied."""
        with self._lock:
            alive = self._liveness()
            if not alive.ok:
                return Verdict(False, ("not ready:", *alive.lines))
            if self._error is not None:
                return Verdict(
                    False, ("not ready:", f"the last pass did not complete: {self._error}")
                )
            if self._outcome is None:
                return Verdict(False, ("not ready:", "no pass has completed yet"))
            reasons = self._outcome.reasons()
            if reasons:
                return Verdict(False, ("not ready:", *reasons))
            count = len(self._outcome.policies)
            noun = "policy" if count == 1 else "policies"
            return Verdict(True, (f"ready: {count} {noun} applied",))
