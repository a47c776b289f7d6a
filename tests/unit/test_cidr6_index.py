"""The prefix indexes, IPv6 and IPv4 (cgpolicy/compiler/cidr6.py, bpf/net.c cgp_cidr_index)
against the longest-prefix semantics of the LPM tries they replaced: for every address,
the OR of the masks of every stored prefix containing it, whatever the mix of lengths, with
every probe count and slot scan within what the program allows."""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable
from struct import unpack

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from policy_builders import egress_policy

from cgpolicy.compiler.cidr6 import (
    CIDR6_FLAT_MAX,
    _homes,
    cidr4_maps,
    cidr6_layout,
    cidr6_maps,
    widen4,
)
from cgpolicy.compiler.compile import compile_policy
from cgpolicy.compiler.spec import MapSpec
from cgpolicy.contract import CIDR4_PROBES, CIDR6_PROBES, CIDR6_ROOT, CIDR6_SLOT, CIDR6_SPAN
from cgpolicy.policy.model import NetworkRule

M64 = (1 << 64) - 1


def keep(length: int, width: int = 128) -> int:
    """The mask of a prefix of ``length`` bits in an address of ``width`` bits."""
    full = (1 << width) - 1
    return full ^ (full >> length)


def index_lookup(
    maps: dict[str, MapSpec], family: str = "cidr6", most: int = CIDR6_PROBES
) -> Callable[[int], tuple[int, int]]:
    """What bpf/net.c cgp_cidr_index computes, as a function of the 128-bit address (an
    IPv4 one as its top 32 bits): (mask, probes), scanning at most CIDR6_SPAN slots per
    probe and asserting at most ``most`` probes, the bounds of the program's loops."""
    root = CIDR6_ROOT.unpack_from(maps[f"{family}_root"].entries[0][1])
    slots = {
        unpack("<I", key)[0]: CIDR6_SLOT.unpack_from(value)
        for key, value in maps[f"{family}_slots"].entries
    }
    size = maps[f"{family}_slots"].max_entries
    assert all(slot < size for slot in slots)
    # the program reads a list as 8 bytes with the len (or shift) first: it ends with a 0
    assert root["next"][-1] == 0 and all(slot["next"][-1] == 0 for slot in slots.values())

    def find(address: int) -> tuple[int, int]:
        found, todo, probes = root["mask"], list(root["next"]), 0
        while todo and todo[0]:
            length = todo.pop(0)
            probes += 1
            key = address & keep(length)
            home = _homes([(length, key)], root["shift"])[0]
            for at in range(home, home + CIDR6_SPAN):
                slot = slots.get(at)
                if slot is None:
                    break
                if slot["len"] == length and int.from_bytes(slot["addr"], "little") == key:
                    found, todo = slot["mask"], list(slot["next"])
                    break
        assert probes <= most
        return found, probes

    return find


def reference(prefixes: dict[tuple[int, int], int], address: int, width: int = 128) -> int:
    """The trie's answer: the OR of the masks of every prefix containing the address."""
    found = 0
    for (length, value), mask in prefixes.items():
        if address & keep(length, width) == value:
            found |= mask
    return found


def probe_points(
    prefixes: dict[tuple[int, int], int], rng: random.Random, width: int = 128
) -> list[int]:
    """Every prefix's first and last address, its neighbours' and sibling's, and random
    ones inside, with the lowest and highest addresses."""
    full = (1 << width) - 1
    points = [0, full]
    for length, value in prefixes:
        last = value | (full >> length)
        points += [value, last, value | rng.getrandbits(width) & (full >> length)]
        if length:
            points += [value ^ (1 << (width - length)), (last + 1) & full, (value - 1) & full]
    return points


def check(
    prefixes: dict[tuple[int, int], int], points: list[int], flat_max: int, width: int = 128
) -> int:
    """Every point's mask from the IPv6 (``width`` 128) or the IPv4 (32) index against
    the trie's; the most probes any took."""
    if width == 128:
        find, shown = index_lookup(cidr6_maps(prefixes, flat_max)), ipaddress.IPv6Address
    else:
        find, shown = ipv4_lookup(cidr4_maps(prefixes, flat_max)), ipaddress.IPv4Address
    worst = 0
    for address in points:
        found, probes = find(address)
        assert found == reference(prefixes, address, width), shown(address)
        worst = max(worst, probes)
    return worst


def random_prefixes(
    rng: random.Random, count: int, lengths: tuple[int, int], width: int = 128
) -> dict:
    """Prefixes clustered around a few bases (so that they nest and share markers)."""
    bases = [rng.getrandbits(width) for _ in range(3)]
    found: dict[tuple[int, int], int] = {}
    for _ in range(count):
        length = rng.randint(*lengths)
        address = rng.choice(bases) ^ (rng.getrandbits(width) >> rng.randint(0, width))
        key = (length, address & keep(length, width))
        found[key] = found.get(key, 0) | 1 << rng.randrange(6)
    return found


MIXES = [(48, 48), (64, 64), (128, 128), (32, 128), (16, 128), (0, 128), (1, 32), (60, 70)]


@pytest.mark.parametrize("lengths", MIXES)
@pytest.mark.parametrize("flat_max", [0, 1, CIDR6_FLAT_MAX])
def test_the_index_gives_the_trie_answer(lengths: tuple[int, int], flat_max: int) -> None:
    rng = random.Random(hash(lengths) ^ flat_max)
    prefixes = random_prefixes(rng, 300, lengths)
    points = probe_points(prefixes, rng) + [rng.getrandbits(128) for _ in range(300)]
    check(prefixes, points, flat_max)


@st.composite
def prefix_sets(draw: st.DrawFn, width: int = 128) -> dict[tuple[int, int], int]:
    low = draw(st.integers(0, width))
    high = draw(st.integers(low, width))
    full = (1 << width) - 1
    base = draw(st.integers(0, full))
    found: dict[tuple[int, int], int] = {}
    for length, spread, bit in draw(
        st.lists(
            st.tuples(st.integers(low, high), st.integers(0, width), st.integers(0, 63)),
            min_size=1,
            max_size=40,
        )
    ):
        address = base ^ (draw(st.integers(0, full)) >> spread)
        key = (length, address & keep(length, width))
        found[key] = found.get(key, 0) | 1 << bit
    return found


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefixes=prefix_sets(), flat_max=st.integers(0, 7), seed=st.integers(0, 1 << 32))
def test_any_mix_of_lengths(prefixes: dict[tuple[int, int], int], flat_max: int, seed: int) -> None:
    check(prefixes, probe_points(prefixes, random.Random(seed)), flat_max)


def test_every_length_nested_stays_within_the_probes() -> None:
    """All 128 lengths along one address, and around it: a binary search on lengths."""
    rng = random.Random(7)
    base = rng.getrandbits(128)
    prefixes = {(length, base & keep(length)): 1 << (length % 64) for length in range(129)}
    for _ in range(2000):
        length = rng.randint(1, 128)
        address = base ^ (1 << rng.randrange(128))
        prefixes[(length, address & keep(length))] = 1 << rng.randrange(64)
    points = probe_points(prefixes, rng)
    assert check(prefixes, points, CIDR6_FLAT_MAX) <= 8


@pytest.mark.parametrize("length", [48, 64, 128])
def test_a_list_of_one_length_is_one_probe(length: int) -> None:
    rng = random.Random(length)
    prefixes = {(length, rng.getrandbits(length) << (128 - length)): 1 for _ in range(5000)}
    (_, root_list), keys, _, _ = cidr6_layout(prefixes)
    assert root_list == (length,) and len(keys) == len(prefixes)  # no marker
    maps = cidr6_maps(prefixes)
    # at most half full: 2 to 4 slots of 32 B per prefix, plus a span at the end, in each
    # of the two copies (bpf/net.c `generation`)
    per_copy = maps["cidr6_slots"].max_entries // 2
    assert 2 * len(prefixes) <= per_copy - CIDR6_SPAN < 4 * len(prefixes)
    find = index_lookup(maps)
    for _, value in list(prefixes)[:200]:
        assert find(value) == (1, 1)


def test_a_random_spread_of_many_lengths_costs_few_probes() -> None:
    """Random prefixes of /32-/128 over the whole space: a bucket per /32 at the root,
    then the few lengths of each: two probes for most addresses, one marker per prefix."""
    rng = random.Random(3)
    prefixes: dict[tuple[int, int], int] = {}
    while len(prefixes) < 20000:
        length = rng.randint(32, 128)
        prefixes[(length, rng.getrandbits(length) << (128 - length))] = 1
    (_, root_list), keys, _, _ = cidr6_layout(prefixes)
    assert root_list == (32,)
    assert len(keys) < 2 * len(prefixes)
    find = index_lookup(cidr6_maps(prefixes))
    probes = [find(value)[1] for _, value in list(prefixes)[:2000]]
    assert max(probes) <= 3 and sum(probes) / len(probes) < 2.1


def test_compile_policy_fills_the_index() -> None:
    """Through compile_policy: a rule's IPv6 list in the index, IPv4-mapped ones too (the
    program looks the IPv4 part up in the IPv4 maps as well), ::/0 in the root."""
    allow = NetworkRule("allow", (ipaddress.IPv6Network("2001:db8::/32"),))
    everything = NetworkRule("deny", (ipaddress.IPv6Network("::/0"),), "udp")
    policy = egress_policy("deny", allow, everything)
    maps = {m.name: m for m in next(p for p in compile_policy(policy).programs).maps}
    find = index_lookup(maps)
    inside = int(ipaddress.IPv6Address("2001:db8::1"))
    outside = int(ipaddress.IPv6Address("2001:db9::1"))
    (found_in, _), (found_out, _) = find(inside), find(outside)
    assert found_in != found_out and found_out & found_in == found_out
    assert bin(found_in).count("1") == 2 and bin(found_out).count("1") == 1


# -- IPv4: the same index in maps of its own, the address as the top 32 bits -----------------


def ipv4_lookup(maps: dict[str, MapSpec]) -> Callable[[int], tuple[int, int]]:
    """The IPv4 index's (mask, probes) for a 32-bit address, at most CIDR4_PROBES probes."""
    find = index_lookup(maps, "cidr4", CIDR4_PROBES)
    return lambda address: find(address << 96)


MIXES4 = [(24, 24), (32, 32), (16, 32), (0, 32), (8, 24), (20, 28), (1, 8)]


@pytest.mark.parametrize("lengths", MIXES4)
@pytest.mark.parametrize("flat_max", [0, 1, CIDR6_FLAT_MAX])
def test_the_ipv4_index_gives_the_trie_answer(lengths: tuple[int, int], flat_max: int) -> None:
    rng = random.Random(hash(lengths) ^ flat_max ^ 4)
    prefixes = random_prefixes(rng, 300, lengths, 32)
    points = probe_points(prefixes, rng, 32) + [rng.getrandbits(32) for _ in range(300)]
    check(prefixes, points, flat_max, 32)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefixes=prefix_sets(32), flat_max=st.integers(0, 7), seed=st.integers(0, 1 << 32))
def test_any_mix_of_ipv4_lengths(
    prefixes: dict[tuple[int, int], int], flat_max: int, seed: int
) -> None:
    check(prefixes, probe_points(prefixes, random.Random(seed), 32), flat_max, 32)


@pytest.mark.parametrize("flat_max", [0, CIDR6_FLAT_MAX])
def test_every_ipv4_length_nested_stays_within_the_probes(flat_max: int) -> None:
    """All 33 lengths along one address, and around it: within CIDR4_PROBES (6) probes."""
    rng = random.Random(9)
    base = rng.getrandbits(32)
    prefixes = {(length, base & keep(length, 32)): 1 << length for length in range(33)}
    for _ in range(2000):
        length = rng.randint(1, 32)
        address = base ^ (1 << rng.randrange(32))
        prefixes[(length, address & keep(length, 32))] = 1 << rng.randrange(64)
    assert check(prefixes, probe_points(prefixes, rng, 32), flat_max, 32) <= CIDR4_PROBES


@pytest.mark.parametrize("length", [24, 32])
def test_an_ipv4_list_of_one_length_is_one_probe(length: int) -> None:
    rng = random.Random(length)
    prefixes = {(length, rng.getrandbits(length) << (32 - length)): 1 for _ in range(5000)}
    (_, root_list), keys, _, _ = cidr6_layout(widen4(prefixes))
    assert root_list == (length,) and len(keys) == len(prefixes)  # no marker
    maps = cidr4_maps(prefixes)
    per_copy = maps["cidr4_slots"].max_entries // 2
    assert 2 * len(prefixes) <= per_copy - CIDR6_SPAN < 4 * len(prefixes)
    find = ipv4_lookup(maps)
    for _, value in list(prefixes)[:200]:
        assert find(value) == (1, 1)
    assert find(value ^ (1 << (32 - length)))[0] in (0, 1)


def test_compile_policy_fills_the_ipv4_index() -> None:
    """Through compile_policy: IPv4 prefixes in cidr4_*, 0.0.0.0/0 in its root, none of
    them in the IPv6 index (an IPv6 lookup never meets them), and the reverse."""
    allow = NetworkRule("allow", (ipaddress.IPv4Network("10.0.0.0/8"),))
    everything = NetworkRule("deny", (ipaddress.IPv4Network("0.0.0.0/0"),), "udp")
    six = NetworkRule("deny", (ipaddress.IPv6Network("::/0"),), "tcp")
    policy = egress_policy("deny", allow, everything, six)
    maps = {m.name: m for m in next(p for p in compile_policy(policy).programs).maps}
    find = ipv4_lookup(maps)
    (found_in, _), (found_out, _) = find(0x0A000001), find(0x0B000001)
    assert found_in != found_out and found_out & found_in == found_out
    assert bin(found_in).count("1") == 2 and bin(found_out).count("1") == 1
    (found6, _) = index_lookup(maps)(0x0A000001 << 96)
    assert bin(found6).count("1") == 1 and not found6 & found_in
