"""The bpf() wrappers and the compile-once loader against the real kernel.

Everything attaches to the test's own scratch cgroup and pins under its own bpffs folder
(fixtures in conftest.py); nothing here touches another owner's programs.
"""

from __future__ import annotations

import errno
import os
import platform
import re
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from enforcement import cgroup_links

from cgpolicy.compiler.spec import MapSpec, ProgramSpec
from cgpolicy.kernel import cgroup, loader, syscall
from cgpolicy.kernel.bpf import CgroupLink, Map, Program, close_all
from cgpolicy.kernel.hooks import HOOKS
from cgpolicy.kernel.syscall import BPF_F_NO_PREALLOC, AttachType, BpfError, MapType, ProgType

EGRESS = AttachType.CGROUP_INET_EGRESS
RETURN_1 = bytes.fromhex("b7000000010000009500000000000000")  # r0 = 1; exit

SOURCE = """
struct key4 { u32 prefixlen; u32 addr; };
BPF_LPM_TRIE(allowed4, struct key4, u32, 1);
BPF_ARRAY(config, u64, 1);

/* Allow packets to addresses in allowed4, or all when config[0] is set. */
int by_address(struct __sk_buff *skb) {
    struct key4 key = {32, skb->remote_ip4};
    int zero = 0;
    u64 *all = config.lookup(&zero);
    if (all && *all)
        return 1;
    return allowed4.lookup(&key) ? 1 : 0;
}

int allow_all(struct __sk_buff *skb) { return 1; }
int deny_all(struct __sk_buff *skb) { return 0; }
"""


def key4(cidr: str) -> bytes:
    address, _, prefix = cidr.partition("/")
    return struct.pack("<I", int(prefix or 32)) + bytes(map(int, address.split(".")))


def u32(value: int) -> bytes:
    return struct.pack("<I", value)


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def ipv4_packet(dst: str) -> bytes:
    """Ethernet + minimal IPv4 header; cgroup_skb test runs read remote_ip4 from it."""
    ip = struct.pack(
        ">BBHHHBBH4s4s", 0x45, 0, 20, 0, 0, 64, 17, 0, bytes(4), bytes(map(int, dst.split(".")))
    )
    return bytes(12) + b"\x08\x00" + ip


@pytest.fixture
def source_dir(tmp_path: Path) -> Path:
    (tmp_path / "test.c").write_text(SOURCE)
    return tmp_path


def spec(
    function: str = "by_address",
    name: str = "cgp_test",
    allowed: tuple[str, ...] = (),
    allow_all: bool = False,
) -> ProgramSpec:
    maps: tuple[MapSpec, ...] = ()
    if function == "by_address":
        entries = tuple((key4(cidr), u32(1)) for cidr in allowed)
        maps = (
            MapSpec("allowed4", "lpm_trie", 8, 4, max(len(entries), 1), BPF_F_NO_PREALLOC, entries),
            MapSpec("config", "array", 4, 8, 1, 0, ((u32(0), u64(int(allow_all))),)),
        )
    return ProgramSpec("egress", "test.c", function, name, maps)


@pytest.fixture
def cgroup_fd(scratch_cgroup) -> Iterator[int]:
    fd = cgroup.open_cgroup(scratch_cgroup.path)
    yield fd
    os.close(fd)


# --- tables -----------------------------------------------------------------------------


def test_enum_numbers_match_the_uapi_header() -> None:
    # The UAPI header of the headers scripts/setup.sh links for this kernel.
    header = Path("/lib/modules", platform.release(), "source/include/uapi/linux/bpf.h")
    assert header.exists(), f"{header} missing: run scripts/setup.sh"
    text = re.sub(r"/\*.*?\*/", "", header.read_text(), flags=re.S)
    checked = 0
    for enum_name, cls, prefix in [
        ("bpf_cmd", syscall.Cmd, "BPF_"),
        ("bpf_map_type", MapType, "BPF_MAP_TYPE_"),
        ("bpf_prog_type", ProgType, "BPF_PROG_TYPE_"),
        ("bpf_attach_type", AttachType, "BPF_"),
        ("bpf_link_type", syscall.LinkType, "BPF_LINK_TYPE_"),
    ]:
        body = re.search(rf"enum {enum_name} {{(.*?)}};", text, re.S)
        assert body, enum_name
        values: dict[str, int] = {}
        number = 0
        for item in filter(None, (i.strip() for i in body.group(1).split(","))):
            name, _, explicit = (part.strip() for part in item.partition("="))
            if explicit:
                number = values[explicit] if explicit in values else int(explicit, 0)
            values[name] = number
            number += 1
        for member in cls:
            if prefix + member.name in values:  # newer than the header: not checkable here
                assert values[prefix + member.name] == member.value, member
                checked += 1
    assert checked > 50


def test_every_hook_loads_with_its_program_and_attach_type() -> None:
    version = tuple(int(x) for x in re.findall(r"\d+", platform.release())[:2])
    for hook in HOOKS.values():
        if hook.name.endswith("_unix") and version < (6, 7):
            continue
        with Program.load(hook.prog_type, RETURN_1, "cgp_hook", hook.attach_type) as program:
            assert program.info().type == hook.prog_type, hook


# --- maps -------------------------------------------------------------------------------


def test_map_update_lookup_delete_and_iterate() -> None:
    with Map.create(MapType.HASH, 4, 8, 16, name="cgp_t_hash") as m:
        m.update(u32(1), u64(10))
        m.update(u32(2), u64(20))
        assert m.lookup(u32(1)) == u64(10)
        assert m.lookup(u32(3)) is None
        assert dict(m.items()) == {u32(1): u64(10), u32(2): u64(20)}
        assert m.delete(u32(1)) and not m.delete(u32(1))
        assert list(m.keys()) == [u32(2)]
        with pytest.raises(BpfError) as refused:
            m.update(u32(2), u64(0), syscall.BPF_NOEXIST)
        assert refused.value.errno == errno.EEXIST
        assert "BPF_MAP_UPDATE_ELEM on map cgp_t_hash" in str(refused.value)
        assert m.info.name == "cgp_t_hash" and m.id > 0


def test_full_map_error_names_the_map() -> None:
    with Map.create(MapType.HASH, 4, 4, 1, name="cgp_t_small") as m:
        m.update(u32(1), u32(1))
        with pytest.raises(BpfError) as full:
            m.update(u32(2), u32(2))
    assert full.value.errno == errno.E2BIG and "cgp_t_small" in str(full.value)


def test_lpm_batch_fill_finds_the_longest_prefix() -> None:
    entries = [(key4(f"10.{i >> 8}.{i & 255}.0/24"), u32(i)) for i in range(20_000)]
    entries += [(key4("10.0.0.0/8"), u32(99_999)), (key4("10.0.5.7/32"), u32(7))]
    with Map.create(MapType.LPM_TRIE, 8, 4, 30_000, BPF_F_NO_PREALLOC, "cgp_t_lpm") as m:
        m.update_batch(entries)
        assert m.lookup(key4("10.0.5.7/32")) == u32(7)
        assert m.lookup(key4("10.0.5.8/32")) == u32(5)  # 10.0.5.0/24
        assert m.lookup(key4("10.200.0.1/32")) == u32(99_999)  # only 10/8
        assert m.lookup(key4("11.0.0.1/32")) is None
        assert sum(1 for _ in m.keys()) == len(entries)


def test_a_batch_of_wrong_sizes_is_refused_before_the_kernel_sees_it() -> None:
    """Sizes are checked for the whole batch at once; an entry of the wrong size is named
    and nothing is written, whatever its place."""
    with Map.create(MapType.ARRAY, 4, 8, 4, name="cgp_t_sizes") as m:
        for bad in ((u32(3)[:3], u64(1)), (u32(3), u32(1)), (u32(3) + b"\0", u64(1))):
            with pytest.raises(ValueError, match="cgp_t_sizes"):
                m.update_batch([(u32(0), u64(7)), bad, (u32(1), u64(7))])
        assert m.lookup(u32(0)) == u64(0)  # nothing written
        m.update_batch([(u32(0), u64(7)), (u32(1), u64(8))])
        assert (m.lookup(u32(0)), m.lookup(u32(1))) == (u64(7), u64(8))


def test_a_batch_fill_writes_a_per_cpu_value_to_every_cpu() -> None:
    with Map.create(MapType.PERCPU_ARRAY, 4, 8, 2, name="cgp_t_pbatch") as m:
        m.update_batch([(u32(0), u64(4)), (u32(1), u64(5))])
        slots = m.lookup_per_cpu(u32(1))
    assert slots and set(slots) == {u64(5)}


def test_per_cpu_value_is_written_to_every_cpu() -> None:
    with Map.create(MapType.PERCPU_ARRAY, 4, 8, 2, name="cgp_t_pcpu") as m:
        m.update(u32(1), u64(5))
        slots = m.lookup_per_cpu(u32(1))
    assert slots and set(slots) == {u64(5)}


def test_map_pinned_reopens_from_pin_and_from_id(bpf_dir: Path) -> None:
    pin = bpf_dir / "map"
    with Map.create(MapType.ARRAY, 4, 4, 4, name="cgp_t_pin") as m:
        m.update(u32(3), u32(33))
        m.pin(pin)
        map_id = m.id
    with Map.from_pin(pin) as again:
        assert again.id == map_id and again.lookup(u32(3)) == u32(33)
        assert (again.info.key_size, again.info.value_size) == (4, 4)
        with Map.from_id(map_id) as by_id:
            assert by_id.lookup(u32(3)) == u32(33)


# --- programs ---------------------------------------------------------------------------


def test_verifier_rejection_carries_the_log() -> None:
    with pytest.raises(syscall.VerifierError) as rejected:
        Program.load(ProgType.CGROUP_SKB, bytes.fromhex("9500000000000000"), "cgp_t_bad")
    assert "R0 !read_ok" in rejected.value.log
    assert str(rejected.value).startswith("BPF_PROG_LOAD of cgp_t_bad (cgroup_skb, 1 insns)")


def test_program_names_longer_than_the_kernel_takes_are_refused() -> None:
    with pytest.raises(ValueError, match="at most 15"):
        Program.load(ProgType.CGROUP_SKB, RETURN_1, "cgp_sixteen_char")


def test_test_run_returns_the_verdict_of_the_loaded_maps(source_dir: Path) -> None:
    allowed = spec(allowed=("10.0.0.0/8",))
    with loader.load_program(allowed, source_dir) as program:
        assert program.program.test_run(ipv4_packet("10.1.2.3")).retval == 1
        result = program.program.test_run(ipv4_packet("192.0.2.1"), repeat=100)
        assert result.retval == 0 and result.duration_ns >= 0


def test_two_loads_of_one_compile_are_distinct_programs_with_independent_maps(
    source_dir: Path,
) -> None:
    first = loader.load_program(spec(allowed=("10.0.0.0/8",)), source_dir)
    second = loader.load_program(spec(allowed=("192.0.2.0/24",)), source_dir)
    with first, second:
        one, two = first.info(), second.info()
        assert one.id != two.id and one.tag == two.tag  # same instructions, other maps
        assert set(one.map_ids).isdisjoint(two.map_ids)
        assert set(one.map_ids) == {m.id for m in first.maps.values()}
        assert first.program.test_run(ipv4_packet("10.1.1.1")).retval == 1
        assert second.program.test_run(ipv4_packet("10.1.1.1")).retval == 0
        first.maps["config"].update(u32(0), u64(1))  # a rule change is a map write
        assert first.program.test_run(ipv4_packet("198.51.100.1")).retval == 1
        assert second.program.test_run(ipv4_packet("198.51.100.1")).retval == 0
    assert first.program.closed and all(m.closed for m in first.maps.values())


def test_spec_must_name_exactly_the_maps_the_code_uses(source_dir: Path) -> None:
    complete = spec()
    with pytest.raises(loader.LoaderError, match=r"does not give: \['config'\]"):
        loader.load_program(
            ProgramSpec("egress", "test.c", "by_address", "cgp_t", complete.maps[:1]), source_dir
        )
    extra = MapSpec("unused", "array", 4, 4, 1, 0, ())
    with pytest.raises(loader.LoaderError, match=r"does not use: \['unused'\]"):
        loader.load_program(
            ProgramSpec("egress", "test.c", "allow_all", "cgp_t", (extra,)), source_dir
        )
    narrow = MapSpec("config", "array", 4, 4, 1, 0, ())
    with pytest.raises(loader.LoaderError, match="map config is declared in C as"):
        loader.load_program(
            ProgramSpec("egress", "test.c", "by_address", "cgp_t", (complete.maps[0], narrow)),
            source_dir,
        )


def test_a_source_that_does_not_compile_reports_clang(tmp_path: Path) -> None:
    (tmp_path / "broken.c").write_text("int f(struct __sk_buff *skb) { return undefined; }\n")
    with pytest.raises(loader.LoaderError, match="undefined"):
        loader.load_program(ProgramSpec("egress", "broken.c", "f", "cgp_t", ()), tmp_path)


def test_hundred_loads_with_fresh_maps_reuse_one_compile(
    source_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the one compile, 100 loads need no compiler (bcc cannot even be imported during
    them) and each is a program of its own with fresh, filled maps. How long loading takes
    is a `make bench` figure (apply_policies_s and its .load_s), not asserted here."""
    program_spec = spec(allowed=tuple(f"10.{i}.0.0/16" for i in range(100)))
    loader.load_program(program_spec, source_dir).close()  # the one compile
    monkeypatch.setitem(sys.modules, "bcc", None)  # `import bcc` now raises ImportError
    loaded: list[loader.LoadedProgram] = []
    try:
        for _ in range(100):
            loaded.append(loader.load_program(program_spec, source_dir))
        infos = [program.info() for program in loaded]
        assert len({info.id for info in infos}) == 100
        assert len({info.tag for info in infos}) == 1  # the same instructions each time
        map_ids = [map_id for info in infos for map_id in info.map_ids]
        assert len(map_ids) == len(set(map_ids)) == 200  # allowed4 and config, never shared
        for program in loaded:
            assert program.maps["allowed4"].lookup(key4("10.99.1.2/32")) == u32(1)
            assert program.program.test_run(ipv4_packet("10.42.0.1")).retval == 1
            assert program.program.test_run(ipv4_packet("10.100.0.1")).retval == 0
    finally:
        close_all(p for lp in loaded for p in (lp.program, *lp.maps.values()))


# --- links and attachments --------------------------------------------------------------


def test_link_is_queried_pinned_reopened_updated_and_detached(
    source_dir: Path, scratch_cgroup, cgroup_fd: int, bpf_dir: Path
) -> None:
    allow = loader.load_program(spec("allow_all", "cgp_t_allow"), source_dir)
    deny = loader.load_program(spec("deny_all", "cgp_t_deny"), source_dir)
    with allow, deny:
        allow_id, deny_id = allow.info().id, deny.info().id
        with CgroupLink.create(allow.fd, cgroup_fd, EGRESS) as link:
            info = link.info()
            link.pin(bpf_dir / "link")
        assert (info.prog_id, info.attach_type) == (allow_id, EGRESS)
        assert info.cgroup_id == cgroup.cgroup_id(scratch_cgroup.path)
        query = syscall.prog_query(cgroup_fd, EGRESS)
        assert query.prog_ids == (allow_id,) and query.attach_flags == syscall.BPF_F_ALLOW_MULTI
        with CgroupLink.from_pin(bpf_dir / "link") as pinned:  # the pin kept it attached
            assert pinned.info().id == info.id
            with pytest.raises(BpfError) as raced:  # not the linked program: refused
                pinned.update(deny.fd, old_prog_fd=deny.fd)
            assert raced.value.errno == errno.EPERM
            pinned.update(deny.fd, old_prog_fd=allow.fd)
            assert syscall.prog_query(cgroup_fd, EGRESS).prog_ids == (deny_id,)
            assert pinned.info().prog_id == deny_id
            pinned.detach()
            assert syscall.prog_query(cgroup_fd, EGRESS).prog_ids == ()
    # what a reconcile pass reads of each pin: a detached link is attached to no cgroup
    found = syscall.pinned_cgroup_links(str(bpf_dir), ["no-such-pin", "link", "no-such-pin"])
    assert found == [None, (info.id, deny_id, 0), None]


@pytest.mark.parametrize("relative", [True, False], ids=["path_fd", "whole_paths"])
def test_pinned_cgroup_links_reads_each_pin_in_order(
    source_dir: Path, scratch_cgroup, cgroup_fd: int, bpf_dir: Path, monkeypatch, relative: bool
) -> None:
    """Relative to the folder (BPF_F_PATH_FD), or by whole paths as on a kernel without it."""
    monkeypatch.setattr(syscall._probed, "path_fd", relative)
    allow = loader.load_program(spec("allow_all", "cgp_t_allow"), source_dir)
    child = scratch_cgroup.child("pins")
    child_fd = cgroup.open_cgroup(child.path)
    pinned: list[tuple[str, int]] = []  # (pin name, link id)
    try:
        with allow:
            for name, fd in (("a", cgroup_fd), ("b", child_fd)):
                with CgroupLink.create(allow.fd, fd, EGRESS) as link:
                    link.pin(bpf_dir / name)
                    pinned.append((name, link.info().id))
            found = syscall.pinned_cgroup_links(str(bpf_dir), [pinned[1][0], "c", pinned[0][0]])
            assert found == [
                (pinned[1][1], allow.info().id, cgroup.cgroup_id(child.path)),
                None,
                (pinned[0][1], allow.info().id, cgroup.cgroup_id(scratch_cgroup.path)),
            ]
    finally:
        for name, _ in pinned:
            with CgroupLink.from_pin(bpf_dir / name) as link:
                link.detach()
            os.unlink(bpf_dir / name)
        os.close(child_fd)


def test_link_attachment_is_effective_in_children_and_ends_with_its_last_fd(
    source_dir: Path, scratch_cgroup, cgroup_fd: int
) -> None:
    child = scratch_cgroup.child("child")
    child_fd = cgroup.open_cgroup(child.path)
    try:
        with loader.load_program(spec("allow_all", "cgp_t_allow"), source_dir) as allow:
            with CgroupLink.create(allow.fd, cgroup_fd, EGRESS):
                assert syscall.prog_query(child_fd, EGRESS).prog_ids == ()
                effective = syscall.prog_query(child_fd, EGRESS, effective=True)
                assert effective.prog_ids == (allow.info().id,)
            assert syscall.prog_query(cgroup_fd, EGRESS).prog_ids == ()
    finally:
        os.close(child_fd)


def test_legacy_attachment_is_listed_and_detached_by_id(source_dir: Path, cgroup_fd: int) -> None:
    """How cgpolicy sees and removes a program it attached without a link."""
    with loader.load_program(spec("deny_all", "cgp_t_legacy"), source_dir) as foreign:
        syscall.prog_attach(cgroup_fd, foreign.fd, EGRESS, syscall.BPF_F_ALLOW_MULTI)
        foreign_id = foreign.info().id
    query = syscall.prog_query(cgroup_fd, EGRESS)  # our fds are closed; the attachment stays
    assert query.prog_ids == (foreign_id,) and query.attach_flags == syscall.BPF_F_ALLOW_MULTI
    with Program.from_id(foreign_id) as again:
        assert again.info().name == "cgp_t_legacy"
        syscall.prog_detach(cgroup_fd, EGRESS, again.fd)
    assert syscall.prog_query(cgroup_fd, EGRESS).prog_ids == ()


def test_cgroup_links_tell_link_attachments_from_legacy_ones(
    source_dir: Path, scratch_cgroup, cgroup_fd: int
) -> None:
    with (
        loader.load_program(spec("allow_all", "cgp_t_linked"), source_dir) as linked,
        loader.load_program(spec("allow_all", "cgp_t_legacy"), source_dir) as legacy,
        CgroupLink.create(linked.fd, cgroup_fd, EGRESS) as link,
    ):
        syscall.prog_attach(cgroup_fd, legacy.fd, EGRESS)
        try:
            links = cgroup_links(cgroup.cgroup_id(scratch_cgroup.path))
            attached = set(syscall.prog_query(cgroup_fd, EGRESS).prog_ids)
        finally:
            syscall.prog_detach(cgroup_fd, EGRESS, legacy.fd)
        assert [(i.id, i.prog_id) for i in links] == [(link.info().id, linked.info().id)]
        assert attached == {linked.info().id, legacy.info().id}


def test_run_time_stats_count_runs_while_enabled(source_dir: Path) -> None:
    stats = syscall.enable_run_time_stats()
    try:
        with loader.load_program(spec("allow_all", "cgp_t_stats"), source_dir) as program:
            program.program.test_run(ipv4_packet("10.0.0.1"), repeat=10)
            assert program.info().run_cnt == 10
    finally:
        os.close(stats)


def test_link_create_error_names_program_cgroup_and_hook(source_dir: Path, tmp_path: Path) -> None:
    not_a_cgroup = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with loader.load_program(spec("allow_all", "cgp_t_err"), source_dir) as program:
            with pytest.raises(BpfError) as failed:
                CgroupLink.create(program.fd, not_a_cgroup, EGRESS)
    finally:
        os.close(not_a_cgroup)
    message = str(failed.value)
    assert message.startswith("BPF_LINK_CREATE of program cgp_t_err (id ")
    assert f"on cgroup {tmp_path} at egress: " in message


# --- cgroup helpers ---------------------------------------------------------------------


def test_walk_lists_the_subtree_parents_first(scratch_cgroup) -> None:
    scratch_cgroup.child("a").child("deep")
    scratch_cgroup.child("b")
    found = [p.relative_to(scratch_cgroup.path) for p in cgroup.walk_cgroups(scratch_cgroup.path)]
    assert found == [Path("."), Path("a"), Path("a/deep"), Path("b")]
    assert list(cgroup.walk_cgroups(scratch_cgroup.path / "vanished")) == []


def test_resolve_stays_inside_the_cgroup2_mount(cgroup_root: Path) -> None:
    assert cgroup.resolve("system.slice/x.service") == cgroup_root / "system.slice/x.service"
    with pytest.raises(cgroup.CgroupError, match="outside"):
        cgroup.resolve("../../etc")
