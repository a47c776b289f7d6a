"""The reconcile service as the kernel tests run it: a real `cgpolicy reconcile` process on
a policy folder of the test's own, its metrics read over HTTP, and everything it applied
removed afterwards, also when the test fails."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from cgpolicy.kernel.cgroup import open_cgroup
from cgpolicy.kernel.hooks import hook
from cgpolicy.kernel.syscall import prog_query

CGPOLICY = Path(sys.executable).with_name("cgpolicy")

POLICY = """\
apiVersion: cgpolicy.dev/v1
kind: CgroupPolicy
metadata: {{name: {name}}}
spec:
  targets: [{{glob: "{glob}"}}]
  sockets:
    connect:
      default: allow
      rules: [{{action: deny, cidrs: ["{denied}/32"]}}]
"""


def wait_until(predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
    """Poll ``predicate`` until it holds or a generous ``timeout`` ends; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Daemon:
    """One service process; ``start`` returns once its metrics answer."""

    def __init__(self, policy_dir: Path, bpf_dir: Path, log: Path) -> None:
        self.policy_dir, self.bpf_dir, self.log_path = policy_dir, bpf_dir, log
        self.interval = "0.25"  # quick passes; tests wait for passes or conditions, never for time
        self.port = free_port()
        self.metrics_addr = f"127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def environment(self) -> dict[str, str] | None:
        """The service's environment (None: this process's)."""
        return None

    def start(self) -> None:
        command = [
            str(CGPOLICY),
            "--bpf-dir",
            str(self.bpf_dir),
            "--log-level",
            "info",
            "reconcile",
            "--policy-dir",
            str(self.policy_dir),
            "--interval",
            self.interval,
            "--metrics-addr",
            self.metrics_addr,
        ]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log, env=self.environment())
        assert wait_until(lambda: self.metrics() is not None, timeout=30), self.log()

    def metrics(self) -> str | None:
        try:
            url = f"http://127.0.0.1:{self.port}/metrics"
            with urllib.request.urlopen(url, timeout=1) as response:
                return response.read().decode()
        except OSError:
            return None

    def metric(self, name: str) -> float | None:
        for line in (self.metrics() or "").splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return None

    def signal(self, signum: int) -> int:
        assert self.process is not None
        self.process.send_signal(signum)
        return self.process.wait(timeout=15)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


D = TypeVar("D", bound=Daemon)


@contextmanager
def running(daemon: D) -> Iterator[D]:
    """``daemon`` with its policy folder made; afterwards the process is stopped and what
    it applied removed (``--force``: the service's policies are refused to the CLI)."""
    daemon.policy_dir.mkdir(exist_ok=True)
    try:
        yield daemon
    finally:
        daemon.stop()
        subprocess.run(
            [str(CGPOLICY), "--bpf-dir", str(daemon.bpf_dir), "remove", "--all", "--force"],
            capture_output=True,
            check=True,
        )


def write_policy(
    daemon: Daemon, scratch, name: str = "svc", denied: str = "127.0.0.2", template: str = POLICY
) -> Path:
    """``name``.yaml in the service's folder: ``template`` (POLICY or a variant of it) for the
    policy ``name`` on the cgroups ``work-*`` below ``scratch``."""
    path = daemon.policy_dir / f"{name}.yaml"
    glob = f"{scratch.relative}/work-*"
    path.write_text(template.format(name=name, glob=glob, denied=denied))
    return path


def connect_denied(cgroup, address: str, port: int) -> bool:
    result = cgroup.probe("connect", "tcp", address, port)
    return not result.ok and result.errno == errno.EPERM


def links_at(cgroup_path: Path, hook_name: str) -> int:
    fd = open_cgroup(cgroup_path)
    try:
        return len(prog_query(fd, hook(hook_name).attach_type).prog_ids)
    finally:
        os.close(fd)


def http_get(port: int, path: str) -> tuple[int, str]:
    """Status and body of a GET; a 503 is an answer, not an error."""
    try:
        url = f"http://127.0.0.1:{port}{path}"
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError as error:
        return 0, str(error)
