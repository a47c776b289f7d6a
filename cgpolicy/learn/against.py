"""`cgpolicy learn --against POLICY`: keep only what an existing policy would deny.

Each observation becomes the action the reference evaluator (cgpolicy/reference.py, the
oracle the kernel programs are tested against) takes, and is kept when the policy does not
let it through. Where an observation does not hold a field the kernel saw, the field is
unknown to the evaluator, which never lets an allow rule match on it: return traffic (its
ephemeral port was not kept) and packets against rules naming interfaces. Those are kept as
"would deny" when only such a rule could allow them: the output may suggest a rule the
policy does not need, never miss one it does. Rules naming DNS names match the names the
answers the workload read gave for the address (before it used it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from cgpolicy import reference
from cgpolicy.compiler.compile import bind_device_paths
from cgpolicy.kernel.devices import bind_devices
from cgpolicy.kernel.learn import AddrKey, IPAddress, NetKey, Observations
from cgpolicy.learn.names import NameBook
from cgpolicy.learn.write import connect_as_egress
from cgpolicy.policy.model import Policy


def _names(book: NameBook | None, address: IPAddress, first_ns: int) -> frozenset[str]:
    if book is None:
        return frozenset()
    found = book.explain(address, first_ns)
    return frozenset(found.names) if found else frozenset()


def _net_action(key: NetKey, names: frozenset[str]) -> reference.Packet:
    protocol: int | None = key.protocol
    port = icmp = None
    if key.kind == "port":
        port = key.port
    elif key.kind == "icmp":
        icmp = key.icmp_type
    elif key.kind == "unknown":
        protocol = None
    return reference.Packet(key.direction, key.address, protocol, port, icmp, names=names)


def _addr_actions(key: AddrKey, names: frozenset[str]) -> list[reference.SocketAddress]:
    if key.op == "response":  # to a peer's ephemeral port, not kept: port 0 is in no range
        return [reference.SocketAddress("sendmsg", key.address, 0, key.protocol, names)]
    return [reference.SocketAddress(key.op, key.address, key.port, key.protocol, names)]


def _allowed(policy: Policy, actions: Sequence[reference.Action]) -> bool:
    return all(reference.evaluate(policy, action).effective for action in actions)


def denied(
    policy: Policy, observations: Observations, dev_root: Path, book: NameBook | None = None
) -> Observations:
    """The observations ``policy`` would not let through (audit mode counts as enforce:
    the question is what the policy would deny). Its ``path:`` device rules are resolved
    under ``dev_root``, as `apply` on this node would."""
    policy, _ = bind_device_paths(policy, bind_devices(policy, dev_root))
    policy = dataclasses.replace(policy, mode="enforce")
    out = dataclasses.replace(
        observations, network={}, create={}, addresses={}, devices={}, sysctls={}
    )
    for net, seen in observations.network.items():
        names = _names(book, net.address, seen.first_ns)
        if not _allowed(policy, [_net_action(net, names)]):
            out.network[net] = seen
    for create, seen in observations.create.items():
        action = reference.SocketCreate(create.family, create.type, create.protocol)
        if not _allowed(policy, [action]):
            out.create[create] = seen
    for addr, seen in observations.addresses.items():
        names = _names(book, addr.address, seen.first_ns) if addr.op != "bind" else frozenset()
        actions = _addr_actions(addr, names)
        if not _allowed(policy, actions):
            out.addresses[addr] = seen
        packet = connect_as_egress(addr)
        if packet is not None and any(
            reference.egress_at_connect(policy, action) is not None for action in actions
        ):  # network.egress refuses the call itself: an egress rule is what is missing
            out.network[packet] = (
                out.network[packet].merged(seen) if packet in out.network else seen
            )
    for device, seen in observations.devices.items():
        access = reference.DeviceAccess(device.type, device.major, device.minor, device.access)
        if not _allowed(policy, [access]):
            out.devices[device] = seen
    for sysctl, seen in observations.sysctls.items():
        if not _allowed(policy, [reference.SysctlAccess(sysctl.name, sysctl.write)]):
            out.sysctls[sysctl] = seen
    return out


def defaults(policy: Policy) -> dict[tuple[str, ...], str]:
    """Each section's default in ``policy``, by its path (``("network", "egress")``)."""
    found: dict[tuple[str, ...], str] = {}
    if policy.network:
        for direction in ("egress", "ingress"):
            section = getattr(policy.network, direction)
            if section is not None:
                found[("network", direction)] = section.default
    if policy.sockets:
        for name in ("create", "bind", "connect"):
            section = getattr(policy.sockets, name)
            if section is not None:
                found[("sockets", name)] = section.default
    if policy.devices:
        found[("devices",)] = policy.devices.default
    if policy.sysctl:
        found[("sysctl",)] = policy.sysctl.default
    return found
