"""The kvstore keys of cluster-pool IPAM and their JSON values: the agent/operator
contract.

::

    villi/state/nodes/v1/<node>                -> NodeEntry JSON   (agent, under its lease)
    villi/state/ipam/v1/podcidrs/<node>        -> {"cidrs": [...]} (operator, no lease)
    villi/state/ipam/v1/cidrs/<a.b.c.d_len>    -> <node>           (operator, create-if-absent)
    villi/state/ipam/v1/usage/<node>           -> usage JSON       (agent, under its lease)

Why two operator keys: the claim key per CIDR makes "one CIDR, one node" a single
create-if-absent that exactly one writer wins, even with two operators; the podcidrs
key per node is what the agent watches (one key, no scan). The node entry lives under
the agent's lease, so its disappearance is how the operator learns a node died; pod
CIDRs deliberately do not, so a restarting agent finds its CIDR still there.

Why usage has its own key: every agent watches every node entry (routes to the other
nodes), so a node entry must change only when a node's IP or pod CIDRs do. IPAM usage
changes with every pod start; kept in the node entry it cost N watch events per report
and up to N/15 reports per second, O(N^2) in the cluster (measured by bench/scale.py,
docs/scale.md). The usage key is read by the operator and ``villi get nodes`` only.

Everything here is pure (no store access), shared by ``villi.ipam`` (agent side) and
``villi.operator``.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from villi.errors import IPAMError
from villi.ipam.capacity import IPAMUsage

NODES_PREFIX = "villi/state/nodes/v1/"
IPAM_PREFIX = "villi/state/ipam/v1/"
PODCIDRS_PREFIX = IPAM_PREFIX + "podcidrs/"
CLAIMS_PREFIX = IPAM_PREFIX + "cidrs/"
USAGE_PREFIX = IPAM_PREFIX + "usage/"


def check_node_name(node: str) -> str:
    """``node`` if it can be the last segment of a key; IPAMError otherwise."""
    if not node or "/" in node or node.strip() != node:
        raise IPAMError(f"invalid node name {node!r} (non-empty, no '/', no spaces at the ends)")
    return node


def node_key(node: str) -> str:
    return NODES_PREFIX + check_node_name(node)


def podcidrs_key(node: str) -> str:
    return PODCIDRS_PREFIX + check_node_name(node)


def usage_key(node: str) -> str:
    """Where a node's agent reports its IPAM usage (``{"ipam": {...}, "villi.io/ip": n}``)."""
    return USAGE_PREFIX + check_node_name(node)


def claim_key(cidr: IPv4Network) -> str:
    """``villi/state/ipam/v1/cidrs/10.64.3.0_24`` ("/" would split the key path)."""
    return f"{CLAIMS_PREFIX}{cidr.network_address}_{cidr.prefixlen}"


def node_of_key(key: str, prefix: str) -> str | None:
    """The node a ``prefix + <node>`` key is about; None for keys nested deeper."""
    if not key.startswith(prefix):
        return None
    rest = key[len(prefix):]
    return rest if rest and "/" not in rest and rest.strip() == rest else None


def cidr_of_claim_key(key: str) -> IPv4Network | None:
    """The CIDR a claim key names; None when the key is not a well-formed claim."""
    if not key.startswith(CLAIMS_PREFIX):
        return None
    addr, sep, length = key[len(CLAIMS_PREFIX):].rpartition("_")
    if not sep:
        return None
    try:
        return IPv4Network(f"{addr}/{length}")  # strict: host bits set is malformed
    except ValueError:
        return None


def parse_cidr(text: str) -> IPv4Network:
    """An IPv4 network from ``a.b.c.d/len``; IPAMError naming the text otherwise."""
    try:
        return IPv4Network(text, strict=True)
    except (ValueError, TypeError) as exc:
        raise IPAMError(f"invalid IPv4 CIDR {text!r}: {exc}") from None


def encode_podcidrs(cidrs: Iterable[IPv4Network]) -> bytes:
    return json.dumps({"cidrs": [str(c) for c in cidrs]}).encode()


def decode_podcidrs(raw: bytes) -> tuple[IPv4Network, ...]:
    """The CIDRs of a ``podcidrs/<node>`` value; IPAMError when it is malformed."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IPAMError(f"podcidrs value is not JSON: {exc}") from None
    cidrs = doc.get("cidrs") if isinstance(doc, dict) else None
    if not isinstance(cidrs, list) or not all(isinstance(c, str) for c in cidrs):
        raise IPAMError(f"podcidrs value needs a list of strings under 'cidrs': {doc!r}")
    return tuple(parse_cidr(c) for c in cidrs)


@dataclass(frozen=True, slots=True)
class NodeEntry:
    """The node entry an agent keeps under its lease.

    ``pod_cidrs`` are the CIDRs the agent currently allocates from (restored from its
    state file after a restart), which lets the operator hand a node that was gone for
    longer than the grace period its old CIDR back when it is still free.
    """

    name: str
    ipv4: IPv4Address | None
    pod_cidrs: tuple[IPv4Network, ...] = ()
    ipam: IPAMUsage | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": self.name,
            "ipv4": str(self.ipv4) if self.ipv4 is not None else None,
            "podCIDRs": [str(c) for c in self.pod_cidrs],
        }
        if self.ipam is not None:
            doc["ipam"] = self.ipam.to_json()
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
        return cls(doc["name"], ipv4, cidrs, usage)
