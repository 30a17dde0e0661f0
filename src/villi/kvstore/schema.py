"""The cluster state's layout in the kvstore: every key prefix and the typed values
agents, the operator, the lab and the relay exchange through it (see DESIGN.md,
KVStore). This is the one place those strings and JSON shapes are spelled; everyone
else builds keys and parses values here, so a writer and its readers cannot drift.

::

    villi/state/nodes/v1/<node>             NodeEntry      (agent, under its lease)
    villi/state/ip/v1/<ip>                  IpcacheEntry   (agent of the pod's node, lease)
    villi/state/ipam/v1/podcidrs/<node>     {"cidrs": [...]} (operator, no lease)
    villi/state/ipam/v1/cidrs/<a.b.c.d_len> <node>         (operator, create-if-absent)
    villi/state/ipam/v1/deleted/<node>      tombstone of a node removed on purpose
    villi/state/identities/v1/...           identities (villi.identity.allocator)
    villi/state/services/v1/clusterip/...   ClusterIP claims (villi.service.allocator)
    villi/resources/<kind>/<ns>/<name>      applied resources (villi.resources)

Decoding is strict where it matters to the datapath (an identity must be an integer)
and raises :class:`~villi.errors.SchemaError` naming the key and the field; unknown
fields are kept out of the typed value (older or newer writers may add some).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from villi.errors import IPAMError, SchemaError

STATE = "villi/state/"
NODES = STATE + "nodes/v1/"
IPCACHE = STATE + "ip/v1/"
IPAM = STATE + "ipam/v1/"
PODCIDRS = IPAM + "podcidrs/"
CLAIMS = IPAM + "cidrs/"
#: IPAM usage reports, one per node under its agent's lease: not in the node entry,
#: which every agent watches (an O(N^2) fan-out at scale; docs/scale.md).
USAGE = IPAM + "usage/"
IDENTITIES = STATE + "identities/v1/"
IDENTITY_IDS = IDENTITIES + "id/"
SERVICES = STATE + "services/v1/"
CLUSTERIP_CLAIMS = SERVICES + "clusterip/"
CLUSTERIP_OWNERS = SERVICES + "clusterip-owner/"
RESOURCES = "villi/resources/"

#: The identity a pod entry without one gets (``world``), as the datapath would.
WORLD_IDENTITY = 2

#: Named ports: name → (port, protocol name as Kubernetes spells it: TCP, UDP, SCTP).
NamedPorts = dict[str, tuple[int, str]]


# --- keys ---------------------------------------------------------------------------------
def check_node_name(node: str) -> str:
    """``node`` if it can be the last segment of a key; IPAMError otherwise."""
    if not node or "/" in node or node.strip() != node:
        raise IPAMError(f"invalid node name {node!r} (non-empty, no '/', no spaces at the ends)")
    return node


def node_key(node: str) -> str:
    return NODES + check_node_name(node)


def podcidrs_key(node: str) -> str:
    return PODCIDRS + check_node_name(node)


def usage_key(node: str) -> str:
    """Where a node's agent reports its IPAM usage (``{"ipam": {...}, "villi.io/ip": n}``)."""
    return USAGE + check_node_name(node)


def ipcache_key(ip: str) -> str:
    return IPCACHE + ip


def resource_prefix(kind: str) -> str:
    """Where every applied resource of ``kind`` lives (``villi.resources`` keys)."""
    return f"{RESOURCES}{kind}/"


def name_in(prefix: str, key: str) -> str:
    """The last segment of ``key`` under ``prefix`` (the node name, the pod IP)."""
    return key[len(prefix):] if key.startswith(prefix) else key


# --- values -------------------------------------------------------------------------------
def _json_object(raw: bytes, what: str, key: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise SchemaError(f"{key or what}: {what} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise SchemaError(f"{key or what}: {what} must be a JSON object, got {doc!r}")
    return doc


def parse_named_ports(raw: Any, where: str = "namedPorts") -> NamedPorts:
    """``{"http": [80, "TCP"]}`` (lists or tuples) → NamedPorts; SchemaError otherwise."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise SchemaError(f"{where}: must be an object, got {raw!r}")
    out: NamedPorts = {}
    for name, value in raw.items():
        try:
            port, proto = value
            out[str(name)] = (int(port), str(proto).upper())
        except (TypeError, ValueError):
            raise SchemaError(f"{where}.{name}: expected [port, protocol], got {value!r}"
                              ) from None
    return out


@dataclass(frozen=True, slots=True)
class IpcacheEntry:
    """One pod's entry: what every node needs to reach it, enforce policy toward it and
    name it in flows. Written by the agent of the pod's node, under its lease."""

    identity: int
    node: str
    node_ip: str | None = None
    namespace: str = ""
    pod_name: str = ""
    endpoint_id: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    named_ports: NamedPorts = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"identity": self.identity, "node": self.node, "nodeIP": self.node_ip,
                "namespace": self.namespace, "podName": self.pod_name,
                "endpointID": self.endpoint_id, "labels": dict(self.labels),
                "namedPorts": {n: list(p) for n, p in self.named_ports.items()}}

    def encode(self) -> bytes:
        return json.dumps(self.to_json()).encode()

    @classmethod
    def decode(cls, raw: bytes, key: str = "") -> IpcacheEntry:
        doc = _json_object(raw, "ipcache entry", key)
        try:
            identity = int(doc.get("identity", WORLD_IDENTITY))
            endpoint_id = int(doc.get("endpointID") or 0)
        except (TypeError, ValueError) as exc:
            raise SchemaError(f"{key or 'ipcache entry'}: identity/endpointID: {exc}"
                              ) from None
        labels = doc.get("labels") or {}
        if not isinstance(labels, Mapping):
            raise SchemaError(f"{key or 'ipcache entry'}: labels must be an object")
        return cls(identity=identity, node=str(doc.get("node") or ""),
                   node_ip=doc.get("nodeIP") or None,
                   namespace=str(doc.get("namespace") or ""),
                   pod_name=str(doc.get("podName") or ""), endpoint_id=endpoint_id,
                   labels={str(k): str(v) for k, v in labels.items()},
                   named_ports=parse_named_ports(doc.get("namedPorts"),
                                                 f"{key or 'ipcache entry'}: namedPorts"))


def parse_cidr(text: str) -> IPv4Network:
    """An IPv4 network from ``a.b.c.d/len``; IPAMError naming the text otherwise."""
    try:
        return IPv4Network(text, strict=True)
    except (ValueError, TypeError) as exc:
        raise IPAMError(f"invalid IPv4 CIDR {text!r}: {exc}") from None


@dataclass(frozen=True, slots=True)
class IPAMUsage:
    """How many pod IPv4s a node has allocated out of how many it can allocate.

    ``capacity`` counts usable addresses (network and broadcast excluded) of the pod
    CIDRs the node allocates from, plus addresses still held in CIDRs it no longer
    allocates from, so ``free`` is exactly what the next allocations can get.
    """

    allocated: int
    capacity: int

    def __post_init__(self) -> None:
        if self.allocated < 0 or self.capacity < 0 or self.allocated > self.capacity:
            raise ValueError(f"invalid IPAM usage {self.allocated}/{self.capacity}")

    @property
    def free(self) -> int:
        return self.capacity - self.allocated

    def summary(self) -> str:
        """The ``GET /v1/healthz`` line: ``IPv4: 3/254 allocated``."""
        return f"IPv4: {self.allocated}/{self.capacity} allocated"

    def to_json(self) -> dict[str, int]:
        return {"allocated": self.allocated, "capacity": self.capacity, "free": self.free}

    @classmethod
    def from_json(cls, raw: Any) -> IPAMUsage:
        """Parse the ``ipam`` object of a node entry (``free`` is derived, not trusted)."""
        if not isinstance(raw, Mapping):
            raise IPAMError(f"ipam usage must be an object, got {raw!r}")
        try:
            allocated, capacity = raw["allocated"], raw["capacity"]
        except KeyError as exc:
            raise IPAMError(f"ipam usage lacks {exc.args[0]!r}: {dict(raw)!r}") from None
        if not (isinstance(allocated, int) and isinstance(capacity, int)):
            raise IPAMError(f"ipam usage counts must be integers: {dict(raw)!r}")
        try:
            return cls(allocated, capacity)
        except ValueError as exc:
            raise IPAMError(str(exc)) from None


@dataclass(frozen=True, slots=True)
class NodeEntry:
    """The node entry an agent keeps under its lease.

    ``pod_cidrs`` are the CIDRs the agent currently allocates from (restored from its
    state file after a restart), which lets the operator hand a node that was gone for
    longer than the grace period its old CIDR back when it is still free.
    ``api_socket`` is where the node's agent serves its API (the lab dials it), and
    ``eni`` the interfaces of an ``--ipam eni`` node (shown by ``villi lab status``).
    """

    name: str
    ipv4: IPv4Address | None
    pod_cidrs: tuple[IPv4Network, ...] = ()
    ipam: IPAMUsage | None = None
    api_socket: str | None = None
    eni: tuple[Mapping[str, Any], ...] | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": self.name,
            "ipv4": str(self.ipv4) if self.ipv4 is not None else None,
            "podCIDRs": [str(c) for c in self.pod_cidrs],
        }
        if self.ipam is not None:
            doc["ipam"] = self.ipam.to_json()
            doc["villi.io/ip"] = self.ipam.free  # allocatable pod IPs (placement)
        if self.api_socket is not None:
            doc["apiSocket"] = self.api_socket
        if self.eni is not None:
            doc["eni"] = [dict(e) for e in self.eni]
        return doc

    def encode(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes, *, key: str = "") -> NodeEntry:
        """Parse a node entry; IPAMError saying what is wrong and where."""
        where = f"{key}: " if key else ""
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IPAMError(f"{where}node entry is not JSON: {exc}") from None
        if not isinstance(doc, Mapping) or not isinstance(doc.get("name"), str):
            raise IPAMError(f"{where}node entry needs a string 'name': {doc!r}")
        try:
            ipv4 = ipaddress.IPv4Address(doc["ipv4"]) if doc.get("ipv4") else None
        except ValueError as exc:
            raise IPAMError(f"{where}ipv4: {exc}") from None
        raw_cidrs = doc.get("podCIDRs") or []
        if not isinstance(raw_cidrs, list):
            raise IPAMError(f"{where}podCIDRs must be a list: {raw_cidrs!r}")
        try:
            cidrs = tuple(parse_cidr(str(c)) for c in raw_cidrs)
            usage = IPAMUsage.from_json(doc["ipam"]) if doc.get("ipam") is not None else None
        except IPAMError as exc:
            raise IPAMError(f"{where}{exc}") from None
        eni = doc.get("eni")
        if eni is not None and not (isinstance(eni, list)
                                    and all(isinstance(e, Mapping) for e in eni)):
            raise IPAMError(f"{where}eni must be a list of objects: {eni!r}")
        sock = doc.get("apiSocket")
        return cls(doc["name"], ipv4, cidrs, usage,
                   str(sock) if sock is not None else None,
                   tuple(eni) if eni is not None else None)


__all__ = [
    "CLAIMS", "CLUSTERIP_CLAIMS", "CLUSTERIP_OWNERS", "IDENTITIES", "IDENTITY_IDS", "IPAM",
    "SERVICES", "IPCACHE", "NODES", "PODCIDRS", "RESOURCES", "STATE",
    "WORLD_IDENTITY", "IPAMUsage", "IpcacheEntry", "NamedPorts", "NodeEntry",
    "check_node_name", "ipcache_key", "name_in", "node_key", "parse_cidr",
    "parse_named_ports", "podcidrs_key", "resource_prefix",
]
