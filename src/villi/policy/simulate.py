"""Policy decisions end to end without a kernel, like ``cilium policy trace``.

:class:`PolicySimulator` wires a :class:`PolicyResolver` to an emulated ipcache (pod IPs
→ pod identities, policy CIDR prefixes → local identities by longest prefix, anything
else → world) and to :func:`datapath_verdict` on each endpoint's map state. It answers
"would this packet pass?" through exactly the code path whose output the kernel gets,
which makes it the harness of the semantic and property tests, and a base for a
``villi policy trace`` command.

Peers are written ``ns/name`` (a pod), an IPv4 address, or a reserved identity name
(``host``, ``remote-node``, ``kube-apiserver``, ``health``, ``ingress``, ``unmanaged``,
``init``, ``world``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from villi.identity.ids import IdentityID
from villi.identity.labels import LabelSet, pod_identity_labels
from villi.identity.reserved import MIN_CLUSTER_IDENTITY, ReservedIdentity
from villi.policy.entry import Direction, EndpointID, Protocol
from villi.policy.loader import load_text
from villi.policy.mapstate import Verdict, datapath_verdict
from villi.policy.models import Namespace, Resource
from villi.policy.resolver import Endpoint, PolicyResolver, PolicyUpdate


@dataclass(frozen=True, slots=True)
class SimPod:
    namespace: str
    name: str
    endpoint: EndpointID
    identity: IdentityID
    labels: LabelSet
    ip: str
    pod_labels: Mapping[str, str]
    named_ports: Mapping[str, tuple[int, Protocol]]


def _protocol(value: str | int) -> int:
    return int(Protocol[value.upper()]) if isinstance(value, str) else int(value)


class PolicySimulator:
    """A one-node cluster of pods, applied policies and an emulated datapath."""

    def __init__(self, resolver: PolicyResolver | None = None) -> None:
        self.resolver = resolver or PolicyResolver()
        self.pods: dict[str, SimPod] = {}
        self._ns_labels: dict[str, dict[str, str]] = {}
        self._identities: dict[LabelSet, IdentityID] = {}
        self._refs: dict[IdentityID, int] = {}
        self._next_identity = MIN_CLUSTER_IDENTITY
        self._next_endpoint = 1

    # -- cluster state ------------------------------------------------------------------

    def apply_yaml(self, text: str, filename: str = "<sim>") -> PolicyUpdate:
        return self.apply(load_text(text, filename))

    def apply(self, resources: Iterable[Resource]) -> PolicyUpdate:
        resources = list(resources)
        with self.resolver.batch() as batch:
            for res in resources:
                self.resolver.upsert_resource(res)
                if isinstance(res, Namespace):
                    self.set_namespace_labels(res.metadata.name, res.metadata.labels or {})
        return batch.update

    def delete(self, kind: str, namespace: str | None, name: str) -> PolicyUpdate:
        return self.resolver.delete_resource(kind, namespace, name)

    def set_namespace_labels(self, namespace: str, labels: Mapping[str, str]) -> None:
        """Relabel a namespace; its pods get new identities, as the agent would do."""
        self._ns_labels[namespace] = dict(labels)
        for pod in [p for p in self.pods.values() if p.namespace == namespace]:
            self._place(pod.namespace, pod.name, pod.pod_labels, pod.ip, pod.named_ports,
                        pod.endpoint)

    def add_pod(self, ref: str, labels: Mapping[str, str], ip: str,
                named_ports: Mapping[str, tuple[int, Protocol | int]] | None = None
                ) -> PolicyUpdate:
        namespace, _, name = ref.partition("/")
        ports = {k: (p, Protocol(int(pr))) for k, (p, pr) in (named_ports or {}).items()}
        endpoint = EndpointID(self._next_endpoint)
        self._next_endpoint += 1
        return self._place(namespace, name, labels, ip, ports, endpoint)

    def relabel_pod(self, ref: str, labels: Mapping[str, str]) -> PolicyUpdate:
        pod = self.pods[ref]
        return self._place(pod.namespace, pod.name, labels, pod.ip, pod.named_ports,
                           pod.endpoint)

    def remove_pod(self, ref: str) -> PolicyUpdate:
        pod = self.pods.pop(ref)
        with self.resolver.batch() as batch:
            self.resolver.delete_endpoint(pod.endpoint)
            self._unref(pod.identity)
        return batch.update

    def _place(self, namespace: str, name: str, labels: Mapping[str, str], ip: str,
               ports: Mapping[str, tuple[int, Protocol]], endpoint: EndpointID) -> PolicyUpdate:
        ident_labels = pod_identity_labels(namespace, labels, self._ns_labels.get(namespace))
        old = self.pods.get(f"{namespace}/{name}")
        with self.resolver.batch() as batch:
            identity = self._ref(ident_labels)
            self.pods[f"{namespace}/{name}"] = SimPod(namespace, name, endpoint, identity,
                                                      ident_labels, ip, dict(labels),
                                                      dict(ports))
            self.resolver.upsert_endpoint(Endpoint(endpoint, identity, ident_labels, namespace,
                                                   ports, ip))
            if old is not None:
                self._unref(old.identity)
        return batch.update

    def _ref(self, labels: LabelSet) -> IdentityID:
        identity = self._identities.get(labels)
        if identity is None:
            identity = IdentityID(self._next_identity)
            self._next_identity += 1
            self._identities[labels] = identity
            self.resolver.update_identities({identity: labels})
        self._refs[identity] = self._refs.get(identity, 0) + 1
        return identity

    def _unref(self, identity: IdentityID) -> None:
        self._refs[identity] -= 1
        if self._refs[identity] == 0:
            del self._refs[identity]
            labels = next(lbl for lbl, i in self._identities.items() if i == identity)
            del self._identities[labels]
            self.resolver.update_identities({}, [identity])

    # -- decisions ----------------------------------------------------------------------

    def identity_of(self, peer: str) -> int:
        """The identity the datapath would see for ``peer`` (pod, IP or reserved name)."""
        if "/" in peer:
            return int(self.pods[peer].identity)
        try:
            address = int(ipaddress.IPv4Address(peer))
        except ValueError:
            return int(ReservedIdentity[peer.upper().replace("-", "_")])
        for pod in self.pods.values():
            if pod.ip == peer:
                return int(pod.identity)
        best: tuple[int, int] | None = None
        for prefix, identity in self.resolver.cidr_identities().items():
            net = ipaddress.IPv4Network(prefix)
            if address & int(net.netmask) == int(net.network_address) and (
                    best is None or net.prefixlen > best[0]):
                best = (net.prefixlen, int(identity))
        return best[1] if best else int(ReservedIdentity.WORLD)

    def verdict(self, pod: str, direction: Direction, peer: str, protocol: str | int,
                port: int) -> Verdict:
        """The verdict of ``pod``'s policy for one packet to/from ``peer``."""
        endpoint = self.pods[pod].endpoint
        policy = self.resolver.policy(endpoint)
        enforced = policy.ingress_enforced if direction is Direction.INGRESS else (
            policy.egress_enforced)
        return datapath_verdict(self.resolver.map_state(endpoint),
                                ingress_or_egress_enforced=enforced,
                                identity=self.identity_of(peer), direction=int(direction),
                                protocol=_protocol(protocol), port=port)

    def ingress(self, pod: str, peer: str, protocol: str | int, port: int) -> Verdict:
        return self.verdict(pod, Direction.INGRESS, peer, protocol, port)

    def egress(self, pod: str, peer: str, protocol: str | int, port: int) -> Verdict:
        return self.verdict(pod, Direction.EGRESS, peer, protocol, port)

    def allowed(self, src: str, dst: str, protocol: str | int, port: int) -> bool:
        """A new connection passes: egress at a local source and ingress at a local
        destination (replies are conntrack's business)."""
        if src in self.pods and not self.egress(src, dst, protocol, port).allowed:
            return False
        return dst not in self.pods or self.ingress(dst, src, protocol, port).allowed
