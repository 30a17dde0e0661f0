"""Applied policies and identities → the policy resolver → this node's policy maps.

The resolver (``villi.policy.resolver``) is incremental and synchronous: each change
returns, per affected local endpoint, the kernel map diff. This module feeds it from
the resource watcher (policies and Namespaces, ``villi.agent.watcher``), the identity
cache and the ipcache (pods elsewhere, for ipBlock and egress named ports), and writes
each diff with the endpoint manager. It depends on small Protocols, not on the agent:
the endpoints it writes (:class:`PolicyTargets`), the ipcache map (CIDR identities) and
two metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from villi.datapath import abi
from villi.endpoint.manager import Endpoint, ip_be
from villi.identity.ids import IdentityID
from villi.identity.labels import LabelSet, pod_identity_labels
from villi.kvstore.schema import IpcacheEntry
from villi.policy.entry import EndpointID
from villi.policy.entry import Protocol as L4Protocol
from villi.policy.resolver import Endpoint as PolicyEndpoint
from villi.policy.resolver import PolicyResolver, PolicyUpdate

log = logging.getLogger(__name__)
PROTOCOLS = {"TCP": L4Protocol.TCP, "UDP": L4Protocol.UDP, "SCTP": L4Protocol.SCTP}


class PolicyTargets(Protocol):
    """The local endpoints whose policy maps the resolver's diffs go to
    (``villi.endpoint.manager.EndpointManager``)."""

    @property
    def endpoints(self) -> Mapping[int, Endpoint]: ...
    def apply_policy_diff(self, endpoint_id: int, *, ingress_enforced: bool,
                          egress_enforced: bool, upserts: Mapping, deletes: Iterable
                          ) -> tuple[int, int]: ...
    def set_policy(self, endpoint_id: int, *, ingress_enforced: bool, egress_enforced: bool,
                   map_state: Mapping) -> tuple[int, int]: ...


class CidrMap(Protocol):
    """The node's ipcache map, where policy CIDRs get their local identities."""

    def update(self, key: Any, value: Any) -> None: ...
    def delete(self, key: Any) -> bool: ...


class PolicyMetrics(Protocol):
    @property
    def regenerations(self) -> Any: ...
    @property
    def regeneration_seconds(self) -> Any: ...


def named_ports(ports: Mapping[str, Any]) -> dict[str, tuple[int, L4Protocol]]:
    """Named ports as the resolver wants them (protocol numbers, TCP by default)."""
    return {n: (int(p), PROTOCOLS.get(str(pr).upper(), L4Protocol.TCP))
            for n, (p, pr) in ports.items()}


class PolicySync:
    def __init__(self, targets: PolicyTargets, ipcache: CidrMap, metrics: PolicyMetrics,
                 cluster: str) -> None:
        self.targets = targets
        self.ipcache = ipcache
        self.metrics = metrics
        self.cluster = cluster
        self.resolver = PolicyResolver()
        self.regenerations = 0
        self._cidrs: dict[str, int] = {}
        #: Called after every map write (the L7 proxy re-pushes its snapshot).
        self.listeners: list[Callable[[], None]] = []

    # --- inputs ---------------------------------------------------------------------------
    def on_resource(self, event: Any) -> None:
        """A policy or Namespace changed (a ``villi.agent.watcher.ResourceEvent``)."""
        if event.model is None:
            update = self.resolver.delete_resource(event.kind, event.namespace, event.name)
        else:
            update = self.resolver.upsert_resource(event.model)
        self.apply(update, event.started)

    def on_identities(self, added: Any, removed: Any) -> None:
        self.apply(self.resolver.update_identities(added, removed.keys()))

    def on_ipcache_change(self, ip: str, entry: IpcacheEntry | None) -> None:
        """A pod anywhere in the cluster appeared, changed or went away."""
        key = f"ip:{ip}"
        if entry is None:
            self.apply(self.resolver.delete_pod(key))
            return
        self.apply(self.resolver.upsert_pod(key, entry.identity, [ip],
                                            named_ports(entry.named_ports)))

    def identity_labels(self, namespace: str, labels: Mapping[str, str]) -> LabelSet:
        """The identity labels of a pod: its labels, its namespace's, the cluster's."""
        return pod_identity_labels(namespace, dict(labels), self.namespace_labels(namespace),
                                   cluster=self.cluster)

    # --- local endpoints ------------------------------------------------------------------
    def _policy_endpoint(self, ep: Endpoint) -> PolicyEndpoint:
        labels = self.identity_labels(ep.namespace, ep.labels)
        return PolicyEndpoint(EndpointID(ep.id), IdentityID(ep.identity), labels, ep.namespace,
                              named_ports(ep.named_ports), ep.ipv4)

    async def endpoint_added(self, ep: Endpoint) -> None:
        self.apply(self.resolver.upsert_endpoint(self._policy_endpoint(ep)))

    def endpoint_removed(self, ep: Endpoint) -> None:
        self.resolver.delete_endpoint(ep.id)

    async def identity_changed(self, ep: Endpoint, old_identity: int) -> None:
        self.apply(self.resolver.upsert_endpoint(self._policy_endpoint(ep)))

    async def regenerate_all(self) -> None:
        """Register every local endpoint and write its full policy as a diff against
        what the kernel already holds (start-up after a restart)."""
        mgr = self.targets
        with self.resolver.batch() as batch:
            for ep in mgr.endpoints.values():
                self.resolver.upsert_endpoint(self._policy_endpoint(ep))
        self._apply_cidrs(batch.update)
        for ep in mgr.endpoints.values():
            pol = self.resolver.policy(ep.id)
            mgr.set_policy(ep.id, ingress_enforced=pol.ingress_enforced,
                           egress_enforced=pol.egress_enforced,
                           map_state=self.resolver.map_state(ep.id))
            self.regenerations += 1

    # --- output ---------------------------------------------------------------------------
    def apply(self, update: PolicyUpdate, started: float | None = None) -> None:
        """Write a resolver update to the kernel; ``started`` is when its input
        changed (for the regeneration-time histogram)."""
        if not update:
            return
        t0 = started if started is not None else time.perf_counter()
        self._apply_cidrs(update)
        mgr = self.targets
        for eid, diff in update.endpoints.items():
            if diff.deleted or eid not in mgr.endpoints:
                continue
            mgr.apply_policy_diff(int(eid), ingress_enforced=diff.ingress_enforced,
                                  egress_enforced=diff.egress_enforced,
                                  upserts=diff.map_upserts, deletes=diff.map_deletes)
            self.regenerations += 1
            self.metrics.regenerations.labels("success").inc()
        self.metrics.regeneration_seconds.observe(time.perf_counter() - t0)
        for listener in self.listeners:
            listener()

    def _apply_cidrs(self, update: PolicyUpdate) -> None:
        ipcache = self.ipcache
        for prefix in update.cidr_deletes:
            if self._cidrs.pop(prefix, None) is not None:
                ipcache.delete(_lpm_key(prefix))
        for prefix, identity in update.cidr_upserts.items():
            self._cidrs[prefix] = int(identity)
            ipcache.update(_lpm_key(prefix), abi.IpcacheValue(identity=int(identity)))

    # --- queries --------------------------------------------------------------------------
    def cidr_identities(self) -> dict[str, int]:
        """Policy-derived CIDR prefixes and their local identities (for the L7 proxy)."""
        return dict(self._cidrs)

    def namespace_labels(self, namespace: str) -> dict[str, str]:
        return self.resolver.namespace_labels(namespace)

    def view(self) -> dict[str, Any]:
        out = []
        for res in self.resolver.resources():
            out.append({"kind": res.kind, "namespace": res.namespace,
                        "name": res.metadata.name})
        eps = {}
        for ep in self.targets.endpoints.values():
            try:
                pol = self.resolver.policy(ep.id)
            except KeyError:
                continue
            eps[str(ep.id)] = {
                "ingressEnforced": pol.ingress_enforced, "egressEnforced": pol.egress_enforced,
                "entries": [{"identity": int(e.identity), "direction": e.direction.name,
                             "protocol": e.protocol.name, "port": e.port,
                             "endPort": e.end_port, "deny": e.deny, "cookie": e.cookie,
                             **({"http": [r.to_wire() for r in e.http]} if e.http else {})}
                            for e in sorted(pol.entries)]}
        return {"resources": out, "endpoints": eps, "regenerations": self.regenerations}


def _lpm_key(prefix: str) -> abi.IpcacheKey:
    addr, _, plen = prefix.partition("/")
    return abi.IpcacheKey(prefixlen=int(plen or 32), addr=ip_be(addr))


__all__ = ["CidrMap", "PolicyMetrics", "PolicySync", "PolicyTargets", "named_ports"]
