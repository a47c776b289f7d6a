"""The cyclic garbage collector paused while a large policy is read or compiled.

Reading and compiling a policy of 100,000 CIDRs made some 500,000 objects that stay alive
(then: networks, their addresses, positions, texts, packed map entries; a prefix is an int
now, which the collector does not track), and each allocation threshold
crossed on the way makes the collector walk all of them again: at 100,000 CIDRs that was
about a third of the time. Nothing these stages make refers to itself, so reference counting
frees all of it.

Deferring the walks is not enough: the first collection after the pause still walks every
object the pause made (2-4 ms after a 10,000-CIDR read or compile, 20-40 ms at 100,000, in
the middle of a load). So a pause that made many objects ends with ``gc.freeze()``, which
takes every object tracked at that moment, mostly what the pause made (a policy, its
compilation: long-lived by nature), out of the collector's sight until ``gc.unfreeze()``.
Reference counting still frees them as usual. The service unfreezes at the start of every
reconcile pass (reconciler/loop.py), so a cycle that was garbage when frozen is collected
after that; a one-shot command exits first.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

# Net new tracked objects above which a pause ends by freezing: about what compiling 5,000
# CIDRs makes (reading them makes few); below it the walk costs less than a millisecond.
FREEZE_ABOVE = 10_000


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic collector for the block, unless it was off already (then leave it)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            if gc.get_count()[0] > FREEZE_ABOVE:  # counts on while the collector is off
                gc.freeze()
            gc.enable()
