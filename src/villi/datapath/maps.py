"""Typed access to BPF maps.

``BpfMap`` is a map fd with raw byte-level operations and its kernel metadata;
``TypedMap`` puts ctypes key/value structs on top (and splits per-CPU values into one
value per CPU). Lookups of absent keys return None: absence is an answer, not an
error. Batch operations are used where the kernel has them (hash and array maps) and
fall back to one syscall per element elsewhere (LPM tries, for instance).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Generic, TypeVar

from villi.datapath import _libbpf as lb
from villi.errors import MapError

K = TypeVar("K", bound=ctypes.Structure)
V = TypeVar("V", bound=ctypes.Structure)

MAP_TYPE_NAMES = {1: "hash", 2: "array", 5: "percpu_hash", 6: "percpu_array", 9: "lru_hash",
                  10: "lru_percpu_hash", 11: "lpm_trie", 27: "ringbuf"}
PERCPU_TYPES = {5, 6, 10}
BATCH_TYPES = {1, 2, 5, 6, 9, 10}


class BpfMapInfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * 16), ("ifindex", ctypes.c_uint32),
                ("btf_vmlinux_value_type_id", ctypes.c_uint32),
                ("netns_dev", ctypes.c_uint64), ("netns_ino", ctypes.c_uint64),
                ("btf_id", ctypes.c_uint32), ("btf_key_type_id", ctypes.c_uint32),
                ("btf_value_type_id", ctypes.c_uint32), ("_pad", ctypes.c_uint32),
                ("map_extra", ctypes.c_uint64)]


class BpfMap:
    """A BPF map by fd. Owns the fd (closed by close())."""

    def __init__(self, fd: int, name: str | None = None) -> None:
        self.fd = fd
        info = BpfMapInfo()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        lb.check(lb.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)),
                 "map info", MapError)
        self.info = info
        self.name = name or info.name.decode()
        self.type = info.type
        self.key_size = info.key_size
        self.value_size = info.value_size
        self.max_entries = info.max_entries
        self.percpu = info.type in PERCPU_TYPES
        self.ncpus = lb.possible_cpus() if self.percpu else 1
        # Per-CPU values are laid out one 8-byte-aligned slot per possible CPU.
        self.value_stride = (self.value_size + 7) // 8 * 8 if self.percpu else self.value_size
        self.total_value_size = self.value_stride * self.ncpus

    @classmethod
    def open_pinned(cls, path: Path | str) -> BpfMap:
        fd = lb.bpf_obj_get(str(path).encode())
        if fd < 0:
            err = ctypes.get_errno() or -fd
            raise MapError(f"cannot open pinned map {path}: {os.strerror(err)}", errno=err)
        return cls(fd, name=Path(path).name)

    def __repr__(self) -> str:
        kind = MAP_TYPE_NAMES.get(self.type, str(self.type))
        return f"BpfMap({self.name!r}, {kind}, max_entries={self.max_entries})"

    # --- raw operations -----------------------------------------------------------
    def lookup_raw(self, key: bytes) -> bytes | None:
        val = ctypes.create_string_buffer(self.total_value_size)
        ret = lb.bpf_map_lookup_elem(self.fd, key, val)
        if ret < 0:
            if -ret == errno.ENOENT:
                return None
            lb.check(ret, f"lookup in {self.name}", MapError)
        return val.raw

    def update_raw(self, key: bytes, value: bytes, flags: int = lb.BPF_ANY) -> None:
        lb.check(lb.bpf_map_update_elem(self.fd, key, value, flags), f"update of {self.name}",
                 MapError)

    def delete_raw(self, key: bytes) -> bool:
        ret = lb.bpf_map_delete_elem(self.fd, key)
        if ret < 0:
            if -ret == errno.ENOENT:
                return False
            lb.check(ret, f"delete in {self.name}", MapError)
        return True

    def keys_raw(self) -> Iterator[bytes]:
        """Every key (a snapshot walk; concurrent deletes may restart it)."""
        cur: bytes | None = None
        nxt = ctypes.create_string_buffer(self.key_size)
        while True:
            ret = lb.bpf_map_get_next_key(self.fd, cur, nxt)
            if ret < 0:
                if -ret == errno.ENOENT:
                    return
                lb.check(ret, f"iterating {self.name}", MapError)
            cur = nxt.raw
            yield cur

    def items_raw(self) -> Iterator[tuple[bytes, bytes]]:
        if self.type in BATCH_TYPES:
            yield from self._lookup_batch()
            return
        for k in list(self.keys_raw()):
            v = self.lookup_raw(k)
            if v is not None:
                yield k, v

    def _lookup_batch(self, chunk: int = 4096) -> Iterator[tuple[bytes, bytes]]:
        keys = ctypes.create_string_buffer(self.key_size * chunk)
        vals = ctypes.create_string_buffer(self.total_value_size * chunk)
        out_batch = ctypes.create_string_buffer(max(self.key_size, 8))
        in_batch: ctypes.Array[ctypes.c_char] | None = None
        opts = lb.BpfMapBatchOpts(sz=ctypes.sizeof(lb.BpfMapBatchOpts))
        while True:
            count = ctypes.c_uint32(chunk)
            ret = lb.bpf_map_lookup_batch(self.fd, in_batch, out_batch, keys, vals,
                                          ctypes.byref(count), ctypes.byref(opts))
            err = -ret if ret < 0 else 0
            if err not in (0, errno.ENOENT):
                if err in (errno.EINVAL, errno.ENOTSUPP if hasattr(errno, "ENOTSUPP") else 524):
                    for k in list(self.keys_raw()):  # kernel without batch support
                        v = self.lookup_raw(k)
                        if v is not None:
                            yield k, v
                    return
                lb.check(ret, f"batch lookup in {self.name}", MapError)
            n = count.value
            kraw, vraw = keys.raw, vals.raw
            for i in range(n):
                yield (kraw[i * self.key_size:(i + 1) * self.key_size],
                       vraw[i * self.total_value_size:(i + 1) * self.total_value_size])
            if err == errno.ENOENT:
                return
            in_batch = ctypes.create_string_buffer(out_batch.raw, len(out_batch))

    def update_batch_raw(self, items: list[tuple[bytes, bytes]]) -> None:
        """Write many elements: one syscall where the kernel supports it."""
        if not items:
            return
        if self.type not in BATCH_TYPES:
            for k, v in items:
                self.update_raw(k, v)
            return
        keys = b"".join(k for k, _ in items)
        vals = b"".join(v for _, v in items)
        count = ctypes.c_uint32(len(items))
        opts = lb.BpfMapBatchOpts(sz=ctypes.sizeof(lb.BpfMapBatchOpts))
        lb.check(lb.bpf_map_update_batch(self.fd, keys, vals, ctypes.byref(count),
                                         ctypes.byref(opts)), f"batch update of {self.name}",
                 MapError)

    def clear(self) -> int:
        """Delete every element; returns how many were deleted."""
        n = 0
        for k in list(self.keys_raw()):
            n += self.delete_raw(k)
        return n

    def pin(self, path: Path | str) -> None:
        lb.check(lb.bpf_obj_pin(self.fd, str(path).encode()), f"pinning {self.name} at {path}",
                 MapError)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class TypedMap(Generic[K, V]):
    """A map with ctypes key and value types.

    For per-CPU maps ``lookup`` returns one value per possible CPU and ``update``
    takes such a list (or a single value, written to every CPU).
    """

    def __init__(self, bpf_map: BpfMap, key_type: type[K], value_type: type[V]) -> None:
        if ctypes.sizeof(key_type) != bpf_map.key_size:
            raise MapError(f"{bpf_map.name}: key is {bpf_map.key_size} bytes in the kernel, "
                           f"{ctypes.sizeof(key_type)} in {key_type.__name__}")
        if ctypes.sizeof(value_type) != bpf_map.value_size:
            raise MapError(f"{bpf_map.name}: value is {bpf_map.value_size} bytes in the kernel, "
                           f"{ctypes.sizeof(value_type)} in {value_type.__name__}")
        self.map = bpf_map
        self.key_type = key_type
        self.value_type = value_type

    @property
    def name(self) -> str:
        return self.map.name

    def _values(self, raw: bytes) -> list[V]:
        stride = self.map.value_stride
        return [self.value_type.from_buffer_copy(raw, i * stride) for i in range(self.map.ncpus)]

    def _encode_value(self, value: V | list[V]) -> bytes:
        if not self.map.percpu:
            assert not isinstance(value, list)
            return bytes(value)
        values = value if isinstance(value, list) else [value] * self.map.ncpus
        pad = b"\0" * (self.map.value_stride - self.map.value_size)
        return b"".join(bytes(v) + pad for v in values)

    def lookup(self, key: K) -> V | None:
        raw = self.map.lookup_raw(bytes(key))
        if raw is None:
            return None
        return self.value_type.from_buffer_copy(raw)

    def lookup_percpu(self, key: K) -> list[V] | None:
        raw = self.map.lookup_raw(bytes(key))
        return None if raw is None else self._values(raw)

    def update(self, key: K, value: V | list[V], flags: int = lb.BPF_ANY) -> None:
        self.map.update_raw(bytes(key), self._encode_value(value), flags)

    def update_many(self, items: Iterable[tuple[K, V]]) -> None:
        self.map.update_batch_raw([(bytes(k), self._encode_value(v)) for k, v in items])

    def delete(self, key: K) -> bool:
        return self.map.delete_raw(bytes(key))

    def keys(self) -> list[K]:
        return [self.key_type.from_buffer_copy(k) for k in self.map.keys_raw()]

    def items(self) -> list[tuple[K, V]]:
        return [(self.key_type.from_buffer_copy(k), self.value_type.from_buffer_copy(v))
                for k, v in self.map.items_raw()]

    def items_percpu(self) -> list[tuple[K, list[V]]]:
        return [(self.key_type.from_buffer_copy(k), self._values(v))
                for k, v in self.map.items_raw()]

    def clear(self) -> int:
        return self.map.clear()
