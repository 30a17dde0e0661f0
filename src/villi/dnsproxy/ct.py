"""Zombie liveness from the datapath: is there a live CT entry from an endpoint to an IP?

An expired DNS answer's IP stays allowed while a connection to it lives (Cilium asks
its CT GC; here the proxy reads the node's pinned ``villi_ct`` map, read-only). CT
expiry is in ``bpf_ktime`` seconds, i.e. ``CLOCK_MONOTONIC``. One scan of the map
answers every question of a GC round (:meth:`PinnedCT.snapshot`).
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

from villi.datapath import abi
from villi.datapath.maps import BpfMap, TypedMap


def _ip(u32: int) -> str:
    return socket.inet_ntoa(struct.pack("<I", u32))


class PinnedCT:
    def __init__(self, pin_dir: str | Path) -> None:
        self.path = Path(pin_dir) / "villi_ct"
        self._map: TypedMap[abi.CtKey, abi.CtValue] | None = None
        self._live: set[tuple[str, str]] = set()

    def snapshot(self) -> set[tuple[str, str]]:
        """(source IP, destination IP) of every live, not-closing CT entry."""
        if self._map is None:
            self._map = TypedMap(BpfMap.open_pinned(self.path), abi.CtKey, abi.CtValue)
        now = int(time.clock_gettime(time.CLOCK_MONOTONIC))
        live = set()
        for key, value in self._map.items():
            if value.expires >= now and not value.closing:
                live.add((_ip(key.saddr), _ip(key.daddr)))
        self._live = live
        return live

    def is_alive(self, endpoint_ip: str, ip: str) -> bool:
        """Against the last :meth:`snapshot`; either direction of the tuple counts."""
        return (endpoint_ip, ip) in self._live or (ip, endpoint_ip) in self._live
