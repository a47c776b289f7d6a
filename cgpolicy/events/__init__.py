"""Deny events: decoding the kernel's records (decode) and collecting them from the ring
buffer of every applied policy (reader, through ``kernel.applied`` and ``kernel.ringbuf``)."""
