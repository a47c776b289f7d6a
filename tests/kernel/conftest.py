"""Fixtures for tests that enforce on the real kernel.

Every test gets its own cgroups under one scratch parent (`<cgroup2>/cgpolicy-tests-<pid>`)
and its own pin folder under bpffs, both removed afterwards, also when the test fails.
When the host cannot run these tests they are skipped, except under CI (`CI` set), where a
test that cannot run is a failure: a green CI must mean the kernel really enforced.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cgpolicy.kernel.cgroup import remove_cgroup_tree
from cgpolicy.mounts import find_bpffs, find_cgroup2_root

PROBE = Path(__file__).with_name("probe.py")
_counter = itertools.count()


def _missing_requirements() -> list[str]:
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    if find_cgroup2_root() is None:
        missing.append("a cgroup2 mount")
    if find_bpffs() is None:
        missing.append("a bpffs mount")
    try:
        import bcc  # noqa: F401
    except ImportError:
        missing.append("bcc (python3-bpfcc)")
    return missing


@pytest.fixture(scope="session")
def kernel_ready() -> None:
    missing = _missing_requirements()
    if missing:
        reason = "kernel tests need " + ", ".join(missing) + " (run `make test` as root)"
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="session", autouse=True)
def _private_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every reconcile service a test starts keeps its last-good store
    (CGPOLICY_STATE_DIR) in this session's folder, never in the host's /var/lib/cgpolicy."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CGPOLICY_STATE_DIR", str(tmp_path_factory.mktemp("cgpolicy-state")))
        yield


@pytest.fixture(autouse=True)
def _needs_kernel(kernel_ready: None) -> None:
    """Every test here runs on the real kernel: gate them all, not only those that ask for
    a scratch cgroup (a test loading a program with bcc needs root and bcc just as much)."""


@pytest.fixture(scope="session")
def cgroup_root(kernel_ready: None) -> Path:
    root = find_cgroup2_root()
    assert root is not None
    return root


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    errno: int
    error: str


@dataclass
class ScratchCgroup:
    path: Path
    root: Path

    @property
    def relative(self) -> str:
        """The path as a policy target names it: relative to the cgroup2 mount."""
        return str(self.path.relative_to(self.root))

    def _enter(self) -> None:
        (self.path / "cgroup.procs").write_text("0")

    def run(self, argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        """Run a command inside this cgroup."""
        return subprocess.run(
            argv, preexec_fn=self._enter, capture_output=True, text=True, timeout=30, **kwargs
        )

    def probe(self, *args: str | int) -> ProbeResult:
        """Perform one action (see probe.py) from a process inside this cgroup."""
        done = self.run([sys.executable, str(PROBE), *map(str, args)])
        if not done.stdout.strip():
            raise RuntimeError(f"probe {args} failed to run: {done.stderr}")
        return ProbeResult(**json.loads(done.stdout.strip().splitlines()[-1]))

    def child(self, name: str) -> ScratchCgroup:
        path = self.path / name
        path.mkdir()
        return ScratchCgroup(path, self.root)

    def fd(self) -> int:
        return os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)


@pytest.fixture(scope="session")
def cgroup_parent(cgroup_root: Path) -> Iterator[Path]:
    parent = cgroup_root / f"cgpolicy-tests-{os.getpid()}"
    parent.mkdir()
    try:
        yield parent
    finally:
        remove_cgroup_tree(parent)


def _test_slug(request: pytest.FixtureRequest) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[:60]
    return f"{name}-{next(_counter)}"


@pytest.fixture
def scratch_cgroup(
    cgroup_parent: Path, cgroup_root: Path, request: pytest.FixtureRequest
) -> Iterator[ScratchCgroup]:
    path = cgroup_parent / _test_slug(request)
    path.mkdir()
    try:
        yield ScratchCgroup(path, cgroup_root)
    finally:
        remove_cgroup_tree(path)


@pytest.fixture
def bpf_dir(kernel_ready: None, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A private folder on bpffs for this test's pins."""
    bpffs = find_bpffs()
    assert bpffs is not None
    path = bpffs / f"cgpolicy-tests-{os.getpid()}" / _test_slug(request)
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        try:
            path.parent.rmdir()
        except OSError:
            pass


class _Server:
    """Loopback TCP and UDP listeners on one ephemeral port per family, outside any policy."""

    def __init__(self, host: str, protocol: str) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
        self.host = host
        self.sock = socket.socket(family, kind)
        self.sock.bind((host, 0))
        self.port: int = self.sock.getsockname()[1]
        self.received = 0
        if protocol == "tcp":
            self.sock.listen(64)
            target = self._accept
        else:
            target = self._receive
        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.received += 1
            conn.close()

    def _receive(self) -> None:
        while True:
            try:
                self.sock.recv(2048)
            except OSError:
                return
            self.received += 1

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


@pytest.fixture
def tcp_server() -> Iterator[_Server]:
    server = _Server("127.0.0.1", "tcp")
    yield server
    server.close()


@pytest.fixture
def tcp6_server() -> Iterator[_Server]:
    server = _Server("::1", "tcp")
    yield server
    server.close()


@pytest.fixture
def udp_server() -> Iterator[_Server]:
    server = _Server("127.0.0.1", "udp")
    yield server
    server.close()


@pytest.fixture
def udp6_server() -> Iterator[_Server]:
    server = _Server("::1", "udp")
    yield server
    server.close()


# --- for the enforcement tests (test_enforce_*.py) ------------------------------------------


@pytest.fixture(scope="session")
def veth_net(kernel_ready: None) -> Iterator[object]:
    """Two network namespaces joined by a veth pair, plus a pair from the root namespace
    into the second, with echo servers there (see netns.py); removed at the end."""
    from netns import VethNet

    net = VethNet.create()
    try:
        yield net
    finally:
        net.close()


@dataclass(frozen=True)
class LoopbackPorts:
    """Five consecutive ports with TCP and UDP echo listeners on every loopback address
    (dual-stack '::'): 127.0.0.0/8, ::1 and IPv4-mapped addresses all reach them."""

    ports: tuple[int, ...]


@pytest.fixture(scope="session")
def loopback_ports(kernel_ready: None) -> Iterator[LoopbackPorts]:
    import random

    extra = Path(__file__).with_name("probe_extra.py")
    for _ in range(20):
        base = random.randrange(20000, 30000)
        ports = tuple(range(base, base + 5))
        server = subprocess.Popen(
            [sys.executable, str(extra), "echo-servers", "::", *map(str, ports)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdout is not None
        if json.loads(server.stdout.readline() or "{}").get("ready"):
            break
        server.wait()
    else:
        raise RuntimeError("no 5 free consecutive loopback ports found")
    try:
        yield LoopbackPorts(ports)
    finally:
        server.kill()
        server.wait()


@pytest.fixture(scope="session")
def dns_server(kernel_ready: None) -> Iterator[object]:
    """The `fqdns` tests' DNS server (dns_responder.py) on two loopback addresses of this
    test process's own, UDP and TCP port 53, in the host's network namespace; stopped at
    the end."""
    from dns_responder import Responder, loopback_addresses

    server = Responder(*loopback_addresses())
    try:
        yield server
    finally:
        server.close()
    assert not server.errors, server.errors
