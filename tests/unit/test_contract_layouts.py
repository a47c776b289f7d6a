"""cgpolicy/contract.py agrees with itself: each layout's offsets, sizes and padding with its
struct.Struct, and the hook table with the kernel's hooks and bpf/. (That the C agrees is
tests/kernel/test_contract.py's.)"""

from __future__ import annotations

import itertools
import re
import struct
from typing import Any

import pytest

from cgpolicy import contract
from cgpolicy.contract import Field, Layout
from cgpolicy.kernel.hooks import HOOKS
from cgpolicy.kernel.loader import SOURCE_DIR

LAYOUTS = pytest.mark.parametrize("layout", contract.LAYOUTS, ids=lambda x: x.c_name)


def _padding(layout: Layout) -> int:
    return sum(int(n or 1) for n in re.findall(r"(\d*)x", layout.struct.format))


@LAYOUTS
def test_members_are_in_order_aligned_and_padded_as_c_does(layout: Layout) -> None:
    end = 0
    for field in layout.fields.values():
        assert field.offset >= end, field
        assert field.offset % field.align == 0, field
        assert field.offset - end < field.align, f"{field}: more padding than alignment needs"
        end = field.offset + field.size
    assert layout.size % layout.align == 0
    assert 0 <= layout.size - end < layout.align
    assert layout.align == (1 if layout.packed else max(f.align for f in layout.fields.values()))
    assert layout.struct.size == layout.size
    assert sum(f.size for f in layout.fields.values()) + _padding(layout) == layout.size


def _sample(layout: Layout, numbers: Any) -> dict[str, Any]:
    """Distinct values for every member (each number fits the smallest member)."""
    values: dict[str, Any] = {}
    for field in layout.fields.values():
        nested = field.layout
        if nested is not None:
            items = [_sample(nested, numbers) for _ in range(field.count or 1)]
            values[field.name] = items if field.count else items[0]
        elif field.is_bytes:
            values[field.name] = bytes(next(numbers) for _ in range(field.count))
        elif field.count:
            values[field.name] = [next(numbers) for _ in range(field.count)]
        else:
            values[field.name] = next(numbers)
    return values


def _alone(field: Field, value: Any) -> bytes:
    """The member's bytes, packed on its own."""
    if field.layout is not None:
        items = value if field.count else [value]
        return b"".join(field.layout.pack(**item) for item in items)
    if field.count and not field.is_bytes:
        return struct.pack("<" + field.format, *value)
    return struct.pack("<" + field.format, value)


@LAYOUTS
def test_each_member_lands_at_its_offset_and_padding_stays_zero(layout: Layout) -> None:
    values = _sample(layout, itertools.cycle(range(1, 251)))
    packed = layout.pack(**values)
    covered = bytearray(len(packed))
    for field in layout.fields.values():
        span = slice(field.offset, field.offset + field.size)
        assert packed[span] == _alone(field, values[field.name]), field
        covered[span] = b"\1" * field.size
    assert all(byte == 0 for byte, used in zip(packed, covered, strict=True) if not used)
    unpacked = layout.unpack_from(packed)
    assert layout.pack(**unpacked) == packed
    assert unpacked.keys() == layout.fields.keys()


def test_layouts_know_their_c_shapes() -> None:
    rules = contract.DEVICE_CONFIG.fields["rules"]
    assert (rules.c_declared_type, rules.offset, rules.size) == (
        "struct cgp_dev_rule[64]",
        32,
        1536,
    )
    assert contract.SYSCTL_CONFIG.struct.format.endswith("256s4x")  # trailing padding
    assert contract.PORT_HI.size == 16
    assert contract.EVENT.fields["comm"].c_declared_type == "char[16]"


def test_pack_takes_every_member_by_name_and_nothing_else() -> None:
    with pytest.raises(ValueError, match=r"missing \['limit'\]"):
        contract.RATELIMIT.pack(window_start=0, dropped=0, sent=0)
    with pytest.raises(ValueError, match=r"unknown \['extra'\]"):
        contract.RATELIMIT.pack(window_start=0, dropped=0, sent=0, limit=1, extra=2)
    verdict = dict.fromkeys(contract.VERDICT.fields, 0)
    with pytest.raises(ValueError, match=r"proto: 4 values for __u64\[5\]"):
        others = dict.fromkeys(set(contract.NET_CONFIG.fields) - {"v", "proto"}, 0)
        contract.NET_CONFIG.pack(v=verdict, proto=[0] * 4, **others)


def test_hook_table() -> None:
    programs = contract.HOOK_PROGRAMS
    assert set(programs) <= set(HOOKS)  # bpftool's names, known to the kernel layer
    assert len(contract.EVENT_HOOKS) == len(programs)  # event codes are unique
    listed = [hook for hooks in contract.SECTION_HOOKS.values() for hook in hooks]
    assert sorted(listed) == sorted(programs)
    for hook, program in programs.items():
        assert hook == program.hook
        assert (SOURCE_DIR / program.source).is_file()
        assert program.function.startswith("cgp_") and len(program.function) <= 15
    assert set(contract.PACKET_HOOKS) | set(contract.SOCKET_ADDRESS_HOOKS) < set(programs)


def test_constants() -> None:
    assert contract.DEFAULT_SLOT == contract.COUNTER_SLOTS - 1 == contract.MAX_RULES
    assert len(contract.PROTO_SLOTS) == contract.NET_CONFIG.fields["proto"].count
    assert contract.PROTO_SLOTS[-1] == "other"
    assert contract.DEVICE_TYPE_NEVER not in contract.DEVICE_TYPES.values()
    assert contract.EVENT.fields["name"].count == contract.EVENT_NAME_MAX
