"""Network interface names and globs to ifindexes, over netlink (pyroute2)."""

from __future__ import annotations

import fnmatch


def resolve_interfaces(patterns: tuple[str, ...]) -> set[int]:
    """The indexes of the interfaces in this network namespace whose names match any pattern.

    A pattern with no match resolves to nothing: the rule then matches no packet until the
    interface exists and the policy is applied again (the reconciler does that on link events).
    """
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = [(link["index"], link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()]
    return {
        index
        for index, name in links
        if name and any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
    }
