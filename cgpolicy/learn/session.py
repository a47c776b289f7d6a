"""One learning session: the observation programs on a cgroup for a while (``--cgroup``
and ``--for``), or on a fresh cgroup for one command's life (``-- CMD``), and then what
they counted.

Nothing is pinned: the programs, maps and links live in this process's file descriptors
(cgpolicy/kernel/learn.py), so they go with it on every way out, Ctrl-C, a failure or a
kill. The cgroup of ``-- CMD`` is made here (``cgpolicy.learn/<name>-<pid>``, refused if
it exists) and removed with whatever still runs in it, as `cgpolicy run` does.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cgpolicy import durations
from cgpolicy.kernel.cgroup import (
    CgroupExists,
    make_cgroup,
    remove_cgroup_tree,
    remove_if_empty,
)
from cgpolicy.kernel.learn import DEFAULT_SIZES, Observations, Observer, Sizes, seed_servers
from cgpolicy.kernel.processes import CommandNotRun, run_in_cgroup, sigterm_as_interrupt
from cgpolicy.learn.names import NameBook

LEARN_PARENT = "cgpolicy.learn"
MAX_LEARN_S = 366 * 86400.0  # learn --for

log = logging.getLogger(__name__)


class LearnError(Exception):
    """The session cannot start (exit status 1), or the command cannot be run (``status``:
    127 not found, 126 not runnable, as a shell says)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


@contextmanager
def _reading_answers(observer: Observer, book: NameBook) -> Iterator[None]:
    """Read the DNS answers the programs copy while the session lasts (the ring buffer is
    bounded: a full one loses answers, which is counted), and what is left at the end."""
    stop = threading.Event()

    def drain() -> None:
        while not stop.wait(0.1):
            for answer in observer.answers():
                book.add(answer)

    thread = threading.Thread(target=drain, name="learn-dns", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _finish(observer: Observer, book: NameBook) -> Observations:
    observer.detach()
    for answer in observer.answers():
        book.add(answer)
    return observer.read()


def learn_cgroup(
    cgroup: Path,
    seconds: float,
    sizes: Sizes = DEFAULT_SIZES,
) -> tuple[Observations, NameBook, bool]:
    """Observe the existing cgroup ``cgroup`` (and everything below it) for ``seconds``,
    or until Ctrl-C, SIGTERM or SIGHUP, whenever it comes (during the attach too); (what
    was seen, the DNS answers, whether it was cut short)."""
    if not cgroup.is_dir():
        raise LearnError(f"cgroup {cgroup} does not exist", 2)
    interrupted = False
    book = NameBook()
    with Observer(sizes) as observer, sigterm_as_interrupt():
        try:
            # Servers that bound before: known before the first packet is seen, and again
            # after the attach for one that bound in between.
            seed_servers(observer, cgroup)
            observer.attach(cgroup)
            seed_servers(observer, cgroup)
            with _reading_answers(observer, book):
                time.sleep(seconds)
        except KeyboardInterrupt:
            interrupted = True
        return _finish(observer, book), book, interrupted


def learn_command(
    cgroup_root: Path,
    command: list[str],
    name: str,
    linger: float = 1.0,
    sizes: Sizes = DEFAULT_SIZES,
) -> tuple[Observations, NameBook, int]:
    """Run ``command`` in a fresh cgroup under observation until it exits, and ``linger``
    seconds more (what its connections still send as they close); (what was seen, the DNS
    answers, its exit status as Popen gives it: negative for a signal)."""
    book = NameBook()
    relative = f"{LEARN_PARENT}/{name}-{os.getpid()}"
    cgroup = cgroup_root / relative
    try:
        make_cgroup(cgroup)
    except CgroupExists:
        raise LearnError(
            f"cgroup {relative} exists already; `learn` makes a cgroup of its own and does not "
            "use (or remove) one it did not make"
        ) from None
    except OSError as error:
        raise LearnError(f"cannot make the cgroup {relative}: {error}") from None
    try:
        with Observer(sizes) as observer:
            observer.attach(cgroup)
            with _reading_answers(observer, book):
                try:
                    status = run_in_cgroup(command, cgroup)
                except CommandNotRun as error:
                    raise LearnError(str(error), error.status) from None
                try:
                    time.sleep(linger)
                except KeyboardInterrupt:
                    pass
            return _finish(observer, book), book, status
    finally:
        try:
            remove_cgroup_tree(cgroup)
        except OSError as error:  # still busy: say so, keep what was learned
            log.warning("could not remove the cgroup %s: %s", relative, error)
        remove_if_empty(cgroup.parent)


def parse_duration(text: str) -> float:
    """Seconds in a --for value (cgpolicy.durations): at most 366 days."""
    return durations.parse_duration(text, MAX_LEARN_S)
