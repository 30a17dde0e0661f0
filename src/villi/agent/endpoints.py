"""Endpoint lifecycle on this node: CNI ADD/DEL, relabel, Pod and Namespace changes.

Every step of an ADD — IP, identity, veth and maps, policy, the pod's entry in the
store — is undone when a later one fails, so a failed ADD leaves nothing behind (the
store clean-up runs in the background: the store may be why the ADD failed). Each
endpoint holds exactly one identity reference, on the label set it was last given;
a new one is taken before the old one is released, so an identity shared with other
pods never drops to zero in between.

The lifecycle depends on small Protocols (below), not on the agent: the endpoint
manager (kernel state; a fake datapath in unit tests), IPAM, the identity allocator
and cache, the policy engine, Pod resources, and the store publisher. Errors are the
domain errors of ``villi.errors``; ``villi.agent.api`` maps them to HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, Protocol

from villi.endpoint.manager import Endpoint, EndpointManager
from villi.endpoint.request import RequestError, validate_endpoint_request, validate_labels
from villi.errors import (
    AddressInUse,
    BadRequest,
    EndpointError,
    EndpointNotFound,
    StoreUnavailable,
    VilliError,
)
from villi.identity.ids import IdentityID
from villi.identity.labels import LabelSet
from villi.netns.veth import GATEWAY_IPV4

log = logging.getLogger(__name__)
MAX_ENDPOINT_ID = 65535
KVSTORE_ADD_DEADLINE = 3.0  # seconds of kvstore work one CNI ADD may wait for (in all)

Kernel = Callable[..., Awaitable[Any]]
Spawn = Callable[[Coroutine[Any, Any, Any], str], Any]


class PodIPAM(Protocol):
    """Pod addresses (``villi.agent.ipam.NodeIPAM`` / ``ENINodeIPAM``)."""

    def allocate(self, owner: str) -> str: ...
    def release(self, ip: str) -> bool: ...
    def release_owner(self, owner: str) -> Any: ...
    def notify(self) -> None: ...
    def cidr_of(self, ip: str) -> str | None: ...


class Identities(Protocol):
    """Cluster identities (``villi.identity.allocator.IdentityAllocator``)."""

    async def allocate(self, labels: LabelSet) -> IdentityID: ...
    async def release(self, labels: LabelSet) -> bool: ...
    def lookup(self, labels: LabelSet) -> IdentityID | None: ...


class IdentityNames(Protocol):
    """The identity cache that names identities in flows and policy."""

    def upsert(self, identity: Any, labels: LabelSet) -> Any: ...


class EndpointPolicy(Protocol):
    """The policy engine's view of local endpoints (``PolicySync``)."""

    def identity_labels(self, namespace: str, labels: Mapping[str, str]) -> LabelSet: ...
    async def endpoint_added(self, ep: Endpoint) -> None: ...
    def endpoint_removed(self, ep: Endpoint) -> None: ...
    async def identity_changed(self, ep: Endpoint, old_identity: int) -> None: ...


class PodResources(Protocol):
    """Applied Pod resources (``villi.agent.pods.PodIndex``)."""

    def labels(self, namespace: str, name: str) -> dict[str, str]: ...
    def named_ports(self, namespace: str, name: str) -> dict[str, list]: ...


class Publisher(Protocol):
    """Pod entries and identity references in the store (``StatePublisher``)."""

    async def endpoint(self, ep: Endpoint) -> None: ...
    async def unpublish_endpoint(self, ip: str) -> None: ...
    async def identity_ref(self, labels: LabelSet) -> None: ...


class EndpointLifecycle:
    def __init__(self, node: str, manager: EndpointManager, ipam: PodIPAM,
                 identities: Identities, names: IdentityNames, policy: EndpointPolicy,
                 pods: PodResources, publisher: Publisher, kernel: Kernel, spawn: Spawn,
                 kvstore: str = "") -> None:
        self.node = node
        self.manager = manager
        self.ipam = ipam
        self.identities = identities
        self.names = names
        self.policy = policy
        self.pods = pods
        self.publisher = publisher
        self.kernel = kernel
        self.spawn = spawn
        self.kvstore = kvstore
        #: Called (synchronously) for an endpoint being deleted, before its state goes.
        self.on_removed: list[Callable[[Endpoint], None]] = []
        #: The ``policy`` part of an endpoint's view (the policy modes in force); by
        #: default whether each direction is enforced.
        self.policy_view: Callable[[Endpoint], dict[str, Any]] = _enforced_view
        self.held: dict[int, LabelSet] = {}   # endpoint id -> label set it holds
        self.lock = asyncio.Lock()

    @property
    def endpoints(self) -> dict[int, Endpoint]:
        return self.manager.endpoints

    # --- lookups and views --------------------------------------------------------------
    def find(self, ref: str, ifname: str = "eth0") -> Endpoint | None:
        """By id, ``container-id:<id>`` (with ``ifname``) or ``pod:<ns>/<name>``."""
        if ref.startswith("container-id:"):
            cid = ref[len("container-id:"):]
            for ep in self.endpoints.values():
                if ep.container_id == cid and ep.ifname == ifname:
                    return ep
            return None
        if ref.startswith("pod:"):
            ns, _, name = ref[len("pod:"):].partition("/")
            for ep in self.endpoints.values():
                if ep.namespace == ns and ep.pod_name == name:
                    return ep
            return None
        try:
            return self.endpoints.get(int(ref))
        except ValueError:
            raise BadRequest(f"bad endpoint id {ref!r}: a number, container-id:<id> or "
                             "pod:<ns>/<name>") from None

    def get(self, ref: str, ifname: str = "eth0") -> dict[str, Any]:
        ep = self.find(ref, ifname)
        if ep is None:
            raise EndpointNotFound(f"no endpoint {ref} (ifname {ifname}) on node {self.node}")
        return self.view(ep)

    def list(self) -> list[dict[str, Any]]:
        return [self.view(ep) for ep in sorted(self.endpoints.values(), key=lambda e: e.id)]

    def view(self, ep: Endpoint) -> dict[str, Any]:
        return {
            "id": ep.id, "containerID": ep.container_id, "ifname": ep.ifname,
            "netns": ep.netns, "namespace": ep.namespace, "podName": ep.pod_name,
            "labels": ep.labels, "identity": ep.identity, "ipv4": ep.ipv4,
            "ipv4Pool": self.ipam.cidr_of(ep.ipv4), "gateway": GATEWAY_IPV4,
            "mac": ep.pod_mac, "hostIfname": ep.host_ifname, "hostMac": ep.host_mac,
            "namedPorts": ep.named_ports, "node": self.node,
            "policy": self.policy_view(ep),
            "state": ep.state,
        }

    def _next_endpoint_id(self) -> int:
        used = set(self.endpoints)
        for i in range(1, MAX_ENDPOINT_ID + 1):
            if i not in used:
                return i
        raise EndpointError("no free endpoint id on this node")

    # --- CNI ADD / DEL ------------------------------------------------------------------
    async def create(self, req: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        """CNI ADD: IP, identity, veth, maps, policy, publish — or nothing at all.
        Returns (created, view); an ADD repeated for the same container and interface
        returns the existing endpoint."""
        # Every field is checked before anything is allocated (no IP leaks on 400).
        try:
            checked = validate_endpoint_request(req)
        except RequestError as exc:
            raise BadRequest(f"bad endpoint request: {exc}", 4) from None
        cid, netns, ifname = checked.container_id, checked.netns, checked.ifname
        if not os.path.exists(netns):
            raise BadRequest(f"network namespace {netns} does not exist", 3)
        async with self.lock:
            existing = self.find(f"container-id:{cid}", ifname)
            if existing is not None:
                return False, self.view(existing)
            namespace = checked.namespace
            pod_name = checked.pod_name or cid[:12]
            labels = self.pods.labels(namespace, pod_name)
            labels.update(checked.labels)
            named_ports = dict(checked.named_ports)
            named_ports.update(self.pods.named_ports(namespace, pod_name))
            owner = f"container-id:{cid}/{ifname}"
            ip = self.ipam.allocate(owner)
            id_labels = self.policy.identity_labels(namespace, labels)
            held = False
            ep: Endpoint | None = None
            deadline = asyncio.get_running_loop().time() + KVSTORE_ADD_DEADLINE
            try:
                identity = int(await self._kvstore_bounded(
                    self.identities.allocate(id_labels), "allocating the pod's identity",
                    deadline))
                held = True
                ep = await self.kernel(
                    self.manager.create,
                    endpoint_id=self._next_endpoint_id(), ipv4=ip, netns=netns, ifname=ifname,
                    identity=identity, attach_key=owner, namespace=namespace,
                    pod_name=pod_name, container_id=cid, labels=labels,
                    named_ports=named_ports)
                assert ep is not None
                self.names.upsert(identity, id_labels)
                await self.policy.endpoint_added(ep)
                await self._kvstore_bounded(self.publisher.endpoint(ep),
                                            "publishing the pod's address", deadline)
            except BaseException:
                if ep is not None:
                    self.policy.endpoint_removed(ep)
                    await self.kernel(self.manager.delete, ep.id)
                    self._cleanup_later(self.publisher.unpublish_endpoint(ep.ipv4), ep.ipv4)
                if held:
                    self._cleanup_later(self._release(id_labels), str(id_labels))
                self.ipam.release(ip)
                raise
            self.held[ep.id] = id_labels
            self.ipam.notify()
            return True, self.view(self.endpoints[ep.id])

    def _cleanup_later(self, coro: Coroutine[Any, Any, Any], what: str) -> None:
        """Undo a failed ADD's kvstore writes in the background: the kvstore may be the
        reason the ADD failed, and the ADD's answer must not wait for it."""
        async def run() -> None:
            try:
                await coro
            except VilliError as exc:
                log.warning("cleaning up %s after a failed ADD: %s", what, exc)

        self.spawn(run(), f"cleanup {what}")

    async def _kvstore_bounded(self, op: Awaitable[Any], doing: str, deadline: float) -> Any:
        """A kvstore step of a CNI ADD; all steps together end by ``deadline``
        (``KVSTORE_ADD_DEADLINE`` after the first): a frozen kvstore must fail the ADD
        within seconds (the runtime retries; code 11), not hold it for the client's
        whole retry budget."""
        remaining = max(0.1, deadline - asyncio.get_running_loop().time())
        try:
            return await asyncio.wait_for(op, remaining)
        except TimeoutError:
            raise StoreUnavailable(
                f"kvstore {self.kvstore} did not answer within "
                f"{KVSTORE_ADD_DEADLINE:g} s while {doing}; the pod was not created"
            ) from None

    async def delete(self, ref: str, ifname: str = "eth0") -> bool:
        """CNI DEL: idempotent; False when there was nothing to delete."""
        async with self.lock:
            ep = self.find(ref, ifname)
            if ep is None:
                if ref.startswith("container-id:"):
                    self.ipam.release_owner(f"{ref}/{ifname}")
                return False
            for hook in self.on_removed:
                hook(ep)
            self.policy.endpoint_removed(ep)
            await self.kernel(self.manager.delete, ep.id)
            await self.publisher.unpublish_endpoint(ep.ipv4)
            held = self.held.pop(ep.id, None)
            if held is not None:
                await self._release(held)
            self.ipam.release(ep.ipv4)
            self.ipam.notify()
            return True

    # --- labels and identities ----------------------------------------------------------
    async def set_labels(self, ref: str, ifname: str, labels: dict[str, str]
                         ) -> dict[str, Any]:
        """Change a running pod's labels: its identity and every policy follow."""
        async with self.lock:
            ep = self.find(ref, ifname)
            if ep is None:
                raise EndpointNotFound(f"no endpoint {ref} on node {self.node}")
            try:
                labels = validate_labels(labels)
            except RequestError as exc:
                raise BadRequest(f"bad labels: {exc}") from None
            ep.labels = dict(labels)
            self.manager.save(ep)
            await self.refresh_identity(ep.id)
            return self.view(self.endpoints[ep.id])

    async def apply_pod(self, namespace: str, name: str, pod: Any) -> None:
        """A Pod resource changed: the running endpoint takes its labels and ports."""
        async with self.lock:
            ep = self.find(f"pod:{namespace}/{name}")
            if ep is None:
                return
            ports = pod.named_ports()
            if ep.labels == pod.labels and ep.named_ports == ports:
                return
            ports_changed = ep.named_ports != ports
            ep.labels, ep.named_ports = pod.labels, ports
            self.manager.save(ep)
            await self.refresh_identity(ep.id)
            if ports_changed:
                await self.policy.identity_changed(ep, ep.identity)
                await self.publisher.endpoint(ep)

    async def refresh_namespace(self, namespace: str) -> None:
        """A namespace's labels changed: identities of its pods follow."""
        async with self.lock:
            for ep in list(self.endpoints.values()):
                if ep.namespace == namespace:
                    await self.refresh_identity(ep.id)

    async def refresh_identity(self, ep_id: int) -> None:
        """Give an endpoint the identity of its current labels and namespace labels."""
        ep = self.endpoints[ep_id]
        new_labels = self.policy.identity_labels(ep.namespace, ep.labels)
        old_labels = self.held.get(ep_id)
        if new_labels == old_labels and ep.identity == self.identities.lookup(new_labels):
            return
        new_id = int(await self.identities.allocate(new_labels))
        self.held[ep_id] = new_labels
        self.names.upsert(new_id, new_labels)
        old_id = ep.identity
        self.manager.set_identity(ep_id, new_id, ep.labels)
        if new_id != old_id:
            await self.publisher.endpoint(self.endpoints[ep_id])
            await self.policy.identity_changed(self.endpoints[ep_id], old_id)
        if old_labels is not None:
            await self._release(old_labels)

    async def _release(self, labels: LabelSet) -> None:
        try:
            await self.identities.release(labels)
        except VilliError as e:
            log.warning("releasing identity %s: %s", labels, e)

    async def republish(self) -> None:
        """After a lease loss: every pod entry and identity reference again."""
        for ep in list(self.endpoints.values()):
            await self.publisher.endpoint(ep)
        for labels in set(self.held.values()):
            await self.publisher.identity_ref(labels)

    # --- IPAM API -----------------------------------------------------------------------
    async def ipam_allocate(self, owner: str) -> dict[str, Any]:
        ip = self.ipam.allocate(owner)
        self.ipam.notify()
        return {"ipv4": {"ip": ip, "cidr": self.ipam.cidr_of(ip), "gateway": GATEWAY_IPV4}}

    async def ipam_release(self, ip: str) -> bool:
        if any(ep.ipv4 == ip for ep in self.endpoints.values()):
            raise AddressInUse(f"{ip} belongs to a live endpoint; delete the endpoint")
        released = self.ipam.release(ip)
        self.ipam.notify()
        return released


__all__ = ["KVSTORE_ADD_DEADLINE", "MAX_ENDPOINT_ID", "EndpointLifecycle"]


def _enforced_view(ep: Endpoint) -> dict[str, Any]:
    return {"ingress": "enabled" if ep.ingress_enforced else "disabled",
            "egress": "enabled" if ep.egress_enforced else "disabled"}
