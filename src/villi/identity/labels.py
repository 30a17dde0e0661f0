"""Labels and label sets: the input a security identity is derived from.

A label is ``source:key=value`` (Cilium's form). The source says where the label came
from; it matters because a selector ``k8s:app=web`` must not match a container label
``container:app=web``, while an unprefixed selector key (source ``any``) matches both.
A :class:`LabelSet` is the sorted, de-duplicated, hashable set of labels of one
identity; its canonical string is what the kvstore keys identities by, so two nodes that
see the same pod labels in a different order still agree on one identity.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

SOURCE_K8S = "k8s"
SOURCE_RESERVED = "reserved"
SOURCE_CIDR = "cidr"
SOURCE_UNSPEC = "unspec"
SOURCE_CONTAINER = "container"
SOURCE_ANY = "any"
#: Labels ``fqdn:<pattern>`` of CIDR identities learned through a toFQDNs selector.
SOURCE_FQDN = "fqdn"

SOURCES = frozenset(
    {SOURCE_K8S, SOURCE_RESERVED, SOURCE_CIDR, SOURCE_UNSPEC, SOURCE_CONTAINER, SOURCE_ANY,
     SOURCE_FQDN}
)

#: Label the agent adds to every pod: the pod's namespace.
POD_NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
#: Prefix under which a namespace's labels reach its pods (how namespaceSelector works).
NAMESPACE_LABELS_PREFIX = "io.cilium.k8s.namespace.labels."
#: Implicit, immutable label every namespace carries (Kubernetes >= 1.21).
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
SERVICE_ACCOUNT_LABEL = "io.cilium.k8s.policy.serviceaccount"
CLUSTER_LABEL = "io.cilium.k8s.policy.cluster"

# Cilium's default identity-relevant filter (pkg/labelsfilter): labels that change per
# pod (hashes, indices, controller uids) would otherwise give every pod its own identity.
_IGNORED_PREFIXES = (
    "io.kubernetes",
    "kubernetes.io",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "batch.kubernetes.io/job-completion-index",
    "batch.kubernetes.io/controller-uid",
    "k8s.io",
    "pod-template-generation",
    "pod-template-hash",
    "controller-revision-hash",
    "controller-uid",
    "annotation.",
    "etcd_node",
)
_INCLUDED_PREFIXES = (
    POD_NAMESPACE_LABEL,
    NAMESPACE_LABELS_PREFIX.rstrip("."),
    "app.kubernetes.io",
    CLUSTER_LABEL,
)

_KEY_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]*[A-Za-z0-9])?$")


@dataclass(frozen=True, slots=True, order=True)
class Label:
    """One ``source:key=value`` label. ``value`` may be empty (reserved labels are)."""

    source: str
    key: str
    value: str = ""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"unknown label source {self.source!r} (known: "
                             f"{', '.join(sorted(SOURCES))})")
        if not self.key:
            raise ValueError("label key must not be empty")
        if "=" in self.key or ";" in self.key or ";" in self.value:
            raise ValueError(f"label {self.key!r}={self.value!r} contains '=' or ';'")

    def __str__(self) -> str:
        return f"{self.source}:{self.key}={self.value}"


def parse_label(text: str, default_source: str = SOURCE_UNSPEC) -> Label:
    """Parse ``source:key=value``, ``source:key``, ``key=value`` or ``key``.

    Label keys cannot contain ``:``, so the first colon (if any, before the ``=``)
    separates the source. Without a source, ``default_source`` is used (Cilium uses
    ``unspec`` for labels and ``any`` for selector keys).
    """
    key_part, eq, value = text.partition("=")
    source = default_source
    if ":" in key_part:
        source, _, key_part = key_part.partition(":")
    return Label(source, key_part, value if eq else "")


def _ignored(key: str) -> bool:
    """Cilium's default filter: ignore unless a longer include prefix matches."""
    ignore = max((len(p) for p in _IGNORED_PREFIXES if key.startswith(p)), default=0)
    if ignore == 0 and "beta.kubernetes.io" not in key:
        return False
    include = max((len(p) for p in _INCLUDED_PREFIXES if key.startswith(p)), default=0)
    return include <= max(ignore, 1)


@dataclass(frozen=True)
class LabelSet:
    """A frozen, sorted set of labels; equality and hash follow the canonical string.

    At most one label per ``(source, key)``: an identity cannot both have ``app=a`` and
    ``app=b`` from the same source.
    """

    labels: tuple[Label, ...] = ()
    _by_key: dict[str, tuple[Label, ...]] = field(
        init=False, repr=False, compare=False, hash=False, default_factory=dict
    )
    _hash: int = field(init=False, repr=False, compare=False, hash=False, default=0)

    def __post_init__(self) -> None:
        ordered = tuple(sorted(set(self.labels)))
        seen: set[tuple[str, str]] = set()
        by_key: dict[str, list[Label]] = {}
        for label in ordered:
            if (label.source, label.key) in seen:
                raise ValueError(f"label set has two values for {label.source}:{label.key}")
            seen.add((label.source, label.key))
            by_key.setdefault(label.key, []).append(label)
        object.__setattr__(self, "labels", ordered)
        object.__setattr__(self, "_by_key", {k: tuple(v) for k, v in by_key.items()})
        object.__setattr__(self, "_hash", hash(ordered))

    # Label sets key the policy engine's per-subject state and the identity cache, so
    # hashing and comparing them must not walk every label each time.
    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, LabelSet):
            return NotImplemented
        return self._hash == other._hash and self.labels == other.labels

    @classmethod
    def of(cls, *labels: str | Label) -> LabelSet:
        """Build from labels or ``source:key=value`` strings (unprefixed → ``unspec``)."""
        return cls(tuple(lbl if isinstance(lbl, Label) else parse_label(lbl) for lbl in labels))

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, str], source: str = SOURCE_K8S) -> LabelSet:
        return cls(tuple(Label(source, k, v) for k, v in mapping.items()))

    @classmethod
    def parse(cls, canonical: str) -> LabelSet:
        """Inverse of :attr:`canonical` (also accepts a missing trailing ``;``)."""
        parts = [p for p in canonical.split(";") if p]
        return cls(tuple(parse_label(p) for p in parts))

    @property
    def canonical(self) -> str:
        """``k8s:app=web;k8s:io.kubernetes.pod.namespace=prod;`` — the kvstore key form."""
        return "".join(f"{label};" for label in self.labels)

    def __str__(self) -> str:
        return self.canonical

    def __iter__(self) -> Iterator[Label]:
        return iter(self.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __contains__(self, item: object) -> bool:
        if isinstance(item, str):
            item = parse_label(item)
        if not isinstance(item, Label):
            return False
        return item in self._by_key.get(item.key, ())

    def with_key(self, key: str, source: str = SOURCE_ANY) -> tuple[Label, ...]:
        """Labels with ``key`` from ``source`` (``any``: from every source)."""
        found = self._by_key.get(key, ())
        if source == SOURCE_ANY:
            return found
        return tuple(lbl for lbl in found if lbl.source == source)

    def get(self, key: str, source: str = SOURCE_ANY) -> str | None:
        """The value of ``key`` (first source in sort order when ``any``), or None."""
        found = self.with_key(key, source)
        return found[0].value if found else None

    @property
    def sources(self) -> frozenset[str]:
        return frozenset(lbl.source for lbl in self.labels)

    @property
    def namespace(self) -> str | None:
        """The pod namespace label's value, for pod identities."""
        return self.get(POD_NAMESPACE_LABEL, SOURCE_K8S)

    def union(self, other: Iterable[Label]) -> LabelSet:
        return LabelSet(self.labels + tuple(other))


def namespace_labels(namespace: str, labels: Mapping[str, str] | None = None) -> dict[str, str]:
    """A namespace's labels including the implicit ``kubernetes.io/metadata.name``."""
    result = dict(labels or {})
    result[NAMESPACE_NAME_LABEL] = namespace
    return result


def pod_identity_labels(
    namespace: str,
    pod_labels: Mapping[str, str],
    ns_labels: Mapping[str, str] | None = None,
    *,
    service_account: str | None = None,
    cluster: str | None = None,
) -> LabelSet:
    """The identity labels of a pod, the way Cilium derives them.

    Pod labels become ``k8s:<key>=<value>`` (after Cilium's default filter drops
    per-pod noise such as ``pod-template-hash``); the agent adds the namespace, and the
    namespace's labels (with the implicit ``kubernetes.io/metadata.name``) under
    ``io.cilium.k8s.namespace.labels.`` so that namespace selectors are plain label
    selectors on the pod identity.
    """
    labels = [Label(SOURCE_K8S, k, v) for k, v in pod_labels.items() if not _ignored(k)]
    labels.append(Label(SOURCE_K8S, POD_NAMESPACE_LABEL, namespace))
    for key, value in namespace_labels(namespace, ns_labels).items():
        labels.append(Label(SOURCE_K8S, NAMESPACE_LABELS_PREFIX + key, value))
    if service_account:
        labels.append(Label(SOURCE_K8S, SERVICE_ACCOUNT_LABEL, service_account))
    if cluster:
        labels.append(Label(SOURCE_K8S, CLUSTER_LABEL, cluster))
    return LabelSet(tuple(labels))


def cidr_labels(prefix: str) -> LabelSet:
    """Labels of a local CIDR identity: ``cidr:<prefix>`` plus ``reserved:world``.

    The world label is why ``toEntities: [world]`` also selects CIDR identities.
    """
    return LabelSet((Label(SOURCE_CIDR, prefix, ""), Label(SOURCE_RESERVED, "world", "")))


def valid_label_key(key: str) -> bool:
    """Loose check of a label key (an optional DNS prefix, ``/``, a name)."""
    return bool(_KEY_RE.match(key)) and len(key) <= 317
