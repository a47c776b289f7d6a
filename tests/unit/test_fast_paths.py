"""The fast paths of loading and compiling large policies against the slow, obvious ones
(bench/validate.py measures them; bench/README.md says where the time went).

cidr_key reads the common CIDRs without ip_network, and parse_cidr makes networks from its
keys without ip_network's constructor; whatever they accept must be exactly what
ip_network(strict=True) makes, and whatever they refuse must be refused by ip_network
too or name a zone (the messages come from the slow path, unchanged). Inputs: random and
hostile texts (leading zeros, spaces, newlines, NULs, IPv4-mapped and compatible IPv6, zone
ids, host bits, netmasks, non-ASCII digits).

The loader composes list items inline and lets libyaml skip long runs of CIDR items; the
compiler builds its CIDR
tables and writes canonical texts its own faster way: each is compared with what the
straightforward code (the code before, kept here) gives, and the revisions of generated
policies of every kind of CIDR are pinned: a faster compile must not reload anything.
"""

from __future__ import annotations

import ipaddress
import itertools
import pickle
import random
import re
import socket
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cgpolicy.compiler import canonical, network
from cgpolicy.compiler.compile import compile_policy
from cgpolicy.policy import loader
from cgpolicy.policy.loader import load_file
from cgpolicy.policy.semantic import InvalidValue, cidr_key, end_of_load, parse_cidr
from cgpolicy.policy.validate import load_contents


def _expected(text: str) -> Any:
    """ip_network's network; one with a zone (fe80::1%eth0) is refused: the programs
    match addresses, not zones."""
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError:
        return None
    return None if getattr(network.network_address, "scope_id", None) else network


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
    end_of_load(keep=False)
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
    from cgpolicy.policy import prefixes

    assert prefixes._network4.__name__ == prefixes._network6.__name__ == "make"


# -- the loader ----------------------------------------------------------------------------

_scalar = st.one_of(
    st.from_regex(r"[a-z0-9.:/]{1,12}", fullmatch=True),
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(["yes", "no", "~", "null", "1.5", "0x10", "010", "2026-01-01", "''", "-"]),
    st.from_regex(r"[a-z0-9 .:/]{0,12}", fullmatch=True).map(lambda t: f'"{t}"'),
    st.from_regex(r"[a-z0-9 .:/]{0,12}", fullmatch=True).map(lambda t: f"'{t}'"),
    st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True).map(lambda t: f"!!str {t}"),
    st.sampled_from(["!!int 7", "!!float 1", "!custom x", "&a x", "*a", "!!binary aGk="]),
)


def _old_scalar(self: Any, event: Any) -> None:
    """_Composer._scalar before list items were composed inline."""
    self._count(event)
    if event.anchor is not None:
        self._anchor(event)
    frame = self.stack[-1] if self.stack else None
    if frame is not None and frame.key is None and isinstance(frame.container, dict):
        self._key(frame, event)
    else:
        self._value(self._construct(event), loader._mark(event.start_mark))


def _outcome(text: bytes) -> Any:
    loaded = load_file("t.yaml", text)
    return loaded.problems, [
        (
            d.index,
            d.line,
            d.column,
            d.data,
            d.problems,
            d.source_map.root,
            {
                path: (list(positions), data)
                for path, (positions, data) in d.source_map._collections.items()
            },
        )
        for d in loaded.documents
    ]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.lists(_scalar, min_size=1, max_size=8), min_size=1, max_size=4), st.booleans())
def test_list_items_compose_as_before(lists: list[list[str]], flow: bool) -> None:
    """Values, problems and every node's position, the same as the code before."""
    lines = []
    for index, items in enumerate(lists):
        if flow:
            lines.append(f"k{index}: [{', '.join(items)}]")
        else:
            lines.append(f"k{index}:" + "".join(f"\n  - {item}" for item in items))
    lines.append("- top")  # a list at the top after a mapping: a syntax error, at the end
    for text in ("\n".join(lines[:-1]) + "\n", "\n".join(lines) + "\n", f"[{lines[0]}]"):
        fast = _outcome(text.encode())
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(loader._Composer, "_scalar", _old_scalar)
            assert _outcome(text.encode()) == fast


_run_item = st.one_of(
    st.from_regex(r"[0-9a-f:./]{1,14}", fullmatch=True).map(lambda t: f'"{t}"'),
    st.from_regex(r"[0-9a-f:./]{1,14}", fullmatch=True).map(lambda t: f"'{t}'"),
    st.from_regex(r"[0-9a-f:.]{1,12}/[0-9]{1,3}", fullmatch=True),
)
# What may stand before and after a run of item lines, each ending with a newline: the
# contexts in which such lines are not items of a block list, or not only those.
_before = st.sampled_from(
    [
        "k:\n",
        "k: [\n",
        "k: |\n",
        "k: >-\n",
        'k: "open\n',
        "k: 'open\n",
        "k: plain\n",
        "k: x\nk:\n",  # a duplicate key: its value is read and dropped
        "k:\n  - first\n",
        "- top\n",
        "k: &a\n",
        "k: !!seq\n",
        "",
    ]
)
_after = st.sampled_from(
    [
        "",
        "j: 1\n",
        "]\n",
        '  close"\n',
        "  close'\n",
        "    more\n",
        "      more\n",
        "  # note\n",
        "- last\n",
        "  - last\n",
        "  - 10.0.0.0/8\r\n",
        "\u2028\n",
        "---\nk: 1\n",
        "*a\n",
    ]
)


def _without_runs(text: bytes) -> Any:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loader, "_CIDR_RUN", re.compile(r"(?!)"))  # matches nothing
        return _outcome(text)


@settings(max_examples=500, deadline=None)
@given(
    _before,
    st.sampled_from(["", "  ", "    "]),
    st.lists(_run_item, min_size=6, max_size=20),
    _after,
    st.integers(0, 3),
    st.sampled_from([loader.MAX_NODES, 12]),
)
def test_blanked_runs_read_as_the_whole_file(
    before: str, indent: str, items: list[str], after: str, breaks: int, max_nodes: int
) -> None:
    """A file whose runs of CIDR items libyaml skips gives the same documents, values,
    problems and positions as the same file read whole, whatever the run turns out to be
    part of (a block scalar, a flow list, a string over several lines, a duplicate key),
    with comments or other line breaks in it, and with the node limit reached inside it."""
    lines = [f"{indent}- {item}\n" for item in items]
    for at in range(breaks):  # a comment or a blank line inside the run
        lines.insert(len(lines) * (at + 1) // (breaks + 1), ["\n", f"{indent}# c\n"][at % 2])
    text = (before + "".join(lines) + after).encode()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loader, "MAX_NODES", max_nodes)
        assert _outcome(text) == _without_runs(text)


def test_a_long_list_is_read_in_few_events() -> None:
    """The fast path is taken for a list as `cgpolicy learn` and the bench write it, and
    gives what the whole reading gives."""
    items = "".join(f'    - "10.{i >> 8}.{i & 255}.0/24"\n' for i in range(5000))
    plain = "".join(f"    - fd00:{i:x}::/48\n" for i in range(5000))
    text = f"a:\n  b:\n{items}  c:\n{plain}d: 1\n".encode()
    scalars = 0
    original = loader._Composer._scalar

    def counted(self: Any, event: Any) -> None:
        nonlocal scalars
        scalars += 1
        original(self, event)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loader._Composer, "_scalar", counted)
        fast = _outcome(text)
    assert scalars < 10
    assert fast == _without_runs(text)
    assert len(fast[1][0][3]["a"]["b"]) == 5000


# -- the compiler ----------------------------------------------------------------------------


def _old_cidr_tables(rules: Any) -> tuple[dict[Any, int], dict[Any, int]]:
    v4: dict[Any, int] = {}
    v6: dict[Any, int] = {}
    for index, rule in enumerate(rules):
        for net in rule.cidrs:
            table = v4 if isinstance(net, ipaddress.IPv4Network) else v6
            key = (net.prefixlen, int(net.network_address))
            table[key] = table.get(key, 0) | 1 << index
    return v4, v6


def _old_network_text(net: Any) -> str:
    value = int(net.network_address)
    if net.version == 4 or value >> 48 == 0:
        return str(net)
    return f"{socket.inet_ntop(socket.AF_INET6, value.to_bytes(16, 'big'))}/{net.prefixlen}"


def mixed_policy(seed: int, count: int) -> str:
    """A policy of several rules over egress, ingress, connect and bind, with IPv4 and IPv6
    prefixes of many lengths (short ones too), IPv4-mapped and bare addresses, lengths
    with a leading zero, and duplicates: about ``count`` CIDRs."""
    rng = random.Random(seed)

    def cidr() -> str:
        kind = rng.random()
        if kind < 0.5:
            length = rng.choice([0, 8, 12, 16, 17, 20, 23, 24, 25, 27, 28, 30, 31, 32] + [24] * 8)
            net = ipaddress.IPv4Network((rng.getrandbits(32), length), strict=False)
            text = str(net)
            if rng.random() < 0.05:
                text = f"{net.network_address}/0{length}"
            if length == 32 and rng.random() < 0.3:
                text = str(net.network_address)
            return text
        if kind < 0.6:
            return f"::ffff:{ipaddress.IPv4Address(rng.getrandbits(32))}"
        length = rng.choice([0, 16, 32, 48, 56, 64, 96, 100, 112, 127, 128] + [48] * 4)
        return str(ipaddress.IPv6Network((rng.getrandbits(128), length), strict=False))

    def cidrs(n: int) -> str:
        items = [cidr() for _ in range(n)]
        items += rng.sample(items, min(3, len(items)))
        return "\n".join(f'            - "{item}"' for item in items)

    per = max(1, count // 4)
    rules = {
        "egress": f"""\
        - action: allow
          protocol: tcp
          ports: [443, "8000-8100"]
          cidrs:
{cidrs(per)}
        - action: deny
          cidrs:
{cidrs(per // 4 + 1)}""",
        "ingress": f"""\
        - action: deny
          protocol: udp
          cidrs:
{cidrs(per)}""",
        "connect": f"""\
        - action: deny
          cidrs:
{cidrs(per)}""",
        "bind": f"""\
        - action: deny
          protocol: tcp
          ports: [22]
          cidrs:
{cidrs(per // 2 + 1)}""",
    }
    return f"""\
apiVersion: cgpolicy.dev/v1
kind: CgroupPolicy
metadata: {{name: mixed-{seed}}}
spec:
  targets: [{{path: system.slice/mixed.service}}]
  network:
    egress:
      default: deny
      rules:
{rules["egress"]}
    ingress:
      default: allow
      rules:
{rules["ingress"]}
  sockets:
    connect:
      default: allow
      rules:
{rules["connect"]}
    bind:
      default: allow
      rules:
{rules["bind"]}
"""


# computed by the code before these fast paths (commit 9fc10d3)
REVISIONS = {
    (1, 40): "56456525db3eb863",
    (2, 400): "9f619dee9df7d10e",
    (3, 4000): "1e733019578b398b",
    (4, 40000): "0c23a69bd3d80f66",
}


@pytest.mark.parametrize(("seed", "count"), sorted(REVISIONS))
def test_compile_matches_the_straightforward_code(seed: int, count: int) -> None:
    result = load_contents([(f"mixed-{seed}.yaml", mixed_policy(seed, count).encode())])
    assert not result.problems, result.problems[:3]
    (policy,) = result.policies
    assert compile_policy(policy, dns_key=bytes(16)).revision == REVISIONS[(seed, count)]
    sections = [policy.network.egress, policy.network.ingress]  # type: ignore[union-attr]
    sections += [policy.sockets.connect, policy.sockets.bind]  # type: ignore[union-attr]
    for section in sections:
        rules = canonical.ordered_rules(section.rules)  # type: ignore[union-attr]
        v4, v6 = network._cidr_tables(rules)
        assert (v4, v6) == _old_cidr_tables(rules)
        for rule in rules:
            for net in rule.cidrs:
                assert canonical.network_text(net) == _old_network_text(net)


@settings(max_examples=500, deadline=None)
@given(_network)
def test_canonical_text_is_the_straightforward_one(text: str) -> None:
    net = parse_cidr(text)
    assert canonical.network_text(net) == _old_network_text(net)


def test_gc_paused_restores_the_collector() -> None:
    import gc

    from cgpolicy.policy.gcpause import gc_paused

    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner pause leaves the outer one in force
    assert gc.isenabled()
    with pytest.raises(RuntimeError), gc_paused():
        raise RuntimeError
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # it was off: left off
    finally:
        gc.enable()


def test_a_pause_that_made_many_objects_ends_with_them_frozen() -> None:
    import gc

    from cgpolicy.policy.gcpause import FREEZE_ABOVE, gc_paused

    gc.unfreeze()
    try:
        with gc_paused():
            few = [[i] for i in range(100)]
        assert gc.get_freeze_count() == 0
        with gc_paused():
            many = [[i] for i in range(2 * FREEZE_ABOVE)]
        assert gc.get_freeze_count() >= len(many)
        assert gc.isenabled() and few
    finally:
        gc.unfreeze()


def test_a_load_starts_from_the_cidrs_of_the_one_before() -> None:
    from cgpolicy.policy import semantic

    end_of_load(keep=False)
    first = cidr_key("192.0.2.0/24")
    assert cidr_key("192.0.2.0/24") is first  # the build reuses the checks' result
    end_of_load()
    assert cidr_key("192.0.2.0/24") is first  # the next load too
    end_of_load()
    end_of_load()  # a load that did not use it: dropped
    assert cidr_key("192.0.2.0/24") is not first
    with pytest.raises(InvalidValue):  # refusals are not kept, so their message is made
        cidr_key("192.0.2.1/24")
    assert "192.0.2.1/24" not in semantic._this_load
    end_of_load(keep=False)
    assert not semantic._this_load and not semantic._last_load
