"""Generated policies: many random, non-overlapping CIDRs of mixed lengths, written as YAML
and read back through the product's own loader (validation included).

The CIDR sets are built so that the addresses the verdict benchmark sends sit as deep in
the LPM tries as any stored prefix:

* IPv4: prefixes of length 24..32, each inside its own randomly drawn /24 of the whole
  address space, plus ``127.0.0.1/32``. A lookup of 127.0.0.1 walks the trie down to that
  /32 (a deep match); 127.0.0.2 shares 30 bits with it and fails only at that leaf (a deep
  miss).
* IPv6: prefixes of length 48..128, each inside its own /48 drawn from ``::/16``, plus
  ``::1/128``; ``::2`` is the deep miss. The prefixes are drawn around ``::1`` (not, say,
  from 2000::/3) because ``::1`` is routable here, which the real-traffic method needs, and
  a lone ``::1`` far from every other prefix would be a shallow lookup.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Sequence
from pathlib import Path

from cgpolicy.policy.model import Policy
from cgpolicy.policy.validate import load_paths

MATCH4, MISS4 = "127.0.0.1", "127.0.0.2"
MATCH6, MISS6 = "::1", "::2"
PORTS = (443, "8000-8100")  # the allow rules' ports; packets go to 443

_V4_LENGTHS = (24, 24, 24, 24, 25, 26, 27, 28, 29, 30, 31, 32)
_V6_LENGTHS = (48, 48, 52, 56, 60, 64, 64, 96, 112, 128)


def _inside(slot_base: int, slot_bits: int, width: int, length: int, rng: random.Random) -> int:
    """A random network address of ``length`` bits inside the slot."""
    host_bits = width - slot_bits
    offset = rng.getrandbits(host_bits) if host_bits else 0
    keep = width - length
    return (slot_base | offset) >> keep << keep


def cidrs_v4(count: int, seed: int = 4) -> list[str]:
    """``count`` non-overlapping IPv4 CIDRs, ``127.0.0.1/32`` among them."""
    rng = random.Random(seed)
    loopback_slot = int(ipaddress.IPv4Address("127.0.0.0")) >> 8
    slots: set[int] = set()
    while len(slots) < count - 1:
        slot = rng.getrandbits(24)
        if slot != loopback_slot:
            slots.add(slot)
    found = [f"{MATCH4}/32"]
    for slot in sorted(slots):
        length = rng.choice(_V4_LENGTHS)
        found.append(f"{ipaddress.IPv4Address(_inside(slot << 8, 24, 32, length, rng))}/{length}")
    return found


def cidrs_v6(count: int, seed: int = 6) -> list[str]:
    """``count`` non-overlapping IPv6 CIDRs in ::/16, ``::1/128`` among them."""
    rng = random.Random(seed)
    slots: set[int] = set()
    while len(slots) < count - 1:
        slot = rng.getrandbits(32)  # the /48 ::/16 + slot
        if slot != 0:  # slot 0 holds ::1
            slots.add(slot)
    found = [f"{MATCH6}/128"]
    for slot in sorted(slots):
        length = rng.choice(_V6_LENGTHS)
        found.append(f"{ipaddress.IPv6Address(_inside(slot << 80, 48, 128, length, rng))}/{length}")
    return found


# IPv6 length mixes of the verdict benchmark's index cases: (shortest, longest) length
V6_MIXES = {"all_64": (64, 64), "all_128": (128, 128), "r32_128": (32, 128), "r16_128": (16, 128)}


def cidrs_v6_mix(count: int, low: int, high: int, seed: int = 16) -> tuple[list[str], str, str]:
    """``count`` distinct IPv6 CIDRs of lengths drawn uniformly from ``low``..``high``, at
    random over the whole address space (so short ones contain some of the others), and
    two addresses: one inside the first CIDR (a match), and one outside every CIDR that
    shares all but the last bit of a longest one (a miss as deep as any)."""
    rng = random.Random(seed)
    found: dict[tuple[int, int], None] = {}
    while len(found) < count:
        length = rng.randint(low, high)
        found[(length, rng.getrandbits(length) << (128 - length))] = None
    nets = [ipaddress.IPv6Network((value, length)) for length, value in found]
    match = nets[0].network_address + (nets[0].num_addresses - 1) // 2
    by_length = sorted(range(len(nets)), key=lambda i: -nets[i].prefixlen)
    for i in by_length:
        net = nets[i]
        sibling = int(net.network_address) ^ (1 << (128 - net.prefixlen))
        if not any(
            (length, sibling >> (128 - length) << (128 - length)) in found
            for length in range(low, high + 1)
        ):
            miss = ipaddress.IPv6Address(sibling)
            break
    else:
        raise RuntimeError("no uncovered address next to a CIDR")  # cannot happen
    return [str(net) for net in nets], str(match), str(miss)


def _list(items: Sequence[object], indent: str) -> str:
    return "".join(f'{indent}- "{item}"\n' for item in items)


def network_yaml(
    name: str,
    targets: Sequence[tuple[str, str]],
    v4: Sequence[str],
    v6: Sequence[str],
    extra_rules: str = "",
    extra_sections: str = "",
    fail_fast: bool = True,
) -> str:
    """An egress policy, default deny, allowing TCP to the given CIDRs on PORTS
    (one rule per address family, so each list stays within the schema's 100,000); with
    ``fail_fast`` false, no connect checks (the packet program alone decides)."""
    target_lines = "".join(f'    - {kind}: "{value}"\n' for kind, value in targets)
    rules = ""
    for cidrs in (v4, v6):
        if cidrs:
            rules += "        - action: allow\n          protocol: tcp\n"
            rules += "          ports:\n" + _list(PORTS, "            ")
            rules += "          cidrs:\n" + _list(cidrs, "            ")
    return (
        "apiVersion: cgpolicy.dev/v1\n"
        "kind: CgroupPolicy\n"
        f"metadata:\n  name: {name}\n"
        "spec:\n"
        "  mode: enforce\n"
        f"  targets:\n{target_lines}"
        "  network:\n"
        "    egress:\n"
        "      default: deny\n"
        + ("" if fail_fast else "      failFast: false\n")
        + f"      rules:\n{rules}{extra_rules}"
        f"{extra_sections}"
    )


def service_yaml(name: str, target: str, index: int) -> str:
    """A complete service policy (egress with a few upstreams, connect, socket creation,
    devices, sysctl), different for every ``index``: 8 programs per policy."""
    a, b = index // 250, index % 250
    egress_rules = (
        "        - action: allow\n          protocol: udp\n"
        f'          cidrs: ["10.{a}.{b}.2/32", "10.{a}.{b}.3/32"]\n          ports: [53]\n'
        "        - action: allow\n          protocol: tcp\n"
        f'          cidrs: ["10.{100 + a}.{b}.0/24", "fd{index:02x}:3456:789a::/48"]\n'
        f'          ports: [443, "{8000 + index}-{8100 + index}"]\n'
        '        - action: allow\n          cidrs: ["127.0.0.0/8", "::1/128"]\n'
        "        - action: deny\n"
        '          cidrs: ["169.254.169.254/32", "fd00:ec2::254/128"]\n'
    )
    sections = (
        "  sockets:\n"
        "    create:\n"
        "      default: allow\n"
        "      rules:\n"
        "        - {action: deny, family: inet, type: raw}\n"
        "        - {action: deny, family: inet6, type: raw}\n"
        "    connect:\n"
        "      default: allow\n"
        "      rules:\n"
        f'        - {{action: deny, cidrs: ["169.254.169.254/32", "10.{a}.{b}.66/32"]}}\n'
        "  devices:\n"
        "    default: deny\n"
        "    rules:\n"
        "      - {action: allow, type: char, major: 1, minor: 3, access: rwm}\n"
        "      - {action: allow, type: char, major: 1, minor: 5, access: rwm}\n"
        "      - {action: allow, type: char, major: 1, minor: 9, access: rwm}\n"
        f"      - {{action: allow, type: char, major: 136, minor: {index}, access: rw}}\n"
        "  sysctl:\n"
        "    default: allow\n"
        "    rules:\n"
        '      - {action: deny, name: "net.*", access: write}\n'
        f'      - {{action: deny, name: "kernel.bench{index}.*", access: rw}}\n'
    )
    return network_yaml(
        name, [("path", target)], [], [], extra_rules=egress_rules, extra_sections=sections
    )


def load(folder: Path, documents: dict[str, str]) -> list[Policy]:
    """Write one file per policy and load them all with the product's loader."""
    paths = []
    for name, text in documents.items():
        path = folder / f"{name}.yaml"
        path.write_text(text)
        paths.append(path)
    result = load_paths(paths)
    if result.problems:
        shown = "\n".join(str(p) for p in result.problems[:5])
        raise RuntimeError(f"generated policies do not validate:\n{shown}")
    return result.policies
