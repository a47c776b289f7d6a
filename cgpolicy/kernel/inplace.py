"""Writing a change into the copy of net.c's rule maps that is not in force, and switching.

bpf/net.c keeps two copies of every rule map (contract.copy_key) and reads the one the
`generation` map names. A change is written as a delta into the other copy
(:func:`write_copy`), put in force with one map update (:func:`switch`), and, once no
program can still be reading the old copy (:func:`wait_for_readers`), written into that
one too. The enforcer decides when a change can go this way (enforcer/inplace.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cgpolicy.compiler.spec import MapSpec
from cgpolicy.contract import U32, copy_key
from cgpolicy.kernel.bpf import Map
from cgpolicy.kernel.syscall import MapType

_ZERO = U32.pack(0)


@dataclass(frozen=True)
class Delta:
    """What turns one copy's contents into another's: entries to write, keys to drop."""

    write: tuple[tuple[bytes, bytes], ...]
    drop: tuple[bytes, ...]


def delta(old: Sequence[tuple[bytes, bytes]], new: Sequence[tuple[bytes, bytes]]) -> Delta:
    """The change from ``old`` to ``new`` entries: what differs, found with set
    operations (in C), so that only the change is written."""
    write = set(new).difference(old)
    gone = set(old).difference(new)
    if gone:
        rewritten = {key for key, _ in write}
        drop = tuple(sorted(key for key, _ in gone if key not in rewritten))
    else:
        drop = ()
    return Delta(tuple(sorted(write)), drop)


def write_copy(map_: Map, spec: MapSpec, gen: int, change: Delta) -> None:
    """Apply ``change`` (copy 0 keys) to copy ``gen`` of ``map_``: drops first, so that the
    copy never holds more than the larger of its old and new contents. An array's dropped
    slot is zeroed, as a fresh array's is."""
    if change.drop:
        if spec.map_type == "array":
            zero = bytes(spec.value_size)
            map_.update_batch(_in_copy(spec, [(key, zero) for key in change.drop], gen))
        else:
            for key in change.drop:
                map_.delete(copy_key(spec.map_type, spec.max_entries, key, gen))
    map_.update_batch(_in_copy(spec, change.write, gen))


def copy_entries(spec: MapSpec, gen: int) -> list[tuple[bytes, bytes]]:
    """A two-copy map's entries as copy ``gen`` holds them."""
    return _in_copy(spec, spec.entries, gen)


def _in_copy(
    spec: MapSpec, entries: Sequence[tuple[bytes, bytes]], gen: int
) -> list[tuple[bytes, bytes]]:
    return [(copy_key(spec.map_type, spec.max_entries, k, gen), v) for k, v in entries]


def in_force(generation: Map) -> int:
    value = generation.lookup(_ZERO)
    return U32.unpack(value)[0] & 1 if value else 0


def switch(generation: Map, gen: int) -> None:
    """Put copy ``gen`` in force: one map update, seen by the next program run."""
    generation.update(_ZERO, U32.pack(gen))


def wait_for_readers() -> None:
    """Return once every program run that started before the call has ended. cgroup
    programs run inside an RCU read-side section, and an update of a map-in-map waits for
    every running BPF program to end before it returns (kernel/bpf/syscall.c
    maybe_wait_bpf_programs: synchronize_rcu), on any number of CPUs, nohz_full or not.
    membarrier(MEMBARRIER_CMD_GLOBAL) is no such wait: with one CPU online it returns at
    once, while a preemptible kernel may have a program preempted in the middle of a run."""
    with (
        Map.create(MapType.ARRAY, U32.size, U32.size, 1, name="cgp_rcu_inner") as inner,
        Map.create(
            MapType.ARRAY_OF_MAPS, U32.size, U32.size, 1, name="cgp_rcu", inner_map_fd=inner.fd
        ) as outer,
    ):
        outer.update(_ZERO, U32.pack(inner.fd))


def fits(map_type: str, max_entries: int, active: int, wanted: int) -> bool:
    """Whether a two-copy map can take a copy of ``wanted`` entries beside one of ``active``
    (with drops first), and then that copy twice: a hash's copies share max_entries;
    an array's copies each have their own slots."""
    if map_type == "array":
        return True
    return active + wanted <= max_entries and 2 * wanted <= max_entries
