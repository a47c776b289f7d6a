"""The cgroup hooks by bpftool's names (egress, connect4, device, ...), each with the attach
type it is and the program type it takes."""

from __future__ import annotations

from dataclasses import dataclass

from cgpolicy.kernel.syscall import AttachType, ProgType


@dataclass(frozen=True, slots=True)
class Hook:
    """A cgroup hook by bpftool's attach-type name, with what loading and attaching need."""

    name: str
    attach_type: AttachType
    prog_type: ProgType


def _hooks(prog_type: ProgType, **attach_types: AttachType) -> dict[str, Hook]:
    return {name: Hook(name, at, prog_type) for name, at in attach_types.items()}


A = AttachType
HOOKS: dict[str, Hook] = {
    **_hooks(ProgType.CGROUP_SKB, ingress=A.CGROUP_INET_INGRESS, egress=A.CGROUP_INET_EGRESS),
    **_hooks(
        ProgType.CGROUP_SOCK,
        sock_create=A.CGROUP_INET_SOCK_CREATE,
        sock_release=A.CGROUP_INET_SOCK_RELEASE,
        post_bind4=A.CGROUP_INET4_POST_BIND,
        post_bind6=A.CGROUP_INET6_POST_BIND,
    ),
    **_hooks(
        ProgType.CGROUP_SOCK_ADDR,
        bind4=A.CGROUP_INET4_BIND,
        bind6=A.CGROUP_INET6_BIND,
        connect4=A.CGROUP_INET4_CONNECT,
        connect6=A.CGROUP_INET6_CONNECT,
        connect_unix=A.CGROUP_UNIX_CONNECT,
        sendmsg4=A.CGROUP_UDP4_SENDMSG,
        sendmsg6=A.CGROUP_UDP6_SENDMSG,
        sendmsg_unix=A.CGROUP_UNIX_SENDMSG,
        recvmsg4=A.CGROUP_UDP4_RECVMSG,
        recvmsg6=A.CGROUP_UDP6_RECVMSG,
        recvmsg_unix=A.CGROUP_UNIX_RECVMSG,
        getpeername4=A.CGROUP_INET4_GETPEERNAME,
        getpeername6=A.CGROUP_INET6_GETPEERNAME,
        getpeername_unix=A.CGROUP_UNIX_GETPEERNAME,
        getsockname4=A.CGROUP_INET4_GETSOCKNAME,
        getsockname6=A.CGROUP_INET6_GETSOCKNAME,
        getsockname_unix=A.CGROUP_UNIX_GETSOCKNAME,
    ),
    **_hooks(ProgType.SOCK_OPS, sock_ops=A.CGROUP_SOCK_OPS),
    **_hooks(ProgType.CGROUP_DEVICE, device=A.CGROUP_DEVICE),
    **_hooks(ProgType.CGROUP_SYSCTL, sysctl=A.CGROUP_SYSCTL),
    **_hooks(
        ProgType.CGROUP_SOCKOPT, getsockopt=A.CGROUP_GETSOCKOPT, setsockopt=A.CGROUP_SETSOCKOPT
    ),
}
del A
HOOK_BY_ATTACH_TYPE: dict[AttachType, Hook] = {h.attach_type: h for h in HOOKS.values()}


def hook(name: str) -> Hook:
    """The hook called ``name`` (bpftool's spelling: egress, connect4, device, ...)."""
    try:
        return HOOKS[name]
    except KeyError:
        raise ValueError(f"unknown cgroup hook {name!r}; known: {', '.join(HOOKS)}") from None


def hook_name(attach_type: int) -> str:
    """bpftool's name for an attach type, for messages ("attach type N" if it is no hook)."""
    known = HOOK_BY_ATTACH_TYPE.get(attach_type)  # type: ignore[call-overload]
    return known.name if known else f"attach type {attach_type}"
