"""The fast paths of loading and compiling large policies against the slow, obvious ones.

parse_cidr reads the common CIDRs without ip_network and builds their objects without its
constructor; whatever it accepts must be exactly what ip_network(strict=True) makes, and
whatever it refuses must be refused by ip_network too (the messages come from the slow
path, unchanged). Inputs: random and hostile texts (leading zeros, spaces, newlines, NULs,
IPv4-mapped and compatible IPv6, zone ids, host bits, netmasks, non-ASCII digits).
"""

from __future__ import annotations

import ipaddress
import itertools
import pickle
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cgpolicy.policy.semantic import InvalidValue, parse_cidr


def _expected(text: str) -> Any:
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        return None


def _alike(fast: Any, slow: Any) -> None:
    assert type(fast) is type(slow)
    assert vars(fast).keys() == vars(slow).keys()
    for name, value in vars(slow).items():
        if name != "hosts":
            assert vars(fast)[name] == value
            assert type(vars(fast)[name]) is type(value)
    for attribute in ("_ip", "_scope_id"):
        for a, b in ((fast.network_address, slow.network_address), (fast.netmask, slow.netmask)):
            assert getattr(a, attribute, "absent") == getattr(b, attribute, "absent")
    assert (fast, hash(fast), str(fast), repr(fast)) == (slow, hash(slow), str(slow), repr(slow))
    assert list(itertools.islice(fast.hosts(), 3)) == list(itertools.islice(slow.hosts(), 3))
    assert pickle.loads(pickle.dumps(fast)) == slow
    assert (fast.broadcast_address, fast.hostmask, fast.num_addresses) == (
        slow.broadcast_address,
        slow.hostmask,
        slow.num_addresses,
    )


def _check(text: str) -> None:
    parse_cidr.cache_clear()
    expected = _expected(text)
    if expected is None:
        with pytest.raises(InvalidValue):
            parse_cidr(text)
    else:
        _alike(parse_cidr(text), expected)


_octet = st.one_of(
    st.integers(0, 255).map(str),
    st.integers(0, 999).map(str),
    st.integers(0, 255).map(lambda n: f"0{n}"),
    st.sampled_from(["", " 1", "1 ", "0x1", "+1", "-1", "\u0661", "00", "000", "0000"]),
)
_length = st.one_of(
    st.integers(0, 129).map(str),
    st.integers(0, 129).map(lambda n: f"0{n}"),
    st.integers(0, 129).map(lambda n: f"00{n}"),
    st.sampled_from(["", " 8", "8 ", "8\n", "+8", "-0", "\u0668", "255.0.0.0", "0.0.0.255", "1/2"]),
)
_ipv4 = st.builds(lambda octets: ".".join(octets), st.lists(_octet, min_size=3, max_size=5))
_ipv6 = st.one_of(
    st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n))),
    st.integers(0, 2**128 - 1).map(lambda n: ipaddress.IPv6Address(n).exploded),
    st.integers(0, 2**32 - 1).map(lambda n: f"::ffff:{ipaddress.IPv4Address(n)}"),
    st.integers(0, 2**32 - 1).map(lambda n: f"::{ipaddress.IPv4Address(n)}"),
    st.integers(0, 2**16 - 1).map(lambda n: f"fe80::{n:x}%eth0"),
    st.text("0123456789abcdefABCDEF:.", min_size=1, max_size=45),
)
_address = st.one_of(_ipv4, _ipv6)
# networks without host bits, so that the fast path is taken, and with them
_network = st.one_of(
    st.builds(
        lambda n, length: f"{ipaddress.ip_network((n, length), strict=False)}",
        st.integers(0, 2**32 - 1),
        st.integers(0, 32),
    ),
    st.builds(
        lambda n, length: f"{ipaddress.ip_network((n, length), strict=False)}",
        st.integers(0, 2**128 - 1),
        st.integers(0, 128),
    ),
)
_text = st.one_of(
    _network,
    st.builds(lambda a, length: f"{a}/{length}", _address, _length),
    _address,
    st.builds(
        lambda n, s: n + s, _network, st.sampled_from([" ", "\n", "\0", "/", "%1", "\udc80"])
    ),
    st.text("0123456789abcdef:./% \n\0x", max_size=50),
    st.text(max_size=20),
)


@settings(max_examples=4000, deadline=None)
@given(_text)
@example("10.0.0.0/8")
@example("10.0.0.0/08")
@example("10.0.0.0/008")
@example("10.0.0.0/0008")
@example("10.0.0.1/8")
@example("010.0.0.0/8")
@example("10.0.0.0/33")
@example("10.0.0.0/255.0.0.0")
@example("10.0.0.0/0.255.255.255")
@example("1.2.3.4")
@example("1.2.3.4/31")
@example("1.2.3.4/32")
@example("0.0.0.0/0")
@example(" 1.2.3.4")
@example("1.2.3.4\n")
@example("::/0")
@example("::1")
@example("::1/127")
@example("::ffff:1.2.3.4/128")
@example("::ffff:1.2.3.0/120")
@example("::1.2.3.4")
@example("fe80::1%eth0")
@example("fe80::1%eth0/128")
@example("fe80::/10")
@example("FE80::/10")
@example("1:2:3:4:5:6:7:8/128")
@example("1:2:3:4:5:6:7::/112")
@example("1::2::3")
@example("\u0661.2.3.4")
def test_parse_cidr_is_ip_network(text: str) -> None:
    _check(text)


def test_many_lengths_and_families() -> None:
    for length in range(33):
        for value in (0, 2**32 - 1):
            network = ipaddress.IPv4Network((value, length), strict=False)
            _check(str(network))
            _check(f"{network.network_address}/{length:03d}")
    for length in range(129):
        for value in (0, 2**128 - 1, 0xFFFF_0A00_0000):
            _check(str(ipaddress.IPv6Network((value, length), strict=False)))


def test_the_fast_constructor_is_in_use() -> None:
    """On the Python this was written for, the checks above exercise the fast objects."""
    from cgpolicy.policy import semantic

    assert semantic._network4.__name__ == semantic._network6.__name__ == "make"
