"""The agent's service table: Service resources and pods in, LB map diffs out.

``ServiceTable`` is what the agent holds. Its store watchers call ``upsert_service``
/ ``delete_service`` for ``villi/resources/Service/<ns>/<name>`` and ``upsert_pod`` /
``delete_pod`` for the ipcache entries every agent publishes; each call computes which
service ports' backends changed (:mod:`villi.service.backends`) and writes exactly that
to the node's LB maps (:class:`~villi.datapath.lb.ServiceDatapath`) before returning —
so when ``delete_pod`` returns, the pod's address is no longer a backend anywhere on
this node and may be given to another pod.

Without a datapath (``ServiceTable(None)``) the table still answers ``service_of`` and
``view`` (the CLI and unit tests use that).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from villi.service.backends import (
    Backend,
    BackendChange,
    BackendIndex,
    PodInfo,
    PortKey,
    ServiceInfo,
    ServiceRef,
)
from villi.service.models import Service

if TYPE_CHECKING:
    from villi.datapath.lb import Frontend, ServiceDatapath


class ServiceTable:
    def __init__(self, datapath: ServiceDatapath | None = None) -> None:
        self.datapath = datapath
        self.index = BackendIndex()
        self.models: dict[ServiceRef, Service] = {}
        self.cluster_ips: dict[ServiceRef, str] = {}
        self._vips: dict[tuple[str, int], ServiceRef] = {}
        self._vip_keys: dict[ServiceRef, set[tuple[str, int]]] = {}
        self._backend_refs: dict[tuple[str, int], dict[PortKey, None]] = {}
        #: ClusterMesh hook: (port, service, local backends) → the backends to program
        #: (global services add remote clusters' backends; villi.clustermesh.services).
        self.merge: Callable[[PortKey, Service, list[Backend]], list[Backend]] | None = None

    # --- services ------------------------------------------------------------------
    def upsert_service(self, model: Service, cluster_ip: str) -> list[BackendChange]:
        """Add or update a service whose ClusterIP is ``cluster_ip`` (allocated by
        :func:`villi.service.allocator.allocate_cluster_ip`)."""
        ref = (model.namespace, model.name)
        old_ip = self.cluster_ips.get(ref)
        old_model = self.models.get(ref)
        if old_ip is not None and old_ip != cluster_ip and old_model is not None:
            for key, _ in self.index.ports_of(ref):  # the VIP moved: old frontends go
                self._remove_frontend(old_ip, key)
        self.models[ref] = model
        self.cluster_ips[ref] = cluster_ip
        changes = self.index.upsert_service(ServiceInfo.from_model(model))
        for change in changes:
            self._track_backends(change)
            if change.new is None:
                self._remove_frontend(cluster_ip, change.key)
        self._index_vips(ref)
        for key, _ in self.index.ports_of(ref):  # affinity or VIP may have changed
            self._program(key)
        return changes

    def delete_service(self, namespace: str, name: str) -> list[BackendChange]:
        ref = (namespace, name)
        ip = self.cluster_ips.pop(ref, None)
        self.models.pop(ref, None)
        changes = self.index.delete_service(namespace, name)
        self._index_vips(ref)
        for change in changes:
            self._track_backends(change)
            if ip is not None:
                self._remove_frontend(ip, change.key)
        return changes

    # --- pods ----------------------------------------------------------------------
    def upsert_pod(self, ip: str, namespace: str, labels: Mapping[str, str],
                   named_ports: Mapping[str, Sequence[Any]] | None = None
                   ) -> list[BackendChange]:
        """Add or update a pod; ``named_ports`` is ``{name: (port, "TCP"|"UDP")}``."""
        changes = self.index.upsert_pod(PodInfo.of(ip, namespace, labels, named_ports))
        self._apply(changes)
        return changes

    def delete_pod(self, ip: str) -> list[BackendChange]:
        changes = self.index.delete_pod(ip)
        self._apply(changes)
        return changes

    def reprogram(self, ref: ServiceRef) -> None:
        """Write a service's ports again (its remote backends changed)."""
        for key, _ in self.index.ports_of(ref):
            self._program(key)

    # --- lookups -------------------------------------------------------------------
    def service_of(self, ip: str, port: int) -> tuple[str, str] | None:
        """The service a flow's ``ip:port`` belongs to: a VIP:port, or a backend of a
        service port (when several services share a backend, the first by name)."""
        ref = self._vips.get((ip, port))
        if ref is not None:
            return ref
        keys = self._backend_refs.get((ip, port))
        if keys:
            return min(keys).service
        return None

    def view(self) -> list[dict[str, Any]]:
        """Every service with its ClusterIP, ports and backends (``villi get services``)."""
        out = self.index.slice_view(self.cluster_ips)
        for entry in out:
            model = self.models.get((entry["namespace"], entry["name"]))
            if model is not None:
                entry["sessionAffinity"] = model.spec.session_affinity
                if model.affinity_timeout:
                    entry["sessionAffinityTimeoutSeconds"] = model.affinity_timeout
                if self.merge is not None:
                    self._merged_view(entry, model)
        return out

    def _merged_view(self, entry: dict[str, Any], model: Service) -> None:
        """Show the backends the socket LB uses (a global service's remote ones merged
        in, ClusterMesh): ``backends`` as programmed, ``localBackends`` this cluster's."""
        assert self.merge is not None
        ref = (entry["namespace"], entry["name"])
        for (key, _spec), port in zip(self.index.ports_of(ref), entry["ports"], strict=True):
            local = sorted(self.index.backends.get(key, ()))
            used = self.merge(key, model, local)
            if used != local:
                port["localBackends"] = port["backends"]
                port["backends"] = [f"{b.ip}:{b.port}" for b in used]

    def frontends(self) -> list[Frontend]:
        """Every frontend the table wants in the datapath."""
        out: list[Frontend] = []
        for ref, ip in self.cluster_ips.items():
            out.extend(self._frontend(ip, key) for key, _ in self.index.ports_of(ref))
        return out

    def prune_datapath(self) -> list[Frontend]:
        """Remove frontends the maps hold but the table does not know (call once the
        agent has replayed every service after a restart)."""
        if self.datapath is None:
            return []
        return self.datapath.retain(self.frontends())

    # --- internals -----------------------------------------------------------------
    def _apply(self, changes: list[BackendChange]) -> None:
        for change in changes:
            self._track_backends(change)
            if change.new is not None:
                self._program(change.key)

    def _program(self, key: PortKey) -> None:
        if self.datapath is None:
            return
        from villi.datapath.lb import Backend as DpBackend

        ip = self.cluster_ips.get(key.service)
        model = self.models.get(key.service)
        if ip is None or model is None:
            return
        backends = sorted(self.index.backends.get(key, ()))
        if self.merge is not None:
            backends = self.merge(key, model, backends)
        self.datapath.apply(self._frontend(ip, key), [DpBackend(b.ip, b.port) for b in backends],
                            affinity_timeout=model.affinity_timeout)

    def _index_vips(self, ref: ServiceRef) -> None:
        for vip in self._vip_keys.pop(ref, ()):
            if self._vips.get(vip) == ref:
                del self._vips[vip]
        ip = self.cluster_ips.get(ref)
        if ip is not None:
            keys = {(ip, key.port) for key, _ in self.index.ports_of(ref)}
            self._vip_keys[ref] = keys
            for vip in keys:
                self._vips[vip] = ref

    def _remove_frontend(self, ip: str, key: PortKey) -> None:
        if self.datapath is not None:
            self.datapath.remove(self._frontend(ip, key))

    @staticmethod
    def _frontend(ip: str, key: PortKey) -> Frontend:
        from villi.datapath.lb import Frontend as DpFrontend

        return DpFrontend(ip, key.port, key.protocol)

    def _track_backends(self, change: BackendChange) -> None:
        for b in change.removed:
            refs = self._backend_refs.get((b.ip, b.port))
            if refs is not None:
                refs.pop(change.key, None)
                if not refs:
                    del self._backend_refs[(b.ip, b.port)]
        for b in change.added:
            self._backend_refs.setdefault((b.ip, b.port), {})[change.key] = None


__all__ = ["Backend", "BackendChange", "ServiceTable"]
