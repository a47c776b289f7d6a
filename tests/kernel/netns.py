"""Network namespaces joined by veth pairs, for traffic that is not loopback.

    root ns:  <veth root end> 10.199.N.1/24 fd00:199:N::1/64   (N from the test process's pid)
                   |
    ns b:     <veth b end>   10.199.N.2/24 fd00:199:N::2/64     echo servers on PORTS
              <veth b end>   10.199.1.2/24 fd00:199::2/64
                   |
    ns a:     <veth a end>   10.199.1.1/24 fd00:199::1/64       probes (in a scratch cgroup)

Probes run in ns a (`ip netns exec`, which keeps the caller's cgroup) to test traffic between
two namespaces. The root-ns pair exists for `interfaces` rules: cgpolicy resolves interface
names in its own network namespace (the test process's), so a rule naming an interface can
only be checked on an interface of the root namespace; probes for it run in the root ns.
Its subnet is the one part shared with the rest of the host: N = 2 + pid % 250, or the next
one no root-ns interface holds, so that two test sessions at once (or a session and a
leftover of a killed one) each route their own traffic.

Only the namespaces and interfaces made here are touched, and all of them are removed in
`close()` (deleting ns b deletes both veth pairs).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

PROBE_EXTRA = Path(__file__).with_name("probe_extra.py")
IFA_F_NODAD = 0x02
# Ports the echo servers in ns b listen on (TCP and UDP); a private namespace, no clashes.
PORTS = (8001, 8002, 8003, 8004, 8005)


def _free_subnet(first: int) -> int:
    """The first N from ``first`` on (2..251, wrapping) whose 10.199.N.0/24 no interface of
    the root namespace holds (never 1: ns b holds 10.199.1.0/24 too)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        taken = {
            int(address.split(".")[2])
            for message in ipr.get_addr(family=socket.AF_INET)
            if (address := message.get_attr("IFA_ADDRESS") or "").startswith("10.199.")
        }
    for offset in range(250):
        subnet = 2 + (first - 2 + offset) % 250
        if subnet not in taken:
            return subnet
    raise RuntimeError("every 10.199.N.0/24 is in use in the root namespace")


@dataclass
class VethNet:
    ns_a: str
    ns_b: str
    veth_a: str  # in ns a
    veth_root: str  # in the root ns
    a4: str = "10.199.1.1"
    b4: str = "10.199.1.2"
    a6: str = "fd00:199::1"
    b6: str = "fd00:199::2"
    root4: str = ""  # the root-ns pair: set by create(), per test process
    broot4: str = ""  # ns b's address on the root-ns pair
    root6: str = ""
    broot6: str = ""
    ports: tuple[int, ...] = PORTS
    _server: subprocess.Popen[str] | None = field(default=None, repr=False)

    @classmethod
    def create(cls) -> VethNet:
        pid = os.getpid()
        subnet = _free_subnet(2 + pid % 250)
        net = cls(
            f"cgpt-a-{pid}",
            f"cgpt-b-{pid}",
            f"cgpt{pid}a",
            f"cgpt{pid}r",
            root4=f"10.199.{subnet}.1",
            broot4=f"10.199.{subnet}.2",
            root6=f"fd00:199:{subnet:x}::1",
            broot6=f"fd00:199:{subnet:x}::2",
        )
        try:
            net._build()
            net._start_servers()
            net._wait_connected()
        except BaseException:
            net.close()
            raise
        return net

    def _build(self) -> None:
        from pyroute2 import IPRoute, netns

        netns.create(self.ns_a)
        netns.create(self.ns_b)
        veth_b1, veth_b2 = f"{self.veth_a[:-1]}b", f"{self.veth_a[:-1]}c"
        with IPRoute() as ipr:
            ipr.link("add", ifname=self.veth_a, kind="veth", peer={"ifname": veth_b1})
            ipr.link("add", ifname=self.veth_root, kind="veth", peer={"ifname": veth_b2})
            ipr.link("set", index=ipr.link_lookup(ifname=self.veth_a)[0], net_ns_fd=self.ns_a)
            for name in (veth_b1, veth_b2):
                ipr.link("set", index=ipr.link_lookup(ifname=name)[0], net_ns_fd=self.ns_b)
        layout = (
            (None, self.veth_root, self.root4, self.root6),
            (self.ns_a, self.veth_a, self.a4, self.a6),
            (self.ns_b, veth_b1, self.b4, self.b6),
            (self.ns_b, veth_b2, self.broot4, self.broot6),
        )
        for ns, ifname, v4, v6 in layout:
            with IPRoute(netns=ns) if ns else IPRoute() as ipr:
                index = ipr.link_lookup(ifname=ifname)[0]
                ipr.addr("add", index=index, address=v4, prefixlen=24)
                ipr.addr("add", index=index, address=v6, prefixlen=64, flags=IFA_F_NODAD)
                ipr.link("set", index=index, state="up")
                if ns:
                    ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")

    def _start_servers(self) -> None:
        argv = [sys.executable, str(PROBE_EXTRA), "echo-servers", "::", *map(str, self.ports)]
        self._server = subprocess.Popen(
            self.exec_argv(self.ns_b, argv), stdout=subprocess.PIPE, text=True
        )
        assert self._server.stdout is not None
        line = self._server.stdout.readline()
        if not json.loads(line or "{}").get("ready"):
            raise RuntimeError(f"echo servers in {self.ns_b} did not start: {line!r}")

    def _wait_connected(self) -> None:
        """TCP from ns a to both ns b addresses and from the root ns over the other pair."""
        deadline = time.monotonic() + 10
        checks = [(self.ns_a, self.b4), (self.ns_a, self.b6), (None, self.broot4)]
        checks.append((None, self.broot6))
        while checks:
            ns, host = checks[0]
            argv = [sys.executable, str(PROBE_EXTRA), "connect", "tcp", host, str(self.ports[0])]
            done = subprocess.run(
                self.exec_argv(ns, argv) if ns else argv, capture_output=True, text=True
            )
            if done.returncode == 0:
                checks.pop(0)
            elif time.monotonic() > deadline:
                raise RuntimeError(f"no connectivity to {host} from {ns or 'root ns'}: {done}")
            else:
                time.sleep(0.1)

    @staticmethod
    def exec_argv(ns: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]

    def ifindex(self, name: str) -> int:
        return socket.if_nametoindex(name)

    def close(self) -> None:
        from pyroute2 import IPRoute, netns

        if self._server is not None:
            self._server.kill()
            self._server.wait()
        existing = set(netns.listnetns())
        for ns in (self.ns_a, self.ns_b):
            if ns in existing:
                netns.remove(ns)
        with IPRoute() as ipr:  # normally gone with ns b already
            for index in ipr.link_lookup(ifname=self.veth_root):
                try:
                    ipr.link("del", index=index)
                except Exception:  # vanished meanwhile
                    pass


@contextmanager
def loopback_netns(name: str) -> Iterator[str]:
    """A network namespace with only its loopback, up (127.0.0.1 and ::1), and default
    routes into it for both families, so that a UDP connect to any address finds a route
    and only the policy decides. Removed afterwards, also when the block fails."""
    from pyroute2 import IPRoute, netns

    netns.create(name)
    try:
        with IPRoute(netns=name) as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.link("set", index=lo, state="up")
            ipr.route("add", dst="0.0.0.0/0", oif=lo)
            ipr.route("add", dst="::/0", oif=lo, family=socket.AF_INET6)
        yield name
    finally:
        netns.remove(name)
