"""Key-range arithmetic shared by the backends."""

from __future__ import annotations


def prefix_range(prefix: str) -> tuple[bytes, bytes | None]:
    """``[start, end)`` of the keys under ``prefix`` as UTF-8 bytes; ``end`` None means
    "to the last key" (the empty prefix, or one made only of 0xff bytes).

    Computed on bytes exactly like etcd's ``clientv3.GetPrefixRangeEnd``, so both
    backends agree on which keys a prefix covers and in which order they sort.
    """
    start = prefix.encode()
    end = bytearray(start)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return start, bytes(end)
        end.pop()
    return start, None
