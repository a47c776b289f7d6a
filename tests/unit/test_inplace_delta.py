"""The pure parts of changes in place: where a copy's entries go, the delta, and when
copy 1 of a load is filled."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cgpolicy.compiler.compile import compile_policy
from cgpolicy.contract import U32, copy_key
from cgpolicy.enforcer import inplace
from cgpolicy.kernel.inplace import delta, fits
from cgpolicy.policy.validate import load_contents


def test_copy_key_places_each_copy_apart() -> None:
    """The two ways bpf/net.c tells the copies apart."""
    assert copy_key("array", 2 * 65536, U32.pack(7), 1) == U32.pack(65536 + 7)
    assert copy_key("array", 2 * 65536, U32.pack(7), 0) == U32.pack(7)
    assert copy_key("hash", 100, b"\x01" * 8 + U32.pack(0), 1) == b"\x01" * 8 + U32.pack(1)
    with pytest.raises(ValueError):
        copy_key("lpm_trie", 100, bytes(10), 1)  # no rule map is a trie


ENTRIES = st.dictionaries(st.binary(min_size=1, max_size=3), st.binary(min_size=1, max_size=2))


@given(ENTRIES, ENTRIES)
def test_delta_turns_one_contents_into_the_other(old: dict, new: dict) -> None:
    change = delta(tuple(old.items()), tuple(new.items()))
    result = dict(old)
    for key in change.drop:
        del result[key]
    result.update(change.write)
    assert result == new
    # proportional: only what differs is written or dropped
    assert len(change.write) == sum(1 for k, v in new.items() if old.get(k) != v)
    assert set(change.drop) == old.keys() - new.keys()


def test_a_copy_fits_beside_the_other() -> None:
    assert fits("lpm_trie", 10, 5, 5) and not fits("lpm_trie", 10, 4, 6)
    assert not fits("hash", 10, 2, 6)  # the other copy, brought level, would not fit
    assert fits("array", 2, 100, 100)  # an array's copies have their own slots


def test_copy_one_of_a_load_is_filled_once_the_pass_is_over(monkeypatch) -> None:
    """InPlace.remember leaves copy 1 to start_filling (called when a pass is over); a
    change before then starts that load's fill, alone, and waits for it."""
    filled: list[str] = []
    monkeypatch.setattr(inplace, "_fill_copy_1", lambda load: filled.append(load.compiled.name))
    loads = inplace.InPlace()
    for name in ("first", "second", "third"):
        (policy,) = load_contents([(f"{name}.yaml", _policy(name))]).policies
        loads.remember(compile_policy(policy), {})
    loads.forget("third")
    assert filled == []
    assert loads._level_load("first") is not None  # a change of it: its fill, waited for
    assert filled == ["first"]
    loads.start_filling()
    second = loads._level_load("second")
    assert second is not None and second.leveling is None
    assert sorted(filled) == ["first", "second"]  # never the forgotten one


def _policy(name: str) -> bytes:
    return (
        f"apiVersion: cgpolicy.dev/v1\nkind: CgroupPolicy\nmetadata: {{name: {name}}}\n"
        "spec:\n  targets: [{path: x}]\n  network:\n    egress:\n      default: deny\n"
        "      rules: [{action: allow, cidrs: [10.0.0.0/8]}]\n"
    ).encode()
