"""Two network namespaces joined by one veth pair: the servers of ``bench.compare`` in one,
its clients in the other.

    ns cgpb-b-<pid>  (servers)  veth cgpb<pid>b  10.198.1.2/24, 10.198.1.3/24
                                                 fd00:198::2/64, fd00:198::3/64
                       |
    ns cgpb-a-<pid>  (client)   veth cgpb<pid>a  10.198.1.1/24, fd00:198::1/64

``.2`` is the measured destination, ``.3`` the one every policy must block. Both namespaces
are private, so the addresses clash with nothing on the host, and deleting them removes the
pair and every iptables/nftables rule made inside them.

CPU placement (a 2-vCPU VM): the servers are pinned to one CPU and the clients to another
(``taskset``), and each veth end steers its receive processing (RPS) to the CPU of the
process that reads it. veth has no hardware interrupt: a packet sent in ns a is handed to
ns b's backlog, and with RPS that backlog is drained on the server's CPU instead of in the
sender's context. The client's CPU then does only the send path (socket, egress filters,
routing, veth transmit), so the filter under test is a larger share of its per-packet
cost.

    python -m bench.veth serve HOST PORT         accept and close TCP connections (the probe's
                                                 target) until killed; prints "ready"
    python -m bench.veth probe DEST BLOCKED PORT COUNT
                                                 COUNT UDP datagrams to BLOCKED, then a TCP
                                                 connect to DEST and one to BLOCKED; JSON
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

IFA_F_NODAD = 0x02
PROBE_PORT = 7000
IPERF_PORT = 5201
QPERF_PORT = 19765
REPO = Path(__file__).resolve().parents[1]


def cpus() -> tuple[int | None, int | None]:
    """(server CPU, client CPU): the last two CPUs this process may run on, the measured
    client on the very last (CPU 0 takes most of the housekeeping); None, None on one CPU."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        return None, None
    return allowed[-2], allowed[-1]


@dataclass
class VethPair:
    ns_client: str
    ns_server: str
    veth_client: str
    veth_server: str
    client4: str = "10.198.1.1"
    server4: str = "10.198.1.2"
    blocked4: str = "10.198.1.3"
    client6: str = "fd00:198::1"
    server6: str = "fd00:198::2"
    blocked6: str = "fd00:198::3"
    server_cpu: int | None = None
    client_cpu: int | None = None
    rps: bool = False
    _servers: list[subprocess.Popen[str]] = field(default_factory=list, repr=False)

    @classmethod
    def create(cls) -> VethPair:
        pid = os.getpid()
        server_cpu, client_cpu = cpus()
        pair = cls(
            f"cgpb-a-{pid}",
            f"cgpb-b-{pid}",
            f"cgpb{pid}a",
            f"cgpb{pid}b",
            server_cpu=server_cpu,
            client_cpu=client_cpu,
        )
        try:
            pair._build()
            pair._start_servers()
        except BaseException:
            pair.close()
            raise
        return pair

    def server(self, family: str) -> str:
        return self.server4 if family == "ipv4" else self.server6

    def blocked(self, family: str) -> str:
        return self.blocked4 if family == "ipv4" else self.blocked6

    def _build(self) -> None:
        from pyroute2 import IPRoute, netns

        netns.create(self.ns_client)
        netns.create(self.ns_server)
        with IPRoute() as ipr:
            ipr.link("add", ifname=self.veth_client, kind="veth", peer={"ifname": self.veth_server})
            # RPS is set here, in the root namespace's sysfs, and moves with the device
            if self.client_cpu is not None and self.server_cpu is not None:
                self._steer(self.veth_client, self.client_cpu)
                self._steer(self.veth_server, self.server_cpu)
                self.rps = True
            for name, ns in (
                (self.veth_client, self.ns_client),
                (self.veth_server, self.ns_server),
            ):
                ipr.link("set", index=ipr.link_lookup(ifname=name)[0], net_ns_fd=ns)
        layout = (
            (self.ns_client, self.veth_client, (self.client4,), (self.client6,)),
            (
                self.ns_server,
                self.veth_server,
                (self.server4, self.blocked4),
                (self.server6, self.blocked6),
            ),
        )
        for ns, ifname, v4s, v6s in layout:
            with IPRoute(netns=ns) as ipr:
                index = ipr.link_lookup(ifname=ifname)[0]
                for v4 in v4s:  # the first is the primary: the source of replies
                    ipr.addr("add", index=index, address=v4, prefixlen=24)
                ipr.addr("add", index=index, address=v6s[0], prefixlen=64, flags=IFA_F_NODAD)
                ipr.link("set", index=index, state="up")
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            # deprecated (preferred lifetime 0), so that IPv6 source selection never
            # answers from the blocked address: such a reply would not match the client's
            # connected UDP socket
            for address in v6s[1:]:
                subprocess.run(
                    ["ip", "-n", ns, "-6", "addr", "add", f"{address}/64", "dev", ifname]
                    + ["nodad", "preferred_lft", "0"],
                    check=True,
                )

    @staticmethod
    def _steer(ifname: str, cpu: int) -> None:
        queues = Path("/sys/class/net") / ifname / "queues"
        for queue in queues.glob("rx-*"):
            (queue / "rps_cpus").write_text(f"{1 << cpu:x}\n")

    def in_ns(self, ns: str, argv: list[str], cpu: int | None = None) -> list[str]:
        """argv run in network namespace ns (nsenter keeps the caller's mounts, so
        /sys/fs/cgroup stays visible to nft and iptables), pinned to cpu if given."""
        pinned = ["taskset", "-c", str(cpu), *argv] if cpu is not None else argv
        return ["nsenter", f"--net=/run/netns/{ns}", *pinned]

    def client(self, argv: list[str]) -> list[str]:
        return self.in_ns(self.ns_client, argv, self.client_cpu)

    def _start_servers(self) -> None:
        commands = (
            ["iperf3", "-s", "-p", str(IPERF_PORT)],
            ["qperf", "-lp", str(QPERF_PORT)],
            [sys.executable, "-m", "bench.veth", "serve", "::", str(PROBE_PORT)],
        )
        for argv in commands:
            proc = subprocess.Popen(
                self.in_ns(self.ns_server, argv, self.server_cpu),
                cwd=REPO,
                stdout=subprocess.PIPE if argv[0] == sys.executable else subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            self._servers.append(proc)
        probe_server = self._servers[-1]
        assert probe_server.stdout is not None
        if probe_server.stdout.readline().strip() != "ready":
            raise RuntimeError(f"probe server in {self.ns_server} did not start")
        deadline = time.monotonic() + 10
        while not self._listening({IPERF_PORT, QPERF_PORT, PROBE_PORT}):
            dead = [p.args for p in self._servers if p.poll() is not None]
            if dead:
                raise RuntimeError(f"server exited: {dead}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"servers in {self.ns_server} are not listening")
            time.sleep(0.05)

    def _listening(self, ports: set[int]) -> bool:
        found: set[int] = set()
        for table in ("tcp", "tcp6"):
            text = self.read_proc(self.ns_server, f"/proc/net/{table}")
            for line in text.splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":
                    found.add(int(fields[1].rsplit(":", 1)[1], 16))
        return ports <= found

    def read_proc(self, ns: str, path: str) -> str:
        """A /proc/net file as namespace ns sees it."""
        return subprocess.run(
            self.in_ns(ns, ["cat", path]), capture_output=True, text=True, check=True
        ).stdout

    def udp_received(self, family: str) -> int:
        """Datagrams that reached UDP in the server namespace, delivered or not (a port
        with no socket counts too): what got through the client's egress filters."""
        if family == "ipv4":
            lines = self.read_proc(self.ns_server, "/proc/net/snmp").splitlines()
            names, values = (line.split()[1:] for line in lines if line.startswith("Udp:"))
            row = dict(zip(names, map(int, values), strict=True))
            return row["InDatagrams"] + row["NoPorts"] + row["InErrors"]
        rows = dict(
            line.split()[:2]
            for line in self.read_proc(self.ns_server, "/proc/net/snmp6").splitlines()
        )
        return sum(int(rows[k]) for k in ("Udp6InDatagrams", "Udp6NoPorts", "Udp6InErrors"))

    def close(self) -> None:
        from pyroute2 import IPRoute, netns

        for proc in self._servers:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self._servers.clear()
        existing = set(netns.listnetns())
        for ns in (self.ns_client, self.ns_server):
            if ns in existing:
                netns.remove(ns)  # takes its end of the veth pair and its rules along
        with IPRoute() as ipr:  # only if it never left the root namespace
            for index in ipr.link_lookup(ifname=self.veth_client):
                try:
                    ipr.link("del", index=index)
                except Exception:  # vanished meanwhile
                    pass


def serve(host: str, port: int) -> None:
    server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # both families
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port))
    server.listen(128)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        conn.close()


def _connects(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:  # EPERM at once (a cgroup program's drop) or the timeout (netfilter's)
        return False


def probe(destination: str, blocked: str, port: int, count: int) -> dict[str, object]:
    """COUNT UDP datagrams to the blocked address, then a TCP connect to the destination
    (answered only once the server CPU has processed everything sent before it), then a
    TCP connect to the blocked address. The UDP sends' own errors are only reported: the
    caller counts what arrived."""
    family = socket.AF_INET6 if ":" in blocked else socket.AF_INET
    refused = 0
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        for _ in range(count):
            try:
                sock.sendto(b"\0" * 64, (blocked, port))
            except OSError:
                refused += 1
    reached = _connects(destination, port, 5.0)
    # a SYN that gets out is answered in well under a millisecond over veth; the UDP count
    # is what proves a drop, this connect only adds TCP to it
    blocked_tcp = _connects(blocked, port, 0.5)
    return {"reached": reached, "blocked_tcp": blocked_tcp, "refused": refused}


def main(argv: list[str]) -> int:
    command, args = (argv[0], argv[1:]) if argv else ("", [])
    if command == "serve" and len(args) == 2:
        serve(args[0], int(args[1]))
        return 0
    if command == "probe" and len(args) == 4:
        print(json.dumps(probe(args[0], args[1], int(args[2]), int(args[3]))))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
