"""What the observer needs to know about the cluster to enrich a flow.

The agent implements this (identity labels, which pod owns an IP, which policy rule
a cookie names); keeping it an interface lets the observer be tested without an agent
and keeps the dependency pointing from the agent to the observer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class PodInfo:
    namespace: str
    name: str
    endpoint_id: int = 0
    node: str = ""
    mac: str = ""
    host_mac: str = ""


@dataclass(frozen=True)
class PolicyRef:
    kind: str
    namespace: str | None
    name: str
    direction: str
    rule_index: int = 0


@dataclass
class StaticContext:
    """A context from plain dicts (tests, replay, benchmarks)."""

    node: str = "node"
    labels: dict[int, list[str]] = field(default_factory=dict)
    pods: dict[str, PodInfo] = field(default_factory=dict)
    policies: dict[int, PolicyRef] = field(default_factory=dict)
    services: dict[tuple[str, int], tuple[str, str]] = field(default_factory=dict)

    def node_name(self) -> str:
        return self.node

    def identity_labels(self, identity: int) -> list[str]:
        return self.labels.get(identity, [])

    def pod_of(self, ip: str) -> PodInfo | None:
        return self.pods.get(ip)

    def all_pods(self) -> dict[str, PodInfo]:
        return dict(self.pods)

    def all_identities(self) -> dict[int, list[str]]:
        return dict(self.labels)

    def policy_of(self, cookie: int) -> PolicyRef | None:
        return self.policies.get(cookie)

    def service_of(self, ip: str, port: int) -> tuple[str, str] | None:
        return self.services.get((ip, port))


class FlowContext(Protocol):
    def node_name(self) -> str: ...
    def identity_labels(self, identity: int) -> list[str]: ...
    def pod_of(self, ip: str) -> PodInfo | None: ...
    def all_pods(self) -> dict[str, PodInfo]: ...
    def all_identities(self) -> dict[int, list[str]]: ...
    def policy_of(self, cookie: int) -> PolicyRef | None: ...
    def service_of(self, ip: str, port: int) -> tuple[str, str] | None: ...
