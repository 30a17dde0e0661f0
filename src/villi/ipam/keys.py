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

import json
from collections.abc import Iterable
from ipaddress import IPv4Network

from villi.errors import IPAMError
from villi.kvstore import schema
from villi.kvstore.schema import (
    NodeEntry,
    check_node_name,
    node_key,
    parse_cidr,
    podcidrs_key,
    usage_key,
)

# The prefixes and the node entry are the store schema's (villi.kvstore.schema); the
# names stay importable here for the IPAM code that uses them.
NODES_PREFIX = schema.NODES
IPAM_PREFIX = schema.IPAM
PODCIDRS_PREFIX = schema.PODCIDRS
CLAIMS_PREFIX = schema.CLAIMS
USAGE_PREFIX = schema.USAGE




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


__all__ = [
    "CLAIMS_PREFIX", "IPAM_PREFIX", "NODES_PREFIX", "PODCIDRS_PREFIX", "NodeEntry",
    "check_node_name", "cidr_of_claim_key", "claim_key", "decode_podcidrs",
    "encode_podcidrs", "node_key", "node_of_key", "parse_cidr", "podcidrs_key",
    "USAGE_PREFIX", "usage_key",
]
