"""Pod IP address management, cluster-pool mode (see ``docs/ipam.md``).

The operator gives each node pod CIDRs (``villi.operator.cidr``); on the node,
:class:`NodePool` hands out their addresses and persists them, :func:`follow_pod_cidrs`
keeps its CIDR list current, and :class:`RateLimitedReporter` publishes the node's usage
(:class:`IPAMUsage`, part of its :class:`NodeEntry`) at most every
``--ipam-node-update-rate``. :func:`pick_node` places a pod on a node with free IPs.
"""

from __future__ import annotations

from villi.ipam.capacity import IPAMUsage, NodeCapacity, pick_node
from villi.ipam.keys import (
    CLAIMS_PREFIX,
    IPAM_PREFIX,
    NODES_PREFIX,
    PODCIDRS_PREFIX,
    USAGE_PREFIX,
    NodeEntry,
    claim_key,
    decode_podcidrs,
    encode_podcidrs,
    node_key,
    podcidrs_key,
)
from villi.ipam.podcidrs import follow_pod_cidrs, wait_pod_cidrs
from villi.ipam.pool import Allocation, NodePool
from villi.ipam.report import DEFAULT_NODE_UPDATE_RATE_S, RateLimitedReporter

__all__ = [
    "CLAIMS_PREFIX",
    "DEFAULT_NODE_UPDATE_RATE_S",
    "IPAM_PREFIX",
    "NODES_PREFIX",
    "PODCIDRS_PREFIX",
    "USAGE_PREFIX",
    "Allocation",
    "IPAMUsage",
    "NodeCapacity",
    "NodeEntry",
    "NodePool",
    "RateLimitedReporter",
    "claim_key",
    "decode_podcidrs",
    "encode_podcidrs",
    "follow_pod_cidrs",
    "node_key",
    "pick_node",
    "podcidrs_key",
    "wait_pod_cidrs",
]
