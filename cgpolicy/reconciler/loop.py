"""`cgpolicy reconcile`: when passes run. Events wake the loop (inotify on the policy
folder, the cgroup folders where a target can appear and the device folders a policy's
paths go through; netlink link changes), a resync interval bounds the wait, SIGHUP
re-reads the folder, SIGTERM ends it. Each wake-up runs one pass (reconcile.py)."""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import select
import signal
import time

from cgpolicy.compiler.spec import CompileError
from cgpolicy.enforcer.apply import ApplyError
from cgpolicy.kernel.loader import LoaderError
from cgpolicy.kernel.syscall import BpfError
from cgpolicy.kernel.trusted import UntrustedFolder
from cgpolicy.reconciler.decide import PassReport
from cgpolicy.reconciler.health import Health
from cgpolicy.reconciler.reconcile import Reconciler
from cgpolicy.reconciler.watch import Events, Watcher

log = logging.getLogger("cgpolicy.reconcile")

# What the kernel or the file system reports: a pass that raises one of these is logged in one
# line (and /readyz says it); anything else is a bug and gets its traceback.
RUNTIME_ERRORS = (OSError, BpfError, LoaderError, ApplyError, CompileError, UntrustedFolder)

# Seconds between sweeps of expired learned DNS entries (Reconciler.sweep_learned): a full
# map learns nothing, so room is given back soon after answers expire, between passes.
SWEEP_INTERVAL = 5.0


def next_resync(started: float, due: float, interval: float, now: float) -> float:
    """When the next resync pass is due, after a pass that started at ``started`` and ended
    at ``now``, the previous one being due at ``due``. A pass woken by an event before then
    keeps that time. Resyncs start every interval, not every interval after the previous
    one ended, so drift with no event is repaired within interval + one pass; a pass
    longer than that still leaves half an interval idle."""
    if started < due:
        return due
    return max(started + interval, now + interval / 2)


def _release_free_heap() -> None:
    """Return free heap pages to the kernel (glibc ``malloc_trim``). bcc's first compile
    grows the heap by ~40 MiB that the daemon never uses again; elsewhere, a no-op."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


class Service:
    """The loop around Reconciler: events wake it, a resync interval bounds it, SIGTERM
    ends it cleanly (enforcement stays, it lives in the kernel), SIGHUP re-reads."""

    def __init__(self, reconciler: Reconciler, health: Health, interval: float) -> None:
        """``health`` is beaten at every pass and every wake-up (/healthz)."""
        self.reconciler = reconciler
        self.health = health
        self.interval = interval
        self._stop = False
        self._reread = False
        self._pass_raised = False  # the last pass did not complete: the next wake-up retries it

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            self._reread = True
        else:
            self._stop = True

    def run(self) -> None:
        reconciler, health = self.reconciler, self.health
        watcher = Watcher(reconciler.policy_dir)
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_write, False)
        signal.set_wakeup_fd(wake_write)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        try:
            resync_due = 0.0
            sweep_due = time.monotonic() + SWEEP_INTERVAL
            due = True  # a pass: at start, on an event or a signal, when a resync is due
            while not self._stop:
                if self._reread:
                    self._reread = False
                    reconciler.reread()
                    log.info("SIGHUP: re-reading %s", reconciler.policy_dir)
                if due:
                    resync_due = self._pass(watcher, resync_due)
                timeout = max(0.0, min(resync_due, sweep_due) - time.monotonic())
                try:
                    ready, _, _ = select.select([*watcher.fds(), wake_read], [], [], timeout)
                except InterruptedError:
                    ready = []
                health.beat()
                if wake_read in ready:
                    os.read(wake_read, 512)
                links = watcher.links_generation
                watcher.drain(ready)
                if watcher.links_generation != links:
                    reconciler.links_changed()
                if time.monotonic() >= sweep_due:
                    self._sweep()
                    sweep_due = time.monotonic() + SWEEP_INTERVAL
                events = watcher.take_events()
                due = bool(ready) or time.monotonic() >= resync_due
                if due and not events.other and wake_read not in ready:
                    due = time.monotonic() >= resync_due or not self._fast_path(events)
        finally:
            health.stopped()
            signal.set_wakeup_fd(-1)
            watcher.close()
            os.close(wake_read)
            os.close(wake_write)
        log.info("stopping; what is applied stays enforced")

    def _pass(self, watcher: Watcher, resync_due: float) -> float:
        """One reconcile pass, then the watches it calls for; when the next resync is due."""
        reconciler, health = self.reconciler, self.health
        started = time.monotonic()
        health.beat()
        gc.unfreeze()  # what the passes before left behind can be collected again
        self._pass_raised = True
        try:
            report = reconciler.reconcile()
            self._pass_raised = False
        except RUNTIME_ERRORS as error:  # e.g. bpffs cannot be mounted
            log.error("reconcile pass failed: %s; retrying at the next wake-up", error)
            health.pass_raised(str(error))
            report = PassReport()
        except Exception as error:  # a bug must not end the service either
            log.exception("reconcile pass failed; retrying at the next wake-up")
            health.pass_raised(f"{type(error).__name__}: {error}")
            report = PassReport()
        if report.applied or report.removed:
            _release_free_heap()  # the first load leaves clang's heap behind
        # Until the next pass, the collector leaves what exists now alone: otherwise its full
        # collections walk the whole heap every few events, 30 ms and more at 10,000 cgroups,
        # in the middle of attaching to a new one (docs/scale.md).
        gc.freeze()
        watcher.watch_policy_dir()
        watcher.watch_cgroups(self.reconciler.cgroup_folders())
        watcher.watch_devices(self.reconciler.device_folders())
        return next_resync(started, resync_due, self.interval, time.monotonic())

    def _fast_path(self, events: Events) -> bool:
        """Only policy files changed or cgroups appeared: the fast paths (Reconciler
        change_files, attach_new: enforcer/incremental.py) instead of a full pass; False
        when a full pass must run (also after any error: it reports it). After a pass that
        did not complete, the fast paths still do what they can (a new cgroup is enforced
        at once even if passes keep failing), and the full pass is retried too: only a pass
        that completes makes /readyz say so."""
        reconciler = self.reconciler
        try:
            if events.policy_files and not reconciler.change_files():
                return False
            done = not events.created or reconciler.attach_new(events.created)
            return done and not self._pass_raised
        except RUNTIME_ERRORS as error:
            log.warning("fast path: %s; running a full pass", error)
        except Exception:  # a bug must not end the service either
            log.exception("fast path failed; running a full pass")
        return False

    def _sweep(self) -> None:
        """Delete expired learned DNS entries; a failure is logged, the next sweep retries."""
        try:
            deleted = self.reconciler.sweep_learned()
        except RUNTIME_ERRORS as error:
            log.warning("deleting expired DNS entries failed: %s", error)
            return
        except Exception:  # a bug must not end the service either
            log.exception("deleting expired DNS entries failed")
            return
        if deleted:
            log.debug("deleted %d expired learned DNS entries", deleted)
