"""Global services: same-named Services of several clusters share their backends.

Cilium's annotations (``Documentation/network/clustermesh/services.rst``, affinity.rst):

- ``service.cilium.io/global: "true"`` on a Service ``ns/name`` in several clusters:
  each cluster's socket LB serves the backends of all of them.
- ``service.cilium.io/shared: "false"`` on one cluster's copy: that cluster still uses
  the remote backends, but its own are not given to the others.
- ``service.cilium.io/affinity: local|remote|none``: prefer local (remote) backends
  while there are any, else use the others; ``none`` (default) uses all alike.

villi computes backends on each node from pods and selectors (docs/services.md), so a
remote cluster's backends are computed the same way here, from that cluster's cached
Service resource and pods, in one :class:`~villi.service.backends.BackendIndex` per
remote cluster; the local service table asks :meth:`MeshServices.merge` for each port.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from villi.errors import ResourceError
from villi.service.backends import Backend, BackendIndex, PodInfo, PortKey, ServiceInfo

log = logging.getLogger(__name__)

GLOBAL = "service.cilium.io/global"
SHARED = "service.cilium.io/shared"
AFFINITY = "service.cilium.io/affinity"
AFFINITIES = ("local", "remote", "none")


def _annotation(model: Any, key: str) -> str | None:
    annotations = getattr(model.metadata, "annotations", None) or {}
    value = annotations.get(key)
    return None if value is None else str(value).strip().lower()


def is_global(model: Any) -> bool:
    return _annotation(model, GLOBAL) == "true"


def is_shared(model: Any) -> bool:
    return _annotation(model, SHARED) != "false"


def affinity(model: Any) -> str:
    value = _annotation(model, AFFINITY) or "none"
    return value if value in AFFINITIES else "none"


def prefer(local: list[Backend], remote: list[Backend], how: str) -> list[Backend]:
    """Cilium's affinity: the preferred side while it has backends, else everything."""
    if how == "local" and local:
        return local
    if how == "remote" and remote:
        return remote
    return sorted(set(local) | set(remote))


class MeshServices:
    """Backends of remote clusters' global, shared services, per service port."""

    def __init__(self, on_change: Callable[[tuple[str, str]], None] | None = None) -> None:
        self.indexes: dict[str, BackendIndex] = {}
        self.on_change = on_change

    def _index(self, cluster: str) -> BackendIndex:
        index = self.indexes.get(cluster)
        if index is None:
            index = self.indexes[cluster] = BackendIndex()
        return index

    def on_remote_service(self, cluster: str, namespace: str, name: str,
                          raw: bytes | None) -> None:
        """A remote cluster's Service resource changed (raw stored JSON, None: gone)."""
        index = self._index(cluster)
        model = None
        if raw is not None:
            from villi.resources import decode

            try:
                model = decode(raw, f"{cluster}:{namespace}/{name}")
            except ResourceError as exc:
                log.warning("rejected service %s/%s from cluster %s: %s", namespace, name,
                            cluster, exc)
            if model is not None and (getattr(model, "kind", None) != "Service"
                                      or model.namespace != namespace
                                      or model.name != name):
                log.warning("rejected service %s/%s from cluster %s: the resource is "
                            "not that Service", namespace, name, cluster)
                model = None
        if model is not None and is_global(model) and is_shared(model):
            changes = index.upsert_service(ServiceInfo.from_model(model))
        else:
            changes = index.delete_service(namespace, name)
        self._changed(change.key.service for change in changes)

    def on_pod(self, cluster: str, ip: str, entry: dict[str, Any] | None) -> None:
        index = self._index(cluster)
        if entry is None:
            changes = index.delete_pod(ip)
        else:
            changes = index.upsert_pod(PodInfo.of(
                ip, entry.get("namespace", "default"), entry.get("labels") or {},
                entry.get("namedPorts") or {}))
        self._changed(change.key.service for change in changes)

    def remote_backends(self, key: PortKey) -> list[Backend]:
        out: set[Backend] = set()
        for index in self.indexes.values():
            out |= index.backends.get(key, frozenset())
        return sorted(out)

    def merge(self, key: PortKey, model: Any, local: list[Backend]) -> list[Backend]:
        """The backends the local LB should use for ``key`` of Service ``model``."""
        if not is_global(model):
            return local
        return prefer(local, self.remote_backends(key), affinity(model))

    def _changed(self, refs: Iterable[tuple[str, str]]) -> None:
        if self.on_change is None:
            return
        for ref in sorted(set(refs)):
            self.on_change(ref)
