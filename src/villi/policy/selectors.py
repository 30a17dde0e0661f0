"""Label selectors over identity labels (Kubernetes LabelSelector semantics, Cilium keys).

A selector is a conjunction of requirements (``matchLabels`` are ``In`` with one value).
Keys carry a label source as Cilium writes them: ``k8s:app`` only matches labels from
Kubernetes, ``reserved:host`` only reserved labels, and ``app`` / ``any:app`` match a
label with that key from any source. Selectors are frozen and hashable, with a
canonical string, so the selector cache can share one entry between every rule that
writes the same selector.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from villi.identity.labels import (
    POD_NAMESPACE_LABEL,
    SOURCE_ANY,
    SOURCE_K8S,
    SOURCES,
    LabelSet,
)

IN = "In"
NOT_IN = "NotIn"
EXISTS = "Exists"
DOES_NOT_EXIST = "DoesNotExist"
OPERATORS = (IN, NOT_IN, EXISTS, DOES_NOT_EXIST)


def parse_selector_key(key: str, default_source: str = SOURCE_ANY) -> tuple[str, str]:
    """``k8s:app`` → (``k8s``, ``app``); ``app`` → (``default_source``, ``app``)."""
    if ":" in key:
        source, _, name = key.partition(":")
        if source not in SOURCES:
            raise ValueError(f"unknown label source {source!r} in key {key!r} (known: "
                             f"{', '.join(sorted(SOURCES))})")
        if not name:
            raise ValueError(f"empty label key in {key!r}")
        return source, name
    if not key:
        raise ValueError("label key must not be empty")
    return default_source, key


@dataclass(frozen=True, slots=True, order=True)
class Requirement:
    """One ``key operator values`` term; ``values`` is sorted and de-duplicated."""

    source: str
    key: str
    operator: str
    values: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.operator not in OPERATORS:
            raise ValueError(f"unknown selector operator {self.operator!r} "
                             f"(valid: {', '.join(OPERATORS)})")
        if self.operator in (IN, NOT_IN) and not self.values:
            raise ValueError(f"operator {self.operator} needs at least one value")
        if self.operator in (EXISTS, DOES_NOT_EXIST) and self.values:
            raise ValueError(f"operator {self.operator} takes no values")
        object.__setattr__(self, "values", tuple(sorted(set(self.values))))

    def matches(self, labels: LabelSet) -> bool:
        found = labels.with_key(self.key, self.source)
        if self.operator == IN:
            return any(lbl.value in self.values for lbl in found)
        if self.operator == NOT_IN:
            return not any(lbl.value in self.values for lbl in found)
        if self.operator == EXISTS:
            return bool(found)
        return not found

    def __str__(self) -> str:
        key = f"{self.source}:{self.key}"
        if self.operator == IN and len(self.values) == 1:
            return f"{key}={self.values[0]}"
        if self.operator in (IN, NOT_IN):
            return f"{key} {self.operator} ({','.join(self.values)})"
        return f"{key} {self.operator}"


@dataclass(frozen=True, slots=True)
class Selector:
    """A conjunction of requirements. No requirements selects every identity."""

    requirements: tuple[Requirement, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "requirements", tuple(sorted(set(self.requirements))))

    @classmethod
    def from_k8s(
        cls,
        match_labels: Mapping[str, str] | None = None,
        match_expressions: Iterable[tuple[str, str, Iterable[str]]] = (),
        *,
        default_source: str = SOURCE_ANY,
        key_prefix: str = "",
    ) -> Selector:
        """Build from ``matchLabels`` and ``(key, operator, values)`` expressions.

        ``key_prefix`` is prepended to every key after the source is split off; that is
        how a Kubernetes ``namespaceSelector`` becomes a selector on the pod labels
        ``io.cilium.k8s.namespace.labels.<key>``.
        """
        reqs = []
        for key, value in (match_labels or {}).items():
            source, name = parse_selector_key(key, default_source)
            reqs.append(Requirement(source, key_prefix + name, IN, (value,)))
        for key, operator, values in match_expressions:
            source, name = parse_selector_key(key, default_source)
            reqs.append(Requirement(source, key_prefix + name, operator, tuple(values)))
        return cls(tuple(reqs))

    def matches(self, labels: LabelSet) -> bool:
        return all(req.matches(labels) for req in self.requirements)

    def names_key(self, key: str, sources: Iterable[str] = (SOURCE_K8S, SOURCE_ANY)) -> bool:
        """True when some requirement is about ``key`` from one of ``sources``."""
        wanted = set(sources)
        return any(r.key == key and r.source in wanted for r in self.requirements)

    def names_namespace(self) -> bool:
        """Cilium's test for "this peer selector picks its own namespace(s)"."""
        return self.names_key(POD_NAMESPACE_LABEL)

    def has_source(self, source: str) -> bool:
        return any(r.source == source for r in self.requirements)

    def with_requirements(self, *reqs: Requirement) -> Selector:
        return Selector(self.requirements + reqs)

    def without_key(self, key: str, sources: Iterable[str] = (SOURCE_K8S, SOURCE_ANY)) -> Selector:
        wanted = set(sources)
        return Selector(tuple(r for r in self.requirements
                              if not (r.key == key and r.source in wanted)))

    @property
    def is_wildcard(self) -> bool:
        return not self.requirements

    def __str__(self) -> str:
        return "{" + ", ".join(str(r) for r in self.requirements) + "}"


def namespace_is(namespace: str) -> Requirement:
    """``k8s:io.kubernetes.pod.namespace=<namespace>``."""
    return Requirement(SOURCE_K8S, POD_NAMESPACE_LABEL, IN, (namespace,))


def any_namespace() -> Requirement:
    """``k8s:io.kubernetes.pod.namespace Exists``: any pod, no reserved identity."""
    return Requirement(SOURCE_K8S, POD_NAMESPACE_LABEL, EXISTS)


class LabelIndex:
    """Identities indexed by label, so a selector is evaluated with set operations
    over all identities at once instead of label-by-label per identity."""

    def __init__(self) -> None:
        self.all: set[int] = set()
        self._values: dict[tuple[str, str], dict[str, set[int]]] = {}
        self._keyed: dict[tuple[str, str], set[int]] = {}

    def add(self, identity: int, labels: LabelSet) -> None:
        self.all.add(identity)
        for lbl in labels:
            for src in (lbl.source, SOURCE_ANY):
                self._values.setdefault((src, lbl.key), {}).setdefault(lbl.value, set()).add(
                    identity)
                self._keyed.setdefault((src, lbl.key), set()).add(identity)

    def remove(self, identity: int, labels: LabelSet) -> None:
        self.all.discard(identity)
        for lbl in labels:
            for src in (lbl.source, SOURCE_ANY):
                values = self._values.get((src, lbl.key))
                if values is not None and lbl.value in values:
                    values[lbl.value].discard(identity)
                    if not values[lbl.value]:
                        del values[lbl.value]
                    if not values:
                        del self._values[(src, lbl.key)]
                keyed = self._keyed.get((src, lbl.key))
                if keyed is not None:
                    keyed.discard(identity)
                    if not keyed:
                        del self._keyed[(src, lbl.key)]

    def _requirement(self, req: Requirement) -> set[int]:
        if req.operator in (IN, NOT_IN):
            values = self._values.get((req.source, req.key), {})
            hit: set[int] = set()
            for value in req.values:
                hit |= values.get(value, set())
            return hit if req.operator == IN else self.all - hit
        keyed = self._keyed.get((req.source, req.key), set())
        return set(keyed) if req.operator == EXISTS else self.all - keyed

    def select(self, selector: Selector) -> set[int]:
        """Every indexed identity ``selector`` matches."""
        result: set[int] | None = None
        for req in selector.requirements:
            hit = self._requirement(req)
            result = hit if result is None else result & hit
            if not result:
                return set()
        return set(self.all) if result is None else result
