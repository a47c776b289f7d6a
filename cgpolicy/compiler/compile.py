"""Policy -> CompiledPolicy: which programs a policy needs, each with its maps filled by
its family's module (network, sockets, devices, sysctl), its canonical revision, and the
label of every counter slot. The map contents are packed as the C structs in bpf/ lay them
out (their layouts: cgpolicy/contract.py). Pure: no syscalls, no bcc."""

from __future__ import annotations

import bisect
import dataclasses
import ipaddress
import secrets
from collections.abc import Callable, Sequence
from typing import Any

from cgpolicy.compiler.canonical import RuleKeys, network_text, ordered_rules, revision
from cgpolicy.compiler.cidr6 import CIDR6_FLAT_MAX, CidrIndex
from cgpolicy.compiler.devices import device_maps
from cgpolicy.compiler.dns import DnsConfig, dns_programs, name_rules
from cgpolicy.compiler.maps import index_variant, program_spec
from cgpolicy.compiler.names import pattern_ids
from cgpolicy.compiler.network import (
    InterfaceResolver,
    interface_sets,
    network_maps,
    socket_address_maps,
)
from cgpolicy.compiler.sockets import create_maps
from cgpolicy.compiler.spec import (
    CompiledPolicy,
    CompileError,
    DeviceNode,
    DevicePath,
    MapSpec,
    ProgramSpec,
    RuleLabel,
)
from cgpolicy.compiler.sysctl import sysctl_maps
from cgpolicy.contract import (
    EGRESS_AT_CONNECT,
    HOOK_PROGRAMS,
    SECTION_HOOKS,
    names_variant,
)
from cgpolicy.policy.describe import rule_text
from cgpolicy.policy.gcpause import gc_paused
from cgpolicy.policy.model import (
    CidrEdit,
    DeviceRule,
    IPNetwork,
    Network,
    NetworkRule,
    NetworkSection,
    Policy,
    SocketAddressRule,
)
from cgpolicy.policy.splice import section_at

# What a `path:` device rule's path names on this node (cgpolicy.kernel.devices does the I/O).
DeviceResolver = Callable[[DeviceRule], DeviceNode]


def compile_policy(
    policy: Policy,
    resolve_interfaces: InterfaceResolver | None = None,
    resolve_device: DeviceResolver | None = None,
    dns_key: bytes | None = None,
    cidr_flat_max: int | None = None,
) -> CompiledPolicy:
    """Compile ``policy``. ``resolve_interfaces`` turns a rule's interface names and globs
    into ifindexes; it is needed only when a network rule names interfaces.
    ``resolve_device`` says what a ``path:`` device rule's path names on this node; it is
    needed only when a device rule names a path. ``dns_key`` (16 bytes) keys the hashes of
    `fqdns` names; a fresh random one by default, so that each load has its own.
    ``cidr_flat_max`` overrides :data:`CIDR6_FLAT_MAX` of the IPv4 and IPv6 indexes (0:
    markers wherever a list has prefixes of more than one length, as in lists of many
    lengths)."""
    with gc_paused():
        return _compile(policy, resolve_interfaces, resolve_device, dns_key, cidr_flat_max)


def _compile(
    policy: Policy,
    resolve_interfaces: InterfaceResolver | None,
    resolve_device: DeviceResolver | None,
    dns_key: bytes | None,
    cidr_flat_max: int | None,
) -> CompiledPolicy:
    flat_max = CIDR6_FLAT_MAX if cidr_flat_max is None else cidr_flat_max
    policy, device_paths = bind_device_paths(policy, resolve_device)
    by_name = _name_sections(policy)
    settings = policy.dns
    dns = DnsConfig(
        bool(by_name), settings.min_ttl, settings.max_ttl, settings.max_learned, settings.servers
    )
    audit = policy.mode == "audit"
    programs: list[ProgramSpec] = []
    resolved: dict[str, list[list[int]]] = {}
    keys = RuleKeys()  # each rule is put in canonical text once, not once per use

    if dns.used:
        # Queries are seen at egress, their answers learned at ingress: a policy naming hosts
        # gets both packet programs, one that lets everything through where it has no section.
        network = policy.network or Network()
        network = dataclasses.replace(
            network,
            ingress=network.ingress or NetworkSection("allow"),
            egress=network.egress or NetworkSection("allow"),
        )
        policy = dataclasses.replace(policy, network=network)
    network = policy.network or Network()
    egress_maps: dict[str, MapSpec] = {}
    for hook, net_section in (("ingress", network.ingress), ("egress", network.egress)):
        if net_section is None:
            continue
        rules = ordered_rules(net_section.rules, keys)
        ifindexes = interface_sets(rules, resolve_interfaces)
        resolved[hook] = [sorted(found) for found in ifindexes]
        maps = network_maps(hook, net_section.default, rules, audit, ifindexes, dns, flat_max)
        programs.append(program_spec(hook, maps, names=dns.used))
        if hook == "egress":
            egress_maps = {m.name: m for m in programs[-1].maps}

    sockets = policy.sockets
    if sockets is not None:
        if sockets.create is not None:
            maps = create_maps(sockets.create, audit, keys)
            programs.append(program_spec("sock_create", maps))
        for section, hooks in (
            (sockets.bind, SECTION_HOOKS["sockets.bind"]),
            (sockets.connect, SECTION_HOOKS["sockets.connect"]),
        ):
            if section is None:
                continue
            where = "sockets.bind" if section is sockets.bind else "sockets.connect"
            maps = socket_address_maps(where, section, audit, keys, dns, flat_max)
            for hook in hooks:
                # IPv4 programs do not use cidr6_*; IPv6 ones use both (IPv4-mapped addresses).
                used = (
                    maps
                    if hook.endswith("6")
                    else {k: v for k, v in maps.items() if k not in _CIDR6_MAPS}
                )
                programs.append(program_spec(hook, used, names=dns.used))

    if egress_maps and not audit and network.egress and may_refuse_at_connect(network.egress):
        programs.extend(connect_checks(egress_maps, names=dns.used))

    if policy.devices is not None:
        programs.append(program_spec("device", device_maps(policy.devices, audit, keys)))

    if policy.sysctl is not None:
        programs.append(program_spec("sysctl", sysctl_maps(policy.sysctl, audit, keys)))

    tail: tuple[ProgramSpec, ...] = ()
    names: tuple[str, ...] = ()
    rules_by_name: list[tuple[int, int, tuple[str, ...]]] = []
    if dns.used:
        ingress = next(spec for spec in programs if spec.hook == "ingress")
        config = next(m for m in ingress.maps if m.name == "config")
        rules_by_name = name_rules({w: ordered_rules(r, keys) for w, r in by_name.items()})
        tail = dns_programs(
            dns_key or secrets.token_bytes(16), rules_by_name, config, dns.max_learned
        )
        names = tuple(pattern_ids(rules_by_name))

    return CompiledPolicy(
        name=policy.name,
        revision=revision(policy, resolved, keys, device_paths),
        mode=policy.mode,
        targets=policy.targets,
        programs=tuple(programs),
        rules=rule_labels(
            policy, [s.hook for s in programs if s.hook in HOOK_PROGRAMS], keys, device_paths
        ),
        device_paths=device_paths,
        dns_programs=tail,
        names=names,
        name_rules=tuple(rules_by_name),
        dns_max_ttl=settings.max_ttl,
        keys=keys,
    )


def recompile(
    base: CompiledPolicy, base_policy: Policy, policy: Policy, edits: Sequence[CidrEdit]
) -> CompiledPolicy | None:
    """``policy`` compiled by changing ``base`` (``base_policy``'s compilation), when
    ``policy`` is ``base_policy`` with the CIDRs of ``edits`` rewritten (a Derivation):
    the new rules' canonical texts from the old ones' (canonical.RuleKeys.derive), and
    the prefix indexes changed in place (cidr6.CidrIndex.changed), so that the cost is
    the edits', not the policy's. None when it must be compiled whole: a policy naming
    DNS names, interfaces or device paths (what they resolve to is looked up at
    compilation), a rule that moves in the canonical order, an index that cannot take the
    change in place."""
    if base.keys is None or base.dns_programs or base.device_paths or names_interfaces(policy):
        return None
    if (policy.name, policy.mode) != (base.name, base.mode):
        return None  # not what a Derivation makes; said here, as the result keeps base's
    try:
        keys = base.keys.derive(edits)
        changes = _index_bits(base.keys, keys, base_policy, policy, edits)
    except CompileError:
        return None
    replaced: dict[int, MapSpec] = {}
    for where, families in changes.items():
        for family, bits in families.items():
            found = _section_index(base, where, f"{family}_slots")
            if found is None:
                return None  # the first prefix of a family: a variant that walks its index
            changed = found[1].changed(found[0], bits)
            if changed is None or changed.index is None or not changed.index.own:
                return None  # not in place; or the family's last prefix went (a variant)
            replaced[id(found[0])] = changed
    programs = tuple(
        dataclasses.replace(spec, maps=tuple(replaced.get(id(m), m) for m in spec.maps))
        if any(id(m) in replaced for m in spec.maps)
        else spec
        for spec in base.programs
    )
    return dataclasses.replace(
        base,
        revision=revision(policy, None, keys),
        targets=policy.targets,
        programs=programs,
        rules=rule_labels(policy, [hook for hook, _ in base.rules], keys),
        keys=keys,
    )


def _position(rules: Sequence[object], rule: object) -> int:
    """Where ``rule`` (that object) is in ``rules``; CompileError if it is not there (a rule
    merged with an equal one)."""
    for at, found in enumerate(rules):
        if found is rule:
            return at
    raise CompileError("a rule merged with another")


def _holds(texts: list[str], network: IPNetwork) -> bool:
    """Whether sorted canonical ``texts`` hold ``network``."""
    text = network_text(network)
    at = bisect.bisect_left(texts, text)
    return at < len(texts) and texts[at] == text


def _section_index(
    compiled: CompiledPolicy, where: str, name: str
) -> tuple[MapSpec, CidrIndex] | None:
    """The prefix index map ``name`` of the programs of the section ``where``, and its
    index (the programs of a section share it)."""
    for spec in compiled.programs:
        if spec.hook in SECTION_HOOKS[where]:
            for m in spec.maps:
                if m.name == name and m.index is not None:
                    return m, m.index
    return None


def names_interfaces(policy: Policy) -> bool:
    """Whether a network rule names interfaces: what they resolve to is looked up at
    compilation, so it is compiled again when interfaces change."""
    network = policy.network
    sections = (network.ingress, network.egress) if network else ()
    return any(rule.interfaces for section in sections if section for rule in section.rules)


def _index_bits(
    old_keys: RuleKeys,
    keys: RuleKeys,
    base_policy: Policy,
    policy: Policy,
    edits: Sequence[CidrEdit],
) -> dict[str, dict[str, list[tuple[tuple[int, int], int, bool]]]]:
    """By section and family (cidr4, cidr6): each (prefix as the index keys it, rule
    bit, listed now) that the edits change; CompileError (compile whole) when a rule's
    bit is not what it was."""
    found: dict[str, dict[str, list[tuple[tuple[int, int], int, bool]]]] = {}
    for edit in edits:
        before = ordered_rules(section_at(base_policy, edit.where).rules, old_keys)
        after = ordered_rules(section_at(policy, edit.where).rules, keys)
        at = _position(after, edit.new)
        if len(before) != len(after) or _position(before, edit.old) != at:
            raise CompileError("a rule moved in the canonical order")
        bit = 1 << at
        old_texts, new_texts = old_keys.cidr_texts(edit.old), keys.cidr_texts(edit.new)
        bits = found.setdefault(edit.where, {})
        for networks, texts, listed in (
            (edit.removed, new_texts, False),
            (edit.added, old_texts, True),
        ):
            for network in networks:
                if _holds(texts, network):  # still listed (or listed before): no change
                    continue
                value = network.network_address._ip  # type: ignore[union-attr]
                if isinstance(network, ipaddress.IPv4Network):
                    change = ((network.prefixlen, value << 96), bit, listed)
                    bits.setdefault("cidr4", []).append(change)
                else:
                    bits.setdefault("cidr6", []).append(((network.prefixlen, value), bit, listed))
    return found


def may_refuse_at_connect(section: NetworkSection) -> bool:
    """Whether network.egress can refuse a TCP/UDP connect at once (bpf/net.c
    cgp_egress_at_connect): asked to (failFast), with a deny default or a deny rule that
    holds on every interface and may match TCP or UDP. Otherwise no check is attached."""
    if not section.fail_fast:
        return False
    return section.default == "deny" or any(
        rule.action == "deny"
        and not rule.interfaces
        and not rule.icmp_types
        and rule.protocol in ("any", "tcp", "udp")
        for rule in section.rules
    )


def connect_checks(egress_maps: dict[str, MapSpec], names: bool = False) -> list[ProgramSpec]:
    """network.egress checked at connect time (contract.EGRESS_AT_CONNECT): one program per
    sock_addr hook, on the egress program's maps (events and rate limit included); the
    IPv4 ones do not look IPv6 prefixes up."""
    specs = []
    for check in EGRESS_AT_CONNECT.values():
        unused = _CIDR6_MAPS if check.hook.endswith("4") else frozenset()
        if not names:  # the plain variant reads no DNS maps
            unused = unused | _CONNECT_CHECK_NAME_MAPS
        # the egress program has no maps of an index that lists no prefix
        wanted = _CONNECT_CHECK_MAPS - unused
        used = {n: egress_maps[n] for n in wanted if n in egress_maps or not n.startswith("cidr")}
        if names:
            function = names_variant(check.function)
        else:
            function, used = index_variant(check.function, used)
        maps = tuple(used[name] for name in sorted(used))
        specs.append(ProgramSpec(check.slot, "net.c", function, check.function, maps, "egress"))
    return specs


_CIDR6_MAPS = frozenset(
    {"cidr6_root", "cidr6_slots"}
)  # the IPv6 index (cidr6.py): IPv6 programs only
# the maps of DNS names, which only the names variant of cgp_egress_at_connect() reads
_CONNECT_CHECK_NAME_MAPS = frozenset(
    {"learned", "dns_seen", "dns_scope", "dns_targets", "dns_clock"}
)
# the maps bpf/net.c cgp_egress_at_connect() uses
_CONNECT_CHECK_MAPS = {
    "generation",
    "config",
    "cidr4_root",
    "cidr4_slots",
    "cidr6_root",
    "cidr6_slots",
    "ports",
    "port_blocks",
    "counters",
    "events",
    "ratelimit",
    *_CONNECT_CHECK_NAME_MAPS,
}


def _name_sections(policy: Policy) -> dict[str, tuple[NetworkRule | SocketAddressRule, ...]]:
    """The sections with a rule naming fqdns, by where they are in the policy."""
    found: dict[str, tuple[NetworkRule | SocketAddressRule, ...]] = {}
    if policy.network is not None:
        for direction in ("egress", "ingress"):
            section = getattr(policy.network, direction)
            if section is not None and any(rule.fqdns for rule in section.rules):
                found[f"network.{direction}"] = section.rules
    connect = policy.sockets.connect if policy.sockets else None
    if connect is not None and any(rule.fqdns for rule in connect.rules):
        found["sockets.connect"] = connect.rules
    return found


def bind_device_paths(
    policy: Policy, resolve: DeviceResolver | None
) -> tuple[Policy, tuple[DevicePath, ...]]:
    """``policy`` with each unresolved ``path:`` device rule given the type and numbers that
    ``resolve`` finds for its path, and what every such path resolved to. A rule whose path
    names no device on this node stays unresolved (type None) and matches nothing: for an
    allow rule that only narrows access; for a deny rule the caller reports it (and may keep
    the numbers it had, see :mod:`cgpolicy.kernel.devices`). Pure: ``resolve`` looks."""
    section = policy.devices
    if section is None or all(rule.type is not None for rule in section.rules):
        return policy, ()
    if resolve is None:
        raise CompileError("device rules that name a path need a device resolver")
    rules: list[DeviceRule] = []
    found: list[DevicePath] = []
    for rule in section.rules:
        if rule.type is None and rule.path is not None:
            node = resolve(rule)
            line = rule.source.line if rule.source else None
            found.append(DevicePath(rule.path, rule.action, line, node))
            if node.type is not None:
                rule = dataclasses.replace(rule, type=node.type, major=node.major, minor=node.minor)
        rules.append(rule)
    bound = dataclasses.replace(section, rules=tuple(rules))
    return dataclasses.replace(policy, devices=bound), tuple(found)


def rule_labels(
    policy: Policy,
    hooks: Sequence[str],
    keys: RuleKeys | None = None,
    device_paths: Sequence[DevicePath] = (),
) -> tuple[tuple[str, tuple[RuleLabel, ...]], ...]:
    """Per hook, a label for each rule in canonical order (what counter slot i counts);
    a device path rule that names no device here carries a note saying so."""
    notes = {(d.path, d.action): d.note() for d in device_paths}
    sections: dict[str, tuple[Any, str]] = {}  # hook -> (section, where it is in the policy)
    if policy.network is not None:
        for direction in ("ingress", "egress"):
            section = getattr(policy.network, direction)
            if section is not None:
                sections[direction] = (section, f"network.{direction}")
    if policy.sockets is not None:
        if policy.sockets.create is not None:
            sections["sock_create"] = (policy.sockets.create, "sockets.create")
        for name in ("bind", "connect"):
            section = getattr(policy.sockets, name)
            if section is not None:
                for hook in SECTION_HOOKS[f"sockets.{name}"]:
                    sections[hook] = (section, f"sockets.{name}")
    if policy.devices is not None:
        sections["device"] = (policy.devices, "devices")
    if policy.sysctl is not None:
        sections["sysctl"] = (policy.sysctl, "sysctl")
    labels = []
    for hook in hooks:
        section, where = sections[hook]
        labels.append(
            (
                hook,
                tuple(
                    RuleLabel(
                        rule_text(where, rule),
                        rule.source.line if rule.source else None,
                        notes.get((rule.path, rule.action)) if hook == "device" else None,
                    )
                    for rule in ordered_rules(section.rules, keys)
                ),
            )
        )
    return tuple(labels)
