"""The flow ring: the last N raw records, as one preallocated numpy array."""

from __future__ import annotations

import numpy as np

from villi.datapath.abi import FLOW_EVENT_DTYPE


class FlowRing:
    """Keeps the newest ``capacity`` records; ``seq`` counts every record ever added."""

    def __init__(self, capacity: int = 4095) -> None:
        if capacity < 1:
            raise ValueError("flow ring capacity must be at least 1")
        self.capacity = capacity
        self.buf = np.zeros(capacity, dtype=FLOW_EVENT_DTYPE)
        self.seq = 0

    def __len__(self) -> int:
        return min(self.seq, self.capacity)

    def append(self, batch: np.ndarray) -> None:
        n = len(batch)
        if n == 0:
            return
        if n >= self.capacity:
            batch = batch[-self.capacity:]
            self.seq += n - self.capacity
            n = self.capacity
        start = self.seq % self.capacity
        first = min(n, self.capacity - start)
        self.buf[start:start + first] = batch[:first]
        if first < n:
            self.buf[:n - first] = batch[first:]
        self.seq += n

    def snapshot(self) -> np.ndarray:
        """Every record held, oldest first (a copy)."""
        n = len(self)
        if self.seq <= self.capacity:
            return self.buf[:n].copy()
        start = self.seq % self.capacity
        return np.concatenate((self.buf[start:], self.buf[:start]))

    def since(self, seq: int) -> tuple[np.ndarray, int]:
        """Records added after sequence number ``seq`` (for followers), and the new seq."""
        missed = self.seq - seq
        if missed <= 0:
            return self.buf[:0].copy(), self.seq
        return self.snapshot()[-min(missed, len(self)):], self.seq
