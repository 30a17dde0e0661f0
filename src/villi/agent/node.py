"""The node's own setup: its pod CIDRs, its entry in the store, its neighbour table.

Pure steps the agent runs at start-up, each taking what it needs: the pod CIDR comes
from ``--pod-cidr`` or from the operator (``villi/state/ipam/v1/podcidrs/<node>``, polled
with full jitter until it appears, then followed); the node entry
(:class:`~villi.kvstore.schema.NodeEntry`) says where the node is and what its IPAM
has left; the neighbour table is sized to the pods and nodes it must hold.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from villi.agent.config import AgentConfig
from villi.agent.eni_ipam import ENINodeIPAM
from villi.agent.ipam import NodeIPAM
from villi.errors import VilliError
from villi.ipam.keys import decode_podcidrs
from villi.kvstore import Store
from villi.kvstore.backoff import Backoff, BackoffPolicy
from villi.kvstore.schema import NodeEntry, parse_cidr, podcidrs_key
from villi.netns import neigh, routes

log = logging.getLogger(__name__)

Spawn = Callable[..., Any]   # Agent.spawn(coro, name, *, vital=False)


def node_entry(node: str, node_ip: str | None, ipam: NodeIPAM | ENINodeIPAM,
               api_socket: str) -> NodeEntry:
    # No usage here: every agent watches every node entry (villi.ipam.usage has it).
    return NodeEntry(
        name=node, ipv4=ipaddress.IPv4Address(node_ip) if node_ip else None,
        pod_cidrs=tuple(parse_cidr(c) for c in ipam.cidrs), api_socket=api_socket,
        eni=tuple(ipam.interfaces()) if isinstance(ipam, ENINodeIPAM) else None)


async def acquire_pod_cidr(cfg: AgentConfig, store: Store, ipam: NodeIPAM | ENINodeIPAM,
                           publish_node: Callable[[], Awaitable[None]], spawn: Spawn
                           ) -> None:
    """Use the static --pod-cidr, else wait for the operator to hand one out."""
    if cfg.pod_cidr:
        ipam.set_cidrs([cfg.pod_cidr])
        return
    key = podcidrs_key(cfg.node)
    await publish_node()  # the operator allocates for nodes it sees
    deadline = asyncio.get_running_loop().time() + cfg.cidr_wait_timeout
    backoff = Backoff(BackoffPolicy(base=0.05, cap=cfg.pod_cidr_backoff_cap,
                                    max_attempts=None))
    while True:
        kv = await store.get(key)
        if kv is not None:
            cidrs = [str(c) for c in decode_podcidrs(kv.value)]
            if cidrs:
                ipam.set_cidrs(cidrs)
                spawn(follow_pod_cidrs(store, key, kv.mod_revision, ipam, publish_node),
                      "podcidrs", vital=True)
                return
        if asyncio.get_running_loop().time() > deadline:
            raise VilliError(f"no pod CIDR for node {cfg.node} after "
                             f"{cfg.cidr_wait_timeout:.0f}s: is `villi operator` "
                             "running against the same kvstore?")
        await backoff.failed()  # full jitter: a fleet waiting together polls spread


async def follow_pod_cidrs(store: Store, key: str, revision: int,
                           ipam: NodeIPAM | ENINodeIPAM,
                           publish_node: Callable[[], Awaitable[None]]) -> None:
    async for event in store.watch(key, start_revision=revision + 1):
        if event.value:
            ipam.set_cidrs([str(c) for c in decode_podcidrs(event.value)])
            await publish_node()


async def size_neighbour_table(kernel: Callable[..., Awaitable[Any]], node_ip: str | None,
                               capacity: int, mode: str) -> dict[str, Any]:
    """What this node needs of the neighbour table, and (``--neigh-gc-thresh auto``,
    where the sysctls exist in this namespace) raise the thresholds to it."""
    underlay = None
    if node_ip:
        try:
            underlay = await kernel(routes.ipv4_interface_of, node_ip)
        except Exception as e:  # report without the subnet rather than fail start-up
            log.warning("cannot read the underlay prefix of %s: %s", node_ip, e)
    demand = neigh.neighbour_demand(capacity, underlay)
    want = neigh.recommended(demand)
    info: dict[str, Any] = {"demand": demand, "underlay": underlay,
                            "recommended": want.as_dict(), "mode": mode}
    current = neigh.read_thresholds()
    if mode == "auto":
        try:
            current = neigh.write_thresholds(want)
            info["set"] = True
        except OSError as e:
            info["set"] = False
            log.warning("--neigh-gc-thresh auto: %s; set %s", e, " ".join(want.sysctl_lines()))
    info["current"] = current.as_dict() if current else None
    warning = neigh.check(demand, current)
    if warning:
        log.warning("%s", warning)
    return info


def make_ipam(cfg: AgentConfig) -> NodeIPAM | ENINodeIPAM:
    """The IPAM of ``--ipam``: cluster-pool CIDRs, or the operator's ENI pool."""
    state, node = cfg.state_path, cfg.node
    if cfg.ipam == "eni":
        if cfg.pod_cidr:
            raise VilliError("--pod-cidr cannot be used with --ipam eni")
        from villi.agent.eni_links import ENILinks

        # routing per interface only in a node namespace (never the machine's own)
        return ENINodeIPAM(state, node, None if cfg.allow_root_netns else ENILinks())
    if cfg.ipam != "cluster-pool":
        raise VilliError(f"--ipam must be cluster-pool or eni, not {cfg.ipam!r}")
    return NodeIPAM(state, node)


def pool_summary(ipam: NodeIPAM | ENINodeIPAM) -> str:
    if isinstance(ipam, ENINodeIPAM):
        ifaces = ipam.interfaces()
        return (f"{len(ifaces)} ENI(s) {', '.join(e['id'] for e in ifaces)}" if ifaces
                else "no ENI yet")
    return ", ".join(ipam.cidrs) or "no CIDR"


__all__ = ["acquire_pod_cidr", "follow_pod_cidrs", "make_ipam", "node_entry", "pool_summary",
           "size_neighbour_table"]
