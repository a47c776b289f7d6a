"""The last good version of a policy file outlives what makes it unusable (issue 10, items
3, 4 and 7): SIGHUP and restarts while the file is invalid, a file replaced by something
that is not a regular file, and what the service counts as drift and where it listens.

Each test runs the real service as a subprocess on a policy folder and its own last-good
store (``--state-dir``), breaks something from outside, and then checks what is enforced on
a cgroup that appears afterwards: only a service that still knows the last good version
attaches to it. A check that something did *not* happen first waits for the service to run
two more passes, so that it would have happened by then.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from service import (
    CGPOLICY,
    POLICY,
    Daemon,
    connect_denied,
    http_get,
    links_at,
    running,
    wait_until,
    write_policy,
)

from cgpolicy.kernel.bpf import CgroupLink, Program
from cgpolicy.reconciler.lastgood import LastGoodStore

HOOKS = ("connect4", "connect6", "sendmsg4", "sendmsg6")


class Service(Daemon):
    """The reconcile service with its own last-good store and a chosen --metrics-addr."""

    def __init__(self, policy_dir: Path, bpf_dir: Path, log: Path, state_dir: Path) -> None:
        super().__init__(policy_dir, bpf_dir, log)
        self.state_dir = state_dir

    def environment(self) -> dict[str, str]:
        # The store's folder by its variable (--state-dir says the same), which a service
        # without a store ignores: so these tests also run, and fail, against one.
        return {**os.environ, "CGPOLICY_STATE_DIR": str(self.state_dir)}

    def passes(self) -> float:
        return self.metric("cgpolicy_reconcile_passes_total") or 0.0

    def run_passes(self, count: int = 2) -> None:
        """Wait until the service has run ``count`` more passes (each one reads the folder
        and the kernel afresh), so that whatever they would do is done."""
        target = self.passes() + count
        assert wait_until(lambda: self.passes() >= target, timeout=60), self.log()

    def stored(self, name: str = "svc.yaml") -> Path:
        return LastGoodStore(self.state_dir, self.policy_dir).path / name


@pytest.fixture
def service(tmp_path: Path, bpf_dir: Path) -> Iterator[Service]:
    daemon = Service(tmp_path / "policies.d", bpf_dir, tmp_path / "daemon.log", tmp_path / "state")
    with running(daemon):
        yield daemon


def break_file(path: Path) -> None:
    """The policy turned into an allow-all by a duplicated key: rejected by validation."""
    path.write_text(path.read_text() + "  sockets: {}\n")


def enforced(cgroup, port: int) -> bool:
    return all(links_at(cgroup.path, h) == 1 for h in HOOKS) and connect_denied(
        cgroup, "127.0.0.1", port
    )


def start_enforcing(service: Service, scratch, tcp_server) -> tuple[Path, object]:
    """svc.yaml applied by a running service on work-1."""
    path = write_policy(service, scratch, denied="127.0.0.1")
    work = scratch.child("work-1")
    service.start()
    assert wait_until(lambda: enforced(work, tcp_server.port), timeout=30), service.log()
    return path, work


def wait_invalid(service: Service) -> None:
    assert wait_until(lambda: service.metric("cgpolicy_invalid_policy_files") == 1), service.log()


# -- item 3: SIGHUP and restarts while a file is invalid --------------------------------------


def test_sighup_while_a_file_is_invalid_keeps_its_last_good_version_for_new_cgroups(
    service, scratch_cgroup, tcp_server
):
    path, work = start_enforcing(service, scratch_cgroup, tcp_server)
    break_file(path)
    wait_invalid(service)
    assert service.process is not None
    service.process.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "SIGHUP: re-reading" in service.log()), service.log()
    service.run_passes()  # the re-read happened, and the passes after it
    late = scratch_cgroup.child("work-2")
    assert wait_until(lambda: enforced(late, tcp_server.port), timeout=30), service.log()
    assert enforced(work, tcp_server.port)
    status, body = http_get(service.port, "/readyz")
    assert status == 503 and "file svc.yaml: invalid: " in body, body
    assert http_get(service.port, "/healthz")[0] == 200
    assert "svc: removed" not in service.log()


def test_restart_while_a_file_is_invalid_keeps_its_last_good_version_for_new_cgroups(
    service, scratch_cgroup, tcp_server
):
    path, work = start_enforcing(service, scratch_cgroup, tcp_server)
    break_file(path)
    wait_invalid(service)
    assert service.signal(signal.SIGTERM) == 0
    service.start()
    service.run_passes()
    late = scratch_cgroup.child("work-2")
    assert wait_until(lambda: enforced(late, tcp_server.port), timeout=30), service.log()
    assert enforced(work, tcp_server.port)
    assert "enforcing its last good version from" in service.log()
    status, body = http_get(service.port, "/readyz")
    assert status == 503 and "file svc.yaml: invalid: " in body, body
    # Fixed, the file is the policy again; its new text becomes the last good version.
    path.write_text(
        POLICY.format(name="svc", glob=f"{scratch_cgroup.relative}/work-*", denied="127.0.0.3")
    )
    assert wait_until(lambda: http_get(service.port, "/readyz")[0] == 200), service.log()
    assert wait_until(lambda: service.stored().read_bytes() == path.read_bytes()), service.log()
    assert late.probe("connect", "tcp", "127.0.0.1", tcp_server.port).ok


def test_restart_with_no_last_good_version_known_says_so_and_removes_nothing(
    service, scratch_cgroup, tcp_server
):
    """The store lost (a new --state-dir, a wiped disk): the kernel keeps what it has from
    the file, the log says that later cgroups are not covered, readiness names the file."""
    path, work = start_enforcing(service, scratch_cgroup, tcp_server)
    break_file(path)
    wait_invalid(service)
    assert service.signal(signal.SIGTERM) == 0
    service.state_dir = service.state_dir.with_name("other-state")
    service.start()
    late = scratch_cgroup.child("work-2")
    service.run_passes()
    assert enforced(work, tcp_server.port)
    assert all(links_at(late.path, h) == 0 for h in HOOKS)
    assert "no last good version of it is known" in service.log()
    assert "svc: removed" not in service.log()
    assert http_get(service.port, "/readyz")[0] == 503


@pytest.mark.parametrize("damage", ["invalid text", "not root's", "writable by others"])
def test_a_stored_version_is_checked_and_validated_again_before_it_is_used(
    service, scratch_cgroup, tcp_server, damage
):
    path, work = start_enforcing(service, scratch_cgroup, tcp_server)
    assert wait_until(lambda: service.stored().exists()), service.log()
    break_file(path)
    wait_invalid(service)
    assert service.signal(signal.SIGTERM) == 0
    entry = service.stored()
    if damage == "invalid text":
        entry.write_text(path.read_text())  # root's own file, but it fails validation
        expected = "the stored last good version of"
    elif damage == "not root's":
        os.chown(entry, 65534, 65534)
        expected = "last good version refused"
    else:
        entry.chmod(0o666)
        expected = "last good version refused"
    service.start()
    late = scratch_cgroup.child("work-2")
    service.run_passes()
    assert all(links_at(late.path, h) == 0 for h in HOOKS), service.log()
    assert enforced(work, tcp_server.port)  # what the kernel has stays
    assert expected in service.log()


def test_a_store_folder_others_can_write_is_refused_until_fixed(
    service, scratch_cgroup, tcp_server
):
    path, work = start_enforcing(service, scratch_cgroup, tcp_server)
    assert wait_until(lambda: service.stored().exists()), service.log()
    break_file(path)
    wait_invalid(service)
    assert service.signal(signal.SIGTERM) == 0
    folder = service.stored().parent
    folder.chmod(0o777)
    service.start()
    late = scratch_cgroup.child("work-2")
    service.run_passes()
    assert all(links_at(late.path, h) == 0 for h in HOOKS), service.log()
    status, body = http_get(service.port, "/readyz")
    assert status == 503 and "last-good store: refusing" in body, body
    assert service.metric("cgpolicy_last_good_store_failing") == 1
    assert "writable by group or others" in service.log()
    folder.chmod(0o700)  # fixed, and the operator reloads: the store is read again
    service.process.send_signal(signal.SIGHUP)
    assert wait_until(lambda: enforced(late, tcp_server.port), timeout=60), service.log()
    assert wait_until(lambda: service.metric("cgpolicy_last_good_store_failing") == 0)


def test_a_store_that_fails_at_a_change_in_place_is_reported_at_once(
    service, scratch_cgroup, tcp_server
):
    """A valid change that the service puts in force without a full pass (the fast path
    for changed files) still says when the store could not record it: /readyz and the
    metric turn at that change, not at the next resync an hour later."""
    service.interval = "3600"
    path, work = start_enforcing(service, scratch_cgroup, tcp_server)
    assert wait_until(lambda: service.stored().exists()), service.log()
    assert wait_until(lambda: http_get(service.port, "/readyz")[0] == 200), service.log()
    folder = service.stored().parent
    folder.chmod(0o777)
    try:
        write_policy(service, scratch_cgroup, denied="127.0.0.3")
        assert wait_until(lambda: not connect_denied(work, "127.0.0.1", tcp_server.port))
        assert wait_until(lambda: service.metric("cgpolicy_last_good_store_failing") == 1), (
            service.log()
        )
        status, body = http_get(service.port, "/readyz")
        assert status == 503 and "last-good store: refusing" in body, body
    finally:
        folder.chmod(0o700)


# -- item 4: a name that is not a regular file is not a deleted file --------------------------


_RENAME_EXCHANGE = 2  # renameat2(2) flag: swap two names atomically


def _exchange(first: Path, second: Path) -> None:
    """Swap two names in one step: a folder cannot be renamed over a file, and an unlink
    first would let a pass see the file deleted (and rightly remove its policy)."""
    libc = ctypes.CDLL(None, use_errno=True)
    at_cwd = -100
    if libc.renameat2(at_cwd, bytes(first), at_cwd, bytes(second), _RENAME_EXCHANGE) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error), str(first))


def _replace_with(path: Path, kind: str) -> None:
    """Swap the file for something else under the same name, atomically."""
    temporary = path.with_name(".swap")
    if kind == "dangling symlink":
        os.symlink("no-such-file", temporary)
    elif kind == "symlink loop":
        os.symlink(path.name, temporary)
    elif kind == "FIFO":
        os.mkfifo(temporary)
    elif kind == "folder":
        temporary.mkdir()
        _exchange(temporary, path)
        temporary.unlink()  # the old file, now under the name the service does not read
        return
    os.replace(temporary, path)


@pytest.mark.parametrize("kind", ["dangling symlink", "symlink loop", "FIFO", "folder"])
def test_a_file_replaced_by_what_cannot_be_read_keeps_its_last_good_version(
    service, scratch_cgroup, tcp_server, kind
):
    path, work = start_enforcing(service, scratch_cgroup, tcp_server)
    _replace_with(path, kind)
    wait_invalid(service)
    service.run_passes()
    assert enforced(work, tcp_server.port), service.log()
    assert "svc: removed" not in service.log()
    status, body = http_get(service.port, "/readyz")
    assert status == 503 and "file svc.yaml: invalid: " in body and "cannot read" in body, body
    late = scratch_cgroup.child("work-2")
    assert wait_until(lambda: enforced(late, tcp_server.port), timeout=30), service.log()
    # And after a restart, from the store.
    assert service.signal(signal.SIGTERM) == 0
    service.start()
    later = scratch_cgroup.child("work-3")
    assert wait_until(lambda: enforced(later, tcp_server.port), timeout=30), service.log()
    # Only a name really gone from the folder removes the policy (and its stored version).
    if path.is_dir() and not path.is_symlink():
        path.rmdir()
    else:
        path.unlink()
    assert wait_until(lambda: not (service.bpf_dir / "svc").exists()), service.log()
    assert all(links_at(c.path, h) == 0 for c in (work, late, later) for h in HOOKS)
    assert wait_until(lambda: not service.stored().exists()), service.log()


def test_configmap_key_removed_keeps_the_policy_until_its_symlink_is_gone(
    service, scratch_cgroup, tcp_server
):
    """kubelet's order when a key leaves a ConfigMap: ``..data`` is swapped first (the
    key's symlink then dangles), the symlink is deleted after. Only the second removes."""
    data = service.policy_dir
    first, second = data / "..2026_1", data / "..2026_2"
    first.mkdir()
    second.mkdir()
    glob = f"{scratch_cgroup.relative}/work-*"
    (first / "svc.yaml").write_text(POLICY.format(name="svc", glob=glob, denied="127.0.0.1"))
    os.symlink("..2026_1", data / "..data")
    os.symlink("..data/svc.yaml", data / "svc.yaml")
    work = scratch_cgroup.child("work-1")
    service.start()
    assert wait_until(lambda: enforced(work, tcp_server.port), timeout=30), service.log()
    os.symlink("..2026_2", data / "..data_tmp")
    os.rename(data / "..data_tmp", data / "..data")  # svc.yaml now dangles
    wait_invalid(service)
    service.run_passes()
    assert enforced(work, tcp_server.port)
    (data / "svc.yaml").unlink()
    assert wait_until(lambda: not (service.bpf_dir / "svc").exists()), service.log()
    assert links_at(work.path, "connect4") == 0


def test_a_symlink_to_a_regular_file_in_the_folder_is_a_policy_file(
    service, scratch_cgroup, tcp_server
):
    inside = service.policy_dir / "..2026_1"
    inside.mkdir()
    glob = f"{scratch_cgroup.relative}/work-*"
    (inside / "svc.yaml").write_text(POLICY.format(name="svc", glob=glob, denied="127.0.0.1"))
    os.symlink(inside / "svc.yaml", service.policy_dir / "svc.yaml")  # absolute, still inside
    work = scratch_cgroup.child("work-1")
    service.start()
    assert wait_until(lambda: enforced(work, tcp_server.port), timeout=30), service.log()
    assert service.metric("cgpolicy_invalid_policy_files") == 0
    assert wait_until(lambda: service.stored().exists())
    assert service.stored().read_bytes() == (inside / "svc.yaml").read_bytes()
    assert not stat.S_ISLNK(os.lstat(service.stored()).st_mode)


# -- the folder's writer reads nothing through the service --------------------------------

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
SECRET = "root:$6$Xq3pSALT$0123456789abcdefHASH:19700:0:99999:7:::\n"


@pytest.fixture
def open_service(bpf_dir: Path, tmp_path: Path) -> Iterator[Service]:
    """A service whose policy folder is nobody's, in a folder anybody may traverse (pytest's
    own tmp_path is root's 0700), with a root-only secret beside it."""
    top = Path(tempfile.mkdtemp(prefix="cgpolicy-open-"))
    top.chmod(0o755)
    policy_dir = top / "policies.d"
    policy_dir.mkdir()
    os.chown(policy_dir, 65534, 65534)
    secret = top / "shadow"
    secret.write_text(SECRET)
    secret.chmod(0o600)
    running = Service(policy_dir, bpf_dir, tmp_path / "daemon.log", tmp_path / "state")
    try:
        yield running
    finally:
        running.stop()
        subprocess.run(
            [str(CGPOLICY), "--bpf-dir", str(bpf_dir), "remove", "--all", "--force"],
            capture_output=True,
        )
        shutil.rmtree(top)


def as_nobody(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NOBODY, *command], capture_output=True, text=True, timeout=60)


def test_the_folders_writer_reads_no_root_only_file_through_readyz(
    open_service, scratch_cgroup, tcp_server
):
    """Security review, finding 2: a symlink (or a hard link) to a root-only file put in the
    policy folder by its unprivileged writer. The service does not read it (the link leaves
    the folder; the file is not one its writer could read), and /readyz, which any local
    user can fetch, names the file and never quotes a problem (which may quote content)."""
    service = open_service
    secret = service.policy_dir.parent / "shadow"
    glob = f"{scratch_cgroup.relative}/work-*"
    policy = POLICY.format(name="svc", glob=glob, denied="127.0.0.1")
    made = as_nobody("sh", "-c", f"printf '%s' \"$1\" > {service.policy_dir}/svc.yaml", "-", policy)
    assert made.returncode == 0, made.stderr
    work = scratch_cgroup.child("work-1")
    service.start()
    assert wait_until(lambda: enforced(work, tcp_server.port), timeout=30), service.log()

    linked = as_nobody("ln", "-s", str(secret), str(service.policy_dir / "leak.yaml"))
    assert linked.returncode == 0, linked.stderr
    wait_invalid(service)
    service.run_passes()
    got = as_nobody("curl", "-s", f"http://127.0.0.1:{service.port}/readyz")
    assert got.returncode == 0 and "file leak.yaml: invalid: cannot read the file" in got.stdout
    assert "root:" not in got.stdout and "$6$" not in got.stdout, got.stdout
    assert "leaves the policy folder" in service.log()
    assert "$6$" not in service.log(), service.log()  # not even read

    # A file the writer has turned into a link out of the folder keeps its last good version.
    swapped = as_nobody("ln", "-sf", str(secret), str(service.policy_dir / "svc.yaml"))
    assert swapped.returncode == 0, swapped.stderr
    assert wait_until(lambda: service.metric("cgpolicy_invalid_policy_files") == 2)
    service.run_passes()
    late = scratch_cgroup.child("work-2")
    assert wait_until(lambda: enforced(late, tcp_server.port), timeout=30), service.log()
    assert "svc: removed" not in service.log()

    # A hard link to a root-only file (as protected_hardlinks=0 would let nobody make).
    (service.policy_dir / "leak.yaml").unlink()
    os.link(secret, service.policy_dir / "hard.yaml")
    assert wait_until(lambda: "could not read it themselves" in service.log()), service.log()
    service.run_passes()
    got = as_nobody("curl", "-s", f"http://127.0.0.1:{service.port}/readyz")
    assert "file hard.yaml: invalid: cannot read the file" in got.stdout, got.stdout
    assert "root:" not in got.stdout and "$6$" not in service.log(), got.stdout


def test_readyz_counts_a_files_problems_and_quotes_none(service):
    """A root-only file's content in a policy file's problems reaches the log (root's), never
    /readyz."""
    (service.policy_dir / "bad.yaml").write_text("'" + SECRET.strip() + "': 1\nother: 2\n")
    service.start()
    wait_invalid(service)
    status, body = http_get(service.port, "/readyz")
    assert status == 503 and "file bad.yaml: invalid: " in body and "problem" in body, body
    assert "root:" not in body and "other" not in body, body
    assert "$6$" in service.log()


# -- item 7: drift is what someone undid, and the endpoints stay on this host ----------------


def drift(service: Service, kind: str, what: str = "found") -> float:
    return service.metric(f'cgpolicy_drift_{what}_total{{problem="{kind}"}}') or 0.0


def test_new_matching_cgroups_are_not_drift_but_changes_from_outside_are(
    service, scratch_cgroup, tcp_server
):
    write_policy(service, scratch_cgroup, denied="127.0.0.1")
    other = scratch_cgroup.child("other")
    (service.policy_dir / "other.yaml").write_text(
        POLICY.format(name="other", glob=other.relative, denied="127.0.0.4")
    )
    service.start()
    assert wait_until(lambda: links_at(other.path, "connect4") == 1, timeout=30), service.log()
    works = [scratch_cgroup.child(f"work-{n}") for n in range(1, 4)]
    assert wait_until(lambda: all(enforced(work, tcp_server.port) for work in works), timeout=30), (
        service.log()
    )
    service.run_passes()
    for kind in ("missing", "stale"):
        assert drift(service, kind) == 0 and drift(service, kind, "repaired") == 0, service.log()

    def link_pin(work, hook: str) -> Path:
        return service.bpf_dir / "svc" / hook / f"link-{os.stat(work.path).st_ino}"

    # A link detached from outside.
    with CgroupLink.from_pin(link_pin(works[0], "connect4")) as link:
        subprocess.run(["bpftool", "link", "detach", "id", str(link.info().id)], check=True)
    assert wait_until(lambda: drift(service, "missing", "repaired") == 1), service.log()
    # A link pin deleted.
    link_pin(works[1], "connect6").unlink()
    assert wait_until(lambda: drift(service, "missing", "repaired") == 2), service.log()
    # A link's program swapped for another policy's.
    with (
        CgroupLink.from_pin(link_pin(works[2], "connect4")) as link,
        Program.from_pin(service.bpf_dir / "other" / "connect4" / "prog") as foreign,
    ):
        link.update(foreign.fd)
    assert wait_until(lambda: drift(service, "stale", "repaired") == 1), service.log()
    # A program pin deleted.
    (service.bpf_dir / "svc" / "sendmsg4" / "prog").unlink()
    assert wait_until(lambda: drift(service, "missing", "repaired") == 3), service.log()
    service.run_passes()
    assert (drift(service, "missing"), drift(service, "stale")) == (3, 1)
    for work in works:
        assert enforced(work, tcp_server.port)


def listening(port: int) -> set[str]:
    """The local addresses of TCP sockets listening on ``port``, as /proc/net shows them."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


@pytest.mark.parametrize(
    ("given", "expected", "said"),
    [
        (":{port}", {"0100007F"}, "on 127.0.0.1:{port}"),
        ("0.0.0.0:{port}", {"00000000"}, "on 0.0.0.0:{port} (every address"),
        # Security review, finding 7: other spellings of every address say so too.
        ("0:{port}", {"00000000"}, "on 0.0.0.0:{port} (every address"),
        ("0.0:{port}", {"00000000"}, "on 0.0.0.0:{port} (every address"),
        ("0x0:{port}", {"00000000"}, "on 0.0.0.0:{port} (every address"),
        (
            "[::ffff:0.0.0.0]:{port}",
            {"0000000000000000FFFF000000000000"},
            "on [::ffff:0.0.0.0]:{port} (every address",
        ),
        ("[]:{port}", {"0100007F"}, "on 127.0.0.1:{port}"),
        ("localhost:{port}", {"0100007F"}, "on 127.0.0.1:{port}"),
    ],
    ids=[
        "no host: loopback",
        "all-zero host: every address, when asked",
        "zero",
        "zero dot zero",
        "hex zero",
        "v4-mapped any",
        "empty brackets: loopback",
        "localhost: loopback",
    ],
)
def test_metrics_addr_without_a_host_listens_on_loopback_only(service, given, expected, said):
    service.metrics_addr = given.format(port=service.port)
    service.start()
    assert listening(service.port) == expected
    assert said.format(port=service.port) in service.log()
    assert ("every address" in service.log()) is ("every address" in said), service.log()
    assert http_get(service.port, "/healthz")[0] == 200


def test_a_file_name_cannot_forge_log_lines(service, scratch_cgroup, tcp_server):
    """Security review, finding 6: a file named ``a\\nINFO cgpolicy.reconcile: x: removed\\n``
    ``.yaml`` in the text log format prints its name on one line, escaped."""
    forged = "a\nINFO cgpolicy.reconcile: x: removed\n.yaml"
    (service.policy_dir / forged).write_text("not: [a policy")
    service.start()
    wait_invalid(service)
    service.run_passes()
    lines = service.log().splitlines()
    assert not [line for line in lines if line.startswith("INFO cgpolicy.reconcile: x:")], lines
    assert any("a\\nINFO cgpolicy.reconcile: x: removed\\n.yaml" in line for line in lines)
