"""`cgpolicy doctor`: can this host enforce policies? Every failed check carries its fix."""

from __future__ import annotations

import os
import platform
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from cgpolicy.mounts import DEFAULT_BPFFS, find_bpffs, find_cgroup2_root, read_mounts

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_BPF = 39


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def _effective_capabilities() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def check_privileges() -> Check:
    caps = _effective_capabilities()
    needed = {"CAP_BPF": CAP_BPF, "CAP_SYS_ADMIN": CAP_SYS_ADMIN, "CAP_NET_ADMIN": CAP_NET_ADMIN}
    missing = [name for name, bit in needed.items() if not caps & (1 << bit)]
    if not missing:
        return Check("privileges", True, "CAP_BPF, CAP_SYS_ADMIN and CAP_NET_ADMIN are effective")
    return Check(
        "privileges",
        False,
        f"missing {', '.join(missing)}",
        "run as root, or grant the capabilities (systemd: AmbientCapabilities=)",
    )


def check_cgroup2(cgroup_root: Path | None) -> Check:
    root = cgroup_root or find_cgroup2_root()
    if root is None:
        return Check(
            "cgroup2",
            False,
            "no cgroup2 hierarchy is mounted",
            "mount -t cgroup2 none /sys/fs/cgroup/unified"
            " (or boot with systemd.unified_cgroup_hierarchy=1)",
        )
    if not (root / "cgroup.procs").is_file():
        return Check("cgroup2", False, f"{root} is not a cgroup2 hierarchy", "check --cgroup-root")
    return Check("cgroup2", True, f"mounted at {root}")


def check_bpffs(bpf_dir: Path | None) -> Check:
    mounts = read_mounts()
    bpffs = find_bpffs(mounts)
    if bpffs is None:
        return Check(
            "bpffs",
            False,
            "no bpf filesystem is mounted; pins cannot be made",
            f"mount -t bpf bpf {DEFAULT_BPFFS}",
        )
    if bpf_dir is not None:
        bpf_mounts = [m.mount_point for m in mounts if m.fs_type == "bpf"]
        if not any(bpf_dir == mp or mp in bpf_dir.parents for mp in bpf_mounts):
            return Check("bpffs", False, f"{bpf_dir} is not on a bpf filesystem", "check --bpf-dir")
    return Check("bpffs", True, f"mounted at {bpffs}")


def check_store() -> Check:
    """Whether the compiled-program store holds a current, intact entry for every shipped
    C file: then no process needs bcc, LLVM or kernel headers."""
    from cgpolicy.kernel.loader import LoaderError
    from cgpolicy.kernel.loader import check_store as store_status
    from cgpolicy.kernel.store import store_dir

    try:
        status = store_status()
    except (LoaderError, OSError) as error:
        return Check("compiled-program store", False, str(error), "see the message")
    missing = sorted(name for name, ok in status.items() if not ok)
    if missing:
        return Check(
            "compiled-program store",
            False,
            f"{store_dir()} lacks a current entry for {', '.join(missing)}"
            " (each process would compile them with bcc)",
            "cgpolicy cache fill (scripts/setup.sh runs it)",
            required=False,
        )
    return Check("compiled-program store", True, f"{store_dir()}: every program is compiled")


def check_kernel_headers(needed: bool) -> Check:
    build = Path("/lib/modules") / platform.release() / "build"
    pinned = os.environ.get("BCC_KERNEL_SOURCE")
    if pinned:
        ok = (Path(pinned) / "include").is_dir()
        return Check(
            "kernel headers",
            ok,
            f"BCC_KERNEL_SOURCE={pinned}",
            "check BCC_KERNEL_SOURCE",
            required=needed,
        )
    if (build / "include").is_dir():
        return Check("kernel headers", True, f"{build} -> {build.resolve()}")
    return Check(
        "kernel headers",
        False,
        f"{build} is missing; bcc cannot compile programs"
        + ("" if needed else " (not needed while the compiled-program store is filled)"),
        "run scripts/setup.sh (installs linux-headers and links them for this kernel)",
        required=needed,
    )


def check_bcc(needed: bool) -> Check:
    """Found without importing it: importing bcc loads LLVM, which doctor does not need."""
    from importlib.util import find_spec

    if find_spec("bcc") is None:
        return Check(
            "bcc",
            False,
            "bcc's python bindings are not installed"
            + ("" if needed else " (not needed while the compiled-program store is filled)"),
            "apt-get install python3-bpfcc, and use a venv made with --system-site-packages",
            required=needed,
        )
    return Check("bcc", True, "python bindings installed")


def check_jit() -> Check:
    path = Path("/proc/sys/net/core/bpf_jit_enable")
    value = path.read_text().strip() if path.exists() else "absent"
    ok = value in {"1", "2"}
    return Check(
        "bpf JIT",
        ok,
        f"bpf_jit_enable={value}",
        "sysctl -w net.core.bpf_jit_enable=1",
        required=False,
    )


def check_btf() -> Check:
    ok = Path("/sys/kernel/btf/vmlinux").exists()
    detail = "kernel BTF available" if ok else "no /sys/kernel/btf/vmlinux"
    return Check("BTF", ok, detail, "a kernel built with CONFIG_DEBUG_INFO_BTF=y", required=False)


def check_bpftool() -> Check:
    path = shutil.which("bpftool")
    return Check(
        "bpftool",
        path is not None,
        path or "not found (optional; handy for inspecting what is attached)",
        "apt-get install bpftool",
        required=False,
    )


# The hooks cgpolicy compiles policy sections onto.
PROBED_HOOKS = ("ingress", "sock_create", "connect4", "bind6", "device", "sysctl")
_RETURN_ONE = bytes.fromhex("b7000000010000009500000000000000")  # r0 = 1; exit


def probe_program_types() -> list[Check]:
    """Load a two-instruction program of each type cgpolicy uses: the kernel says yes or no,
    which is more honest than reading its version or config."""
    from cgpolicy.kernel.bpf import Program
    from cgpolicy.kernel.hooks import hook
    from cgpolicy.kernel.syscall import BpfError

    checks = []
    for name in PROBED_HOOKS:
        target = hook(name)
        try:
            Program.load(target.prog_type, _RETURN_ONE, "cgp_probe", target.attach_type).close()
        except BpfError as error:
            checks.append(
                Check(
                    f"program type for {name}",
                    False,
                    f"the kernel refuses {target.prog_type.name.lower()} programs: {error}",
                    "a kernel built with CONFIG_CGROUP_BPF=y and CONFIG_BPF_SYSCALL=y",
                )
            )
            continue
        checks.append(Check(f"program type for {name}", True, target.prog_type.name.lower()))
    return checks


def run_checks(cgroup_root: Path | None, bpf_dir: Path | None) -> list[Check]:
    store = check_store()
    simple: list[Callable[[], Check]] = [
        check_privileges,
        lambda: store,
        lambda: check_kernel_headers(needed=not store.ok),
        lambda: check_bcc(needed=not store.ok),
        check_jit,
        check_btf,
        check_bpftool,
    ]
    checks = [check_cgroup2(cgroup_root), check_bpffs(bpf_dir)]
    checks.extend(check() for check in simple)
    if os.geteuid() == 0 or _effective_capabilities() & (1 << CAP_BPF):
        checks.extend(probe_program_types())
    return checks
