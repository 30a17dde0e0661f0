"""Per-subject policy state used by the resolver.

A *subject* is what a policy is computed for: a label set plus the named ports it
declares. Endpoints with the same labels and ports (the replicas of one deployment)
share one subject, so their policy is computed and encoded once, like Cilium's
per-identity ``selectorPolicy``. A subject holds, per rule section (by cookie), the
entries that section contributes; cookies are unique per section, so the subject's
entries are the disjoint union of those contributions and a change to one section is a
set difference on that section alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from villi.identity.ids import IdentityID
from villi.identity.labels import LabelSet
from villi.policy.entry import Direction, EndpointID, PolicyEntry, Protocol
from villi.policy.mapstate import EndpointMapState, MapKey, MapValue
from villi.policy.rules import RuleKey, Section

PortsSig = tuple[tuple[str, int, int], ...]
SubjectKey = tuple[LabelSet, PortsSig]
EMPTY: frozenset[PolicyEntry] = frozenset()


def ports_signature(named_ports: Mapping[str, tuple[int, int]]) -> PortsSig:
    return tuple(sorted((name.lower(), int(port), int(proto))
                        for name, (port, proto) in named_ports.items()))


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A local endpoint, as the policy engine sees it.

    ``named_ports`` maps a container port name to ``(port, protocol)``; ingress rules
    with named ports resolve against these.
    """

    id: EndpointID
    identity: IdentityID
    labels: LabelSet
    namespace: str
    named_ports: Mapping[str, tuple[int, Protocol]] = field(default_factory=dict)
    ipv4: str | None = None


@dataclass(frozen=True, slots=True)
class EndpointPolicy:
    """An endpoint's resolved policy: per-direction default deny and its entries."""

    ingress_enforced: bool
    egress_enforced: bool
    entries: frozenset[PolicyEntry]


@dataclass(frozen=True, slots=True)
class EndpointPolicyDiff:
    """What changed for one endpoint; ``map_*`` is the kernel map diff to write.

    ``deleted`` is set when the endpoint itself went away (everything is removed).
    """

    endpoint: EndpointID
    added: frozenset[PolicyEntry]
    removed: frozenset[PolicyEntry]
    ingress_enforced: bool
    egress_enforced: bool
    enforcement_changed: bool
    map_upserts: Mapping[MapKey, MapValue]
    map_deletes: frozenset[MapKey]
    deleted: bool = False


@dataclass(frozen=True, slots=True)
class PolicyUpdate:
    """The result of one change: per affected endpoint diffs and ipcache CIDR changes."""

    endpoints: Mapping[EndpointID, EndpointPolicyDiff] = field(default_factory=dict)
    cidr_upserts: Mapping[str, IdentityID] = field(default_factory=dict)
    cidr_deletes: Mapping[str, IdentityID] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.endpoints or self.cidr_upserts or self.cidr_deletes)


class Subject:
    """Policy state shared by all endpoints with the same labels and named ports."""

    __slots__ = ("key", "labels", "namespace", "ports", "endpoints", "rules", "contrib",
                 "enforcers", "flushed", "mapstate", "_plus", "_minus")

    def __init__(self, key: SubjectKey) -> None:
        self.key = key
        self.labels: LabelSet = key[0]
        self.namespace = self.labels.namespace
        self.ports: dict[str, tuple[int, int]] = {n: (p, pr) for n, p, pr in key[1]}
        self.endpoints: set[EndpointID] = set()
        self.rules: set[RuleKey] = set()
        self.contrib: dict[int, frozenset[PolicyEntry]] = {}
        self.enforcers: tuple[set[RuleKey], set[RuleKey]] = (set(), set())
        self.flushed: tuple[bool, bool] = (False, False)
        self.mapstate = EndpointMapState()
        self._plus: set[PolicyEntry] = set()
        self._minus: set[PolicyEntry] = set()

    @property
    def enforced(self) -> tuple[bool, bool]:
        return bool(self.enforcers[0]), bool(self.enforcers[1])

    def entries(self) -> frozenset[PolicyEntry]:
        out: set[PolicyEntry] = set()
        for part in self.contrib.values():
            out |= part
        return frozenset(out)

    def set_contribution(self, cookie: int, new: frozenset[PolicyEntry]) -> bool:
        """Replace one section's entries; True when something changed."""
        old = self.contrib.get(cookie, EMPTY)
        if old is new or old == new:
            return False
        return self.apply_delta(cookie, new, new - old, old - new)

    def apply_delta(self, cookie: int, new: frozenset[PolicyEntry], plus: frozenset[PolicyEntry],
                    minus: frozenset[PolicyEntry]) -> bool:
        """Like :meth:`set_contribution` when the difference is already known (it is
        computed once per section and shared by every subject holding the same entries).

        Pending changes cancel out (an entry added then removed is no change); the set
        algebra reuses the hashes the sets already store.
        """
        if new:
            self.contrib[cookie] = new
        else:
            self.contrib.pop(cookie, None)
        if not plus and not minus:
            return False
        if plus:
            if self._minus:
                back = self._minus & plus
                self._minus -= back
                self._plus |= plus - back if back else plus
            else:
                self._plus |= plus
        if minus:
            if self._plus:
                undo = self._plus & minus
                self._plus -= undo
                self._minus |= minus - undo if undo else minus
            else:
                self._minus |= minus
        return True

    def take_pending(self) -> tuple[frozenset[PolicyEntry], frozenset[PolicyEntry]]:
        plus, minus = frozenset(self._plus), frozenset(self._minus)
        self._plus.clear()
        self._minus.clear()
        return plus, minus


@dataclass(slots=True)
class Snapshot:
    """An endpoint's realized policy before it moved subject (label change) or left."""

    entries: frozenset[PolicyEntry]
    state: dict[MapKey, MapValue]
    enforced: tuple[bool, bool]
    deleted: bool = False


@dataclass(slots=True)
class PodRecord:
    """A pod anywhere in the cluster, for ipBlock matching and egress named ports."""

    identity: int
    ips: tuple[int, ...]
    ports: PortsSig


@dataclass(slots=True)
class Batch:
    """Collects several changes into one flush; ``update`` is set when the block exits."""

    update: PolicyUpdate = field(default_factory=PolicyUpdate)


def section_entries(section: Section, ids: set[int], own_ports: Mapping[str, tuple[int, int]],
                    identity_ports: Mapping[int, Mapping[str, set[tuple[int, int]]]]
                    ) -> frozenset[PolicyEntry]:
    """The entries one rule section yields for a subject.

    ``ids`` are the selected peer identities ({0} for the wildcard). Named ports
    resolve against the destination: on ingress the subject's own ports; on egress each
    peer identity's pods (a name that maps to different numbers on different peers
    yields per-identity entries). An egress named port with the wildcard peer becomes
    entries for every identity that declares the name, so it never matches world.
    """
    if not ids:
        return EMPTY
    d, deny, cookie = section.direction, section.deny, section.cookie
    if section.ports is None:
        return frozenset(PolicyEntry(IdentityID(i), d, Protocol.ANY, 0, 0, deny, cookie)
                         for i in ids)
    out: set[PolicyEntry] = set()
    for spec in section.ports:
        if spec.name is None:
            out.update(PolicyEntry(IdentityID(i), d, spec.protocol, spec.port, spec.end_port,
                                   deny, cookie, spec.http, spec.dns) for i in ids)
        elif d is Direction.INGRESS:
            declared = own_ports.get(spec.name)
            if declared and spec.protocol in (Protocol.ANY, declared[1]):
                out.update(PolicyEntry(IdentityID(i), d, Protocol(declared[1]), declared[0], 0,
                                       deny, cookie, spec.http, spec.dns) for i in ids)
        else:
            peers = ids if 0 not in ids else set(identity_ports)
            for i in peers:
                for port, proto in identity_ports.get(i, {}).get(spec.name, ()):
                    if spec.protocol in (Protocol.ANY, proto):
                        out.add(PolicyEntry(IdentityID(i), d, Protocol(proto), port, 0, deny,
                                            cookie, spec.http, spec.dns))
    return frozenset(out) if out else EMPTY
