"""bench.compare's allow-lists: N distinct, non-overlapping prefixes of one family with the
measured destination last (the worst case of a linear chain), and a replacement outside
them; its summary divides by the no-policy median of the same family."""

from __future__ import annotations

import ipaddress
import itertools

import pytest

from bench.compare import allow_list, replacement, summarize


@pytest.mark.parametrize(
    ("family", "destination", "blocked"),
    [("ipv4", "10.198.1.2", "10.198.1.3"), ("ipv6", "fd00:198::2", "fd00:198::3")],
)
@pytest.mark.parametrize("n", [1, 2, 1000])
def test_allow_list_ends_with_the_destination_and_misses_the_blocked_address(
    family, destination, blocked, n
):
    prefixes = allow_list(family, n, destination)
    networks = [ipaddress.ip_network(p) for p in prefixes]
    assert len(networks) == n
    assert networks[-1] == ipaddress.ip_network(destination)
    assert {net.version for net in networks} == {4 if family == "ipv4" else 6}
    ordered = sorted(networks)
    assert not any(a.overlaps(b) for a, b in itertools.pairwise(ordered))
    assert not any(ipaddress.ip_address(blocked) in net for net in networks)
    extra = ipaddress.ip_network(replacement(family, prefixes))
    assert not any(extra.overlaps(net) for net in networks)


def test_ratios_divide_by_the_families_own_no_policy_median():
    samples = [
        {"config": c, "family": f, "n": 1, "round": r, "pps": v, "pps_cpu": v, "tps": v}
        for f, base in (("ipv4", 100.0), ("ipv6", 50.0))
        for r, (c, v) in enumerate([("none", base), ("none", base * 1.2), ("x", base / 2)])
    ]
    summary = summarize(samples, ["none", "x"], [1], ["ipv4", "ipv6"])
    for family in ("ipv4", "ipv6"):
        assert summary[family]["x"][1]["pps_ratio"] == pytest.approx(0.5 / 1.1)
        assert summary[family]["none"][1]["tps_ratio_min"] == pytest.approx(1 / 1.1)
