"""Deny events: decoding the kernel's records (decode), reading ring buffers (ringbuf) and
collecting them from every applied policy (reader)."""
