#!/usr/bin/env python3
"""ATTACK 6 (local unprivileged user): read or write what cgpolicy trusts for DNS names:
the pins of `learned`, dns_stats, dns_scope, dns_targets, dns_jump and the metadata (the
`names` list), and the policy file. Also: a bpffs folder pre-created by the user at the
path root will use (bpffs is 1777).

Each check runs as uid 65534: a listing, open(2) of each pin, and BPF_OBJ_GET (the bpf()
syscall, which since 5.19 no longer refuses unprivileged callers globally: the pin's file
mode decides) for read and for write.

Run as root: .venv/bin/python attack/pins_unprivileged.py   (exit 0 = everything held)
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import common

PROBE = r'''
import ctypes, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
BPF_OBJ_GET = 7
class Attr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32), ("file_flags", ctypes.c_uint32), ("pad", ctypes.c_uint8 * 64)]
out = {}
for path in sys.argv[1:]:
    row = {}
    try:
        row["listdir"] = len(os.listdir(path)) if os.path.isdir(path) else None
    except OSError as e:
        row["listdir"] = e.strerror
    for flag, name in ((0, "rdwr"), (1 << 3, "rdonly"), (1 << 4, "wronly")):
        p = ctypes.create_string_buffer(path.encode())
        attr = Attr(ctypes.cast(p, ctypes.c_void_p).value, 0, flag)
        fd = libc.syscall(321, BPF_OBJ_GET, ctypes.byref(attr), ctypes.sizeof(attr))
        row["obj_get_" + name] = "OK fd" if fd >= 0 else os.strerror(ctypes.get_errno())
        if fd >= 0:
            os.close(fd)
    out[path] = row
print(json.dumps(out))
'''


def main() -> int:
    cgs = common.setup("w")
    spec = {"sockets": {"connect": {"default": "deny", "rules": [
        {"action": "allow", "protocol": "udp", "cidrs": ["127.77.4.53/32"], "ports": [53]},
        {"action": "allow", "fqdns": ["secret-partner.example.test"]}]}}}
    policy = common.write_policy("pins", common.policy("attack-pins", [cgs["w"]], spec))
    common.cli("apply", str(policy))
    paths = [common.BPF_DIR, *sorted(common.BPF_DIR.rglob("*"))]
    held = True
    for path in paths:
        mode = path.lstat().st_mode
        print(f"{stat.filemode(mode)} {path.stat().st_uid}:{path.stat().st_gid} {path}")
        if mode & 0o077 & ~0o011 if path.is_dir() else mode & 0o066:
            held = False
    script = f"/tmp/{common.TAG}-probe.py"
    Path(script).write_text(PROBE)
    done = common.in_cgroup(cgs["w"], ["/usr/bin/python3", script, *map(str, paths)])
    rows = json.loads(done.stdout)
    for path, row in rows.items():
        print("as nobody:", path, row)
        if any(v == "OK fd" for v in row.values()) or isinstance(row["listdir"], int):
            held = False
    # policy file: what cgpolicy reads it as
    print("policy file:", stat.filemode(policy.stat().st_mode), policy)
    # a folder an unprivileged user made at the path root will use
    squat = Path(f"/sys/fs/bpf/{common.TAG}-squat")
    done = common.in_cgroup(cgs["w"], ["mkdir", str(squat)])
    print("nobody mkdir in bpffs:", done.returncode, done.stderr.strip())
    done = common.subprocess.run([*common.CLI, "--bpf-dir", str(squat), "apply", str(policy)], capture_output=True, text=True)
    print("apply into the squatted folder:", done.returncode, (done.stdout + done.stderr).strip()[-400:])
    if done.returncode == 0:
        held = False
        common.subprocess.run([*common.CLI, "--bpf-dir", str(squat), "remove", "--all"], capture_output=True)
    common.subprocess.run(["rm", "-rf", str(squat)])
    print("RESULT:", "held" if held else "BROKE")
    return 0 if held else 1


if __name__ == "__main__":
    sys.exit(main())
