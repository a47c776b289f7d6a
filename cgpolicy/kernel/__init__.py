"""The kernel layer: the only code that makes bpf() calls, loads programs (bcc, the
compiled-program store), maps ring buffers, talks netlink, and reads or changes bpffs,
cgroupfs and /dev. Everything above it uses its objects and functions; `make lint` holds
that for imports (pyproject.toml, [tool.importlinter])."""
