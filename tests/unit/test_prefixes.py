"""A rule's prefixes kept as integers (policy/prefixes.py): the same networks, texts,
equality and compiled maps as the tuples of networks they replace."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from cgpolicy.compiler.compile import compile_policy
from cgpolicy.policy.model import NetworkRule
from cgpolicy.policy.prefixes import Prefixes, key_parts, network_of, prefix_key, prefix_text
from tests.policy_builders import egress_policy, net

_networks = st.one_of(
    st.builds(
        lambda n, length: ipaddress.IPv4Network((n, length), strict=False),
        st.integers(0, 2**32 - 1),
        st.integers(0, 32),
    ),
    st.builds(
        lambda n, length: ipaddress.IPv6Network((n, length), strict=False),
        st.one_of(st.integers(0, 2**128 - 1), st.integers(0, 2**48), st.just(0xFFFF << 32)),
        st.integers(0, 128),
    ),
)


@given(_networks)
def test_a_key_is_its_network(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
    key = prefix_key(network)
    assert network_of(key) == network and type(network_of(key)) is type(network)
    assert prefix_text(key) == str(network)
    assert key_parts(key) == (network.version, network.prefixlen, int(network.network_address))


@given(st.lists(_networks, max_size=12))
def test_prefixes_are_the_networks(networks: list) -> None:
    prefixes = Prefixes.of(networks)
    assert len(prefixes) == len(networks) and bool(prefixes) == bool(networks)
    assert prefixes[: len(networks) // 2] == tuple(networks[: len(networks) // 2])
    assert [prefixes[i] for i in range(len(networks))] == networks
    assert tuple(prefixes) == tuple(networks) and prefixes.texts() == list(map(str, networks))
    assert prefixes == Prefixes.of(tuple(networks)) and hash(prefixes) == hash(
        Prefixes.of(networks)
    )


def test_the_families_differ_where_the_numbers_agree() -> None:
    assert Prefixes.of(net("0.0.0.1/32")) != Prefixes.of(net("::1/128"))
    assert Prefixes.of(net("10.0.0.0/8")) != Prefixes.of(net("10.0.0.0/9"))


def test_a_rule_made_with_networks_holds_prefixes() -> None:
    """Rules made in code (tests, learn) and rules read from a file are one kind: equal
    when their prefixes are, and compiled alike."""
    made = NetworkRule("allow", net("10.0.0.0/8", "fd00::/8"))
    read = NetworkRule("allow", Prefixes.of(net("10.0.0.0/8", "fd00::/8")))
    assert isinstance(made.cidrs, Prefixes) and made == read and hash(made) == hash(read)
    first, second = (compile_policy(egress_policy("deny", r)) for r in (made, read))
    assert first.revision == second.revision
    assert [p.maps for p in first.programs] == [p.maps for p in second.programs]


def test_a_long_list_is_shown_without_making_it() -> None:
    prefixes = Prefixes(prefix_key(ipaddress.IPv4Network((i << 8, 24))) for i in range(1000))
    assert repr(prefixes) == (
        "Prefixes([0.0.0.0/24, 0.0.1.0/24, 0.0.2.0/24, 0.0.3.0/24, 0.0.4.0/24, ... 995 more])"
    )
    assert prefixes[:3] == net("0.0.0.0/24", "0.0.1.0/24", "0.0.2.0/24")
    assert prefixes._networks is None  # shown and sliced: nothing else made
