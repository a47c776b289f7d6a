"""cgpolicy: declarative per-cgroup security policy, enforced by eBPF at cgroup hooks."""

__version__ = "0.1.0"
