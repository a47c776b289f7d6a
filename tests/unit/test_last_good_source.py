"""The reconcile service's view of its policy folder: what a bad, unreadable or gone file
leaves enforced, the last-good store, what counts as drift, where /metrics listens.
(The service itself, on the kernel: tests/kernel/test_last_good.py.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from policy_builders import glob_policy_text

from cgpolicy.enforcer.plan import Action, PolicyPlan, Step
from cgpolicy.kernel.applied import AppliedHook, AppliedPolicy
from cgpolicy.kernel.pins import PolicyMeta
from cgpolicy.reconciler.decide import drift_of, readiness_summary
from cgpolicy.reconciler.lastgood import LastGoodStore
from cgpolicy.reconciler.metrics import describe_bind, every_address, parse_metrics_addr
from cgpolicy.reconciler.source import PolicySource, read_policy_file

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 and not os.environ.get("CI"),  # under CI it must run, so it fails
    reason="the store must be root's",
)


def port_of(source: PolicySource, name: str) -> int:
    (policy,) = [p for p in source.read().policies if p.name == name]
    assert policy.sockets and policy.sockets.connect
    return policy.sockets.connect.rules[0].ports[0].low


def make(folder: Path, name: str = "svc", port: int = 443) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(glob_policy_text(name, port))
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "policies.d"
    path.mkdir()
    return path


def replace_with(path: Path, kind: str) -> None:
    path.unlink()
    if kind == "dangling symlink":
        os.symlink("nowhere", path)
    elif kind == "symlink loop":
        os.symlink(path.name, path)
    elif kind == "FIFO":
        os.mkfifo(path)
    else:
        path.mkdir()


@pytest.mark.parametrize("kind", ["dangling symlink", "symlink loop", "FIFO", "folder"])
def test_what_cannot_be_read_keeps_the_last_good_version(folder: Path, kind: str) -> None:
    path = make(folder)
    source = PolicySource(folder)
    assert port_of(source, "svc") == 443
    replace_with(path, kind)
    snapshot = source.read()
    assert [p.name for p in snapshot.policies] == ["svc"]
    (problem,) = snapshot.invalid_files[str(path)]
    assert problem.message.startswith("cannot read the file: it is ")
    assert snapshot.without_last_good == set()


def test_a_fifo_with_a_writer_is_never_opened(folder: Path) -> None:
    """Opening a FIFO for reading blocks until a writer comes and reading it blocks while
    the writer stays: the service looks at what a name is before opening it."""
    path = folder / "svc.yaml"
    os.mkfifo(path)
    writer = os.open(path, os.O_RDWR)  # a writer that never writes nor closes
    try:
        assert read_policy_file(str(path)) == "it is a named pipe (FIFO), not a regular file"
    finally:
        os.close(writer)


def test_only_a_name_really_gone_removes(folder: Path) -> None:
    path = make(folder)
    source = PolicySource(folder)
    assert port_of(source, "svc") == 443
    path.unlink()
    snapshot = source.read()
    assert snapshot.policies == [] and snapshot.invalid_files == {}
    assert read_policy_file(str(path)) is None


def test_a_symlink_to_a_regular_file_in_the_folder_is_read(folder: Path) -> None:
    """A ConfigMap's layout: svc.yaml -> ..data/svc.yaml, ..data -> ..2026_1."""
    (folder / "..2026_1").mkdir()
    make(folder / "..2026_1", "svc")
    os.symlink("..2026_1", folder / "..data")
    os.symlink("..data/svc.yaml", folder / "svc.yaml")
    assert port_of(PolicySource(folder), "svc") == 443
    os.symlink(folder / "..data" / "svc.yaml", folder / "absolute.yaml")  # still inside
    assert isinstance(read_policy_file(str(folder / "absolute.yaml")), bytes)


def test_a_symlink_out_of_the_folder_is_not_read(folder: Path, tmp_path: Path) -> None:
    """Whoever writes the folder must not make the service (root) read other files: a
    symlink whose target leaves the folder is unreadable, its last good version kept."""
    target = make(tmp_path, "svc")
    secret = tmp_path / "secret"
    secret.write_text("root:$6$salt$hash:19700:0:99999:7:::\n")
    os.symlink(secret, folder / "leak.yaml")
    path = make(folder)
    source = PolicySource(folder)
    assert port_of(source, "svc") == 443
    (problem,) = source.read().invalid_files[str(folder / "leak.yaml")]
    assert "leaves the policy folder" in problem.message and "root:" not in problem.message
    path.unlink()
    os.symlink(target, path)  # the same policy, now from outside: its last good version stays
    snapshot = source.read()
    assert [p.name for p in snapshot.policies] == ["svc"]
    assert "leaves the policy folder" in snapshot.invalid_files[str(path)][0].message
    os.symlink("..", folder / "up")  # through a folder symlink that leads out
    os.symlink("up/svc.yaml", folder / "other.yaml")
    assert "leaves the policy folder" in str(read_policy_file(str(folder / "other.yaml")))


@needs_root
def test_a_root_only_file_is_not_read_for_a_folder_others_write(folder: Path) -> None:
    """A hard link to a root-only file, made by the folder's (unprivileged) owner where
    protected_hardlinks is off, is not read; their own files are, and root's own folder
    reads anything."""
    secret = folder / "leak.yaml"
    secret.write_text("root:$6$salt$hash:19700:0:99999:7:::\n")
    secret.chmod(0o600)
    mine = make(folder)
    os.chown(folder, 65534, 65534)
    os.chown(mine, 65534, 65534)
    mine.chmod(0o600)
    why = read_policy_file(str(secret))
    assert isinstance(why, str) and "could not read it themselves" in why, why
    assert isinstance(read_policy_file(str(mine)), bytes)
    secret.chmod(0o644)  # readable by anybody anyway
    assert isinstance(read_policy_file(str(secret)), bytes)
    secret.chmod(0o600)
    os.chown(folder, 0, 0)
    folder.chmod(0o777)  # root's, but others write it
    assert isinstance(read_policy_file(str(secret)), str)
    folder.chmod(0o755)
    assert isinstance(read_policy_file(str(secret)), bytes)


def test_sighup_rereads_every_file_and_keeps_the_last_good_version(folder: Path) -> None:
    path = make(folder)
    source = PolicySource(folder)
    assert port_of(source, "svc") == 443
    path.write_text("not: [a policy")
    source.reread()
    snapshot = source.read()
    assert snapshot.changed and str(path) in snapshot.invalid_files
    assert port_of(source, "svc") == 443


def test_without_memory_or_store_a_bad_file_has_no_last_good_version(folder: Path) -> None:
    path = folder / "svc.yaml"
    path.write_text("not: [a policy")
    snapshot = PolicySource(folder).read()
    assert snapshot.policies == [] and snapshot.without_last_good == {str(path)}


@needs_root
def test_the_store_carries_the_last_good_version_to_the_next_process(
    folder: Path, tmp_path: Path
) -> None:
    store = LastGoodStore(tmp_path / "state", folder)
    path = make(folder)
    assert port_of(PolicySource(folder, store), "svc") == 443
    entry = store.path / "svc.yaml"
    assert entry.read_bytes() == path.read_bytes()
    assert oct(entry.stat().st_mode & 0o777) == "0o600"
    assert oct(store.path.stat().st_mode & 0o777) == "0o700"
    path.write_text("not: [a policy")
    restarted = PolicySource(folder, store)
    assert port_of(restarted, "svc") == 443  # from the store, validated again
    assert restarted.read().without_last_good == set()
    path.unlink()
    restarted.read()
    assert not entry.exists()  # really gone: forgotten


@needs_root
def test_a_valid_file_wins_over_a_last_good_version_of_the_same_name(
    folder: Path, tmp_path: Path
) -> None:
    store = LastGoodStore(tmp_path / "state", folder)
    path = make(folder, "svc", 443)
    PolicySource(folder, store).read()
    path.write_text("not: [a policy")
    make(folder, "moved", 8443).write_text(glob_policy_text("svc", 8443))
    snapshot = PolicySource(folder, store).read()
    assert [p.name for p in snapshot.policies] == ["svc"]
    assert snapshot.policies[0].source is not None
    assert snapshot.policies[0].source.file == str(folder / "moved.yaml")


@needs_root
@pytest.mark.parametrize("damage", ["invalid", "writable by others", "symlink"])
def test_a_damaged_entry_is_not_used(folder: Path, tmp_path: Path, damage: str) -> None:
    store = LastGoodStore(tmp_path / "state", folder)
    path = make(folder)
    PolicySource(folder, store).read()
    entry = store.path / "svc.yaml"
    if damage == "invalid":
        entry.write_text("not: [a policy")
    elif damage == "writable by others":
        entry.chmod(0o666)
    else:
        elsewhere = tmp_path / "elsewhere.yaml"
        elsewhere.write_bytes(entry.read_bytes())
        entry.unlink()
        os.symlink(elsewhere, entry)
    path.write_text("not: [a policy")
    snapshot = PolicySource(folder, store).read()
    assert snapshot.policies == [] and snapshot.without_last_good == {str(path)}


@needs_root
def test_a_store_folder_others_can_write_is_refused(folder: Path, tmp_path: Path) -> None:
    store = LastGoodStore(tmp_path / "state", folder)
    path = make(folder)
    PolicySource(folder, store).read()
    store.path.chmod(0o777)
    path.write_text("not: [a policy")
    snapshot = PolicySource(folder, store).read()
    assert snapshot.policies == []
    assert snapshot.store_error is not None and "writable by group or others" in (
        snapshot.store_error
    )


# -- drift ------------------------------------------------------------------------------------


def applied(cgroups: dict[int, str], prog_id: int | None = 7) -> AppliedPolicy:
    meta = PolicyMeta("svc", "r1", "enforce", "/p/svc.yaml", cgroups)
    return AppliedPolicy("svc", Path("/x"), meta, {"connect4": AppliedHook("connect4", prog_id)})


def plan(*steps: Step, reload: bool = False, old: str = "r1", new: str = "r1") -> PolicyPlan:
    result = PolicyPlan("svc", old, new, reload)
    result.steps.extend(steps)
    return result


def test_a_newly_matched_cgroup_is_not_drift() -> None:
    steps = (Step(Action.KEEP, "connect4", 1, "a/1"), Step(Action.ATTACH, "connect4", 2, "a/2"))
    assert drift_of(plan(*steps), applied({1: "a/1"})) == []


def test_what_was_undone_from_outside_is_drift() -> None:
    steps = (
        Step(Action.ATTACH, "connect4", 1, "a/1"),  # known: its link pin was deleted
        Step(Action.REATTACH, "connect4", 2, "a/2"),  # detached from outside
        Step(Action.UPDATE, "connect4", 3, "a/3"),  # its program swapped
    )
    assert drift_of(plan(*steps), applied({1: "a/1", 2: "a/2", 3: "a/3"})) == [
        "missing",
        "missing",
        "stale",
    ]


def test_a_deleted_program_pin_is_drift_but_a_new_revision_is_not() -> None:
    steps = (Step(Action.UPDATE, "connect4", 1, "a/1"),)
    assert drift_of(plan(*steps, reload=True), applied({1: "a/1"}, prog_id=None)) == ["missing"]
    assert drift_of(plan(*steps, reload=True, new="r2"), applied({1: "a/1"})) == []


# -- --metrics-addr -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (":9464", ("127.0.0.1", 9464)),
        ("0.0.0.0:9464", ("0.0.0.0", 9464)),
        ("[::]:9464", ("::", 9464)),
        ("[::1]:9464", ("::1", 9464)),
        ("::1:9464", ("::1", 9464)),
        ("node-1.example:80", ("node-1.example", 80)),
    ],
)
def test_metrics_addr_defaults_to_loopback(given: str, expected: tuple[str, int]) -> None:
    assert parse_metrics_addr(given) == expected


@pytest.mark.parametrize("given", ["9464", "host:", ":99999", "[::1:80", "bad host:80", "a..b:1"])
def test_metrics_addr_refuses_what_is_not_host_port(given: str) -> None:
    with pytest.raises(ValueError, match="--metrics-addr"):
        parse_metrics_addr(given)


@pytest.mark.parametrize(
    ("bound", "every"),
    [
        ("0.0.0.0", True),
        ("::", True),
        ("::ffff:0.0.0.0", True),  # what [::ffff:0.0.0.0]:PORT binds
        ("127.0.0.1", False),
        ("::1", False),
        ("::ffff:127.0.0.1", False),
        ("fe80::1%eth0", False),
    ],
)
def test_every_address_is_judged_by_what_was_bound(bound: str, every: bool) -> None:
    assert every_address(bound) is every
    assert ("every address" in describe_bind(bound, 9464)) is every


def test_readiness_names_a_bad_file_and_counts_its_problems_without_their_text(
    folder: Path, tmp_path: Path
) -> None:
    """Any local user reads /readyz; a problem's text can quote what the file holds."""
    (folder / "bad.yaml").write_text(
        glob_policy_text("bad", 1) + "  'root:$6$salt$hash': 1\n  other: 2\n"
    )
    secret = tmp_path / "secret"
    secret.write_text("root:$6$salt$hash:19700:0:99999:7:::\n")
    os.symlink(secret, folder / "leak.yaml")
    snapshot = PolicySource(folder).read()
    problems = snapshot.invalid_files[str(folder / "bad.yaml")]
    assert any("root:$6$" in p.format() for p in problems)  # the log has them in full
    shown = {
        Path(file).name: readiness_summary(found) for file, found in snapshot.invalid_files.items()
    }
    assert shown == {
        "bad.yaml": f"{len(problems)} problems (see the service log)",
        "leak.yaml": "cannot read the file (see the service log)",
    }


def test_a_reading_checks_only_the_files_that_changed(folder: Path) -> None:
    """The folder is read whole at every change, but a file whose bytes did not change is
    not checked again: its policies are the same objects (so what was compiled from them
    is reused); names are still compared across every file, whichever changed."""
    make(folder, "a", 443)
    b = make(folder, "b", 80)
    source = PolicySource(folder)
    first = {p.name: p for p in source.read().policies}
    b.write_text(glob_policy_text("b", 81))
    second = {p.name: p for p in source.read().policies}
    assert second["a"] is first["a"]
    assert second["b"] is not first["b"] and port_of(source, "b") == 81

    (folder / "c.yaml").write_text(glob_policy_text("a", 22))  # a's name again, in a later file
    snapshot = source.read()
    assert sorted(p.name for p in snapshot.policies) == ["a", "b"]
    assert snapshot.policies[0] is first["a"]
    (problem,) = snapshot.invalid_files[str(folder / "c.yaml")]
    assert "a" in problem.message and "a.yaml" in problem.message


def test_a_memo_changes_no_answer(tmp_path: Path) -> None:
    """load_contents with a memo says what it says without one, reading after reading."""
    from cgpolicy.policy.validate import FileMemo, load_contents

    def answer(result):  # noqa: ANN001, ANN202
        return (
            [(p.name, p.source) for p in result.policies],
            [p.format() for p in result.problems],
            [p.format() for p in result.warnings],
            [p.format() for p in result.skipped],
        )

    readings = [
        {"a": glob_policy_text("a", 1), "b": glob_policy_text("b", 2)},
        {"a": glob_policy_text("a", 1), "b": glob_policy_text("a", 3)},  # b takes a's name
        {"a": "not: [valid", "b": glob_policy_text("a", 3)},  # now b's is the first a
        {"a": glob_policy_text("a", 1), "b": glob_policy_text("b", 2) + "---\nkind: X\n"},
        {"b": glob_policy_text("b", 2)},
    ]
    memo = FileMemo()
    for reading in readings:
        files = sorted((str(tmp_path / f"{n}.yaml"), t.encode()) for n, t in reading.items())
        assert answer(load_contents(files, memo)) == answer(load_contents(files))
