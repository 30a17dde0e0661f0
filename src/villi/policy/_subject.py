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

from villi.identity.labels import LabelSet
from villi.policy.entry import EndpointID, IdentityID, PolicyEntry, Protocol
from villi.policy.mapstate import EndpointMapState, MapKey, MapValue
from villi.policy.rules import RuleKey

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
        if new:
            self.contrib[cookie] = new
        else:
            self.contrib.pop(cookie, None)
        for entry in new - old:
            if entry in self._minus:
                self._minus.discard(entry)
            else:
                self._plus.add(entry)
        for entry in old - new:
            if entry in self._plus:
                self._plus.discard(entry)
            else:
                self._minus.add(entry)
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
