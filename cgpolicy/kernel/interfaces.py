"""Network interfaces over netlink: names and globs to ifindexes (pyroute2), and a
subscription to link events."""

from __future__ import annotations

import errno
import fnmatch
import logging
import socket


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


class LinkEvents:
    """A netlink socket in the link multicast group: readable when an interface appears,
    goes or changes. Its messages are drained, not read: they only say "look again", and
    resolve_interfaces reads the interfaces then. Not a pyroute2 socket: importing pyroute2
    costs the service ~20 MiB, which a service whose policies name no interface never
    needs otherwise."""

    def __init__(self) -> None:
        flags = socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        self._socket = socket.socket(socket.AF_NETLINK, flags, socket.NETLINK_ROUTE)
        try:
            self._socket.bind((0, _RTMGRP_LINK))
        except OSError:
            self._socket.close()
            raise

    def fileno(self) -> int:
        return self._socket.fileno()

    def drain(self) -> None:
        """Read what is queued (an overrun, ENOBUFS, is news too), at most a bounded
        number of messages: the wake-up is what counts, and a storm of link changes must
        not hold the service here."""
        for _ in range(_MAX_DRAINED):
            try:
                self._socket.recv(65536)
            except BlockingIOError:
                return
            except OSError as error:
                if error.errno != errno.ENOBUFS:
                    logging.getLogger(__name__).warning("netlink link events: %s", error)
                    return

    def close(self) -> None:
        self._socket.close()


_RTMGRP_LINK = 1  # linux/rtnetlink.h
_MAX_DRAINED = 1024


def link_monitor() -> LinkEvents | None:
    """Link events (interfaces added, removed, renamed), or None with a warning when
    netlink is unavailable: callers use it as a hint source, not as the truth."""
    try:
        return LinkEvents()
    except OSError as error:
        logging.getLogger(__name__).warning(
            "cannot follow interface changes over netlink (%s); resync only", error
        )
        return None
