"""Checks on everything a remote cluster sends: does it fit that cluster's name and id?

A misconfigured or compromised cluster must not be able to inject identities in another
cluster's range (which would let its pods pass policies meant for the local cluster's
pods), nor ipcache entries that point at such identities. Every check returns ``None``
when the item fits, else the reason it is rejected; the caller logs the reason with the
key and drops the item (Cilium validates remote identities and ipcache entries the same
way, ``pkg/clustermesh/types`` ``ValidateRemoteClusterConfig`` and the watchers'
validators).
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from villi.clustermesh.ids import MIN_IDENTITY, ClusterInfo
from villi.identity.labels import CLUSTER_LABEL, LabelSet


def _owned(cluster: ClusterInfo, identity: Any) -> str | None:
    if not isinstance(identity, int) or isinstance(identity, bool):
        return f"identity {identity!r} is not a number"
    if 0 < identity < MIN_IDENTITY:
        return None   # reserved identities (host, world, remote-node, ...) are shared
    if not cluster.owns_identity(identity):
        low, high = cluster.identity_range
        return (f"identity {identity} is outside cluster {cluster.name}'s range "
                f"{low}..{high} (cluster id {cluster.id})")
    return None


def check_identity(cluster: ClusterInfo, identity: int, raw_labels: bytes
                   ) -> tuple[LabelSet | None, str | None]:
    """(labels, None) for a remote identity that fits, else (None, reason)."""
    why = _owned(cluster, identity)
    if why is not None:
        return None, why
    if identity < MIN_IDENTITY:
        return None, f"identity {identity} is reserved; clusters do not publish those"
    try:
        labels = LabelSet.parse(raw_labels.decode())
    except (UnicodeDecodeError, ValueError) as exc:
        return None, f"labels of identity {identity} do not parse: {exc}"
    names = {lbl.value for lbl in labels if lbl.key == CLUSTER_LABEL}
    if names != {cluster.name}:
        shown = ", ".join(sorted(names)) or "none"
        return None, (f"identity {identity} has cluster label {shown}, expected "
                      f"{CLUSTER_LABEL}={cluster.name}")
    return labels, None


def parse_json(raw: bytes) -> tuple[dict[str, Any] | None, str | None]:
    try:
        data = json.loads(raw)
    except ValueError as exc:
        return None, f"not JSON: {exc}"
    if not isinstance(data, dict):
        return None, "not a JSON object"
    return data, None


def check_ipcache(cluster: ClusterInfo, ip: str, raw: bytes
                  ) -> tuple[dict[str, Any] | None, str | None]:
    """(entry, None) for a remote pod's ipcache entry that fits, else (None, reason)."""
    data, why = parse_json(raw)
    if data is None:
        return None, why
    try:
        ipaddress.IPv4Address(ip)
    except ValueError:
        return None, f"{ip!r} is not an IPv4 address"
    identity = data.get("identity")
    why = _owned(cluster, identity)
    if why is not None:
        return None, why
    assert isinstance(identity, int)
    if identity < MIN_IDENTITY:
        return None, f"a pod cannot have the reserved identity {identity}"
    node_ip = data.get("nodeIP")
    if node_ip is not None:
        try:
            ipaddress.IPv4Address(node_ip)
        except ValueError:
            return None, f"nodeIP {node_ip!r} is not an IPv4 address"
    if data.get("cluster") not in (None, cluster.name):
        return None, f"entry names cluster {data['cluster']!r}, expected {cluster.name!r}"
    return data, None


def check_node(cluster: ClusterInfo, name: str, raw: bytes
               ) -> tuple[dict[str, Any] | None, str | None]:
    data, why = parse_json(raw)
    if data is None:
        return None, why
    if data.get("cluster") not in (None, cluster.name):
        return None, f"node names cluster {data['cluster']!r}, expected {cluster.name!r}"
    try:
        if data.get("ipv4"):
            ipaddress.IPv4Address(data["ipv4"])
        for cidr in data.get("podCIDRs") or ():
            ipaddress.IPv4Network(cidr)
    except (ValueError, TypeError) as exc:
        return None, f"node {name}: {exc}"
    return data, None


def check_config(expected: str, raw: bytes, *, local: ClusterInfo | None = None
                 ) -> tuple[ClusterInfo | None, str | None]:
    """A remote's cluster config: its name must be the one we were told, its id must
    differ from ours, and both sides must agree on the mesh size."""
    from villi.clustermesh.ids import ClusterMeshError

    data, why = parse_json(raw)
    if data is None:
        return None, f"cluster config of {expected}: {why}"
    try:
        info = ClusterInfo.from_config(data)
    except ClusterMeshError as exc:
        return None, f"cluster config of {expected}: {exc}"
    if info.name != expected:
        return None, f"cluster config says its name is {info.name!r}, expected {expected!r}"
    if info.id == 0:
        return None, f"cluster {expected} has id 0: clusters in a mesh need ids 1..255"
    if local is not None:
        if info.id == local.id:
            return None, f"cluster {expected} has the same id as this cluster ({info.id})"
        if info.max_connected != local.max_connected:
            return None, (f"cluster {expected} uses max-connected-clusters "
                          f"{info.max_connected}, this cluster {local.max_connected}")
    return info, None
