"""Linking subprograms into a program (cgpolicy/kernel/loader.py link) and the BTF that makes
them global functions (cgpolicy/kernel/btf.py), on made-up instructions. That the kernel
takes the result, and that the programs decide as before, is tested on the kernel
(tests/kernel/test_subprograms_kernel.py, tests/kernel/test_differential.py)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from cgpolicy.contract import SUBPROGRAM_ARGS, SUBPROGRAM_BASE, SUBPROGRAMS
from cgpolicy.kernel import loader
from cgpolicy.kernel.btf import func_btf
from cgpolicy.kernel.loader import LinkedFunction, LoaderError, link
from cgpolicy.kernel.store import CompiledFunction, MapTemplate

INSN = struct.Struct("<BBhi")
SOURCE = Path("net.c")
TEMPLATE = MapTemplate(2, 4, 8, 1, 0)


def insn(opcode: int, regs: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return INSN.pack(opcode, regs, off, imm)


def call_helper(number: int) -> bytes:
    return insn(0x85, imm=number)


def map_load(fd: int) -> bytes:  # ld_imm64 r1 = map fd: two slots
    return insn(0x18, 1 | 1 << 4, imm=fd) + insn(0)


EXIT = insn(0x95)
MOV0 = insn(0xB7)  # r0 = 0


def function(name: str, *code: bytes, maps: tuple[tuple[int, str], ...] = ()) -> CompiledFunction:
    insns = b"".join(code)
    templates = {m: TEMPLATE for _, m in maps}
    return CompiledFunction(SOURCE, name, insns, maps, templates)


def decoded(insns: bytes) -> list[tuple[int, int, int, int]]:
    return [INSN.unpack_from(insns, o) for o in range(0, len(insns), 8)]


def test_a_function_without_subprogram_calls_is_itself() -> None:
    main = function("main", call_helper(1), MOV0, EXIT)
    linked = link({"main": main}, "main", SOURCE)
    assert linked == LinkedFunction(main)


def test_a_subprogram_is_appended_once_and_each_call_points_at_it() -> None:
    walk = SUBPROGRAMS[0]
    main = function(
        "main",
        map_load(7),  # insns 0-1
        call_helper(SUBPROGRAM_BASE),  # 2
        call_helper(1),  # 3: a real helper stays as it is
        call_helper(SUBPROGRAM_BASE),  # 4
        EXIT,  # 5
        maps=((0, "config"),),
    )
    sub = function(walk, MOV0, map_load(9), EXIT, maps=((8, "cidr4_root"),))
    linked = link({"main": main, walk: sub}, "main", SOURCE)
    code = decoded(linked.code.insns)
    assert len(code) == 6 + 4
    assert linked.subprograms == ((6, walk),)
    assert code[2] == (0x85, 1 << 4, 0, 6 - 2 - 1)  # BPF_PSEUDO_CALL, relative to the next
    assert code[3] == (0x85, 0, 0, 1)
    assert code[4] == (0x85, 1 << 4, 0, 6 - 4 - 1)
    assert linked.code.insns[48:] == sub.insns
    assert linked.code.relocations == ((0, "config"), (56, "cidr4_root"))
    assert set(linked.code.templates) == {"config", "cidr4_root"}


def test_the_second_half_of_a_map_load_is_never_read_as_a_call() -> None:
    looks_like_a_call = insn(0x18, 0, imm=0) + call_helper(SUBPROGRAM_BASE)
    main = function("main", looks_like_a_call, EXIT)
    assert link({"main": main}, "main", SOURCE) == LinkedFunction(main)


def test_subprograms_called_by_subprograms_are_linked_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "SUBPROGRAMS", ("first", "second"))
    main = function("main", call_helper(SUBPROGRAM_BASE), EXIT)
    first = function("first", call_helper(SUBPROGRAM_BASE + 1), EXIT)
    second = function("second", MOV0, EXIT)
    files = {"main": main, "first": first, "second": second}
    linked = link(files, "main", SOURCE)
    assert linked.subprograms == ((2, "first"), (4, "second"))
    code = decoded(linked.code.insns)
    assert code[0] == (0x85, 1 << 4, 0, 1)
    assert code[2] == (0x85, 1 << 4, 0, 1)


def test_a_call_of_a_subprogram_the_file_lacks_is_refused() -> None:
    main = function("main", call_helper(SUBPROGRAM_BASE), EXIT)
    with pytest.raises(LoaderError, match=f"calls subprogram {SUBPROGRAMS[0]}"):
        link({"main": main}, "main", SOURCE)


def test_an_unknown_function_is_refused() -> None:
    with pytest.raises(LoaderError, match="no BPF function 'nope'"):
        link({}, "nope", SOURCE)


def test_func_info_names_the_main_function_then_each_subprogram() -> None:
    walk = SUBPROGRAMS[0]
    main = function("main", call_helper(SUBPROGRAM_BASE), EXIT)
    linked = link({"main": main, walk: function(walk, MOV0, EXIT)}, "main", SOURCE)
    blob, func_info = linked.btf()
    assert [start for start, _ in func_info] == [0, 2]
    expected, type_ids = func_btf("main", [walk], SUBPROGRAM_ARGS.size)
    assert blob == expected
    assert [type_id for _, type_id in func_info] == type_ids


def btf_types(blob: bytes) -> tuple[list[tuple[str, int, int, int]], bytes]:
    """(name, kind, vlen or linkage, size or type) of each type, and the strings."""
    magic, version, _, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
        "<HBBIIIII", blob
    )
    assert (magic, version, hdr_len) == (0xEB9F, 1, 24)
    strings = blob[hdr_len + str_off : hdr_len + str_off + str_len]
    types, at, end = [], hdr_len + type_off, hdr_len + type_off + type_len
    extra = {1: 4, 2: 0, 3: 12, 12: 0}  # bytes after the common part, by kind
    while at < end:
        name_off, info, size = struct.unpack_from("<III", blob, at)
        kind, vlen = info >> 24 & 0x1F, info & 0xFFFF
        name = strings[name_off : strings.index(b"\0", name_off)].decode()
        types.append((name, kind, vlen, size))
        at += 12 + (8 * vlen if kind == 13 else extra[kind])
    assert at == end
    return types, strings


def test_the_btf_declares_the_subprograms_global_and_the_main_function_static() -> None:
    blob, type_ids = func_btf("cgp_connect6", ["cgp_cidr_walk4"], 24)
    types, strings = btf_types(blob)
    funcs = {name: (vlen, types[proto - 1]) for name, kind, vlen, proto in types if kind == 12}
    assert funcs["cgp_connect6"][0] == 0  # static
    assert funcs["cgp_cidr_walk4"][0] == 1  # global: verified on its own
    assert [types[i - 1][0] for i in type_ids] == ["cgp_connect6", "cgp_cidr_walk4"]
    # the subprogram's prototype: __u64 f(__u64 (*args)[3]), a pointer to 24 bytes
    _, (_, kind, vlen, returns) = funcs["cgp_cidr_walk4"]
    assert (kind, vlen, types[returns - 1][:2]) == (13, 1, ("__u64", 1))
    assert b"\0args\0" in strings


def test_the_btf_refuses_arguments_that_are_not_whole_words() -> None:
    with pytest.raises(ValueError, match="not whole 8-byte words"):
        func_btf("main", ["sub"], 20)
