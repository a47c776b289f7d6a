"""The cyclic garbage collector paused while a large policy is read or compiled.

Reading a policy of 100,000 CIDRs makes some 500,000 objects that stay alive (networks,
their addresses, positions, texts, packed map entries), and each allocation threshold
crossed on the way makes the collector walk all of them again: at 100,000 CIDRs that was
about a third of the time. Nothing these stages make refers to itself, so reference counting
frees all of it; a cycle made meanwhile is collected after the pause, as usual.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic collector for the block, unless it was off already (then leave it)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
