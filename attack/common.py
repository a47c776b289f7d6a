"""Shared helpers for the attack scripts (run as root; each script drops to uid 65534 for the
attacker's side). Everything lives under one scratch cgroup parent and one bpffs folder of
its own, removed at exit. DNS wire format by hand (struct): the attacker's side runs under
the system python3, with no third-party module."""

from __future__ import annotations

import atexit
import json
import subprocess
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLI = [str(REPO / ".venv/bin/cgpolicy")]
CG_ROOT = Path("/sys/fs/cgroup/unified")  # the cgroup2 mount (hybrid host)
TAG = f"cgp-attack-{os.getpid()}"
PARENT = CG_ROOT / TAG
BPF_DIR = Path("/sys/fs/bpf") / TAG
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*CLI, "--bpf-dir", str(BPF_DIR), *args], capture_output=True, text=True, timeout=300
    )
    if check and done.returncode != 0:
        sys.exit(f"cgpolicy {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def _cleanup() -> None:
    if BPF_DIR.exists():
        subprocess.run([*CLI, "--bpf-dir", str(BPF_DIR), "remove", "--all"], capture_output=True)
        shutil.rmtree(BPF_DIR, ignore_errors=True)
    if PARENT.exists():
        dirs = [Path(d) for d, _, _ in os.walk(PARENT)]
        for cg in dirs:
            try:
                pids = (cg / "cgroup.procs").read_text().split()
            except OSError:
                continue
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except ProcessLookupError:
                    pass
        for cg in sorted(dirs, key=lambda p: -len(p.parts)):
            try:
                cg.rmdir()
            except OSError as error:
                print(f"cleanup: {cg}: {error}", file=sys.stderr)


def setup(*targets: str) -> dict[str, Path]:
    atexit.register(_cleanup)
    PARENT.mkdir()
    (PARENT / "cgroup.subtree_control").write_text("")
    made = {}
    for name in targets:
        path = PARENT / name
        path.mkdir(parents=True)
        made[name] = path
    return made


def policy(name: str, targets: list[Path], spec: dict, *, globs: list[str] = ()) -> dict:
    """A policy document (JSON is YAML)."""
    return {
        "apiVersion": "cgpolicy.dev/v1",
        "kind": "CgroupPolicy",
        "metadata": {"name": name},
        "spec": {
            "mode": "enforce",
            "targets": [{"path": rel(t)} for t in targets] + [{"glob": g} for g in globs],
            **spec,
        },
    }


def rel(path: Path) -> str:
    return str(path.relative_to(CG_ROOT))


def write_policy(name: str, body: "str | dict") -> Path:
    path = Path(f"/tmp/{TAG}-{name}.yaml")
    path.write_text(textwrap.dedent(body) if isinstance(body, str) else json.dumps(body, indent=1))
    atexit.register(lambda: path.unlink(missing_ok=True))
    return path


def in_cgroup(cgroup: Path, argv: list[str], *, unprivileged: bool = True, **kw) -> subprocess.CompletedProcess[str]:
    """Run argv in ``cgroup`` (entered as root before dropping privileges)."""

    def enter() -> None:
        (cgroup / "cgroup.procs").write_text("0")

    full = [*NOBODY, *argv] if unprivileged else argv
    return subprocess.run(full, preexec_fn=enter, capture_output=True, text=True, timeout=60, **kw)


# --- DNS wire format ---------------------------------------------------------------------


def encode_name(name: str) -> bytes:
    out = b""
    for label in name.rstrip(".").split("."):
        raw = label.encode("latin-1")
        out += bytes([len(raw)]) + raw
    return out + b"\0"


def query(qid: int, name: str, qtype: int = 1) -> bytes:
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + encode_name(name) + struct.pack("!HH", qtype, 1)


def answer(q: bytes, addresses: list[str], ttl: int = 3600) -> bytes:
    """A response to query ``q`` with one A record per address, owners pointing at the question."""
    import ipaddress

    qid = struct.unpack("!H", q[:2])[0]
    body = q[12:]
    out = struct.pack("!HHHHHH", qid, 0x8180, 1, len(addresses), 0, 0) + body
    for address in addresses:
        ip = ipaddress.ip_address(address)
        kind = 1 if ip.version == 4 else 28
        out += struct.pack("!HHHIH", 0xC00C, kind, 1, ttl, len(ip.packed)) + ip.packed
    return out


def learned_rows() -> list[dict]:
    done = cli("audit", "--json", check=False)
    try:
        data = json.loads(done.stdout)
    except json.JSONDecodeError:
        return []
    return data.get("dns", []) if isinstance(data, dict) else []
