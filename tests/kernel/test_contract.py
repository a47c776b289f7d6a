"""cgpolicy/contract.py against what the C compiler makes of bpf/common.h.

Every struct layout and constant of the contract becomes a ``_Static_assert`` (member
offsets, sizes and types, struct sizes and alignments, constant values) in a translation
unit that includes bpf/common.h, compiled by bcc exactly as the programs are
(cgpolicy.kernel.loader). A mismatch fails the compile, and the test names every struct
member or constant that differs. Runs with the kernel tests: bcc needs root and kernel
headers; under CI a host without them fails (tests/kernel/conftest.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

from cgpolicy import contract
from cgpolicy.contract import Layout
from cgpolicy.kernel.hooks import hook
from cgpolicy.kernel.loader import SOURCE_DIR, LoaderError, compile_file

_WHERE = "in cgpolicy/contract.py"
_MESSAGE = re.compile(r"error: static.*?(contract: [^\"\n]*)")


def _assertions(layouts: Iterable[Layout], constants: Mapping[str, int]) -> list[str]:
    """One ``_Static_assert`` per fact of the contract, its message naming the fact."""
    lines = []
    for layout in layouts:
        c_type = f"struct {layout.c_name}"
        for field in layout.fields.values():
            member = f"(({c_type} *)0)->{field.name}"
            what = f"contract: {c_type}.{field.name}"
            lines += [
                f"_Static_assert(offsetof({c_type}, {field.name}) == {field.offset}, "
                f'"{what} is at offset {field.offset} {_WHERE}");',
                f'_Static_assert(sizeof({member}) == {field.size}, "{what} has size {field.size} '
                f'{_WHERE}");',
                f"_Static_assert(__builtin_types_compatible_p(__typeof__({member}), "
                f'{field.c_declared_type}), "{what} is {field.c_declared_type} {_WHERE}");',
            ]
        what = f"contract: {c_type}"
        lines += [
            f'_Static_assert(sizeof({c_type}) == {layout.size}, "{what} has size {layout.size} '
            f'{_WHERE}");',
            f'_Static_assert(_Alignof({c_type}) == {layout.align}, "{what} has alignment '
            f'{layout.align} {_WHERE}");',
        ]
    for name, value in constants.items():
        lines.append(f'_Static_assert({name} == {value}, "contract: {name} is {value} {_WHERE}");')
    return lines


def _mismatches(tmp_path: Path, assertions: list[str]) -> list[str]:
    """What the compiler refuses of ``assertions`` over bpf/common.h: the messages of the
    failed assertions (any other compile error fails the test with bcc's diagnostics)."""
    unit = tmp_path / "contract_check.c"
    unit.write_text('#include "common.h"\n\n' + "\n".join(assertions) + "\n")
    try:
        compile_file(unit, [f"-I{SOURCE_DIR}", "-ferror-limit=0"])
    except LoaderError as error:
        found = list(dict.fromkeys(_MESSAGE.findall(str(error))))
        if not found:
            pytest.fail(f"the contract check does not compile:\n{error}", pytrace=False)
        return found
    return []


def test_the_c_structs_and_constants_are_the_contract(tmp_path: Path) -> None:
    assertions = _assertions(contract.LAYOUTS, contract.C_CONSTANTS)
    fields = sum(len(layout.fields) for layout in contract.LAYOUTS)
    assert len(assertions) == 3 * fields + 2 * len(contract.LAYOUTS) + len(contract.C_CONSTANTS)
    mismatches = _mismatches(tmp_path, assertions)
    if mismatches:
        pytest.fail(
            "bpf/common.h and cgpolicy/contract.py disagree:\n  " + "\n  ".join(mismatches),
            pytrace=False,
        )


def test_the_check_names_a_reordered_member(tmp_path: Path) -> None:
    """The check itself can fail: a ratelimit layout with its first two members swapped, and
    a wrong constant, are refused by name."""
    swapped = Layout(
        "cgp_ratelimit",
        ("dropped", "__u64"),
        ("window_start", "__u64"),
        ("sent", "__u32"),
        ("limit", "__u32"),
    )
    mismatches = _mismatches(tmp_path, _assertions([swapped], {"CGP_MAX_RULES": 63}))
    assert mismatches == [
        f"contract: struct cgp_ratelimit.dropped is at offset 0 {_WHERE}",
        f"contract: struct cgp_ratelimit.window_start is at offset 8 {_WHERE}",
        f"contract: CGP_MAX_RULES is 63 {_WHERE}",
    ]


def test_every_hook_program_is_a_function_of_its_source() -> None:
    for program in contract.HOOK_PROGRAMS.values():
        assert program.function in compile_file(SOURCE_DIR / program.source), program
        assert hook(program.hook).name == program.hook


def test_every_variant_the_compiler_may_pick_is_a_function_of_net_c() -> None:
    """The names variant and the variants by the families a section lists prefixes of
    (contract.family_variant) of every net.c program, the connect checks included."""
    compiled = compile_file(SOURCE_DIR / "net.c")
    functions = [p.function for p in contract.HOOK_PROGRAMS.values() if p.source == "net.c"]
    functions += [check.function for check in contract.EGRESS_AT_CONNECT.values()]
    for function in functions:
        assert contract.names_variant(function) in compiled, function
        for ipv4 in (False, True):
            for ipv6 in (False, True):
                variant = contract.family_variant(function, ipv4, ipv6)
                assert variant in compiled, variant
