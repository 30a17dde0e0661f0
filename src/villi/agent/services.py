"""Services on this node: Service resources and every pod → the socket-LB maps.

The table (``villi.service.table``) does the work; this module feeds it from the
store (Service resources, via the agent's resource watch) and from the ipcache entries
every agent publishes (pods cluster-wide, with namespace, labels and named ports), and
attaches the socket programs to the node's cgroup.

ClusterIPs are claimed atomically in the store (``villi apply`` does it when it stores
a Service; the allocation is idempotent per namespace/name, so agents ask for the same
address and get it).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from villi.datapath.cgroup import cgroup2_root, create_cgroup
from villi.datapath.lb import ServiceDatapath
from villi.errors import VilliError
from villi.service.allocator import allocate_cluster_ip
from villi.service.models import Service
from villi.service.table import ServiceTable

if TYPE_CHECKING:
    from villi.agent.daemon import Agent

log = logging.getLogger(__name__)


def node_cgroup(cluster: str, node: str) -> Path:
    """The cgroup whose processes this node's socket programs serve (lab default)."""
    return cgroup2_root() / "villi" / cluster / node


class ServiceSync:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        cfg = agent.config
        self.datapath: ServiceDatapath | None = None
        if cfg.service_cgroup != "none":
            path = Path(cfg.service_cgroup) if cfg.service_cgroup else \
                node_cgroup(cfg.cluster, agent.node)
            create_cgroup(path)
            self.datapath = ServiceDatapath(cfg.cluster, agent.node, path,
                                            agent.datapath.config)
            self.datapath.attach()
        self.table = ServiceTable(self.datapath)
        self._models: dict[tuple[str, str], Any] = {}

    @property
    def cgroup(self) -> str | None:
        return str(self.datapath.cgroup_path) if self.datapath else None

    def on_resource(self, namespace: str, name: str, model: Any | None) -> None:
        """A Service was applied (model) or deleted (None)."""
        if model is None:
            self._models.pop((namespace, name), None)
            self.table.delete_service(namespace, name)
            return
        self._models[(namespace, name)] = model
        asyncio.get_running_loop().create_task(self._upsert(model))

    async def _upsert(self, model: Service) -> None:
        assert self.agent.store is not None
        try:
            ip = await allocate_cluster_ip(self.agent.store, model.namespace, model.name,
                                           model.spec.cluster_ip or None)
        except VilliError as e:
            log.error("service %s/%s: %s", model.namespace, model.name, e)
            return
        if self._models.get((model.namespace, model.name)) is model:
            self.table.upsert_service(model, ip)

    def on_pod(self, ip: str, data: dict | None) -> None:
        if data is None:
            self.table.delete_pod(ip)
            return
        ports = {n: (int(p), str(pr)) for n, (p, pr) in (data.get("namedPorts") or {}).items()}
        self.table.upsert_pod(ip, data.get("namespace", "default"), data.get("labels") or {},
                              ports)

    def prune(self) -> None:
        """After the first full sync: drop frontends the maps hold but nobody wants."""
        try:
            self.table.prune_datapath()
        except VilliError as e:
            log.warning("pruning service maps: %s", e)

    def close(self) -> None:
        if self.datapath is not None:
            self.datapath.close()
