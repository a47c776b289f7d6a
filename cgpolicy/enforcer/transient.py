"""`cgpolicy run`: one command in a fresh cgroup under a policy, everything removed after."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess

from cgpolicy.enforcer.apply import ApplyError
from cgpolicy.enforcer.engine import Enforcer
from cgpolicy.kernel.cgroup import remove_cgroup_tree
from cgpolicy.policy.model import Policy, Target

RUN_PARENT = "cgpolicy.run"


class CommandNotRun(Exception):
    """The command could not be started; ``status`` is what a shell would exit with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def run_under_policy(enforcer: Enforcer, policy: Policy, command: list[str]) -> int:
    """Run ``command`` in a new cgroup with ``policy`` applied to it (and only to it); return
    its exit status. The policy is applied under a name of its own, so an applied policy of
    the same name elsewhere is untouched."""
    pid = os.getpid()
    relative = f"{RUN_PARENT}/{policy.name}-{pid}"
    cgroup = enforcer.cgroup_root / relative
    cgroup.mkdir(parents=True)
    transient = dataclasses.replace(
        policy,
        name=f"{policy.name[:50]}-run{pid}",
        targets=(Target(relative, is_glob=False),),
    )
    try:
        outcome = enforcer.apply(enforcer.plan([transient]))[0]
        if not outcome.ok:
            raise ApplyError(outcome.error or "apply failed")
        try:
            child = subprocess.Popen(
                command, preexec_fn=lambda: (cgroup / "cgroup.procs").write_text("0")
            )
        except OSError as error:
            status = 127 if isinstance(error, FileNotFoundError) else 126
            raise CommandNotRun(f"cannot run {command[0]}: {error.strerror}", status) from error
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:
                child.send_signal(signal.SIGINT)
    finally:
        remove_cgroup_tree(cgroup)
        try:
            cgroup.parent.rmdir()  # the shared parent, once no other run uses it
        except OSError:
            pass
        enforcer.apply(enforcer.plan_removal([transient.name]))
        if transient.name in enforcer.observe():
            raise ApplyError(f"could not remove the transient policy {transient.name}")
