"""The BTF a program with subprograms needs: a FUNC for its main function and one for each
subprogram, the subprograms' linkage global. The verifier checks a global function once, on
its own, with unknown arguments of their declared types, instead of once per path of the
caller that reaches its call (cgpolicy/contract.py SUBPROGRAMS, bpf/net.c cgp_cidr_walk4).

bcc emits BTF, but for its own loads only; this is the little the kernel needs, made here
(the layout: include/uapi/linux/btf.h, Documentation/bpf/btf.rst). Pure: no I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

_MAGIC = 0xEB9F
_HEADER = struct.Struct("<HBBIIIII")  # magic, version, flags, hdr_len, type/str off and len
_TYPE = struct.Struct("<III")  # name_off, info (vlen | kind << 24 | kind_flag << 31), size/type
_U32 = struct.Struct("<I")
_ARRAY = struct.Struct("<III")  # element type, index type, count
_PARAM = struct.Struct("<II")  # name_off, type

_KIND_INT = 1
_KIND_PTR = 2
_KIND_ARRAY = 3
_KIND_FUNC = 12
_KIND_FUNC_PROTO = 13
_INT_SIGNED = 1
_LINKAGE_STATIC = 0
_LINKAGE_GLOBAL = 1

# The type ids of func_btf's fixed part, then one FUNC per function from _FIRST_FUNC on.
_U64, _INT, _VOID_PTR, _ARGS, _ARGS_PTR, _MAIN_PROTO, _SUB_PROTO = range(1, 8)
_FIRST_FUNC = 8


def func_btf(main: str, subprograms: Sequence[str], arg_bytes: int) -> tuple[bytes, list[int]]:
    """The BTF blob for a program whose main function is ``main`` (``int main(void *ctx)``)
    and whose subprograms, in the order they follow it, are each ``__u64 f(void *args)``
    with ``args`` pointing to ``arg_bytes`` bytes (whole 8-byte words), and the type id of
    each function's FUNC, main first (the func_info records' type ids)."""
    if arg_bytes <= 0 or arg_bytes % 8:
        raise ValueError(f"subprogram arguments of {arg_bytes} bytes: not whole 8-byte words")
    strings = bytearray(b"\0")

    def name(text: str) -> int:
        offset = len(strings)
        strings.extend(text.encode() + b"\0")
        return offset

    def info(kind: int, vlen: int = 0) -> int:
        return kind << 24 | vlen

    types = bytearray()
    types += _TYPE.pack(name("__u64"), info(_KIND_INT), 8) + _U32.pack(64)
    types += _TYPE.pack(name("int"), info(_KIND_INT), 4) + _U32.pack(_INT_SIGNED << 24 | 32)
    types += _TYPE.pack(0, info(_KIND_PTR), 0)  # void *
    types += _TYPE.pack(0, info(_KIND_ARRAY), 0) + _ARRAY.pack(_U64, _U64, arg_bytes // 8)
    types += _TYPE.pack(0, info(_KIND_PTR), _ARGS)
    types += _TYPE.pack(0, info(_KIND_FUNC_PROTO, 1), _INT) + _PARAM.pack(name("ctx"), _VOID_PTR)
    types += _TYPE.pack(0, info(_KIND_FUNC_PROTO, 1), _U64) + _PARAM.pack(name("args"), _ARGS_PTR)
    types += _TYPE.pack(name(main), info(_KIND_FUNC, _LINKAGE_STATIC), _MAIN_PROTO)
    for sub in subprograms:
        types += _TYPE.pack(name(sub), info(_KIND_FUNC, _LINKAGE_GLOBAL), _SUB_PROTO)
    header = _HEADER.pack(_MAGIC, 1, 0, _HEADER.size, 0, len(types), len(types), len(strings))
    ids = list(range(_FIRST_FUNC, _FIRST_FUNC + 1 + len(subprograms)))
    return header + bytes(types) + bytes(strings), ids
