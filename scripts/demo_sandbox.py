"""Demo: a command under the build sandbox policy reaches loopback but not the outside.

A listener on an ephemeral loopback port runs here, outside any policy; `cgpolicy run`
starts a probe in a fresh cgroup with policies/build-sandbox.yaml applied to it.
"""

import socket
import subprocess
import sys
import threading
from pathlib import Path

PROBE = """
import socket, subprocess, sys
for host, port in (("127.0.0.1", int(sys.argv[1])), ("192.0.2.1", 443)):
    try:
        socket.create_connection((host, port), timeout=2).close()
        print(f"  connect {host}:{port}: allowed")
    except OSError as error:
        print(f"  connect {host}:{port}: denied ({error.strerror or error})")
own = open("/proc/self/cgroup").read().split("::", 1)[1].strip().lstrip("/")
print(f"== cgpolicy audit --cgroup {own}  (from inside the sandbox)")
subprocess.run([sys.argv[2], "audit", "--cgroup", own])
"""

root = Path(__file__).resolve().parents[1]
server = socket.create_server(("127.0.0.1", 0))
threading.Thread(target=lambda: server.accept(), daemon=True).start()
port = server.getsockname()[1]
command = [str(root / ".venv/bin/cgpolicy"), "run", str(root / "policies/build-sandbox.yaml")]
command += ["--", sys.executable, "-c", PROBE, str(port), command[0]]
sys.exit(subprocess.run(command).returncode)
