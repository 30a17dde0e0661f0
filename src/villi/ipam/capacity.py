"""A node's IP capacity and the choice of a node for a new pod.

Each agent publishes how many pod IPs it has handed out and how many it could hand out
in its node entry (``villi/state/nodes/v1/<node>``, field ``ipam``), so that whoever
places pods (today ``villi lab pod add`` without ``--node``) can avoid nodes that have
none left instead of learning it from a failed CNI ADD. The numbers are up to
``--ipam-node-update-rate`` old (the report is rate-limited), which is why
:func:`pick_node` accepts the caller's own count of pods placed since.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from villi.errors import IPAMError, PoolExhausted
from villi.kvstore.schema import IPAMUsage  # the node entry's report (the store schema)


@dataclass(frozen=True, slots=True)
class NodeCapacity:
    """What :func:`pick_node` needs to know about one node; ``usage`` None = unknown
    (the agent has not reported yet)."""

    name: str
    usage: IPAMUsage | None


def pick_node(
    nodes: Iterable[NodeCapacity], placed: Mapping[str, int] | None = None
) -> str:
    """The node a new pod should go to: the one with the most free IPs.

    ``placed`` counts pods the caller put on each node since the reports were read;
    they are subtracted from the reported free IPs so a burst of placements within one
    report interval spreads out instead of piling onto the same node. Ties go to the
    smallest name (deterministic, so tests and labs are reproducible). Nodes that have
    not reported come after every node known to have room (they may have none) but
    before nodes known to be full. Raises :class:`PoolExhausted` when every node is
    known to be full, and :class:`IPAMError` when there is no node at all.
    """
    placed = placed or {}
    ranked: list[tuple[int, int, str]] = []
    full: list[str] = []
    for node in nodes:
        if node.usage is None:
            ranked.append((1, 0, node.name))
            continue
        free = node.usage.free - placed.get(node.name, 0)
        if free > 0:
            ranked.append((0, -free, node.name))
        else:
            full.append(node.name)
    if ranked:
        return min(ranked)[2]
    if full:
        raise PoolExhausted(
            f"no node has a free IPv4 (full: {', '.join(sorted(full))}); "
            "free IPs on a node by deleting pods, or add a node")
    raise IPAMError("no nodes registered: is an agent running?")
