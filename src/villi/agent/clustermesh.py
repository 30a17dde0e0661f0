"""The agent's ClusterMesh hooks: remote clusters' state into this node.

Wires :class:`villi.clustermesh.remote.RemoteClusters` to the agent: remote identities
go into the identity cache (so selectors such as
``io.cilium.k8s.policy.cluster: c2`` see them), remote pods into the ipcache map and
the policy and service feeds, remote nodes into routes (native routing to their pod
CIDRs over the underlay) and Service resources of remote clusters into the global
service merge. The agent calls :func:`start` once its store is open and
:func:`wait_synced` before it regenerates restored endpoints, so a restart never drops
cross-cluster traffic the policy allows (cilium#26462).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from villi.clustermesh.ids import ClusterInfo, identity_range, parse_remote
from villi.clustermesh.keys import cluster_config_key
from villi.clustermesh.remote import CachedSource, DirectSource, RemoteClusters
from villi.clustermesh.services import MeshServices
from villi.datapath import abi
from villi.endpoint.manager import ip_be
from villi.errors import NetnsError, VilliError
from villi.identity.labels import LabelSet
from villi.identity.reserved import MAX_CLUSTER_IDENTITY, MIN_CLUSTER_IDENTITY
from villi.kvstore import Store
from villi.kvstore.schema import IpcacheEntry
from villi.netns import routes

if TYPE_CHECKING:
    from villi.agent.config import AgentConfig
    from villi.agent.policy_sync import PolicySync
    from villi.agent.services import ServiceSync
    from villi.agent.sync import HasIpcache, IpcacheSync
    from villi.identity.cache import IdentityCache

log = logging.getLogger(__name__)


def identity_bounds(cfg: AgentConfig) -> tuple[int, int]:
    """The identities this cluster allocates: its cluster id's range in a mesh."""
    if not cfg.cluster_id:
        return MIN_CLUSTER_IDENTITY, MAX_CLUSTER_IDENTITY
    return identity_range(cfg.cluster_id, cfg.max_connected_clusters)


def remote_names(cfg: AgentConfig) -> dict[str, str]:
    """{name: url} of --remote-cluster (url empty when only the name was given)."""
    out: dict[str, str] = {}
    for spec in cfg.remote_cluster:
        name, url = parse_remote(spec) if "=" in spec else (parse_remote(spec + "=-")[0], "")
        out[name] = url
    return out


class MeshHost(Protocol):
    """What the ClusterMesh hooks use of the agent (its collaborators, by name)."""

    config: AgentConfig
    store: Store | None
    identity_cache: IdentityCache
    ipcache_sync: IpcacheSync
    policy: PolicySync
    services: ServiceSync
    mesh: RemoteClusters | None
    #: Called for each remote pod that appears, changes or goes away (the L7 proxy's
    #: snapshot); local pods reach ``pod_handlers`` instead.
    remote_pod_handlers: list[Callable[[str, IpcacheEntry | None], None]]

    @property
    def datapath(self) -> HasIpcache:
        """The node datapath (its ipcache map)."""

    async def kernel(self, fn: Any, *args: Any, **kwargs: Any) -> Any: ...
    def spawn(self, coro: Coroutine[Any, Any, Any], name: str, *,
              vital: bool = False) -> Any: ...


class AgentSink:
    """:class:`~villi.clustermesh.remote.MeshSink` on a running agent."""

    def __init__(self, agent: MeshHost, services: MeshServices) -> None:
        self.agent = agent
        self.services = services
        self._routes: dict[tuple[str, str], list[str]] = {}

    def upsert_identity(self, identity: int, labels: LabelSet) -> None:
        self.agent.identity_cache.upsert(identity, labels)

    def delete_identity(self, identity: int) -> None:
        self.agent.identity_cache.delete(identity)

    def set_pod(self, cluster: str, ip: str, entry: dict[str, Any] | None) -> None:
        key = abi.IpcacheKey(prefixlen=32, addr=ip_be(ip))
        if entry is None:
            self.agent.datapath.ipcache.delete(key)
        else:
            node_ip = entry.get("nodeIP")
            self.agent.datapath.ipcache.update(key, abi.IpcacheValue(
                identity=int(entry["identity"]), node_ip=ip_be(node_ip) if node_ip else 0))
        # Flow enrichment and the L7 proxy read the ipcache sync's entries: remote pods
        # join them (their keys never come from the local watch, so nothing collides).
        sync = self.agent.ipcache_sync
        typed: IpcacheEntry | None = None
        if entry is None:
            raw = sync.entries.pop_raw(ip)
            if raw is not None:
                sync.departed[ip] = IpcacheEntry.decode(raw, ip)
        else:
            raw = json.dumps(entry).encode()
            typed = IpcacheEntry.decode(raw, ip)
            sync.entries.set_raw(ip, raw)
        # Policy and the L7 proxy see remote pods like local ones; services do not: a
        # remote pod backs a local Service only through the global-service merge.
        self.agent.policy.on_ipcache_change(ip, typed)
        for handler in self.agent.remote_pod_handlers:
            handler(ip, typed)
        self.services.on_pod(cluster, ip, entry)

    async def set_node(self, cluster: str, name: str, entry: dict[str, Any] | None) -> None:
        await self.agent.kernel(self._node, cluster, name, entry)

    def _node(self, cluster: str, name: str, entry: dict[str, Any] | None) -> None:
        for cidr in self._routes.pop((cluster, name), []):
            try:
                routes.delete_route(cidr)
            except NetnsError as e:
                log.warning("route to %s node %s: %s", cluster, name, e)
        if entry is None or not entry.get("ipv4"):
            return
        for cidr in entry.get("podCIDRs") or []:
            try:
                routes.replace_route(cidr, entry["ipv4"])
                self._routes.setdefault((cluster, name), []).append(cidr)
            except NetnsError as e:
                log.warning("route to %s node %s: %s", cluster, name, e)
        self.agent.datapath.ipcache.update(
            abi.IpcacheKey(prefixlen=32, addr=ip_be(entry["ipv4"])),
            abi.IpcacheValue(identity=int(abi.ReservedIdentity.REMOTE_NODE)))

    def set_service(self, cluster: str, namespace: str, name: str, raw: bytes | None
                    ) -> None:
        self.services.on_remote_service(cluster, namespace, name, raw)


def start(agent: MeshHost) -> RemoteClusters | None:
    """Follow the remote clusters (nothing when this cluster has no cluster id)."""
    cfg = agent.config
    if not cfg.cluster_id:
        if cfg.remote_cluster:
            raise VilliError("--remote-cluster needs --cluster-id (1..255)")
        return None
    assert agent.store is not None
    local = ClusterInfo(cfg.mesh_name, cfg.cluster_id, cfg.max_connected_clusters)
    low, high = local.identity_range
    agent.identity_cache.owned = lambda i: low <= i <= high or i >= 1 << 24
    table = agent.services.table
    services = MeshServices(on_change=table.reprogram)
    table.merge = services.merge
    clusters = RemoteClusters(local, AgentSink(agent, services))
    remotes = remote_names(cfg)
    source: CachedSource | DirectSource
    if cfg.clustermesh_mode == "direct":
        missing = [n for n, url in remotes.items() if not url]
        if missing:
            raise VilliError(f"--clustermesh-mode direct needs NAME=URL for "
                             f"{', '.join(missing)}")
        source = DirectSource(remotes, clusters)
    else:
        source = CachedSource(agent.store, clusters)
    agent.spawn(publish_config(agent.store, local), "clustermesh-config")
    agent.spawn(source.run(), f"clustermesh-{source.mode}", vital=True)
    log.info("clustermesh: cluster %s id %d (identities %d..%d), %s mode, remotes %s",
             local.name, local.id, low, high, source.mode, ", ".join(remotes) or "none")
    return clusters


async def publish_config(store: Store, local: ClusterInfo) -> None:
    """Make sure this cluster's config is in its kvstore (create-if-absent; the
    kvstoremesh writes it too): remote clusters read it before anything else, and a
    cluster with another id under the same name is refused loudly."""
    key = cluster_config_key(local.name)
    raw = json.dumps(local.config()).encode()
    if await store.create(key, raw):
        return
    kv = await store.get(key)
    if kv is None:
        return
    try:
        theirs = ClusterInfo.from_config(json.loads(kv.value))
    except (ValueError, VilliError) as exc:
        log.error("%s holds an invalid cluster config (%s); rewriting it", key, exc)
        await store.put(key, raw)
        return
    if (theirs.id, theirs.max_connected) != (local.id, local.max_connected):
        log.error("%s says cluster %s has id %d (max %d), this agent was started with "
                  "--cluster-id %d (max %d): every cluster in a mesh needs one id",
                  key, local.name, theirs.id, theirs.max_connected, local.id,
                  local.max_connected)


async def wait_synced(agent: MeshHost) -> None:
    """Before endpoints regenerate: the remote clusters' state is in (or time is up)."""
    clusters = agent.mesh
    if clusters is None:
        return
    names = list(remote_names(agent.config))
    timeout = agent.config.clustermesh_sync_timeout
    t0 = asyncio.get_running_loop().time()
    if await clusters.wait_synced(names, timeout):
        log.info("clustermesh: remote clusters %s synced after %.2f s",
                 ", ".join(names) or "(none named)",
                 asyncio.get_running_loop().time() - t0)
    else:
        log.warning("clustermesh: remote clusters not synced after %.0f s (%s); "
                    "regenerating endpoints anyway", timeout,
                    ", ".join(n for n in names if not clusters.ready([n])))


def view(agent: MeshHost) -> dict[str, Any] | None:
    clusters = agent.mesh
    if clusters is None:
        return None
    cfg = agent.config
    return {"cluster": cfg.mesh_name, "id": cfg.cluster_id, "mode": cfg.clustermesh_mode,
            "remotes": clusters.view()}
