"""Services on this node: Service resources and every pod → the socket-LB maps.

The table (``villi.service.table``) does the work; this module feeds it from the
store (Service resources, via the agent's resource watcher) and from the ipcache entries
every agent publishes (pods cluster-wide, with namespace, labels and named ports), and
attaches the socket programs to the node's cgroup.

ClusterIPs are claimed atomically in the store (``villi apply`` does it when it stores
a Service; the allocation is idempotent per namespace/name, so agents ask for the same
address and get it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from villi.datapath.cgroup import cgroup2_root, create_cgroup
from villi.datapath.compiler import NodeConfig
from villi.datapath.lb import ServiceDatapath
from villi.errors import VilliError
from villi.kvstore import Store
from villi.kvstore.schema import IpcacheEntry
from villi.service.allocator import allocate_cluster_ip
from villi.service.models import Service
from villi.service.table import ServiceTable

#: Runs a coroutine as an agent-owned background task (``Agent.spawn``).
Spawn = Callable[[Coroutine[Any, Any, Any], str], Any]

log = logging.getLogger(__name__)


def node_cgroup(cluster: str, node: str) -> Path:
    """The cgroup whose processes this node's socket programs serve (lab default)."""
    return cgroup2_root() / "villi" / cluster / node


class ServiceSync:
    """``service_cgroup``: a path, "" for the node's default, "none" for no socket LB
    (tests without cgroups)."""

    def __init__(self, cluster: str, node: str, service_cgroup: str | None,
                 node_config: NodeConfig, spawn: Spawn) -> None:
        self.store: Store | None = None   # set once the agent has connected
        self.spawn = spawn
        self.datapath: ServiceDatapath | None = None
        if service_cgroup != "none":
            path = Path(service_cgroup) if service_cgroup else node_cgroup(cluster, node)
            create_cgroup(path)
            self.datapath = ServiceDatapath(cluster, node, path, node_config)
            self.datapath.attach()
        self.table = ServiceTable(self.datapath)
        self._models: dict[tuple[str, str], Any] = {}

    @property
    def cgroup(self) -> str | None:
        return str(self.datapath.cgroup_path) if self.datapath else None

    def on_resource(self, event: Any) -> None:
        """A Service was applied or deleted (a ``villi.agent.watcher.ResourceEvent``)."""
        namespace, name, model = event.namespace or "default", event.name, event.model
        if model is None:
            self._models.pop((namespace, name), None)
            self.table.delete_service(namespace, name)
            return
        self._models[(namespace, name)] = model
        self.spawn(self._upsert(model), f"service {namespace}/{name}")

    async def _upsert(self, model: Service) -> None:
        assert self.store is not None
        try:
            ip = await allocate_cluster_ip(self.store, model.namespace, model.name,
                                           model.spec.cluster_ip or None)
        except VilliError as e:
            log.error("service %s/%s: %s", model.namespace, model.name, e)
            return
        if self._models.get((model.namespace, model.name)) is model:
            self.table.upsert_service(model, ip)

    def on_pod(self, ip: str, entry: IpcacheEntry | None) -> None:
        if entry is None:
            self.table.delete_pod(ip)
            return
        self.table.upsert_pod(ip, entry.namespace or "default", dict(entry.labels),
                              dict(entry.named_ports))

    def prune(self) -> None:
        """After the first full sync: drop frontends the maps hold but nobody wants."""
        try:
            self.table.prune_datapath()
        except VilliError as e:
            log.warning("pruning service maps: %s", e)

    def close(self) -> None:
        if self.datapath is not None:
            self.datapath.close()
