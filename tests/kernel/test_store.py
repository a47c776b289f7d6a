"""The compiled-program store: a process that finds its programs there never imports bcc;
a damaged, edited or stale entry is rebuilt, never loaded; a store someone other than root
could change is refused with the fix."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest

from cgpolicy.kernel import loader, store
from cgpolicy.kernel.store import CompiledStore, decode_entry, entry_key
from cgpolicy.kernel.trusted import UntrustedFolder, open_trusted_dir

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
CLI = [sys.executable, "-m", "cgpolicy"]


@pytest.fixture(scope="session")
def filled_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("store-filled") / "store"
    store.configure_store_dir(path)
    try:
        outcome = loader.fill_store()
    finally:
        store.configure_store_dir(None)
    assert set(outcome.values()) == {"compiled"}
    return path


@pytest.fixture
def store_dir(filled_store: Path, tmp_path: Path) -> Iterator[Path]:
    """A private copy of a filled store, used by this process's store functions."""
    copy = tmp_path / "store"
    shutil.copytree(filled_store, copy)
    store.configure_store_dir(copy)
    try:
        yield copy
    finally:
        store.configure_store_dir(None)


def entry_of(folder: Path, source: str) -> Path:
    (found,) = folder.glob(f"{source}-*.json")
    return found


def fill_outcome() -> dict[str, str]:
    return loader.fill_store()


# A fresh process that applies nothing but loads every function of every shipped program
# (as apply would), then says whether bcc or LLVM came into it.
_LOAD_ALL = textwrap.dedent(
    """
    import json, sys
    from cgpolicy.kernel import loader
    functions = {}
    for source in sorted(loader.SOURCE_DIR.glob("*.c")):
        functions[source.name] = sorted(loader.compile_file(source))
    llvm = [line for line in open("/proc/self/maps") if "LLVM" in line or "libbcc" in line]
    print(json.dumps({"functions": functions, "bcc": "bcc" in sys.modules, "llvm": bool(llvm)}))
    """
)


def run_loader(store_path: Path) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_ALL],
        env={**os.environ, "CGPOLICY_CACHE_DIR": str(store_path)},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return dict(json.loads(done.stdout))


def test_a_filled_store_spares_a_process_bcc_and_llvm(store_dir: Path) -> None:
    seen = run_loader(store_dir)
    assert seen["bcc"] is False and seen["llvm"] is False
    functions = seen["functions"]
    assert isinstance(functions, dict)
    assert set(functions) == {"device.c", "learn.c", "net.c", "sock.c", "sysctl.c"}
    assert all(functions.values())


def test_an_empty_store_is_filled_by_the_first_process_and_used_by_the_next(
    tmp_path: Path,
) -> None:
    empty = tmp_path / "fresh" / "store"
    first = run_loader(empty)
    assert first["bcc"] is True
    assert sorted(p.name.split("-")[0] for p in empty.glob("*.json")) == [
        "device.c",
        "learn.c",
        "net.c",
        "sock.c",
        "sysctl.c",
    ]
    assert (os.stat(empty).st_mode & 0o777) == 0o700
    second = run_loader(empty)
    assert second["bcc"] is False and second["functions"] == first["functions"]


def test_a_filled_store_is_kept_as_it_is(store_dir: Path) -> None:
    before = {p.name: p.read_bytes() for p in store_dir.iterdir()}
    assert set(fill_outcome().values()) == {"kept"}
    assert {p.name: p.read_bytes() for p in store_dir.iterdir()} == before


def _flip_a_code_byte(entry: Path) -> None:
    document = json.loads(entry.read_bytes())
    function = next(iter(document["body"]["functions"].values()))
    code = bytearray(base64.b64decode(function["insns"]))
    code[8] ^= 0x01
    function["insns"] = base64.b64encode(bytes(code)).decode()
    entry.write_text(json.dumps(document))


def _reseal_with_another_key(entry: Path) -> None:
    """An edit that also recomputes the checksum, but of a body made for other sources."""
    document = json.loads(entry.read_bytes())
    document["body"]["key"]["texts"] = {"device.c": "0" * 64}
    body = json.dumps(document["body"], sort_keys=True, separators=(",", ":")).encode()
    document["sha256"] = hashlib.sha256(body).hexdigest()
    entry.write_text(json.dumps(document))


def _relocation_off_the_code(entry: Path) -> None:
    document = json.loads(entry.read_bytes())
    for function in document["body"]["functions"].values():
        if function["relocations"]:
            function["relocations"][0][0] = 8  # not an ld_imm64 of a map
            break
    body = json.dumps(document["body"], sort_keys=True, separators=(",", ":")).encode()
    document["sha256"] = hashlib.sha256(body).hexdigest()
    entry.write_text(json.dumps(document))


def _truncate(entry: Path) -> None:
    data = entry.read_bytes()
    entry.write_bytes(data[: len(data) // 2])


def _empty(entry: Path) -> None:
    entry.write_bytes(b"")


def _world_writable(entry: Path) -> None:
    entry.chmod(0o666)


def _owned_by_nobody(entry: Path) -> None:
    os.chown(entry, 65534, 65534)


def _symlink_to_a_good_copy(entry: Path) -> None:
    good = entry.with_name("elsewhere")
    entry.rename(good)
    entry.symlink_to(good)


def _fifo(entry: Path) -> None:
    entry.unlink()
    os.mkfifo(entry)


DAMAGE = {
    "code-byte-flipped": _flip_a_code_byte,
    "resealed-with-another-key": _reseal_with_another_key,
    "relocation-off-the-code": _relocation_off_the_code,
    "truncated": _truncate,
    "empty": _empty,
    "world-writable": _world_writable,
    "owned-by-nobody": _owned_by_nobody,
    "symlink": _symlink_to_a_good_copy,
    "fifo": _fifo,
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_entry_is_rebuilt_never_loaded(store_dir: Path, damage) -> None:  # type: ignore[no-untyped-def]
    source = loader.SOURCE_DIR / "device.c"
    key = entry_key(source, ())
    good = entry_of(store_dir, "device.c")
    good_bytes = good.read_bytes()
    damage(good)
    assert CompiledStore(store_dir).load(source, key) is None
    assert fill_outcome() == {
        "device.c": "compiled",
        "learn.c": "kept",
        "net.c": "kept",
        "sock.c": "kept",
        "sysctl.c": "kept",
    }
    rebuilt = entry_of(store_dir, "device.c")
    assert not rebuilt.is_symlink() and (rebuilt.stat().st_mode & 0o777) == 0o600
    assert decode_entry(rebuilt.read_bytes(), key, source) == decode_entry(good_bytes, key, source)


def test_an_entry_under_another_key_is_stale_and_pruned_when_rebuilt(store_dir: Path) -> None:
    """What a bcc upgrade, new headers or an edited source leave behind: an entry whose
    key no longer holds. It is never read, and the rebuild replaces it."""
    source = loader.SOURCE_DIR / "sock.c"
    current = entry_of(store_dir, "sock.c")
    stale = current.with_name("sock.c-" + "0" * 64 + ".json")
    current.rename(stale)
    assert fill_outcome()["sock.c"] == "compiled"
    assert not stale.exists() and entry_of(store_dir, "sock.c") == current
    assert CompiledStore(store_dir).load(source, entry_key(source, ())) is not None


def test_the_key_covers_sources_headers_cflags_bcc_and_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("net.c", "common.h", "packet.h"):
        shutil.copy(loader.SOURCE_DIR / name, tmp_path / name)
    source = tmp_path / "net.c"
    base = entry_key(source, ())
    assert entry_key(source, ()) == base

    (tmp_path / "common.h").write_text((tmp_path / "common.h").read_text() + "\n// edit\n")
    assert entry_key(source, ())["texts"] != base["texts"]
    shutil.copy(loader.SOURCE_DIR / "common.h", tmp_path / "common.h")
    assert entry_key(source, ()) == base

    assert entry_key(source, ("-DX=1",)) != base

    bcc_package = tmp_path / "fake-bcc" / "bcc"
    bcc_package.mkdir(parents=True)
    (bcc_package / "__init__.py").write_text("")
    (bcc_package / "version.py").write_text("__version__ = '99.0.0'\n")
    fake = ModuleSpec("bcc", None, origin=str(bcc_package / "__init__.py"))
    monkeypatch.setattr(store, "find_spec", lambda name: fake)
    assert entry_key(source, ())["bcc"] != base["bcc"]
    monkeypatch.undo()

    real_uname = os.uname()
    monkeypatch.setattr(
        store.os,
        "uname",
        lambda: os.uname_result((*real_uname[:2], "9.9.9-new", *real_uname[3:])),
    )
    assert entry_key(source, ())["headers"]["kernel_release"] == "9.9.9-new"
    assert entry_key(source, ()) != base
    monkeypatch.undo()

    monkeypatch.setenv("BCC_KERNEL_SOURCE", str(tmp_path))
    assert entry_key(source, ())["headers"] != base["headers"]


def _cli(
    *args: str, store_path: Path, user: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*(user or []), *CLI, "--cache-dir", str(store_path), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(loader.__file__).parents[2],
    )


@pytest.mark.parametrize(
    "spoil, expected",
    [
        (lambda p: os.chown(p, 65534, 65534), "owned by uid 65534"),
        (lambda p: p.chmod(0o777), "writable by group or others"),
        (lambda p: p.chmod(0o770), "writable by group or others"),
        (lambda p: p.parent.chmod(0o777), "writable by group or others"),
    ],
    ids=["owner", "mode-777", "mode-770", "parent-writable"],
)
def test_a_store_others_could_change_is_refused_with_the_fix(
    store_dir: Path,
    spoil,
    expected: str,  # type: ignore[no-untyped-def]
) -> None:
    spoil(store_dir)
    for command in (["cache", "fill"], ["cache", "check"]):
        done = _cli(*command, store_path=store_dir)
        assert done.returncode == 1, done
        assert expected in done.stderr and "fix:" in done.stderr
        assert "Traceback" not in done.stderr
    with pytest.raises(loader.LoaderError, match=expected):
        loader.fill_store()


def test_a_symlinked_store_is_refused(store_dir: Path, tmp_path: Path) -> None:
    link = tmp_path / "linked"
    link.symlink_to(store_dir)
    store.configure_store_dir(link)
    with pytest.raises(loader.LoaderError, match="is a symlink"):
        loader.check_store()


@pytest.fixture
def sticky_folder() -> Iterator[Path]:
    """A sticky, world-writable folder that an unprivileged user can reach, as /tmp is."""
    shared = Path(tempfile.mkdtemp(prefix="cgpolicy-test-sticky-", dir="/tmp"))
    shared.chmod(0o1777)
    try:
        yield shared
    finally:
        shutil.rmtree(shared)


def test_a_store_planted_by_an_unprivileged_user_is_refused(sticky_folder: Path) -> None:
    """In a sticky, world-writable folder (as /tmp or bpffs are) a local user creates the
    store's folder before root does: cgpolicy refuses it and writes nothing there."""
    planted = sticky_folder / "store"
    made = subprocess.run([*NOBODY, "mkdir", "-m", "0777", str(planted)], capture_output=True)
    assert made.returncode == 0, made.stderr
    done = _cli("cache", "fill", store_path=planted)
    assert done.returncode == 1 and "owned by uid 65534" in done.stderr
    assert not any(planted.iterdir())


def test_a_store_root_makes_in_a_sticky_folder_is_used(sticky_folder: Path) -> None:
    assert _cli("cache", "fill", store_path=sticky_folder / "store").returncode == 0
    done = _cli("cache", "check", store_path=sticky_folder / "store")
    assert done.returncode == 0, done.stdout + done.stderr


def test_an_unprivileged_user_cannot_write_or_read_the_store(store_dir: Path) -> None:
    entry = entry_of(store_dir, "net.c")
    for argv in (["touch", str(store_dir / "net.c-evil.json")], ["cat", str(entry)]):
        done = subprocess.run([*NOBODY, *argv], capture_output=True, text=True)
        assert done.returncode != 0 and "Permission denied" in done.stderr


def test_check_says_why_a_missing_store_under_a_users_folder_is_refused(
    sticky_folder: Path,
) -> None:
    """Before: `cache check` called such a store "missing"; only `fill` said why."""
    theirs = sticky_folder / "theirs"
    assert subprocess.run([*NOBODY, "mkdir", "-m", "1777", str(theirs)]).returncode == 0
    done = _cli("cache", "check", store_path=theirs / "store")
    assert done.returncode == 1 and "owned by uid 65534" in done.stderr, done


def test_a_folder_in_an_entrys_place_is_rebuilt_and_cleared(store_dir: Path) -> None:
    """Before: it raised IsADirectoryError on every load (leaking a descriptor), failed
    every policy needing that file, and `cache clear` could not remove it."""
    source = loader.SOURCE_DIR / "sysctl.c"
    entry = entry_of(store_dir, "sysctl.c")
    entry.unlink()
    entry.mkdir()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        assert CompiledStore(store_dir).load(source, entry_key(source, ())) is None
    assert len(os.listdir("/proc/self/fd")) == before
    assert fill_outcome()["sysctl.c"] == "compiled"
    assert entry.is_file()
    entry.unlink()
    entry.mkdir()
    assert CompiledStore(store_dir).clear() == 5
    assert not any(store_dir.iterdir())


def test_code_compiled_while_its_source_changed_is_not_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key is taken again after the compile: new text must not be kept under the old
    text's key (a checkout or an update during a compile)."""
    source = tmp_path / "device.c"
    for name in ("device.c", "common.h"):
        shutil.copy(loader.SOURCE_DIR / name, tmp_path / name)
    target = CompiledStore(tmp_path / "store")
    key = entry_key(source, ())
    compiled = {"f": store.CompiledFunction(source, "f", bytes(16), (), {})}
    (tmp_path / "common.h").write_text((tmp_path / "common.h").read_text() + "// edited\n")
    loader._save_if_unchanged(target, source, (), key, compiled)
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())
    loader._save_if_unchanged(target, source, (), entry_key(source, ()), compiled)
    assert len(list((tmp_path / "store").iterdir())) == 1


def test_symlinks_inside_a_links_target_are_judged_too(sticky_folder: Path, tmp_path: Path) -> None:
    """A root link pointing into a user's link in a sticky folder was accepted: the user
    could repoint it after the check. A chain of root links is fine."""
    real = tmp_path / "real"
    real.mkdir()
    assert (
        subprocess.run([*NOBODY, "ln", "-s", str(real), str(sticky_folder / "ulink")]).returncode
        == 0
    )
    rootlink = tmp_path / "rootlink"
    rootlink.symlink_to(sticky_folder / "ulink")
    with pytest.raises(UntrustedFolder, match="symlink owned by uid 65534"):
        open_trusted_dir(rootlink / "store")

    second = real / "l2"
    second.symlink_to(tmp_path / "real2")
    (tmp_path / "real2").mkdir()
    first = tmp_path / "l1"
    first.symlink_to(real)
    os.close(open_trusted_dir(first / "l2" / "store"))
    assert (tmp_path / "real2" / "store").is_dir()
