"""Read the ``events`` ring buffer straight from its memory, in batches.

The kernel maps a BPF ringbuf as: one consumer page (read-write, holds the consumer
position), one producer page (read-only, the producer position), then the data area
mapped twice in a row so that a record that wraps around is still contiguous. Every
record is an 8-byte header (length with BUSY/DISCARD bits, page offset) followed by the
payload padded to 8 bytes.

All of villi's records are ``struct flow_event`` (56 bytes, 64 with the header), so a
batch between the consumer and producer positions is a strided numpy view: the reader
checks every header at once and copies the records out in one operation, with no
Python code per record (see DESIGN.md, Observer). A record of another size (should a
future program emit one) falls back to a header-by-header walk.
"""

from __future__ import annotations

import mmap
import select
import struct
from typing import Any

import numpy as np

from villi.datapath.abi import FLOW_EVENT_DTYPE
from villi.datapath.maps import BpfMap
from villi.errors import MapError

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HDR_SIZE = 8
RECORD_SIZE = FLOW_EVENT_DTYPE.itemsize
STRIDE = (HDR_SIZE + RECORD_SIZE + 7) // 8 * 8


class RingBuffer:
    """Consumer side of a BPF ringbuf map holding flow events."""

    def __init__(self, bpf_map: BpfMap) -> None:
        if bpf_map.type != 27:
            raise MapError(f"{bpf_map.name} is not a ring buffer")
        self.map = bpf_map
        self.size = bpf_map.max_entries
        self.mask = self.size - 1
        page = mmap.PAGESIZE
        self._cons = mmap.mmap(bpf_map.fd, page, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._prod = mmap.mmap(bpf_map.fd, page + 2 * self.size, mmap.MAP_SHARED,
                               mmap.PROT_READ, offset=page)
        self._data = np.frombuffer(self._prod, dtype=np.uint8, offset=page,
                                   count=2 * self.size)
        self._poll = select.epoll()
        self._poll.register(bpf_map.fd, select.EPOLLIN)

    def fileno(self) -> int:
        """Readable when records are waiting (for asyncio's add_reader or epoll)."""
        return self._poll.fileno()

    def wait(self, timeout: float) -> bool:
        """Block until records may be waiting or ``timeout`` seconds pass."""
        if self.pending():
            return True
        return bool(self._poll.poll(timeout))

    @property
    def consumer_pos(self) -> int:
        return struct.unpack_from("<Q", self._cons, 0)[0]

    @property
    def producer_pos(self) -> int:
        return struct.unpack_from("<Q", self._prod, 0)[0]

    def pending(self) -> int:
        """Bytes written by the kernel and not yet consumed."""
        return self.producer_pos - self.consumer_pos

    def _commit(self, pos: int) -> None:
        struct.pack_into("<Q", self._cons, 0, pos)

    def read_batch(self, max_records: int = 65536) -> np.ndarray:
        """Consume up to ``max_records`` committed records; returns a copied array."""
        cons = self.consumer_pos
        avail = min(self.producer_pos - cons, max_records * STRIDE)
        if avail <= 0:
            return np.empty(0, dtype=FLOW_EVENT_DTYPE)
        start = cons & self.mask
        n = avail // STRIDE
        window = self._data[start:start + n * STRIDE]
        headers = window.view(np.uint32)[:: STRIDE // 4][:n]
        lengths = headers & ~np.uint32(BUSY_BIT | DISCARD_BIT)
        if np.all(lengths == RECORD_SIZE):
            busy = np.flatnonzero(headers & np.uint32(BUSY_BIT))
            if busy.size:
                n = int(busy[0])
            keep = (headers[:n] & np.uint32(DISCARD_BIT)) == 0
            if n:
                records = np.ndarray(shape=(n,), dtype=FLOW_EVENT_DTYPE, buffer=window,
                                     offset=HDR_SIZE, strides=(STRIDE,))
                out = records[keep]  # boolean indexing copies out of the ring
            else:
                out = np.empty(0, dtype=FLOW_EVENT_DTYPE)
            self._commit(cons + n * STRIDE)
            return out
        return self._read_slow(cons, max_records)

    def _read_slow(self, cons: int, max_records: int) -> np.ndarray:
        prod = self.producer_pos
        out: list[Any] = []
        while cons < prod and len(out) < max_records:
            off = cons & self.mask
            hdr = int(self._data[off:off + 4].view(np.uint32)[0])
            if hdr & BUSY_BIT:
                break
            length = hdr & ~(BUSY_BIT | DISCARD_BIT)
            if not hdr & DISCARD_BIT and length == RECORD_SIZE:
                out.append(self._data[off + HDR_SIZE: off + HDR_SIZE + length].tobytes())
            cons += (HDR_SIZE + length + 7) // 8 * 8
        self._commit(cons)
        if not out:
            return np.empty(0, dtype=FLOW_EVENT_DTYPE)
        return np.frombuffer(b"".join(out), dtype=FLOW_EVENT_DTYPE).copy()

    def drain(self) -> np.ndarray:
        """Consume everything committed so far."""
        parts = []
        while True:
            batch = self.read_batch()
            if not batch.size:
                break
            parts.append(batch)
        if not parts:
            return np.empty(0, dtype=FLOW_EVENT_DTYPE)
        return np.concatenate(parts)

    def close(self) -> None:
        self._poll.close()
        del self._data
        self._prod.close()
        self._cons.close()


