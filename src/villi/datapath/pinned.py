"""Read a node's pinned maps directly from bpffs, as plain rows (``villi bpf …``).

The agent is not needed: the maps live in ``/sys/fs/bpf/villi/<cluster>/<node>/`` for
as long as the node's datapath enforces, so these readers answer "what does the kernel
hold right now?" even while the agent restarts. Rows are decoded into numbers,
addresses and protocol names only; naming identities and pods is the caller's job.
"""

from __future__ import annotations

import ctypes
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from villi.datapath import abi
from villi.datapath.maps import BpfMap, TypedMap
from villi.errors import MapError

PROTOCOL_NAMES = {0: "ANY", 1: "ICMP", 6: "TCP", 17: "UDP", 132: "SCTP"}
DIRECTION_NAMES = {0: "ingress", 1: "egress"}
MATCH_NAMES = {0: "none", 1: "L3-only", 2: "L3-L4", 3: "L4-only", 4: "all"}


class MapNotPinned(MapError):
    """The node has no such pinned map (wrong node, or its datapath never started)."""


class _U32(ctypes.Structure):
    _fields_ = [("value", ctypes.c_uint32)]


def ip_str(raw: int) -> str:
    """A u32 as the kernel stores an address (network order in memory) → dotted quad."""
    return socket.inet_ntoa(struct.pack("=I", raw & 0xFFFFFFFF))


def _open(pin_dir: Path, name: str, key: type[ctypes.Structure],
          value: type[ctypes.Structure]) -> TypedMap[Any, Any]:
    path = pin_dir / name
    if not path.exists():
        raise MapNotPinned(f"map {name} is not pinned at {pin_dir} (is this node's "
                           "datapath running? `villi lab status` / `villi status`)")
    return TypedMap(BpfMap.open_pinned(path), key, value)


class _Reader:
    def __init__(self, pin_dir: Path, name: str, key: type[ctypes.Structure],
                 value: type[ctypes.Structure]) -> None:
        self.map = _open(pin_dir, name, key, value)

    def __enter__(self) -> TypedMap[Any, Any]:
        return self.map

    def __exit__(self, *exc: object) -> None:
        self.map.map.close()


def endpoints(pin_dir: Path) -> list[dict[str, Any]]:
    """``villi_endpoints``: pod IP → endpoint id, ifindex, identity, enforcement flags."""
    with _Reader(pin_dir, "villi_endpoints", abi.EndpointKey, abi.EndpointValue) as m:
        rows = []
        for k, v in m.items():
            rows.append({"ip": ip_str(k.addr), "endpointID": v.endpoint_id,
                         "ifindex": v.ifindex, "identity": v.identity, "flags": v.flags,
                         "ingressEnforced": bool(v.flags & abi.EP_F_INGRESS_ENFORCED),
                         "egressEnforced": bool(v.flags & abi.EP_F_EGRESS_ENFORCED),
                         "mac": ":".join(f"{b:02x}" for b in v.pod_mac)})
        return sorted(rows, key=lambda r: r["endpointID"])


def policy(pin_dir: Path, endpoint_id: int | None = None) -> list[dict[str, Any]]:
    """``villi_policy`` rows (of one endpoint, or all): identity, direction, protocol,
    port range, deny, proxy port, cookie and the entry's packet/byte counters."""
    with _Reader(pin_dir, "villi_policy", abi.PolicyKey, abi.PolicyValue) as m:
        rows = []
        for k, v in m.items():
            if endpoint_id is not None and k.endpoint_id != endpoint_id:
                continue
            bits = max(0, k.prefixlen - abi.POLICY_STATIC_PREFIX - 8)
            port = socket.ntohs(k.dport)
            lo, hi = (port, port | (0xFFFF >> bits)) if k.protocol and bits else (0, 0)
            rows.append({"endpointID": k.endpoint_id, "identity": k.identity,
                         "direction": DIRECTION_NAMES.get(k.direction, str(k.direction)),
                         "protocol": PROTOCOL_NAMES.get(k.protocol, str(k.protocol)),
                         "port": lo, "endPort": hi if hi != lo else 0,
                         "deny": bool(v.deny), "proxyPort": v.proxy_port,
                         "cookie": v.cookie,
                         "matchType": MATCH_NAMES.get(v.match_type, str(v.match_type)),
                         "packets": v.packets, "bytes": v.bytes})
        rows.sort(key=lambda r: (r["endpointID"], r["direction"], r["identity"],
                                 r["protocol"], r["port"]))
        return rows


def ipcache(pin_dir: Path) -> list[dict[str, Any]]:
    """``villi_ipcache``: prefix → identity and the node IP of pods elsewhere."""
    with _Reader(pin_dir, "villi_ipcache", abi.IpcacheKey, abi.IpcacheValue) as m:
        rows = [{"prefix": f"{ip_str(k.addr)}/{k.prefixlen}", "identity": v.identity,
                 "nodeIP": ip_str(v.node_ip) if v.node_ip else ""} for k, v in m.items()]
        return sorted(rows, key=lambda r: (socket.inet_aton(r["prefix"].split("/")[0]),
                                           r["prefix"]))


def conntrack(pin_dir: Path) -> list[dict[str, Any]]:
    """``villi_ct``: live entries with seconds to expiry (CLOCK_MONOTONIC, the clock of
    ``bpf_ktime_get_ns``); expired entries the LRU has not evicted are left out."""
    now = int(time.monotonic())
    with _Reader(pin_dir, "villi_ct", abi.CtKey, abi.CtValue) as m:
        rows = []
        for k, v in m.items():
            if v.expires < now:
                continue
            proto = PROTOCOL_NAMES.get(k.protocol, str(k.protocol))
            # ct keys hold ports in host order (parse.h), unlike policy keys
            rows.append({"protocol": proto, "source": ip_str(k.saddr),
                         "sourcePort": k.sport, "destination": ip_str(k.daddr),
                         "destinationPort": k.dport,
                         "direction": DIRECTION_NAMES.get(k.direction, str(k.direction)),
                         "expiresIn": v.expires - now, "endpointID": v.endpoint_id,
                         "peerIdentity": v.peer_identity, "cookie": v.cookie,
                         "packets": v.packets, "bytes": v.bytes, "closing": bool(v.closing),
                         "txFlags": v.tx_flags_seen, "rxFlags": v.rx_flags_seen,
                         "proxyPort": v.proxy_port})
        rows.sort(key=lambda r: (r["endpointID"], r["source"], r["destination"],
                                 r["destinationPort"], r["sourcePort"]))
        return rows


def _rows(pin_dir: Path, name: str, key: type[ctypes.Structure],
          value: type[ctypes.Structure]) -> Iterator[tuple[Any, Any]]:
    with _Reader(pin_dir, name, key, value) as m:
        yield from m.items()


def services(pin_dir: Path) -> list[dict[str, Any]]:
    """``villi_lb_services`` + ``villi_lb_backends``: each frontend with its backends
    in slot order (slot 0 is the frontend's master entry holding the count)."""
    backends = {k.value: v for k, v in _rows(pin_dir, "villi_lb_backends", _U32,
                                             abi.LbBackend)}
    fronts: dict[tuple[int, int, int], dict[str, Any]] = {}
    slots: dict[tuple[int, int, int], dict[int, int]] = {}
    for k, v in _rows(pin_dir, "villi_lb_services", abi.LbServiceKey, abi.LbServiceValue):
        fk = (k.address, k.dport, k.protocol)
        if k.slot == 0:
            fronts[fk] = {"frontend": f"{ip_str(k.address)}:{socket.ntohs(k.dport)}",
                          "protocol": PROTOCOL_NAMES.get(k.protocol, str(k.protocol)),
                          "serviceID": v.service_id, "count": v.count,
                          "affinityTimeout": v.affinity_timeout, "flags": v.flags}
        else:
            slots.setdefault(fk, {})[k.slot] = v.backend_id
    out = []
    for fk, front in fronts.items():
        rows = []
        for slot, backend_id in sorted(slots.get(fk, {}).items()):
            if slot > front["count"]:
                continue   # written ahead of a count change, not yet visible
            b = backends.get(backend_id)
            rows.append({"slot": slot, "backendID": backend_id,
                         "address": f"{ip_str(b.address)}:{socket.ntohs(b.port)}"
                         if b is not None else "(missing backend)"})
        out.append({**front, "backends": rows})
    return sorted(out, key=lambda r: (r["frontend"], r["protocol"]))
