"""The prefix index of IPv6 and IPv4 (cgpolicy/compiler/cidr6.py, bpf/net.c cgp_cidr_index)
against the longest-prefix semantics of the LPM tries it replaced: for every address, the
OR of the masks of every stored prefix containing it, whatever the mix of lengths, with
every probe count and slot scan within what the program allows; from each of its three
roots (IPv6, IPv4, IPv4-mapped IPv6 addresses)."""

from __future__ import annotations

import functools
import ipaddress
import operator
import random
from collections.abc import Callable
from struct import unpack

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from policy_builders import egress_policy

from cgpolicy.compiler.cidr6 import (
    CIDR6_FLAT_MAX,
    MAPPED,
    _homes,
    cidr6_layout,
    cidr_maps,
    mapped4,
)
from cgpolicy.compiler.compile import compile_policy
from cgpolicy.compiler.spec import MapSpec
from cgpolicy.contract import (
    CIDR4_PROBES,
    CIDR6_PROBES,
    CIDR6_ROOT,
    CIDR6_SLOT,
    CIDR6_SPAN,
    CIDR_ROOT_MAPPED,
    CIDR_ROOT_V4,
    CIDR_ROOT_V6,
    CIDR_ROOTS,
    U32,
)
from cgpolicy.policy.model import NetworkRule

FULL = (1 << 128) - 1
M64 = (1 << 64) - 1


def keep(length: int) -> int:
    return FULL ^ (FULL >> length)


def index_lookup(
    maps: dict[str, MapSpec], root: int = CIDR_ROOT_V6, most: int = CIDR6_PROBES
) -> Callable[[int], tuple[int, int]]:
    """What bpf/net.c cgp_cidr_index computes from the root ``root`` of copy 0, as a
    function of the 128-bit address hi:lo: (mask, probes), scanning at most CIDR6_SPAN
    slots per probe and asserting at most ``most`` probes, the bounds of the program's
    loops. The key of a length is masked as the program masks it (``len & 63`` bits of
    one half: the mapped root's own lengths, 161..192, as 97..128)."""
    roots = maps["cidr6_root"]
    assert roots.max_entries == 2 * CIDR_ROOTS and len(roots.entries) == CIDR_ROOTS
    root = CIDR6_ROOT.unpack_from(dict(roots.entries)[root.to_bytes(4, "little")])
    slots = {
        unpack("<I", key)[0]: CIDR6_SLOT.unpack_from(value)
        for key, value in maps["cidr6_slots"].entries
    }
    size = maps["cidr6_slots"].max_entries
    assert all(slot < size for slot in slots)
    # the program reads a list as 8 bytes with the len (or shift) first: it ends with a 0
    assert root["next"][-1] == 0 and all(slot["next"][-1] == 0 for slot in slots.values())

    def find(address: int) -> tuple[int, int]:
        hi, lo = address >> 64, address & M64
        found, todo, probes = root["mask"], list(root["next"]), 0
        while todo and todo[0]:
            length = todo.pop(0)
            probes += 1
            if length > 64:
                khi, klo = hi, lo & (M64 << ((128 - length) & 63)) & M64
            else:
                khi, klo = hi & (M64 << ((64 - length) & 63)) & M64, 0
            key = khi << 64 | klo
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


def ipv6_lookup(maps: dict[str, MapSpec]) -> Callable[[int], tuple[int, int]]:
    """bpf/net.c cgp_cidr6_mask: an IPv4-mapped address from the mapped root, any other
    from the IPv6 one."""
    six = index_lookup(maps)
    mapped = index_lookup(maps, CIDR_ROOT_MAPPED, CIDR4_PROBES)
    return lambda address: (mapped if address >> 32 == 0xFFFF else six)(address)


def reference(prefixes: dict[tuple[int, int], int], address: int) -> int:
    """The trie's answer: the OR of the masks of every prefix containing the address."""
    found = 0
    for (length, value), mask in prefixes.items():
        if address & keep(length) == value:
            found |= mask
    return found


def probe_points(prefixes: dict[tuple[int, int], int], rng: random.Random) -> list[int]:
    """Every prefix's first and last address, its sibling's, and random ones inside."""
    points = []
    for length, value in prefixes:
        last = value | (FULL >> length)
        points += [value, last, value | rng.getrandbits(128) & (FULL >> length)]
        if length:
            points += [value ^ (1 << (128 - length)), (last + 1) & FULL, (value - 1) & FULL]
    return points


def check(prefixes: dict[tuple[int, int], int], points: list[int], flat_max: int) -> int:
    find = ipv6_lookup(cidr_maps({}, prefixes, flat_max))
    worst = 0
    for address in points:
        found, probes = find(address)
        assert found == reference(prefixes, address), ipaddress.IPv6Address(address)
        worst = max(worst, probes)
    return worst


def random_prefixes(rng: random.Random, count: int, lengths: tuple[int, int]) -> dict:
    """Prefixes clustered around a few bases (so that they nest and share markers)."""
    bases = [rng.getrandbits(128) for _ in range(3)]
    found: dict[tuple[int, int], int] = {}
    for _ in range(count):
        length = rng.randint(*lengths)
        address = rng.choice(bases) ^ (rng.getrandbits(128) >> rng.randint(0, 128))
        key = (length, address & keep(length))
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
def prefix_sets(draw: st.DrawFn) -> dict[tuple[int, int], int]:
    low = draw(st.integers(0, 128))
    high = draw(st.integers(low, 128))
    base = draw(st.integers(0, FULL))
    found: dict[tuple[int, int], int] = {}
    for length, spread, bit in draw(
        st.lists(
            st.tuples(st.integers(low, high), st.integers(0, 128), st.integers(0, 63)),
            min_size=1,
            max_size=40,
        )
    ):
        address = base ^ (draw(st.integers(0, FULL)) >> spread)
        key = (length, address & keep(length))
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
    maps = cidr_maps({}, prefixes)
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
    find = index_lookup(cidr_maps({}, prefixes))
    probes = [find(value)[1] for _, value in list(prefixes)[:2000]]
    assert max(probes) <= 3 and sum(probes) / len(probes) < 2.1


def test_compile_policy_fills_the_index() -> None:
    """Through compile_policy: a rule's IPv6 list in the index, ::/0 in the root."""
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


# -- IPv4: the same index from a root of its own, a.b.c.d/n as ::ffff:a.b.c.d/(96 + n) -------

FULL4 = (1 << 32) - 1


def keep4(length: int) -> int:
    return FULL4 ^ (FULL4 >> length)


def ipv4_lookup(
    maps: dict[str, MapSpec], root: int = CIDR_ROOT_V4
) -> Callable[[int], tuple[int, int]]:
    """The (mask, probes) of a 32-bit address from the IPv4 root (bpf/net.c
    cgp_cidr4_mask), or as the mapped address ::ffff:a.b.c.d from the mapped root: at most
    CIDR4_PROBES probes."""
    find = index_lookup(maps, root, CIDR4_PROBES)
    return lambda address: find(MAPPED | address)


def reference4(prefixes: dict[tuple[int, int], int], address: int) -> int:
    """The trie's answer: the OR of the masks of every prefix containing the address."""
    return functools.reduce(
        operator.or_,
        (m for (length, value), m in prefixes.items() if address & keep4(length) == value),
        0,
    )


def probe_points4(prefixes: dict[tuple[int, int], int], rng: random.Random) -> list[int]:
    """Every prefix's first and last address, its neighbours' and sibling's, and random
    ones inside, with 0.0.0.0 and 255.255.255.255."""
    points = [0, FULL4]
    for length, value in prefixes:
        last = value | (FULL4 >> length)
        points += [value, last, value | rng.getrandbits(32) & (FULL4 >> length)]
        if length:
            points += [value ^ (1 << (32 - length)), (last + 1) & FULL4, (value - 1) & FULL4]
    return points


def check4(prefixes: dict[tuple[int, int], int], points: list[int], flat_max: int) -> int:
    find = ipv4_lookup(cidr_maps(prefixes, {}, flat_max))
    worst = 0
    for address in points:
        found, probes = find(address)
        assert found == reference4(prefixes, address), ipaddress.IPv4Address(address)
        worst = max(worst, probes)
    return worst


MIXES4 = [(24, 24), (32, 32), (16, 32), (0, 32), (8, 24), (20, 28), (1, 8)]


@pytest.mark.parametrize("lengths", MIXES4)
@pytest.mark.parametrize("flat_max", [0, 1, CIDR6_FLAT_MAX])
def test_the_ipv4_index_gives_the_trie_answer(lengths: tuple[int, int], flat_max: int) -> None:
    rng = random.Random(hash(lengths) ^ flat_max ^ 4)
    bases = [rng.getrandbits(32) for _ in range(3)]
    prefixes: dict[tuple[int, int], int] = {}
    for _ in range(300):
        length = rng.randint(*lengths)
        address = rng.choice(bases) ^ (rng.getrandbits(32) >> rng.randint(0, 32))
        key = (length, address & keep4(length))
        prefixes[key] = prefixes.get(key, 0) | 1 << rng.randrange(6)
    points = probe_points4(prefixes, rng) + [rng.getrandbits(32) for _ in range(300)]
    check4(prefixes, points, flat_max)


@st.composite
def prefix_sets4(draw: st.DrawFn) -> dict[tuple[int, int], int]:
    low = draw(st.integers(0, 32))
    high = draw(st.integers(low, 32))
    base = draw(st.integers(0, FULL4))
    found: dict[tuple[int, int], int] = {}
    for length, spread, bit in draw(
        st.lists(
            st.tuples(st.integers(low, high), st.integers(0, 32), st.integers(0, 63)),
            min_size=1,
            max_size=40,
        )
    ):
        address = base ^ (draw(st.integers(0, FULL4)) >> spread)
        key = (length, address & keep4(length))
        found[key] = found.get(key, 0) | 1 << bit
    return found


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefixes=prefix_sets4(), flat_max=st.integers(0, 7), seed=st.integers(0, 1 << 32))
def test_any_mix_of_ipv4_lengths(
    prefixes: dict[tuple[int, int], int], flat_max: int, seed: int
) -> None:
    check4(prefixes, probe_points4(prefixes, random.Random(seed)), flat_max)


@pytest.mark.parametrize("flat_max", [0, CIDR6_FLAT_MAX])
def test_every_ipv4_length_nested_stays_within_the_probes(flat_max: int) -> None:
    """All 33 lengths along one address, and around it: within CIDR4_PROBES (6) probes."""
    rng = random.Random(9)
    base = rng.getrandbits(32)
    prefixes = {(length, base & keep4(length)): 1 << length for length in range(33)}
    for _ in range(2000):
        length = rng.randint(1, 32)
        address = base ^ (1 << rng.randrange(32))
        prefixes[(length, address & keep4(length))] = 1 << rng.randrange(64)
    assert check4(prefixes, probe_points4(prefixes, rng), flat_max) <= CIDR4_PROBES


@pytest.mark.parametrize("length", [24, 32])
def test_an_ipv4_list_of_one_length_is_one_probe(length: int) -> None:
    rng = random.Random(length)
    prefixes = {(length, rng.getrandbits(length) << (32 - length)): 1 for _ in range(5000)}
    (_, root_list), keys, _, _ = cidr6_layout(mapped4(prefixes))
    assert root_list == (96 + length,) and len(keys) == len(prefixes)  # no marker
    maps = cidr_maps(prefixes, {})
    per_copy = maps["cidr6_slots"].max_entries // 2
    assert 2 * len(prefixes) <= per_copy - CIDR6_SPAN < 4 * len(prefixes)
    find = ipv4_lookup(maps)
    for _, value in list(prefixes)[:200]:
        assert find(value) == (1, 1)
    assert find(value ^ (1 << (32 - length)))[0] in (0, 1)


def test_compile_policy_fills_the_ipv4_index() -> None:
    """Through compile_policy: IPv4 prefixes from the IPv4 root, 0.0.0.0/0 in its mask,
    none of them met from the IPv6 root (an IPv6 lookup never meets them), and the
    reverse."""
    allow = NetworkRule("allow", (ipaddress.IPv4Network("10.0.0.0/8"),))
    everything = NetworkRule("deny", (ipaddress.IPv4Network("0.0.0.0/0"),), "udp")
    six = NetworkRule("deny", (ipaddress.IPv6Network("::/0"),), "tcp")
    policy = egress_policy("deny", allow, everything, six)
    maps = {m.name: m for m in next(p for p in compile_policy(policy).programs).maps}
    find = ipv4_lookup(maps)
    (found_in, _), (found_out, _) = find(0x0A000001), find(0x0B000001)
    assert found_in != found_out and found_out & found_in == found_out
    assert bin(found_in).count("1") == 2 and bin(found_out).count("1") == 1
    (found6, _) = ipv6_lookup(maps)(0x0A000001 << 96)
    assert bin(found6).count("1") == 1 and not found6 & found_in


# -- IPv4-mapped IPv6 addresses: the mapped root --------------------------------------------


def mapped_reference(v4: dict, v6: dict, address: int) -> int:
    """What an address meets (docs/policy.md): an IPv4-mapped one (::ffff:a.b.c.d) the IPv4
    rules of a.b.c.d and the IPv6 rules containing it; any other the IPv6 rules only."""
    found = reference(v6, address)
    if address >> 32 == 0xFFFF:
        found |= reference4(v4, address & FULL4)
    return found


def check_mapped(v4: dict, v6: dict, rng: random.Random, flat_max: int) -> None:
    maps = cidr_maps(v4, v6, flat_max)
    plain, six = ipv4_lookup(maps), ipv6_lookup(maps)
    inside = {(n - 96, value & FULL4): m for (n, value), m in v6.items() if n >= 96}
    points4 = probe_points4({**v4, **inside}, rng) + [rng.getrandbits(32) for _ in range(50)]
    for address in points4:
        # a plain IPv4 address never meets an IPv6 rule, mapped form or not
        assert plain(address)[0] == reference4(v4, address), ipaddress.IPv4Address(address)
        mapped = MAPPED | address
        assert six(mapped)[0] == mapped_reference(v4, v6, mapped), ipaddress.IPv6Address(mapped)
    for address in probe_points(v6, rng):
        assert six(address)[0] == mapped_reference(v4, v6, address), ipaddress.IPv6Address(address)


@st.composite
def mapped_mixes(draw: st.DrawFn) -> tuple[dict, dict]:
    """IPv4 prefixes, and IPv6 ones inside ::ffff:0:0/96 (the mapped form, /96../128),
    containing it (::/0../96) and outside it, around one IPv4 address."""
    base = draw(st.integers(0, FULL4))
    v4: dict[tuple[int, int], int] = {}
    v6: dict[tuple[int, int], int] = {}
    bit = st.integers(0, 63)
    for length, spread, b in draw(
        st.lists(st.tuples(st.integers(0, 32), st.integers(0, 32), bit), max_size=20)
    ):
        key = (length, (base ^ draw(st.integers(0, FULL4)) >> spread) & keep4(length))
        v4[key] = v4.get(key, 0) | 1 << b
    for kind, length, spread, b in draw(
        st.lists(
            st.tuples(st.sampled_from("icor"), st.integers(0, 32), st.integers(0, 32), bit),
            max_size=12,
        )
    ):
        if kind == "i":  # inside: ::ffff:a.b.c.d/(96 + n)
            address = MAPPED | (base ^ draw(st.integers(0, FULL4)) >> spread)
            key = (96 + length, address & keep(96 + length))
        elif kind == "c":  # containing: ::/0 .. ::ffff:0:0/96
            n = draw(st.integers(0, 96))
            key = (n, MAPPED & keep(n))
        elif kind == "o":  # beside it: its siblings and what lies around
            n = draw(st.integers(1, 128))
            key = (n, (MAPPED ^ draw(st.integers(0, FULL)) >> draw(st.integers(0, 128))) & keep(n))
        else:  # anywhere
            n = draw(st.integers(0, 128))
            key = (n, draw(st.integers(0, FULL)) & keep(n))
        v6[key] = v6.get(key, 0) | 1 << b
    return v4, v6


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mix=mapped_mixes(), flat_max=st.integers(0, 7), seed=st.integers(0, 1 << 32))
def test_mapped_addresses_meet_the_ipv4_rules_and_the_ipv6_rules_containing_them(
    mix: tuple[dict, dict], flat_max: int, seed: int
) -> None:
    check_mapped(*mix, random.Random(seed), flat_max)


@pytest.mark.parametrize("flat_max", [0, CIDR6_FLAT_MAX])
def test_the_mapped_root_shares_the_ipv4_entries_unless_it_has_its_own(flat_max: int) -> None:
    """No IPv6 prefix inside ::ffff:0:0/96 and no IPv6 rule containing it that the IPv4
    root's mask lacks: the mapped root is the IPv4 root (no slot more). Else its own
    entries, at lengths 161..192, which the IPv4 root never probes."""
    rng = random.Random(flat_max)
    v4 = {(length, rng.getrandbits(32) & keep4(length)): 1 << 1 for length in (8, 24, 32) * 50}
    outside = {(32, int(ipaddress.IPv6Address("2001:db8::"))): 1 << 2}
    maps = cidr_maps(v4, outside, flat_max)
    roots = dict(maps["cidr6_root"].entries)
    assert roots[U32.pack(CIDR_ROOT_V4)] == roots[U32.pack(CIDR_ROOT_MAPPED)]
    shared = len(maps["cidr6_slots"].entries)
    mapped_rule = {(104, MAPPED | 0x7F000000): 1 << 3}  # ::ffff:127.0.0.0/104
    for extra in (mapped_rule, {(0, 0): 1 << 4}):  # a mapped-form rule, ::/0
        maps = cidr_maps(v4, {**outside, **extra}, flat_max)
        roots = dict(maps["cidr6_root"].entries)
        assert roots[U32.pack(CIDR_ROOT_V4)] != roots[U32.pack(CIDR_ROOT_MAPPED)]
        own = [
            CIDR6_SLOT.unpack_from(value)["len"]
            for _, value in maps["cidr6_slots"].entries
            if CIDR6_SLOT.unpack_from(value)["len"] > 160
        ]
        assert len(maps["cidr6_slots"].entries) == shared + len(own)
        assert own and all(161 <= length <= 192 for length in own)
        check_mapped(v4, {**outside, **extra}, rng, flat_max)
