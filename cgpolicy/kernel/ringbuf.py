"""Consumer side of a BPF ring buffer map, with mmap (no libbpf, no bcc).

The map's first page is the consumer position (read-write), the second the producer
position, then the data area, mapped twice in a row so that a record wrapping around the
end reads as one slice. Each record has an 8-byte header: its length with two flag bits
(BUSY: still being written; DISCARD: dropped by the program), then the record, padded to
8 bytes. Only one consumer should read a ring buffer at a time: reading consumes.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator

from cgpolicy.kernel.bpf import Map
from cgpolicy.kernel.syscall import MapType

_BUSY = 1 << 31
_DISCARD = 1 << 30
_HEADER = 8
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


class RingBuffer:
    """Records of one ring buffer map; keeps the map open while it lives."""

    def __init__(self, ring: Map) -> None:
        if ring.info.type != MapType.RINGBUF:
            raise ValueError(f"map {ring.name} is not a ring buffer")
        self.map = ring
        self.size = ring.info.max_entries
        self.mask = self.size - 1
        page = mmap.PAGESIZE
        self._consumer = mmap.mmap(ring.fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._producer = mmap.mmap(
            ring.fd, page + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page
        )
        self._data = page

    @property
    def fd(self) -> int:
        return self.map.fd

    def pending(self) -> int:
        """Bytes written by the kernel and not consumed yet."""
        return _U64.unpack_from(self._producer, 0)[0] - _U64.unpack_from(self._consumer, 0)[0]

    def drain(self, limit: int | None = None) -> Iterator[bytes]:
        """Every complete record now in the buffer (at most ``limit``), consuming them."""
        consumer = _U64.unpack_from(self._consumer, 0)[0]
        count = 0
        while limit is None or count < limit:
            producer = _U64.unpack_from(self._producer, 0)[0]
            if consumer >= producer:
                break
            at = self._data + (consumer & self.mask)
            length = _U32.unpack_from(self._producer, at)[0]
            if length & _BUSY:
                break  # the kernel is still writing it
            size = length & ~(_BUSY | _DISCARD)
            record = (
                None if length & _DISCARD else self._producer[at + _HEADER : at + _HEADER + size]
            )
            consumer += (size + _HEADER + 7) & ~7
            _U64.pack_into(self._consumer, 0, consumer)
            if record is not None:
                count += 1
                yield record

    def close(self) -> None:
        self._consumer.close()
        self._producer.close()
        self.map.close()
