"""Network interfaces over netlink (pyroute2): names and globs to ifindexes, and a
subscription to link events."""

from __future__ import annotations

import fnmatch
import logging
from typing import Any


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


def link_monitor() -> Any | None:
    """A pyroute2 socket subscribed to link events (interfaces added, removed, renamed),
    or None with a warning when netlink is unavailable: callers use it as a hint source,
    not as the truth."""
    try:
        from pyroute2 import IPRoute
        from pyroute2.netlink.rtnl import RTMGRP_LINK

        ipr = IPRoute()
        ipr.bind(groups=RTMGRP_LINK)
        return ipr
    except Exception as error:  # noqa: BLE001 - netlink is a hint source, not required
        logging.getLogger(__name__).warning(
            "cannot follow interface changes over netlink (%s); resync only", error
        )
        return None
