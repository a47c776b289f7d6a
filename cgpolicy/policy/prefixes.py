"""A rule's `cidrs`, kept as integers: a list may hold 100,000 prefixes, and as ipaddress
networks those take ~440 bytes and ~0.5 us each to make; as integers ~40 bytes. The
compiler reads the integers; networks are made only for what asks for them (explain,
describe, the reference evaluator).

A prefix is one int, its *key*: ``(address << 8 | length) << 1 | is_ipv6``, the address
an int with no host bits set.
"""

from __future__ import annotations

import ipaddress
import itertools
import socket
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, overload

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def make_key(address: int, length: int, ipv6: bool) -> int:
    return (address << 8 | length) << 1 | ipv6


def prefix_key(network: IPNetwork) -> int:
    value, length = network.network_address._ip, network._prefixlen  # type: ignore[union-attr]
    return make_key(value, length, network.version == 6)


def key_parts(key: int) -> tuple[int, int, int]:
    """(version, length, address) of a key."""
    return 6 if key & 1 else 4, key >> 1 & 0xFF, key >> 9


def network_of(key: int) -> IPNetwork:
    value, length = key >> 9, key >> 1 & 0xFF
    return _network6(value, length) if key & 1 else _network4(value, length)


def prefix_text(key: int) -> str:
    """``str(network_of(key))``, made with the C inet_ntop: the same text several times
    faster. Addresses whose first 80 bits are zero are left to ``str``, because glibc
    writes ::ffff:a.b.c.d and ::a.b.c.d dotted and Python does not."""
    value, length = key >> 9, key >> 1 & 0xFF
    if not key & 1:
        return f"{_inet_ntoa(_U32.pack(value))}/{length}"
    if value >> 48 == 0:
        return str(network_of(key))
    return f"{socket.inet_ntop(socket.AF_INET6, value.to_bytes(16, 'big'))}/{length}"


_inet_ntoa = socket.inet_ntoa
_U32 = struct.Struct(">I")


class Prefixes(Sequence[IPNetwork]):
    """A rule's prefixes in the order written (repeats kept): a sequence of networks, made
    when read (and kept from then on), compared and hashed by their keys."""

    __slots__ = ("_keys", "_networks")

    def __init__(self, keys: Iterable[int] = ()) -> None:
        self._keys: tuple[int, ...] = tuple(keys)
        self._networks: tuple[IPNetwork, ...] | None = None

    @property
    def keys(self) -> tuple[int, ...]:
        return self._keys

    def tables(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(length, address) of each prefix: the IPv4 ones, then the IPv6 ones."""
        v4: list[tuple[int, int]] = []
        v6: list[tuple[int, int]] = []
        for key in self._keys:
            (v6 if key & 1 else v4).append((key >> 1 & 0xFF, key >> 9))
        return v4, v6

    @classmethod
    def of(cls, networks: Iterable[IPNetwork]) -> Prefixes:
        return networks if isinstance(networks, Prefixes) else cls(map(prefix_key, networks))

    def networks(self) -> tuple[IPNetwork, ...]:
        if self._networks is None:
            self._networks = tuple(map(network_of, self._keys))
        return self._networks

    def texts(self) -> list[str]:
        """Each prefix as ``str`` writes its network, without making the networks."""
        return list(map(prefix_text, self._keys))

    def __len__(self) -> int:
        return len(self._keys)

    @overload
    def __getitem__(self, index: int) -> IPNetwork: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[IPNetwork, ...]: ...

    def __getitem__(self, index: int | slice) -> IPNetwork | tuple[IPNetwork, ...]:
        if self._networks is not None:
            return self._networks[index]
        if isinstance(index, slice):  # a few shown of a long list: only those made
            return tuple(map(network_of, self._keys[index]))
        return network_of(self._keys[index])

    def __iter__(self) -> Iterator[IPNetwork]:
        return iter(self.networks())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Prefixes):
            return self._keys == other.keys
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._keys)

    def __reduce__(self) -> tuple[type[Prefixes], tuple[tuple[int, ...]]]:
        return Prefixes, (self._keys,)  # (copied and pickled without the networks made)

    def __repr__(self) -> str:
        shown = ", ".join(map(prefix_text, self._keys[:5]))
        more = f", ... {len(self._keys) - 5} more" if len(self._keys) > 5 else ""
        return f"Prefixes([{shown}{more}])"


def _network_maker(network_type: type[IPNetwork], longest: int) -> Callable[[int, int], IPNetwork]:
    """``network_type((value, length))`` for a value without host bits, without the checks
    and string handling of its constructor (half the time of making one). The objects are
    made as ipaddress's own ``__init__`` makes them (the same attributes, so the same
    equality, hash, text and pickle); a Python whose ipaddress builds them differently
    (checked once, on import) gets the real constructor."""
    address_type = network_type._address_class  # type: ignore[union-attr]
    masks = [network_type._make_netmask(length) for length in range(longest + 1)]  # type: ignore[union-attr]
    # the address's other slots (IPv6: _scope_id) as its int constructor leaves them
    sample = address_type(0)
    slots = {name for kind in address_type.__mro__ for name in getattr(kind, "__slots__", ())}
    others = [(name, getattr(sample, name)) for name in sorted(slots - {"_ip", "__weakref__"})]
    new = object.__new__

    def make(value: int, length: int) -> IPNetwork:
        network = new(network_type)
        address = new(address_type)
        address._ip = value
        for name, default in others:
            setattr(address, name, default)
        # set as attributes, in __init__'s order, not through __dict__: that would give
        # each network a dict of its own instead of the compact shared-key layout
        network.network_address = address
        network.netmask, network._prefixlen = masks[length]  # type: ignore[union-attr]
        if length >= longest - 1:  # ipaddress gives these two lengths their own hosts()
            hosts: Any = network.__iter__ if length < longest else lambda: [address_type(value)]
            network.hosts = hosts  # type: ignore[method-assign]
        return network

    def real(value: int, length: int) -> IPNetwork:
        return network_type((value, length))

    samples = [(0, 0), (1, longest), (2, longest - 1), (1 << (longest - 8), 8)]
    try:
        if all(_same(make(*sample), real(*sample)) for sample in samples):
            return make
    except Exception:  # noqa: BLE001 - an ipaddress unlike the one this was written for
        pass
    return real


def _same(fast: IPNetwork, slow: IPNetwork) -> bool:
    """Whether two networks are alike in every attribute and in what they compute."""
    hosts = [list(itertools.islice(network.hosts(), 2)) for network in (fast, slow)]
    return (
        vars(fast).keys() == vars(slow).keys()
        and all(vars(fast)[k] == v for k, v in vars(slow).items() if k != "hosts")
        and (fast, hash(fast), str(fast), repr(fast)) == (slow, hash(slow), str(slow), repr(slow))
        and hosts[0] == hosts[1]
    )


_network4 = _network_maker(ipaddress.IPv4Network, ipaddress.IPV4LENGTH)
_network6 = _network_maker(ipaddress.IPv6Network, ipaddress.IPV6LENGTH)
