"""Applied resources and identities → the policy resolver → this node's policy maps.

The resolver (``villi.policy.resolver``) is incremental and synchronous: each change
returns, per affected local endpoint, the kernel map diff. This module feeds it from
the store (resources), the identity cache and the ipcache (pods elsewhere, for ipBlock
and egress named ports), and writes each diff with the endpoint manager. A Namespace
whose labels change also changes the identity of its pods (namespace labels are part
of a pod's identity labels), which the agent handles.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import TYPE_CHECKING, Any

from villi import resources
from villi.datapath import abi
from villi.endpoint.manager import Endpoint, ip_be
from villi.errors import VilliError
from villi.identity.ids import IdentityID
from villi.kvstore import EventType, WatchEvent
from villi.kvstore.sync import PrefixSync
from villi.policy.entry import EndpointID, Protocol
from villi.policy.resolver import Endpoint as PolicyEndpoint
from villi.policy.resolver import PolicyResolver, PolicyUpdate

if TYPE_CHECKING:
    from villi.agent.daemon import Agent

log = logging.getLogger(__name__)
PROTOCOLS = {"TCP": Protocol.TCP, "UDP": Protocol.UDP, "SCTP": Protocol.SCTP}


class PolicySync:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.resolver = PolicyResolver()
        self.sync = PrefixSync(agent.store, resources.RESOURCES)  # type: ignore[arg-type]
        self.regenerations = 0
        self._cidrs: dict[str, int] = {}
        self._pods: dict[tuple[str, str], Any] = {}   # (ns, name) -> Pod resource
        agent.identity_cache.add_listener(self._on_identities)

    # --- inputs ---------------------------------------------------------------------------
    async def run(self) -> None:
        async for event in self.sync:
            try:
                self._on_resource(event)
            except VilliError as e:
                log.error("ignoring resource %s: %s", event.key, e)

    async def wait_synced(self) -> None:
        await self.sync.synced.wait()

    def _on_resource(self, event: WatchEvent) -> None:
        t0 = time.perf_counter()
        parsed = resources.parse_resource_key(event.key)
        if parsed is None:
            return
        kind, ns, name = parsed
        if kind == "Service":
            model = None if event.type is EventType.DELETE else \
                resources.decode(event.value, event.key)
            self.agent.services.on_resource(ns or "default", name, model)
            return
        if kind == "Pod":
            pod = None if event.type is EventType.DELETE else \
                resources.decode(event.value, event.key)
            if pod is None:
                self._pods.pop((ns or "default", name), None)
            else:
                self._pods[(ns or "default", name)] = pod
                asyncio.get_running_loop().create_task(
                    self.agent.apply_pod_resource(ns or "default", name, pod))
            return
        if event.type is EventType.DELETE:
            update = self.resolver.delete_resource(kind, ns, name)
        else:
            update = self.resolver.upsert_resource(resources.decode(event.value, event.key))
        self.apply(update, t0)
        if kind == "Namespace":
            asyncio.get_running_loop().create_task(self.agent.refresh_namespace(name))

    def _on_identities(self, added: Any, removed: Any) -> None:
        self.apply(self.resolver.update_identities(added, removed.keys()))

    def on_ipcache_change(self, ip: str, data: dict | None) -> None:
        """A pod anywhere in the cluster appeared, changed or went away."""
        key = f"ip:{ip}"
        if data is None:
            self.apply(self.resolver.delete_pod(key))
            return
        ports = {n: (int(p), int(PROTOCOLS.get(str(pr).upper(), Protocol.TCP)))
                 for n, (p, pr) in (data.get("namedPorts") or {}).items()}
        self.apply(self.resolver.upsert_pod(key, int(data.get("identity", 2)), [ip], ports))

    # --- local endpoints ------------------------------------------------------------------
    def _policy_endpoint(self, ep: Endpoint) -> PolicyEndpoint:
        labels = self.agent.identity_labels(ep.namespace, ep.labels)
        ports = {n: (int(p), PROTOCOLS.get(str(pr).upper(), Protocol.TCP))
                 for n, (p, pr) in ep.named_ports.items()}
        return PolicyEndpoint(EndpointID(ep.id), IdentityID(ep.identity), labels, ep.namespace,
                              ports, ep.ipv4)

    async def endpoint_added(self, ep: Endpoint) -> None:
        self.apply(self.resolver.upsert_endpoint(self._policy_endpoint(ep)))

    def endpoint_removed(self, ep: Endpoint) -> None:
        self.resolver.delete_endpoint(ep.id)

    async def identity_changed(self, ep: Endpoint, old_identity: int) -> None:
        self.apply(self.resolver.upsert_endpoint(self._policy_endpoint(ep)))

    async def regenerate_all(self) -> None:
        """Register every local endpoint and write its full policy as a diff against
        what the kernel already holds (start-up after a restart)."""
        mgr = self.agent.endpoints
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
        mgr = self.agent.endpoints
        for eid, diff in update.endpoints.items():
            if diff.deleted or eid not in mgr.endpoints:
                continue
            mgr.apply_policy_diff(int(eid), ingress_enforced=diff.ingress_enforced,
                                  egress_enforced=diff.egress_enforced,
                                  upserts=diff.map_upserts, deletes=diff.map_deletes)
            self.regenerations += 1
            self.agent.metrics.regenerations.labels("success").inc()
        self.agent.metrics.regeneration_seconds.observe(time.perf_counter() - t0)
        l7 = getattr(self.agent, "l7", None)
        if l7 is not None:
            l7.request_push()

    def _apply_cidrs(self, update: PolicyUpdate) -> None:
        ipcache = self.agent.datapath.ipcache
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

    async def pod_labels(self, namespace: str, name: str) -> dict[str, str]:
        pod = self._pods.get((namespace, name))
        return pod.labels if pod is not None else {}

    async def pod_named_ports(self, namespace: str, name: str) -> dict[str, list]:
        pod = self._pods.get((namespace, name))
        return pod.named_ports() if pod is not None else {}

    def view(self) -> dict[str, Any]:
        out = []
        for res in self.resolver.resources():
            out.append({"kind": res.kind, "namespace": res.namespace,
                        "name": res.metadata.name})
        eps = {}
        for ep in self.agent.endpoints.endpoints.values():
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


__all__ = ["PolicySync", "socket"]
