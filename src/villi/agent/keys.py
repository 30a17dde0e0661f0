"""The agent's key layout in the kvstore (see DESIGN.md, KVStore).

    villi/state/nodes/v1/<node>            node entry, under the agent's lease
    villi/state/ip/v1/<ip>                 ipcache entry of a pod, under its node's lease
    villi/state/ipam/v1/podcidrs/<node>    pod CIDRs the operator gave the node
    villi/state/ipam/v1/usage/<node>       IPAM usage report, under the agent's lease
                                           (not in the node entry: every agent watches those)
    (applied resources: see villi.resources)
"""

from __future__ import annotations

NODES = "villi/state/nodes/v1/"
IPCACHE = "villi/state/ip/v1/"
PODCIDRS = "villi/state/ipam/v1/podcidrs/"
USAGE = "villi/state/ipam/v1/usage/"


def node_key(node: str) -> str:
    return NODES + node


def ipcache_key(ip: str) -> str:
    return IPCACHE + ip


def podcidrs_key(node: str) -> str:
    return PODCIDRS + node


def usage_key(node: str) -> str:
    return USAGE + node
