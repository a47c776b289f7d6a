"""Compile once per machine, load many: bcc compiles each C file in ``bpf/`` once, the
result is kept in the compiled-program store (``store``), and every program instance gets
fresh maps made here and a PROG_LOAD of the already compiled instructions.

bcc's own loading ties a program to the maps bcc created for that compile, so 100 policies
would mean 100 clang runs (~0.3 s each). Instead, the instructions of every function are
taken once with ``BPF.dump_func``; in them every map reference is an ``ld_imm64`` whose
``imm`` is the fd of bcc's *template* map, recorded as a relocation. A load creates the maps
its MapSpecs describe, writes their fds at the relocations and loads the result: a few
milliseconds plus the map fill.

Subprograms (contract.SUBPROGRAMS): bcc compiles no call between its functions, so a
program calls one as a helper number; :func:`link` appends the function and makes that a
BPF-to-BPF call, and the load gives the kernel BTF that declares the subprograms global
functions (cgpolicy/kernel/btf.py), which the verifier checks once each.

Only this module imports bcc, and only when the store lacks what a load needs.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import tempfile
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from cgpolicy.compiler.spec import MapSpec, ProgramSpec
from cgpolicy.contract import SUBPROGRAM_ARGS, SUBPROGRAM_BASE, SUBPROGRAMS, attach_hook
from cgpolicy.kernel.bpf import Btf, Map, Program, close_all
from cgpolicy.kernel.btf import func_btf
from cgpolicy.kernel.hooks import hook
from cgpolicy.kernel.store import (
    CompiledFile,
    CompiledFunction,
    CompiledStore,
    MapTemplate,
    StoreError,
    entry_key,
    store_dir,
)
from cgpolicy.kernel.syscall import MAP_TYPES, ProgramInfo, map_info

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parents[2] / "bpf"

_LD_IMM64 = 0x18  # BPF_LD | BPF_IMM | BPF_DW: a 16-byte instruction
_PSEUDO_MAP_FD = 1  # src_reg: imm is a map fd
_PSEUDO_MAP_VALUE = 2  # src_reg: imm is a map fd, the next imm an offset into its value
_CALL = 0x85  # BPF_JMP | BPF_CALL: src_reg 0 calls the helper number imm
_PSEUDO_CALL = 1  # src_reg: imm is the called function's first instruction - (this one + 1)
_INSN = struct.Struct("<BBhi")  # opcode, dst_reg | src_reg << 4, off, imm


class LoaderError(Exception):
    """A C source does not compile, or a ProgramSpec does not fit the compiled code."""


@dataclass
class LoadedProgram:
    """A program instance and the maps only it uses; closing it closes them all.

    Pinning or attaching keeps the kernel objects alive after close().
    """

    spec: ProgramSpec
    program: Program
    maps: dict[str, Map]

    @property
    def fd(self) -> int:
        return self.program.fd

    def info(self) -> ProgramInfo:
        return self.program.info()

    def close(self) -> None:
        close_all([self.program, *self.maps.values()])

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class LinkedFunction:
    """A function with the subprograms it calls (contract.SUBPROGRAMS) appended, each once,
    and its calls of them made BPF-to-BPF calls: what PROG_LOAD takes."""

    code: CompiledFunction  # the instructions of all; relocations and templates of all
    subprograms: tuple[tuple[int, str], ...] = ()  # (first instruction, name), in order

    def btf(self) -> tuple[bytes, list[tuple[int, int]]]:
        """The BTF that makes the subprograms global functions, and the func_info records
        (first instruction, FUNC type id) of the main function and each subprogram."""
        blob, type_ids = func_btf(
            self.code.function, [name for _, name in self.subprograms], SUBPROGRAM_ARGS.size
        )
        starts = [0, *(start for start, _ in self.subprograms)]
        return blob, list(zip(starts, type_ids, strict=True))


_lock = threading.Lock()
_compiled: dict[tuple[str, bytes, tuple[str, ...]], CompiledFile] = {}
_linked: dict[tuple[int, str], LinkedFunction] = {}  # by id() of a CompiledFile in _compiled


def compile_function(source: Path, function: str, cflags: Sequence[str] = ()) -> CompiledFunction:
    """The compiled instructions of ``function`` in ``source``, its subprograms linked."""
    return link_function(source, function, cflags).code


def link_function(source: Path, function: str, cflags: Sequence[str] = ()) -> LinkedFunction:
    """``function`` of ``source`` with its subprograms (:func:`link`), once per process."""
    compiled = compile_file(source, cflags)
    key = (id(compiled), function)
    with _lock:
        linked = _linked.get(key)
    if linked is None:
        linked = link(compiled, function, source)
        with _lock:
            _linked[key] = linked
    return linked


def link(compiled: CompiledFile, function: str, source: Path) -> LinkedFunction:
    """Append each subprogram ``function`` calls (a call of the helper number
    SUBPROGRAM_BASE + i calls SUBPROGRAMS[i]), and those they call, once each, and turn
    every such call into a BPF-to-BPF call of the appended copy."""
    main = compiled.get(function)
    if main is None:
        raise LoaderError(f"{source} has no BPF function {function!r}")
    insns = bytearray(main.insns)
    relocations = list(main.relocations)
    templates = dict(main.templates)
    parts = [(0, main)]  # (first instruction, function)
    starts: dict[str, int] = {function: 0}
    for first, part in parts:  # grows while it runs: a subprogram may call another
        index = first
        while index < first + len(part.insns) // 8:
            opcode, regs, _, imm = _INSN.unpack_from(insns, index * 8)
            number = imm - SUBPROGRAM_BASE
            if opcode == _CALL and regs >> 4 == 0 and 0 <= number < len(SUBPROGRAMS):
                name = SUBPROGRAMS[number]
                if name not in starts:
                    callee = compiled.get(name)
                    if callee is None:
                        raise LoaderError(
                            f"{source}:{part.function}: calls subprogram {name}, which is "
                            "not a function of the file"
                        )
                    starts[name] = len(insns) // 8
                    parts.append((starts[name], callee))
                    relocations += [(starts[name] * 8 + o, m) for o, m in callee.relocations]
                    templates |= callee.templates
                    insns += callee.insns
                _INSN.pack_into(
                    insns, index * 8, _CALL, _PSEUDO_CALL << 4, 0, starts[name] - index - 1
                )
            index += 2 if opcode == _LD_IMM64 else 1
    code = CompiledFunction(
        main.source, function, bytes(insns), tuple(relocations), dict(sorted(templates.items()))
    )
    return LinkedFunction(code, tuple((start, part.function) for start, part in parts[1:]))


def compile_file(source: Path, cflags: Sequence[str] = ()) -> CompiledFile:
    """Every function of ``source``: from this process's memory, else (for the shipped
    programs in ``bpf/``) from the compiled-program store, else compiled by bcc, and then
    stored. An edited file is a new key, so it compiles again."""
    try:
        text = source.read_bytes()
    except OSError as error:
        raise LoaderError(f"cannot read BPF source {source}: {error.strerror}") from None
    memo_key = (str(source), text, tuple(cflags))
    with _lock:
        compiled = _compiled.get(memo_key)
        if compiled is None:
            compiled = _compiled[memo_key] = _from_store_or_bcc(source, cflags)
    return compiled


def fill_store(cflags: Sequence[str] = ()) -> dict[str, str]:
    """Make sure the store holds every shipped C file: name -> "kept" or "compiled"."""
    store = CompiledStore(store_dir())
    outcome = {}
    for source in sorted(SOURCE_DIR.glob("*.c")):
        key = _key(source, cflags)
        if _load_entry(store, source, key) is not None:
            outcome[source.name] = "kept"
            continue
        _save_if_unchanged(store, source, cflags, key, _bcc_compile_file(source, cflags))
        outcome[source.name] = "compiled"
    return outcome


def check_store(cflags: Sequence[str] = ()) -> dict[str, bool]:
    """Whether the store holds a valid, current entry for each shipped C file."""
    store = CompiledStore(store_dir())
    return {
        source.name: _load_entry(store, source, _key(source, cflags)) is not None
        for source in sorted(SOURCE_DIR.glob("*.c"))
    }


def _key(source: Path, cflags: Sequence[str]) -> dict[str, Any]:
    try:
        return entry_key(source, cflags)
    except OSError as error:
        raise LoaderError(str(error.strerror)) from None


def _load_entry(store: CompiledStore, source: Path, key: dict[str, Any]) -> CompiledFile | None:
    try:
        return store.load(source, key)
    except StoreError as error:
        raise LoaderError(str(error)) from None


def _save_entry(
    store: CompiledStore, source: Path, key: dict[str, Any], compiled: CompiledFile
) -> None:
    try:
        store.save(source, key, compiled)
    except StoreError as error:
        raise LoaderError(str(error)) from None
    except OSError as error:  # a read-only store (an image's): still usable, only slower
        log.warning(
            "compiled-program store %s: cannot save %s (%s)",
            store.path,
            source.name,
            error.strerror,
        )


def _from_store_or_bcc(source: Path, cflags: Sequence[str]) -> CompiledFile:
    if source.parent.resolve() != SOURCE_DIR:
        return _bcc_compile_file(source, cflags)  # not a shipped program: never stored
    store = CompiledStore(store_dir())
    key = _key(source, cflags)
    compiled = _load_entry(store, source, key)
    if compiled is None:
        log.info("compiling %s with bcc (not in the store %s)", source.name, store.path)
        compiled = _bcc_compile_file(source, cflags)
        _save_if_unchanged(store, source, cflags, key, compiled)
    return compiled


def _save_if_unchanged(
    store: CompiledStore,
    source: Path,
    cflags: Sequence[str],
    key: dict[str, Any],
    compiled: CompiledFile,
) -> None:
    """Store what bcc made only if nothing it read changed while it compiled (a checkout,
    an update, an editor's save): else new code would be kept under the old text's key."""
    if _key(source, cflags) != key:
        log.warning("%s changed while it compiled; not stored, compiled again next time", source)
        return
    _save_entry(store, source, key, compiled)


@dataclass
class PreparedProgram:
    """A program instance before PROG_LOAD: its maps made, its instructions pointing at
    them, and what to fill them with (:func:`prepare_program`)."""

    spec: ProgramSpec
    maps: dict[str, Map]
    insns: bytes
    linked: LinkedFunction | None = None  # the code's subprograms, if any

    def fill(self) -> None:
        """Write every map's entries from its spec (a two-copy map's copy 0, in force).
        The verifier does not read map contents, so this may run while it walks."""
        for map_spec in self.spec.maps:
            if map_spec.name in self.maps:
                self.maps[map_spec.name].update_batch(map_spec.entries)

    def load(self) -> LoadedProgram:
        """PROG_LOAD with the hook's program type and expected attach type; the maps are
        the LoadedProgram's from here (closed with it). On failure the caller closes them:
        another thread may still be filling them."""
        target = hook(attach_hook(self.spec.hook))
        if self.linked is None or not self.linked.subprograms:
            program = Program.load(
                target.prog_type, self.insns, self.spec.prog_name, target.attach_type
            )
            return LoadedProgram(self.spec, program, self.maps)
        blob, func_info = self.linked.btf()
        with Btf.load(blob) as btf:  # the program keeps its own reference
            program = Program.load(
                target.prog_type,
                self.insns,
                self.spec.prog_name,
                target.attach_type,
                btf=btf,
                func_info=func_info,
            )
        return LoadedProgram(self.spec, program, self.maps)


def prepare_program(
    spec: ProgramSpec,
    source_dir: Path = SOURCE_DIR,
    cflags: Sequence[str] = (),
    shared_maps: Mapping[str, Map] | None = None,
) -> PreparedProgram:
    """Fresh maps for one instance of ``spec``, empty, and its instructions with their fds
    (:meth:`PreparedProgram.fill` fills the maps). On failure nothing stays open.

    ``shared_maps`` (by map name) are maps the caller created and keeps, used instead of
    creating those from the spec: several programs of one policy share one ring buffer
    this way. They must match their MapSpec's type and sizes; they are not filled from the
    spec, not part of ``LoadedProgram.maps`` and not closed with the program."""
    linked = link_function(source_dir / spec.source, spec.function, cflags)
    compiled = linked.code
    _check_maps(spec, compiled)
    shared = dict(shared_maps or {})
    maps: dict[str, Map] = {}
    try:
        for map_spec in spec.maps:
            if map_spec.name in shared:
                _check_shared(spec, map_spec, shared[map_spec.name])
                continue
            maps[map_spec.name] = create_map(map_spec)
        by_name = {**maps, **{n: m for n, m in shared.items() if n in compiled.templates}}
        insns = bytearray(compiled.insns)
        for offset, name in compiled.relocations:
            struct.pack_into("<i", insns, offset + 4, by_name[name].fd)
    except BaseException:
        close_all(maps.values())
        raise
    return PreparedProgram(spec, maps, bytes(insns), linked)


def load_program(
    spec: ProgramSpec,
    source_dir: Path = SOURCE_DIR,
    cflags: Sequence[str] = (),
    shared_maps: Mapping[str, Map] | None = None,
) -> LoadedProgram:
    """Load one instance of ``spec``: :func:`prepare_program`, fill, then PROG_LOAD."""
    prepared = prepare_program(spec, source_dir, cflags, shared_maps)
    try:
        prepared.fill()
        return prepared.load()
    except BaseException:
        close_all(prepared.maps.values())
        raise


def load_prepared(prepared: Sequence[PreparedProgram]) -> list[LoadedProgram]:
    """Fill every prepared program's maps and PROG_LOAD them all at once: the loads on
    threads (one each up to the CPUs: the verifier's walk is most of a load and runs on
    the calling thread's CPU, the longest programs first, so that the threads end
    together), the fills on this one meanwhile. All or nothing: on a failure every
    program and map is closed, and the first error raised."""
    with ThreadPoolExecutor(max(1, min(len(prepared), os.cpu_count() or 1))) as pool:
        longest_first = sorted(prepared, key=lambda p: len(p.insns), reverse=True)
        started = {id(p): pool.submit(p.load) for p in longest_first}
        futures = [started[id(p)] for p in prepared]
        try:
            for program in prepared:
                program.fill()
        except BaseException as error:  # after the loads: then close everything
            filled: BaseException | None = error
        else:
            filled = None
    loaded = [f.result() for f in futures if f.exception() is None]
    failed = [f.exception() for f in futures if f.exception() is not None]
    if failed or filled is not None:
        for done in loaded:
            done.close()
        for program in prepared:
            close_all(program.maps.values())
        raise failed[0] if failed else filled  # type: ignore[misc]
    return loaded


def create_map(spec: MapSpec) -> Map:
    """An empty map as ``spec`` describes it (not filled)."""
    try:
        map_type = MAP_TYPES[spec.map_type]
    except KeyError:
        known = ", ".join(MAP_TYPES)
        raise LoaderError(
            f"map {spec.name}: unknown map_type {spec.map_type!r} ({known})"
        ) from None
    return Map.create(
        map_type, spec.key_size, spec.value_size, spec.max_entries, spec.flags, spec.name[:15]
    )


def _check_shared(spec: ProgramSpec, map_spec: MapSpec, given: Map) -> None:
    info = given.info
    expected = (MAP_TYPES.get(map_spec.map_type), map_spec.key_size, map_spec.value_size)
    actual = (info.type, info.key_size, info.value_size)
    if actual != expected or info.max_entries != map_spec.max_entries:
        raise LoaderError(
            f"program {spec.prog_name}: shared map {map_spec.name} is (type {info.type}, key "
            f"{info.key_size} B, value {info.value_size} B, max {info.max_entries}) but the "
            f"spec says ({map_spec.map_type}, key {map_spec.key_size} B, value "
            f"{map_spec.value_size} B, max {map_spec.max_entries})"
        )


def _check_maps(spec: ProgramSpec, compiled: CompiledFunction) -> None:
    """Refuse a spec whose maps differ from the ones the code uses, or whose layout differs
    from the C declaration: the verifier would not notice a smaller key, the program would
    just read garbage."""
    where = f"program {spec.prog_name} ({spec.source}:{spec.function})"
    given = {m.name: m for m in spec.maps}
    missing = sorted(set(compiled.templates) - set(given))
    extra = sorted(set(given) - set(compiled.templates))
    if missing:
        raise LoaderError(f"{where}: the code uses maps the spec does not give: {missing}")
    if extra:
        raise LoaderError(f"{where}: the spec gives maps the code does not use: {extra}")
    for name, template in compiled.templates.items():
        m = given[name]
        expected = (template.type, template.key_size, template.value_size)
        actual = (MAP_TYPES.get(m.map_type), m.key_size, m.value_size)
        if actual != expected:
            raise LoaderError(
                f"{where}: map {name} is declared in C as (type {expected[0]}, key "
                f"{expected[1]} B, value {expected[2]} B) but the spec says ({m.map_type}, "
                f"key {m.key_size} B, value {m.value_size} B)"
            )


def _bcc_compile_file(source: Path, cflags: Sequence[str]) -> CompiledFile:
    """Compile with bcc and take every function's instructions and relocations. Only here
    is bcc (and with it LLVM) imported."""
    import bcc  # heavy, and needs kernel headers: imported only to compile
    from bcc.libbcc import lib

    module = _bcc_module(bcc, source, cflags)
    try:
        return _take_functions(lib, module, source)
    finally:
        module.cleanup()


def _take_functions(lib: Any, module: Any, source: Path) -> CompiledFile:
    lib.bpf_num_tables.restype = ctypes.c_ulonglong
    lib.bpf_num_tables.argtypes = [ctypes.c_void_p]
    lib.bpf_table_name.restype = ctypes.c_char_p
    lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_ulonglong]
    lib.bpf_table_fd_id.restype = ctypes.c_int
    lib.bpf_table_fd_id.argtypes = [ctypes.c_void_p, ctypes.c_ulonglong]
    handle = module.module
    template_names = {
        lib.bpf_table_fd_id(handle, i): lib.bpf_table_name(handle, i).decode()
        for i in range(lib.bpf_num_tables(handle))
    }
    functions = [
        lib.bpf_function_name(handle, i).decode() for i in range(lib.bpf_num_functions(handle))
    ]
    return {
        name: _extract(source, name, module.dump_func(name.encode()), template_names)
        for name in functions
    }


def _bcc_module(bcc: Any, source: Path, cflags: Sequence[str]) -> Any:
    """Compile with bcc, capturing clang's diagnostics (printed on fd 2) for the error."""
    with tempfile.TemporaryFile() as captured:
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            text = source.read_bytes()
            return bcc.BPF(text=text, cflags=[f"-I{source.parent}", *cflags])
        except Exception as error:
            os.dup2(saved, 2)
            captured.seek(0)
            diagnostics = captured.read().decode(errors="replace").strip()
            diagnostics = diagnostics.replace("/virtual/main.c", str(source))
            raise LoaderError(f"bcc cannot compile {source}: {error}\n{diagnostics}") from None
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _extract(
    source: Path, function: str, insns: bytes, template_names: Mapping[int, str]
) -> CompiledFunction:
    """Find every map load in ``insns`` and the map it names (by bcc's template fd)."""
    relocations = []
    offset = 0
    while offset < len(insns):
        opcode, regs, _, imm = struct.unpack_from("<BBhi", insns, offset)
        if opcode == _LD_IMM64:
            if (regs >> 4) in (_PSEUDO_MAP_FD, _PSEUDO_MAP_VALUE):
                name = template_names.get(imm)
                if name is None:
                    raise LoaderError(
                        f"{source}:{function}: instruction {offset // 8} names map fd {imm}, "
                        "which is not one of bcc's maps for this file"
                    )
                relocations.append((offset, name))
            offset += 8  # the second half of the 16-byte instruction
        offset += 8
    fds = {name: fd for fd, name in template_names.items()}
    templates = {}
    for name in sorted({name for _, name in relocations}):
        info = map_info(fds[name])
        templates[name] = MapTemplate(
            info.type, info.key_size, info.value_size, info.max_entries, info.flags
        )
    return CompiledFunction(source, function, bytes(insns), tuple(relocations), templates)
