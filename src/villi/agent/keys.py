"""The agent's key layout in the kvstore (see DESIGN.md, KVStore).

    villi/state/nodes/v1/<node>            node entry, under the agent's lease
    villi/state/ip/v1/<ip>                 ipcache entry of a pod, under its node's lease
    villi/state/ipam/v1/podcidrs/<node>    pod CIDRs the operator gave the node
    (applied resources: see villi.resources)
"""

from __future__ import annotations

NODES = "villi/state/nodes/v1/"
IPCACHE = "villi/state/ip/v1/"
PODCIDRS = "villi/state/ipam/v1/podcidrs/"


def node_key(node: str) -> str:
    return NODES + node


def ipcache_key(ip: str) -> str:
    return IPCACHE + ip


def podcidrs_key(node: str) -> str:
    return PODCIDRS + node
