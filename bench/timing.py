"""Where the time of a plan+apply goes: wraps the Enforcer's calls to the compiler, the
reader of applied state ("observe"), the loader and PROG_LOAD for the duration of a
``with Split()`` block, summing their wall times. What is left of apply after loading is
attaching and pinning."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

from cgpolicy.enforcer import apply as apply_module
from cgpolicy.enforcer import engine
from cgpolicy.kernel.bpf import Program


class Split:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {"compile": 0.0, "observe": 0.0, "load": 0.0}
        self.seconds["verifier"] = 0.0
        self.counts: dict[str, int] = dict.fromkeys(self.seconds, 0)
        self.verifier_by_name: dict[str, float] = {}
        self._restore: list[Callable[[], None]] = []

    def _timed(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                self.seconds[name] += elapsed
                self.counts[name] += 1
                if name == "verifier" and len(args) > 3:  # Program.load(cls, type, insns, name)
                    by = self.verifier_by_name
                    by[args[3]] = by.get(args[3], 0.0) + elapsed

        return wrapper

    def _patch(self, owner: Any, attribute: str, name: str) -> None:
        original = owner.__dict__[attribute]
        if isinstance(original, classmethod):
            timed = self._timed(name, original.__func__)
            setattr(owner, attribute, classmethod(timed))
        else:
            setattr(owner, attribute, self._timed(name, original))
        self._restore.append(lambda: setattr(owner, attribute, original))

    def __enter__(self) -> Split:
        self._patch(engine, "compile_policy", "compile")
        self._patch(engine, "read_applied", "observe")
        # maps made and filled and programs verified, on threads (enforcer/apply.py), and
        # the DNS programs of the names variant, one by one
        self._patch(apply_module, "_load_programs", "load")
        self._patch(apply_module, "load_program", "load")
        self._patch(Program, "load", "verifier")  # PROG_LOAD (the verifier), inside load
        return self

    def __exit__(self, *exc: object) -> None:
        for restore in reversed(self._restore):
            restore()
        self._restore.clear()
