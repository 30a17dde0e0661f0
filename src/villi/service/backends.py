"""Which pods back which service port: selectors, named target ports, incremental diffs.

Pure logic, no kernel and no store: the inputs are services (:class:`ServiceInfo`) and
pods (:class:`PodInfo`, as every agent publishes them in its ipcache entries); the
output, for each service port, is its set of backends ``(pod IP, port)``. Each update
returns only the service ports whose backend set changed, with the old and the new
set, so the caller writes a diff to the LB maps instead of rebuilding them.

Semantics (Kubernetes'): a service selects the pods *of its own namespace* whose labels
contain every ``selector`` pair; a service without a selector (or with an empty one)
has no automatically managed backends. A numeric ``targetPort`` is used as is; a named
one is looked up in each pod's named container ports, and a pod without a port of that
name and protocol is not a backend of that service port (it may still back the
service's other ports).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from villi.service.models import Service

ServiceRef = tuple[str, str]
"""``(namespace, name)`` of a service."""


@dataclass(frozen=True, order=True)
class PortSpec:
    """One service port: what clients connect to and where it leads."""

    name: str
    port: int
    protocol: str  # "TCP" | "UDP"
    target: int | str  # a port number or a named container port


@dataclass(frozen=True, order=True)
class PortKey:
    """A service port, unique cluster-wide: (namespace, name, port, protocol)."""

    namespace: str
    name: str
    port: int
    protocol: str

    @property
    def service(self) -> ServiceRef:
        return (self.namespace, self.name)


@dataclass(frozen=True, order=True)
class Backend:
    ip: str
    port: int


@dataclass(frozen=True)
class ServiceInfo:
    namespace: str
    name: str
    selector: Mapping[str, str]
    ports: tuple[PortSpec, ...]

    @classmethod
    def from_model(cls, svc: Service) -> ServiceInfo:
        ports = tuple(PortSpec(p.name or "", p.port, p.protocol, p.target) for p in svc.ports)
        return cls(svc.namespace, svc.name, dict(svc.selector), ports)

    def key(self, port: PortSpec) -> PortKey:
        return PortKey(self.namespace, self.name, port.port, port.protocol)


#: Shared read-only label and port mappings (see :meth:`PodInfo.of`), bounded.
_SHARED: dict[tuple[Any, ...], Mapping[str, Any]] = {}
_SHARED_MAX = 100_000


def _shared(items: dict[str, Any]) -> Mapping[str, Any]:
    """One read-only mapping per distinct content: the replicas of a workload share
    their labels and named ports (issue 16: 350,000 pods held 700,000 small dicts)."""
    try:
        key = tuple(sorted(items.items()))
        found = _SHARED.get(key)
    except TypeError:  # unhashable values: not shared
        return MappingProxyType(items)
    if found is None:
        if len(_SHARED) >= _SHARED_MAX:
            _SHARED.clear()
        found = _SHARED[key] = MappingProxyType(items)
    return found


@dataclass(frozen=True, slots=True)
class PodInfo:
    ip: str
    namespace: str
    labels: Mapping[str, str]
    named_ports: Mapping[str, tuple[int, str]] = field(default_factory=dict)

    @classmethod
    def of(cls, ip: str, namespace: str, labels: Mapping[str, str],
           named_ports: Mapping[str, Sequence[Any]] | None = None) -> PodInfo:
        """Normalise named ports given as ``{name: (port, proto)}`` or ``[port, proto]``
        (as ipcache entries carry them); the protocol is upper-cased. Labels and ports
        are shared read-only mappings."""
        ports = {str(n): (int(v[0]), str(v[1]).upper()) for n, v in (named_ports or {}).items()}
        return cls(ip, sys.intern(namespace), _shared(dict(labels)), _shared(ports))


@dataclass(frozen=True)
class BackendChange:
    """The backends of one service port before and after an update.

    ``old`` is None when the port did not exist before; ``new`` is None when it no
    longer exists (service deleted, or the port removed from it).
    """

    key: PortKey
    old: frozenset[Backend] | None
    new: frozenset[Backend] | None

    @property
    def added(self) -> frozenset[Backend]:
        return (self.new or frozenset()) - (self.old or frozenset())

    @property
    def removed(self) -> frozenset[Backend]:
        return (self.old or frozenset()) - (self.new or frozenset())


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """A service selector (equality on every pair); an empty one selects nothing."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def backend_of(pod: PodInfo, port: PortSpec) -> Backend | None:
    """Where ``port`` leads on ``pod``, or None when the pod has no such named port."""
    if isinstance(port.target, int):
        return Backend(pod.ip, port.target)
    named = pod.named_ports.get(port.target)
    if named is None or named[1] != port.protocol:
        return None
    return Backend(pod.ip, named[0])


class BackendIndex:
    """Services, pods, and each service port's backends, kept current incrementally."""

    def __init__(self) -> None:
        self.services: dict[ServiceRef, ServiceInfo] = {}
        self.pods: dict[str, PodInfo] = {}
        self.backends: dict[PortKey, frozenset[Backend]] = {}
        self._by_namespace: dict[str, set[ServiceRef]] = {}
        self._pods_by_namespace: dict[str, set[str]] = {}

    # --- services ------------------------------------------------------------------
    def upsert_service(self, svc: ServiceInfo | Service) -> list[BackendChange]:
        info = svc if isinstance(svc, ServiceInfo) else ServiceInfo.from_model(svc)
        ref = (info.namespace, info.name)
        old_keys = self._port_keys(ref)
        self.services[ref] = info
        self._by_namespace.setdefault(info.namespace, set()).add(ref)
        pods = [self.pods[ip] for ip in self._pods_by_namespace.get(info.namespace, ())]
        selected = [p for p in pods if selects(info.selector, p.labels)]
        changes = []
        new_keys = set()
        for port in info.ports:
            key = info.key(port)
            new_keys.add(key)
            found = (backend_of(p, port) for p in selected)
            changes.append(self._set(key, frozenset(b for b in found if b is not None)))
        for key in sorted(old_keys - new_keys):
            changes.append(self._set(key, None))
        return [c for c in changes if c.old != c.new]

    def delete_service(self, namespace: str, name: str) -> list[BackendChange]:
        ref = (namespace, name)
        keys = self._port_keys(ref)
        if self.services.pop(ref, None) is None:
            return []
        self._by_namespace.get(namespace, set()).discard(ref)
        return [self._set(key, None) for key in sorted(keys)]

    # --- pods ----------------------------------------------------------------------
    def upsert_pod(self, pod: PodInfo) -> list[BackendChange]:
        old = self.pods.get(pod.ip)
        if old == pod:
            return []
        changes = self._remove_pod(old) if old is not None else {}
        self.pods[pod.ip] = pod
        self._pods_by_namespace.setdefault(pod.namespace, set()).add(pod.ip)
        for ref in self._by_namespace.get(pod.namespace, ()):
            info = self.services[ref]
            if not selects(info.selector, pod.labels):
                continue
            for port in info.ports:
                backend = backend_of(pod, port)
                if backend is not None:
                    key = info.key(port)
                    before = changes[key].old if key in changes else self.backends[key]
                    changes[key] = BackendChange(key, before, self.backends[key] | {backend})
                    self.backends[key] = changes[key].new  # type: ignore[assignment]
        return [c for _, c in sorted(changes.items()) if c.old != c.new]

    def delete_pod(self, ip: str) -> list[BackendChange]:
        pod = self.pods.pop(ip, None)
        if pod is None:
            return []
        self._pods_by_namespace.get(pod.namespace, set()).discard(ip)
        return [c for _, c in sorted(self._remove_pod(pod).items())]

    # --- views ---------------------------------------------------------------------
    def ports_of(self, ref: ServiceRef) -> list[tuple[PortKey, PortSpec]]:
        info = self.services.get(ref)
        return [] if info is None else [(info.key(p), p) for p in info.ports]

    def slice_view(self, cluster_ips: Mapping[ServiceRef, str] | None = None
                   ) -> list[dict[str, Any]]:
        """An EndpointSlice-like view: one entry per service, its ports and endpoints."""
        out = []
        for ref in sorted(self.services):
            info = self.services[ref]
            ips: dict[str, dict[str, Any]] = {}
            ports = []
            for port in info.ports:
                key = info.key(port)
                backends = sorted(self.backends.get(key, ()),
                                  key=lambda b: (_ip_sort(b.ip), b.port))
                ports.append({"name": port.name, "port": port.port, "protocol": port.protocol,
                              "targetPort": port.target,
                              "backends": [f"{b.ip}:{b.port}" for b in backends]})
                for b in backends:
                    ep = ips.setdefault(b.ip, {"addresses": [b.ip], "ports": []})
                    ep["ports"].append({"name": port.name, "port": b.port,
                                        "protocol": port.protocol})
            out.append({
                "namespace": info.namespace, "name": info.name,
                "clusterIP": (cluster_ips or {}).get(ref),
                "selector": dict(info.selector), "ports": ports,
                "endpoints": [ips[ip] for ip in sorted(ips, key=_ip_sort)],
            })
        return out

    # --- internals -----------------------------------------------------------------
    def _port_keys(self, ref: ServiceRef) -> set[PortKey]:
        info = self.services.get(ref)
        return set() if info is None else {info.key(p) for p in info.ports}

    def _set(self, key: PortKey, new: frozenset[Backend] | None) -> BackendChange:
        old = self.backends.get(key)
        if new is None:
            self.backends.pop(key, None)
        else:
            self.backends[key] = new
        return BackendChange(key, old, new)

    def _remove_pod(self, pod: PodInfo) -> dict[PortKey, BackendChange]:
        """Drop ``pod``'s backends from every service port; the changes by key."""
        changes: dict[PortKey, BackendChange] = {}
        for ref in self._by_namespace.get(pod.namespace, ()):
            info = self.services[ref]
            if not selects(info.selector, pod.labels):
                continue
            for port in info.ports:
                backend = backend_of(pod, port)
                key = info.key(port)
                if backend is not None and backend in self.backends[key]:
                    new = self.backends[key] - {backend}
                    changes[key] = BackendChange(key, self.backends[key], new)
                    self.backends[key] = new
        return changes


def _ip_sort(ip: str) -> tuple[int, ...]:
    return tuple(int(x) for x in ip.split("."))


def changed_services(changes: Iterable[BackendChange]) -> set[ServiceRef]:
    return {c.key.service for c in changes}
