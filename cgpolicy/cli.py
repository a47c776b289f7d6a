"""The `cgpolicy` command line.

Commands import what they need inside their bodies: `--help`, `validate` and other commands
that do not touch the kernel must not pay for importing bcc or pyroute2.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from cgpolicy import __version__

if TYPE_CHECKING:
    from cgpolicy.enforcer.ownership import Owner

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INVALID = 2

app = typer.Typer(
    name="cgpolicy",
    help="Declarative per-cgroup security policy, enforced by eBPF programs at cgroup hooks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@dataclass
class Settings:
    """Global options; the mount-derived defaults are discovered only when a command asks."""

    cgroup_root: Path | None
    bpf_dir: Path | None
    dev_root: Path = Path("/dev")  # where this node's /dev is seen (device path rules)
    lock_timeout: float = 30.0  # seconds to wait for another change of the pins to end

    def resolved_cgroup_root(self) -> Path:
        from cgpolicy.mounts import find_cgroup2_root

        root = self.cgroup_root or find_cgroup2_root()
        if root is None:
            _fail("no cgroup2 hierarchy is mounted (see `cgpolicy doctor`)")
        return root

    def resolved_bpf_dir(self) -> Path:
        from cgpolicy.mounts import default_bpf_dir

        return self.bpf_dir or default_bpf_dir()

    def bpf_dir_to_read(self) -> Path:
        """The pin folder for commands that only read it (audit, events): one not on bpffs
        is an error; a missing one means nothing is applied, and is said so on stderr."""
        from cgpolicy.kernel.pins import bpf_dir_exists
        from cgpolicy.mounts import read_mounts

        bpf_dir = self.resolved_bpf_dir()
        mounts = [m.mount_point for m in read_mounts() if m.fs_type == "bpf"]
        if not any(mount == bpf_dir or mount in bpf_dir.parents for mount in mounts):
            _fail(f"{bpf_dir} is not on a bpf filesystem; nothing cgpolicy applies lives there")
        if not bpf_dir_exists(bpf_dir):
            typer.echo(f"cgpolicy: note: {bpf_dir} does not exist: nothing is applied", err=True)
        return bpf_dir


def _write_output(path: Path, data: bytes) -> None:
    """Write ``data`` as the file ``path`` without following what is there now: a new file
    beside it, renamed over it. A symlink or a hard link that someone else planted under
    that name (in /tmp, say) is replaced, never written through: root's output never lands
    in a file it was not asked to write."""
    from cgpolicy.kernel.trusted import write_atomically

    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        write_atomically(folder, path.name, data, mode=0o644)
    finally:
        os.close(folder)


def _fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    typer.echo(f"cgpolicy: {message}", err=True)
    raise typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cgpolicy {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    cgroup_root: Annotated[
        Path | None,
        typer.Option(
            "--cgroup-root",
            envvar="CGPOLICY_CGROUP_ROOT",
            help="cgroup v2 mount point \\[default: discovered from /proc/self/mountinfo]",
        ),
    ] = None,
    bpf_dir: Annotated[
        Path | None,
        typer.Option(
            "--bpf-dir",
            envvar="CGPOLICY_BPF_DIR",
            help="bpffs folder cgpolicy pins into \\[default: <bpffs mount>/cgpolicy]",
        ),
    ] = None,
    dev_root: Annotated[
        Path,
        typer.Option(
            "--dev-root",
            envvar="CGPOLICY_DEV_ROOT",
            help="where this node's /dev is mounted; device paths in policies are looked up "
            "there when applied",
        ),
    ] = Path("/dev"),
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            "--cache-dir",
            envvar="CGPOLICY_CACHE_DIR",
            help="root-only folder of compiled programs \\[default: /var/cache/cgpolicy]",
        ),
    ] = None,
    lock_timeout: Annotated[
        float,
        typer.Option(
            "--lock-timeout",
            envvar="CGPOLICY_LOCK_TIMEOUT",
            min=0,
            help="seconds to wait while another cgpolicy changes the same pins",
        ),
    ] = 30.0,
    log_level: Annotated[
        str,
        typer.Option("--log-level", help="debug, info, warning or error"),
    ] = "warning",
    log_format: Annotated[
        str,
        typer.Option("--log-format", help="text, or json (one object per line, for services)"),
    ] = "text",
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        _fail(f"unknown log level {log_level!r}", EXIT_INVALID)
    if log_format not in ("text", "json"):
        _fail(f"unknown log format {log_format!r}", EXIT_INVALID)
    handler = logging.StreamHandler()
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s", timestamp=True)
        )
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    if cache_dir is not None:
        from cgpolicy.kernel.store import configure_store_dir

        configure_store_dir(cache_dir)
    ctx.obj = Settings(
        cgroup_root=cgroup_root, bpf_dir=bpf_dir, dev_root=dev_root, lock_timeout=lock_timeout
    )


PathsArgument = Annotated[
    list[Path], typer.Argument(help="Policy files or folders (every *.yaml / *.yml in a folder).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
ForceOption = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Also change policies another owner holds (the reconcile service, a running "
        "`cgpolicy run`), and take them over; apply a policy whose targets cover this "
        "session, an sshd or the reconcile service (the lockout guard), or one waiting for "
        "`cgpolicy confirm`.",
    ),
]


def _count(number: int, singular: str, plural: str | None = None) -> str:
    return f"{number} {singular if number == 1 else plural or singular + 's'}"


@app.command()
def validate(paths: PathsArgument, as_json: JsonOption = False) -> None:
    """Check policy files; print every problem as FILE:LINE:COL: field: message.

    Exit 0 when all are valid, 2 when any is not.
    """
    from cgpolicy.policy.validate import load_paths

    result = load_paths(paths)
    if as_json:
        report = {
            "valid": result.ok,
            "files": result.files,
            "policies": [policy.name for policy in result.policies],
            "problems": [problem.to_json() for problem in result.problems],
            "warnings": [warning.to_json() for warning in result.warnings],
            "skipped": [skipped.to_json() for skipped in result.skipped],
        }
        typer.echo(json.dumps(report, indent=2))
    else:
        for problem in result.problems:
            typer.echo(problem.format(), err=True)
        for warning in result.warnings:
            typer.echo(f"warning: {warning.format()}", err=True)
        for skipped in result.skipped:
            typer.echo(f"note: {skipped.format()}", err=True)
        if result.ok:
            names = ", ".join(policy.name for policy in result.policies)
            typer.echo(
                f"{_count(len(result.policies), 'policy', 'policies')} valid in "
                f"{_count(len(result.files), 'file')}: {names}"
            )
        else:
            problems, files = (
                _count(len(result.problems), "problem"),
                _count(len(result.files), "file"),
            )
            typer.echo(f"{problems} in {files}", err=True)
    raise typer.Exit(EXIT_OK if result.ok else EXIT_INVALID)


@app.command()
def describe(paths: PathsArgument) -> None:
    """Validate policies and print what each would enforce, without touching the kernel."""
    from cgpolicy.policy.describe import describe as describe_policy
    from cgpolicy.policy.validate import load_paths

    result = load_paths(paths)
    for problem in result.problems:
        typer.echo(problem.format(), err=True)
    if not result.ok:
        raise typer.Exit(EXIT_INVALID)
    typer.echo("\n\n".join(describe_policy(policy) for policy in result.policies))


@app.command()
def doctor(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Check that this host can enforce policies; print the fix for every failed check.

    Exit 0 when ready, 1 when any required check fails.
    """
    from cgpolicy.doctor import run_checks

    settings: Settings = ctx.obj
    checks = run_checks(cgroup_root=settings.cgroup_root, bpf_dir=settings.bpf_dir)
    ready = all(check.ok or not check.required for check in checks)
    if as_json:
        typer.echo(json.dumps({"ready": ready, "checks": [c.to_json() for c in checks]}, indent=2))
    else:
        for check in checks:
            status = "ok  " if check.ok else ("FAIL" if check.required else "warn")
            typer.echo(f"[{status}] {check.name}: {check.detail}")
            if not check.ok and check.fix:
                typer.echo(f"       fix: {check.fix}")
        typer.echo("ready" if ready else "not ready")
    raise typer.Exit(EXIT_OK if ready else EXIT_FAILURE)


cache_app = typer.Typer(
    help="The compiled-program store: bcc's output for every program in bpf/, kept so that "
    "no command needs bcc, LLVM or kernel headers. `scripts/setup.sh` fills it.",
    no_args_is_help=True,
)
app.add_typer(cache_app, name="cache")


@cache_app.command("fill")
def cache_fill() -> None:
    """Compile every shipped program not yet in the store (stale or damaged ones again).

    A second run compiles nothing.
    """
    from cgpolicy.kernel.loader import fill_store
    from cgpolicy.kernel.store import store_dir

    outcome = fill_store()
    compiled = sorted(name for name, what in outcome.items() if what == "compiled")
    if compiled:
        typer.echo(f"{store_dir()}: compiled {', '.join(compiled)}")
    else:
        typer.echo(f"{store_dir()}: every program is already compiled")


@cache_app.command("check")
def cache_check(as_json: JsonOption = False) -> None:
    """Say, per shipped program, whether the store holds a current, intact entry.

    Exit 0 when all of them do, 1 otherwise.
    """
    from cgpolicy.kernel.loader import check_store
    from cgpolicy.kernel.store import store_dir

    status = check_store()
    if as_json:
        typer.echo(json.dumps({"store": str(store_dir()), "entries": status}, indent=2))
    else:
        for name, ok in status.items():
            typer.echo(f"{name}: {'ok' if ok else 'missing, stale or damaged'}")
    raise typer.Exit(EXIT_OK if all(status.values()) else EXIT_FAILURE)


@cache_app.command("clear")
def cache_clear() -> None:
    """Remove every entry (after an LLVM update, say); the next command recompiles."""
    from cgpolicy.kernel.store import CompiledStore, StoreError, store_dir

    try:
        removed = CompiledStore(store_dir()).clear()
    except StoreError as error:
        _fail(str(error))
    typer.echo(f"{store_dir()}: removed {_count(removed, 'entry', 'entries')}")


def _load_valid(paths: list[Path]) -> list:
    """Policies from ``paths``, or exit 2 after printing every problem."""
    from cgpolicy.policy.validate import load_paths

    result = load_paths(paths)
    for problem in result.problems:
        typer.echo(problem.format(), err=True)
    for skipped in result.skipped:
        typer.echo(f"note: {skipped.format()}", err=True)
    if not result.ok:
        raise typer.Exit(EXIT_INVALID)
    return result.policies


def _enforcer(ctx: typer.Context, owner: Owner | None = None, in_place: bool = False):
    """The Enforcer of the global options (-> Enforcer, imported lazily), applying as
    ``owner`` (by default the CLI), changing rules in place where it can if ``in_place``."""
    from cgpolicy.enforcer.engine import Enforcer

    settings: Settings = ctx.obj
    return Enforcer(
        settings.resolved_cgroup_root(),
        settings.resolved_bpf_dir(),
        settings.dev_root,
        owner,
        lock_timeout=settings.lock_timeout,
        in_place=in_place,
    )


def _print_plans(
    planned: list,
    as_json: bool,
    errors: dict[str, str] | None = None,
    pending: dict | None = None,  # policy -> PendingRecord: confirmations pending
    extra: dict | None = None,  # more top-level keys of the JSON report
) -> None:
    from cgpolicy.enforcer.plan import Action
    from cgpolicy.enforcer.rollout import describe_pending, pending_json

    errors, pending = errors or {}, pending or {}
    if as_json:
        report = []
        for item in planned:
            entry = item.plan.to_json()
            entry["error"] = errors.get(item.plan.name)
            record = pending.get(item.plan.name)
            entry["pending"] = pending_json(record) if record is not None else None
            report.append(entry)
        typer.echo(json.dumps({"policies": report, **(extra or {})}, indent=2))
        return
    for item in planned:
        typer.echo(item.plan.summary())
        for warning in item.plan.device_warnings():
            typer.echo(f"  warning: {warning}")
        for step in item.plan.steps:
            if step.action is not Action.KEEP:
                typer.echo(f"  {step.describe()}")
        if item.plan.name in errors and not item.plan.blocked:
            typer.echo(f"  FAILED: {errors[item.plan.name]} (previous state kept)")
        if item.plan.name in pending:
            typer.echo(f"  {describe_pending(pending[item.plan.name])}")


@app.command()
def plan(
    ctx: typer.Context,
    paths: PathsArgument,
    as_json: JsonOption = False,
    force: ForceOption = False,
) -> None:
    """Show what `apply` would change in the kernel for these policies; change nothing.

    Refuses, as `apply` would, a policy that could deny something to the cgroup of this
    cgpolicy, of the processes that started it, of its session's leader, of an sshd or of
    the reconcile service (the lockout guard), unless --force; and shows confirmations
    pending from `apply --confirm-within` (docs/rollout.md).
    """
    from cgpolicy.enforcer.rollout import plan_checked

    policies = _load_valid(paths)
    planned, records = plan_checked(_enforcer(ctx), policies, force)
    _print_plans(planned, as_json, pending=records)
    blocked = any(item.plan.blocked for item in planned)
    raise typer.Exit(EXIT_FAILURE if blocked else EXIT_OK)


@app.command()
def apply(
    ctx: typer.Context,
    paths: PathsArgument,
    as_json: JsonOption = False,
    force: ForceOption = False,
    confirm_within: Annotated[
        str | None,
        typer.Option(
            "--confirm-within",
            metavar="DURATION",
            help="Keep the way back: unless `cgpolicy confirm` comes within DURATION (60s, "
            "2m, 1h or seconds), every changed policy is switched back to what it was (a new "
            "one is removed), even if this terminal is gone (docs/rollout.md).",
        ),
    ] = None,
) -> None:
    """Enforce policies on their target cgroups; print what changed.

    Idempotent: a second run changes nothing. A policy that fails to apply keeps what it
    enforced before; the exit status is then 1. Refused unless --force: a policy the
    reconcile service or a running `cgpolicy run` holds (docs/ownership.md), one that could
    deny something to this session, an sshd or the reconcile service (the lockout guard),
    and one waiting for `cgpolicy confirm` (docs/rollout.md).
    """
    from cgpolicy.durations import DurationError
    from cgpolicy.enforcer.rollout import apply_with_way_back, parse_duration, plan_checked

    within = None
    if confirm_within is not None:
        try:
            within = parse_duration(confirm_within)
        except DurationError as error:
            _fail(f"--confirm-within: {error}", EXIT_INVALID)
    policies = _load_valid(paths)
    enforcer = _enforcer(ctx)
    with enforcer.locked():
        planned, records = plan_checked(enforcer, policies, force)
        rollout = apply_with_way_back(enforcer, planned, within, records)
    _report_outcomes(rollout.outcomes, as_json, rollout)


def _report_outcomes(outcomes: list, as_json: bool, rollout=None) -> None:  # Rollout
    from cgpolicy.enforcer.engine import Planned
    from cgpolicy.enforcer.rollout import going_back, when

    errors = {o.plan.name: o.error for o in outcomes if o.error}
    armed = {record.policy: record for record in rollout.pending} if rollout else {}
    extra = {"confirm": rollout.to_json()} if rollout else None
    _print_plans([Planned(o.plan, None) for o in outcomes], as_json, errors, armed, extra)
    if not outcomes and not as_json:
        typer.echo("nothing to do: no policy is applied")
    if rollout and not as_json:
        for name in rollout.ended:
            typer.echo(f"{name}: its pending confirmation is ended: this apply is final")
        if rollout.within is not None and not rollout.pending:
            typer.echo("nothing changed: nothing waits for `cgpolicy confirm`")
        if rollout.pending:
            first = rollout.pending[0]
            names = " ".join(record.policy for record in rollout.pending)
            typer.echo(
                f"run `cgpolicy confirm {names}` before {when(first.deadline_wall)} to keep "
                "this; otherwise, "
                + "; ".join(f"{record.policy}: {going_back(record)}" for record in rollout.pending)
            )
    raise typer.Exit(EXIT_FAILURE if errors else EXIT_OK)


@app.command()
def remove(
    ctx: typer.Context,
    names: Annotated[list[str] | None, typer.Argument(help="Names of applied policies.")] = None,
    remove_all: Annotated[
        bool, typer.Option("--all", help="Remove every cgpolicy policy.")
    ] = False,
    as_json: JsonOption = False,
    force: ForceOption = False,
) -> None:
    """Detach and unpin what cgpolicy applied for these policies; nothing else is touched.

    A policy the reconcile service or a running `cgpolicy run` holds is refused unless
    --force (docs/ownership.md).
    """
    if bool(names) == remove_all:
        _fail("give policy names or --all (not both)", EXIT_INVALID)
    from cgpolicy.enforcer.rollout import end_removed

    enforcer = _enforcer(ctx)
    with enforcer.locked():
        outcomes = enforcer.apply(enforcer.plan_removal(None if remove_all else names, force=force))
        end_removed(enforcer, outcomes)  # a removal is final: no confirmation waits for it
    _report_outcomes(outcomes, as_json)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def run(
    ctx: typer.Context,
    policy_file: Annotated[Path, typer.Argument(help="A file holding one policy.")],
    command: Annotated[list[str], typer.Argument(help="The command, after `--`.")],
) -> None:
    """Run one command in a fresh cgroup under a policy: `cgpolicy run POLICY -- CMD...`.

    The policy's targets are replaced by the transient cgroup; everything is removed when
    the command ends, and its exit status is returned (127 if it cannot be found, 126 if it
    cannot be run, 128+N if killed by signal N).
    """
    from cgpolicy.enforcer.apply import ApplyError
    from cgpolicy.enforcer.transient import run_under_policy
    from cgpolicy.kernel.processes import CommandNotRun

    policies = _load_valid([policy_file])
    if len(policies) != 1:
        _fail(
            f"{policy_file} holds {len(policies)} policies; `run` takes exactly one", EXIT_INVALID
        )
    try:
        status = run_under_policy(_enforcer(ctx), policies[0], command)
    except CommandNotRun as error:
        _fail(str(error), error.status)
    except (ApplyError, OSError) as error:
        _fail(str(error))
    raise typer.Exit(status if status >= 0 else 128 - status)


@app.command()
def reconcile(
    ctx: typer.Context,
    policy_dir: Annotated[
        Path, typer.Option("--policy-dir", help="Folder of policy files (a ConfigMap mount works).")
    ],
    interval: Annotated[
        float,
        typer.Option(
            "--interval",
            min=0.1,
            max=86400.0,  # a day; also keeps inf and nan out of the loop's timers
            help="Seconds between full resyncs (0.1 to 86400).",
        ),
    ] = 30.0,
    once: Annotated[bool, typer.Option("--once", help="Run a single pass and exit.")] = False,
    metrics_addr: Annotated[
        str | None,
        typer.Option(
            "--metrics-addr",
            help="HOST:PORT for /metrics (Prometheus), /healthz (liveness: the loop is alive)"
            " and /readyz (readiness: every policy in the folder is applied). ':PORT' is"
            " 127.0.0.1:PORT; every address only when asked for, as 0.0.0.0:PORT or [::]:PORT.",
        ),
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            "--state-dir",
            envvar="CGPOLICY_STATE_DIR",
            help="Root-only folder that keeps the last good version of each policy file, so"
            " that a file that is invalid or unreadable at a restart keeps it enforced"
            " \\[default: /var/lib/cgpolicy]",
        ),
    ] = None,
) -> None:
    """Keep the policies in a folder applied: new cgroups, changed files, drift, restarts.

    Applies every valid policy in the folder and removes policies that came from files
    since deleted. A file that fails validation is logged and counted, and the last good
    version of its policies stays enforced. A change of addresses, ports or actions in a
    policy the service loaded is made in place: every hook switches to the new rules at
    once, without reloading (docs/reconcile.md). SIGTERM exits and leaves enforcement in
    place; SIGHUP re-reads the folder. With --once, exit 1 when any policy failed to apply.
    """
    from cgpolicy.enforcer.ownership import Owner
    from cgpolicy.reconciler.lastgood import DEFAULT_STATE_DIR, LastGoodStore
    from cgpolicy.reconciler.loop import Service
    from cgpolicy.reconciler.metrics import Metrics, parse_metrics_addr
    from cgpolicy.reconciler.reconcile import Reconciler

    if not policy_dir.is_dir():
        _fail(f"policy folder {policy_dir} does not exist", EXIT_INVALID)
    enforcer = _enforcer(ctx, Owner.service(), in_place=True)  # applies as the service
    metrics = Metrics(enforcer.bpf_dir)
    metrics.healthy_within = max(60.0, 3 * interval)
    if metrics_addr:
        try:
            host, port = parse_metrics_addr(metrics_addr)
        except ValueError as error:
            _fail(str(error), EXIT_INVALID)
        try:
            metrics.serve(host, port)
        except OSError as error:  # in use, not an address of this host, not resolved
            _fail(f"--metrics-addr {host}:{port}: cannot listen: {error.strerror or error}")
        except (ValueError, TypeError) as error:  # a name the resolver cannot take
            _fail(f"--metrics-addr {host}:{port}: {error}", EXIT_INVALID)
    store = LastGoodStore(state_dir or DEFAULT_STATE_DIR, policy_dir)
    reconciler = Reconciler(enforcer, policy_dir, metrics, store)
    if once:
        report = reconciler.reconcile()
        raise typer.Exit(EXIT_FAILURE if report.failed else EXIT_OK)
    Service(reconciler, metrics.health, interval).run()


EXIT_DRIFT = 3


@app.command()
def audit(
    ctx: typer.Context,
    cgroup: Annotated[
        str | None,
        typer.Option("--cgroup", help="Only this cgroup and its subtree (relative path)."),
    ] = None,
    as_json: JsonOption = False,
    show_all: Annotated[
        bool,
        typer.Option("--all", help="Also list cgroups that only inherit programs."),
    ] = False,
) -> None:
    """Show every program at every cgroup hook, ours and foreign, and drift.

    Per cgroup: hook, program id, name, tag, attach mode, owner, policy and revision,
    what the cgroup inherits from its ancestors, per-rule counters, and drift from what
    cgpolicy applied (missing, stale, unexpected, orphaned).

    Exit when in sync, 3 when drift was found, 1 on failure.
    """
    from cgpolicy.audit.collect import audit as run_audit
    from cgpolicy.audit.render import render
    from cgpolicy.kernel.cgroup import CgroupError, is_cgroup, resolve
    from cgpolicy.kernel.syscall import BpfError

    settings: Settings = ctx.obj
    root = settings.resolved_cgroup_root()
    try:
        top = resolve(cgroup, root) if cgroup else root
        if not is_cgroup(top):
            _fail(f"no cgroup {cgroup} under {root}", EXIT_INVALID)
        result = run_audit(root, settings.bpf_dir_to_read(), top, show_all)
    except (BpfError, CgroupError) as error:
        _fail(str(error))
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
    else:
        typer.echo(render(result.cgroups, result.dns, result.pending))
    raise typer.Exit(EXIT_DRIFT if result.drifted else EXIT_OK)


@app.command()
def events(
    ctx: typer.Context,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep waiting for new events.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Deny events (and audit-mode would-deny events) of every applied policy.

    Reading consumes them. Events the kernel's rate limit dropped are reported as counts.
    """
    from cgpolicy.events.reader import EventReader
    from cgpolicy.kernel.syscall import BpfError

    settings: Settings = ctx.obj

    def emit(event) -> None:  # Event
        typer.echo(json.dumps(event.to_json()) if as_json else event.line())

    def on_dropped(policy: str, hook: str, count: int) -> None:
        if as_json:
            typer.echo(
                json.dumps({"type": "dropped", "policy": policy, "hook": hook, "count": count})
            )
        else:
            typer.echo(f"{count} {policy} {hook} events dropped by the rate limit", err=True)

    try:
        reader = EventReader(settings.bpf_dir_to_read(), settings.resolved_cgroup_root())
    except (BpfError, OSError) as error:
        _fail(str(error))
    try:
        if follow:
            try:
                reader.follow(emit, on_dropped)
            except KeyboardInterrupt:
                pass
        else:
            for event in reader.drain():
                emit(event)
            for policy, hooks in reader.dropped().items():
                for hook, count in sorted(hooks.items()):
                    if count:
                        on_dropped(policy, hook, count)
    finally:
        reader.close()
    raise typer.Exit(EXIT_OK)


@app.command(
    epilog="ACTION: egress|ingress PROTO ADDR\\[:PORT] \\[--icmp-type N] \\[--interface NAME]"
    " | connect|sendmsg|bind PROTO ADDR:PORT | socket FAMILY TYPE \\[PROTO]"
    " | device c|b MAJOR:MINOR ACCESS | device /dev/PATH ACCESS | sysctl read|write NAME."
    " IPv6 with a port: \\[fd00::1]:443. See docs/explain.md.",
)
def explain(
    ctx: typer.Context,
    words: Annotated[
        list[str],
        typer.Argument(
            metavar="[POLICY] ACTION...",
            help="A policy file or folder (not with --cgroup), then the action.",
        ),
    ],
    cgroup: Annotated[
        str | None,
        typer.Option(
            "--cgroup",
            help="Explain against what cgpolicy applied to this cgroup and its ancestors.",
        ),
    ] = None,
    icmp_type: Annotated[
        int | None, typer.Option("--icmp-type", help="ICMP/ICMPv6 type of the packet.")
    ] = None,
    interface: Annotated[
        str | None, typer.Option("--interface", help="Interface name (or index) of the packet.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Say whether policies allow or deny one action, and which rule decides.

    Example: cgpolicy explain web.yaml egress tcp 10.1.2.3:443

    Exit 0 when explained, whatever the verdict; 2 for invalid input.
    """
    from cgpolicy.explain.actions import ACTION_WORDS, ExplainError, parse_action
    from cgpolicy.explain.applied import explain_cgroup
    from cgpolicy.explain.explanation import explain_files
    from cgpolicy.explain.render import render, to_json

    settings: Settings = ctx.obj
    has_policy = bool(words) and words[0].lower() not in ACTION_WORDS
    if has_policy == (cgroup is not None):
        _fail("give a POLICY file or --cgroup PATH (one of them) before the action", EXIT_INVALID)
    try:
        parsed = parse_action(words[1:] if has_policy else words, icmp_type, interface)
        if cgroup is not None:
            root, bpf_dir = settings.resolved_cgroup_root(), settings.resolved_bpf_dir()
            explanation = explain_cgroup(root, bpf_dir, cgroup, parsed, settings.dev_root)
        else:
            policies = _load_valid([Path(words[0])])
            pairs = [(p, p.source.file if p.source else words[0]) for p in policies]
            explanation = explain_files(pairs, parsed, settings.dev_root)
    except ExplainError as error:
        _fail(str(error), EXIT_INVALID)
    typer.echo(json.dumps(to_json(explanation), indent=2) if as_json else render(explanation))
    raise typer.Exit(EXIT_OK)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def learn(
    ctx: typer.Context,
    command: Annotated[
        list[str] | None, typer.Argument(help="The command to observe, after `--`.")
    ] = None,
    cgroup: Annotated[
        str | None,
        typer.Option(
            "--cgroup", help="Observe this existing cgroup (relative to the cgroup2 mount)."
        ),
    ] = None,
    duration: Annotated[
        str | None,
        typer.Option(
            "--for", help="How long to observe --cgroup: 90s, 15m, 2h (Ctrl-C ends early)."
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the policy here, not to stdout.")
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="metadata.name of the policy written.")
    ] = None,
    merge_prefixes: Annotated[
        bool,
        typer.Option(
            "--merge-prefixes",
            help="Write hosts as the prefixes they fill (exact: only prefixes whose every "
            "address was seen).",
        ),
    ] = False,
    merge_min_hosts: Annotated[
        int | None,
        typer.Option(
            "--merge-min-hosts",
            min=2,
            help="With --merge-prefixes, also widen a /24 (IPv6: /64) in which at least N "
            "hosts were seen to the whole prefix (marked WIDENED).",
        ),
    ] = None,
    against: Annotated[
        Path | None,
        typer.Option("--against", help="Write only what this policy would deny: the rules to add."),
    ] = None,
    linger: Annotated[
        float,
        typer.Option("--linger", min=0, max=60, help="Seconds to go on observing after CMD exits."),
    ] = 1.0,
) -> None:
    """Observe a workload on every hook and write the policy that allows exactly what it did.

    `cgpolicy learn [-o FILE] -- CMD ARGS...` runs CMD in a fresh cgroup, observes it until it
    exits and returns its exit status. `cgpolicy learn --cgroup PATH --for 10m [-o FILE]`
    observes an existing cgroup. Observation is exact (kernel counters) and allows
    everything. Comments give counts, first and last seen, executables. docs/learn.md.
    """
    from cgpolicy.learn.main import LearnError
    from cgpolicy.learn.main import learn as run_learn
    from cgpolicy.learn.session import parse_duration
    from cgpolicy.learn.write import PrefixMerge, safe

    settings: Settings = ctx.obj
    if bool(command) == (cgroup is not None):
        _fail("give either -- CMD ARGS... or --cgroup PATH --for DURATION", EXIT_INVALID)
    seconds = None
    if cgroup is not None:
        if duration is None:
            _fail("--cgroup needs --for DURATION (e.g. --for 10m)", EXIT_INVALID)
        try:
            seconds = parse_duration(duration)
        except ValueError as error:
            _fail(f"--for: {error}", EXIT_INVALID)
    elif duration is not None:
        _fail("--for goes with --cgroup; `-- CMD` is observed until it exits", EXIT_INVALID)
    if merge_min_hosts is not None and not merge_prefixes:
        _fail("--merge-min-hosts goes with --merge-prefixes", EXIT_INVALID)
    if name is not None and not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", name):
        _fail(f"--name {name!r} is not a policy name (lowercase DNS label)", EXIT_INVALID)
    existing = None
    if against is not None:
        policies = _load_valid([against])
        if len(policies) != 1:
            _fail(f"{against} holds {len(policies)} policies; --against takes one", EXIT_INVALID)
        existing = policies[0]
    if output is not None and (output.is_dir() or not output.parent.is_dir()):
        why = "is a folder" if output.is_dir() else "is in no existing folder"
        _fail(f"-o {output} {why}: give a file to write the policy to", EXIT_INVALID)
    merge = PrefixMerge(merge_min_hosts) if merge_prefixes else None
    try:
        outcome = run_learn(
            settings.resolved_cgroup_root(),
            settings.dev_root,
            command=command,
            cgroup=cgroup,
            seconds=seconds,
            name=name,
            merge=merge,
            against=existing,
            linger=linger,
        )
    except LearnError as error:
        _fail(str(error), error.status)
    for warning in outcome.warnings:  # may quote what the workload named: escaped
        typer.echo(f"warning: {safe(warning, 400)}", err=True)
    if output is None:
        typer.echo(outcome.text, nl=False)
    else:
        try:
            _write_output(output, outcome.text.encode())
        except OSError as error:  # what was learned is not lost: it goes to stdout
            typer.echo(
                f"cgpolicy: cannot write {output}: {error.strerror}; the policy follows on stdout",
                err=True,
            )
            typer.echo(outcome.text, nl=False)
            raise typer.Exit(EXIT_FAILURE) from None
        seen = sum(outcome.observations.seen.values())
        typer.echo(f"wrote {output} from {_count(seen, 'action')} observed", err=True)
    status = outcome.status
    if cgroup is not None and outcome.observations.total_lost:
        status = EXIT_FAILURE  # incomplete: a script must not take it for the whole truth
    raise typer.Exit(status if status >= 0 else 128 - status)


@app.command(name="test")
def test_policies(
    ctx: typer.Context,
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="Test files (kind: CgroupPolicyTest), or folders: every *.yaml / *.yml test "
            "file in them (policy files there are left out)."
        ),
    ],
    kernel: Annotated[
        bool,
        typer.Option(
            "--kernel",
            help="Also run every case through the real programs, applied under transient "
            "names to a throwaway cgroup that is removed afterwards (root).",
        ),
    ] = False,
    junit: Annotated[
        Path | None, typer.Option("--junit", help="Write JUnit XML (for CI) to this file.")
    ] = None,
    as_json: JsonOption = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Also list the cases that passed.")
    ] = False,
) -> None:
    """Run policy test cases: expected verdicts and deciding rules (docs/testing.md).

    Each case goes through the reference evaluator (what `explain` uses) and, with
    --kernel, through the compiled programs: a disagreement between the two is a failure of
    its own. Lists the rules no case decided. Exit 0 when every case passes, 1 on a failure
    or disagreement, 2 for invalid test files or policies.
    """
    from cgpolicy.testing import run_tests
    from cgpolicy.testing.report import junit as junit_xml
    from cgpolicy.testing.report import render
    from cgpolicy.testing.report import to_json as report_json
    from cgpolicy.testing.spec import load_tests

    settings: Settings = ctx.obj
    loaded = load_tests(list(paths))
    for problem in loaded.problems:
        typer.echo(problem.format(), err=True)
    if not loaded.ok:
        raise typer.Exit(EXIT_INVALID)
    enforcer = _enforcer(ctx) if kernel else None
    try:
        report = run_tests(loaded.files, settings.dev_root, enforcer)
    except KeyboardInterrupt:
        _fail("interrupted" + ("; what the kernel run made was removed" if kernel else ""), 130)
    if junit is not None:
        try:
            _write_output(junit, junit_xml(report))
        except OSError as error:
            _fail(f"cannot write {junit}: {error.strerror or error}")
    typer.echo(json.dumps(report_json(report), indent=2) if as_json else render(report, verbose))
    raise typer.Exit(EXIT_OK if report.ok else EXIT_FAILURE)


@app.command("confirm")
def confirm_command(
    ctx: typer.Context,
    names: Annotated[
        list[str] | None,
        typer.Argument(help="Policies to keep (default: every one waiting for confirmation)."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Keep what `apply --confirm-within` applied: its rollback is cancelled.

    Exit 0 when every named policy (or every pending one) was confirmed; 1 when one was
    not: its deadline had passed (it is rolled back now, and says so), or nothing waited
    for confirmation.
    """
    from cgpolicy.enforcer.rollout import confirm

    settings: Settings = ctx.obj
    root, bpf_dir = settings.resolved_cgroup_root(), settings.resolved_bpf_dir()
    results = confirm(bpf_dir, root, names or None, settings.lock_timeout)
    if as_json:
        typer.echo(json.dumps({"policies": [r.to_json() for r in results]}, indent=2))
    elif not results:
        typer.echo("nothing to confirm: no confirmation is pending", err=True)
    for result in [] if as_json else results:
        typer.echo(result.message, err=not result.ok)
    ok = bool(results) and all(result.ok for result in results)
    raise typer.Exit(EXIT_OK if ok else EXIT_FAILURE)


@app.command("rollback-timer", hidden=True)
def rollback_timer(
    ctx: typer.Context, token: Annotated[str, typer.Argument(help="The apply's token.")]
) -> None:
    """The rollback process `apply --confirm-within` starts (not for people): waits for
    the deadline, then rolls back what was not confirmed; logs to syslog."""
    import logging.handlers
    import os

    from cgpolicy.enforcer.rollout import run_timer

    if os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log")
        handler.setFormatter(logging.Formatter("cgpolicy-rollback[%(process)d]: %(message)s"))
        logging.getLogger().addHandler(handler)
    settings: Settings = ctx.obj
    run_timer(settings.resolved_bpf_dir(), settings.resolved_cgroup_root(), token)


def main() -> None:
    """Run the CLI; a failure the kernel or the filesystem reports is one line, not a
    traceback (`--log-level debug` shows the traceback too)."""
    try:
        app()
    except Exception as error:
        if not isinstance(error, _runtime_errors()):
            raise
        logging.getLogger("cgpolicy").debug("failed", exc_info=True)
        typer.echo(f"cgpolicy: {error}", err=True)
        raise SystemExit(EXIT_FAILURE) from None


def _runtime_errors() -> tuple[type[Exception], ...]:
    """What the kernel layer reports; imported only once something failed."""
    from cgpolicy.compiler.spec import CompileError
    from cgpolicy.enforcer.apply import ApplyError
    from cgpolicy.kernel.loader import LoaderError
    from cgpolicy.kernel.syscall import BpfError
    from cgpolicy.kernel.trusted import UntrustedFolder

    return (OSError, BpfError, LoaderError, ApplyError, CompileError, UntrustedFolder)
