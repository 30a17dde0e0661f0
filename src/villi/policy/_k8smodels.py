"""Kubernetes ``networking.k8s.io/v1`` NetworkPolicy and ``v1`` Namespace models.

Re-exported by :mod:`villi.policy.models`; kept apart only to keep modules short.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator

from villi.policy._modelbase import (
    CIDR,
    FieldError,
    LabelSelector,
    ObjectMeta,
    StrictModel,
    check_except,
    check_port_name,
)


def _int_or_str(value: Any) -> Any:
    """IntOrString without pydantic's union error noise in field paths."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(f"expected a port number or name, got {value!r}")


class NetworkPolicyPort(StrictModel):
    protocol: Literal["TCP", "UDP", "SCTP"] = "TCP"
    port: Annotated[Any, AfterValidator(_int_or_str)] = None
    end_port: int | None = None

    @model_validator(mode="after")
    def _check(self) -> NetworkPolicyPort:
        if isinstance(self.port, str):
            try:
                check_port_name(self.port)
            except ValueError as exc:
                raise FieldError(str(exc), "port") from None
        elif self.port is not None and not 1 <= self.port <= 65535:
            raise FieldError(f"{self.port} is out of range (1..65535)", "port")
        if self.end_port is not None:
            if not isinstance(self.port, int):
                raise FieldError("endPort needs a numeric port", "endPort")
            if not 1 <= self.end_port <= 65535:
                raise FieldError(f"{self.end_port} is out of range (1..65535)", "endPort")
            if self.end_port < self.port:
                raise FieldError(f"endPort {self.end_port} is less than port {self.port}",
                                 "endPort")
        return self


class IPBlock(StrictModel):
    cidr: CIDR
    except_: list[CIDR] | None = Field(None, alias="except")

    @model_validator(mode="after")
    def _check(self) -> IPBlock:
        check_except(self.cidr, self.except_, "except")
        return self


class NetworkPolicyPeer(StrictModel):
    pod_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    ip_block: IPBlock | None = None

    @model_validator(mode="after")
    def _check(self) -> NetworkPolicyPeer:
        if self.ip_block is not None and (self.pod_selector is not None
                                          or self.namespace_selector is not None):
            raise FieldError("ipBlock cannot be combined with podSelector or "
                             "namespaceSelector in one peer", "ipBlock")
        if self.ip_block is None and self.pod_selector is None and self.namespace_selector is None:
            raise FieldError("a peer needs podSelector, namespaceSelector or ipBlock",
                             "podSelector")
        return self


class NetworkPolicyIngressRule(StrictModel):
    from_: list[NetworkPolicyPeer] | None = Field(None, alias="from")
    ports: list[NetworkPolicyPort] | None = None


class NetworkPolicyEgressRule(StrictModel):
    to: list[NetworkPolicyPeer] | None = None
    ports: list[NetworkPolicyPort] | None = None


class NetworkPolicySpec(StrictModel):
    pod_selector: LabelSelector
    policy_types: list[Literal["Ingress", "Egress"]] | None = None
    ingress: list[NetworkPolicyIngressRule] | None = None
    egress: list[NetworkPolicyEgressRule] | None = None

    @property
    def effective_policy_types(self) -> frozenset[str]:
        """Kubernetes' default: Ingress always, Egress iff egress rules are present."""
        if self.policy_types is not None:
            return frozenset(self.policy_types)
        return frozenset({"Ingress", "Egress"} if self.egress else {"Ingress"})


class NetworkPolicy(StrictModel):
    api_version: Literal["networking.k8s.io/v1"]
    kind: Literal["NetworkPolicy"]
    metadata: ObjectMeta
    spec: NetworkPolicySpec
    status: Any = None

    @property
    def namespace(self) -> str:
        return self.metadata.namespace or "default"


class Namespace(StrictModel):
    api_version: Literal["v1"]
    kind: Literal["Namespace"]
    metadata: ObjectMeta
    spec: Any = None
    status: Any = None

    @model_validator(mode="after")
    def _no_namespace(self) -> Namespace:
        if self.metadata.namespace is not None:
            raise FieldError("a Namespace has no namespace", "metadata", "namespace")
        return self

    @property
    def namespace(self) -> None:
        return None
