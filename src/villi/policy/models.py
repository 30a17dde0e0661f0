"""Strict models of the resources villi accepts, exactly as users write them in YAML.

CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy (``cilium.io/v2``), Kubernetes
NetworkPolicy (``networking.k8s.io/v1``) and ``v1`` Namespace. Unknown fields, wrong
types and bad values are errors (nothing of a bad file is applied, so a typo must not
silently widen or narrow a policy). Fields villi recognises but does not implement
(Kafka and DNS L7 rules, ``toFQDNs``, ``fromRequires``, …) are errors too, with a message
that says so, rather than being ignored. HTTP L7 rules (``toPorts[].rules.http``) are
checked here (regexes compile, ``path`` starts with ``/``, only TCP ports).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from villi.policy._k8smodels import (
    IPBlock,
    Namespace,
    NetworkPolicy,
    NetworkPolicyEgressRule,
    NetworkPolicyIngressRule,
    NetworkPolicyPeer,
    NetworkPolicyPort,
    NetworkPolicySpec,
)
from villi.policy._modelbase import (
    CIDR,
    EndpointSelector,
    FieldError,
    ObjectMeta,
    StrictModel,
    check_except,
    check_port_name,
    rejecting,
)
from villi.policy.fqdn import FQDNSelector, check_dns_ports

ENTITIES = ("all", "world", "world-ipv4", "world-ipv6", "cluster", "host", "remote-node",
            "kube-apiserver", "ingress", "health", "init", "unmanaged", "none")
Entity = Literal["all", "world", "world-ipv4", "world-ipv6", "cluster", "host", "remote-node",
                 "kube-apiserver", "ingress", "health", "init", "unmanaged", "none"]
CILIUM_PROTOCOLS = ("TCP", "UDP", "SCTP", "ANY")

# ICMP (IPv4) type names Cilium accepts besides numbers.
ICMP_TYPES = {
    "EchoReply": 0, "DestinationUnreachable": 3, "Redirect": 5, "Echo": 8, "EchoRequest": 8,
    "RouterAdvertisement": 9, "RouterSelection": 10, "TimeExceeded": 11,
    "ParameterProblem": 12, "Timestamp": 13, "TimestampReply": 14, "Photuris": 40,
    "ExtendedEchoRequest": 42, "ExtendedEchoReply": 43,
}

_REQUIRES = ("{} is not supported (deprecated in Cilium 1.17, removed in 1.19); add the "
             "labels to the peer selectors instead")
_NODES = "{} is not supported yet (node selector labels)"

__all__ = [
    "CIDRRule", "CiliumClusterwideNetworkPolicy", "CiliumNetworkPolicy", "CiliumRule",
    "DefaultDeny", "EgressDenyRule", "EgressRule", "ENTITIES", "FQDNSelector",
    "HeaderMatchRule", "ICMPField", "ICMPRule", "L7Rules", "PortRuleHTTP",
    "IngressDenyRule", "IngressRule", "IPBlock", "KINDS", "Namespace", "NetworkPolicy",
    "NetworkPolicyEgressRule", "NetworkPolicyIngressRule", "NetworkPolicyPeer",
    "NetworkPolicyPort", "NetworkPolicySpec", "Policy", "PortDenyRule", "PortProtocol",
    "PortRule", "Resource", "resource_key",
]

# Recognised-but-rejected fields (see ``unsupported``).
_Kafka = Annotated[Any, AfterValidator(rejecting("Kafka L7 rules are not supported yet"))]
_L7Proto = Annotated[Any, AfterValidator(rejecting("l7proto rules are not supported yet"))]
_Secret = Annotated[Any, AfterValidator(
    rejecting("secret header values are not supported yet"))]
_DenyL7 = Annotated[Any, AfterValidator(rejecting("deny rules cannot have L7 rules"))]
_TLS = Annotated[Any, AfterValidator(rejecting("TLS interception is not supported yet"))]
_ServerNames = Annotated[Any, AfterValidator(
    rejecting("serverNames (TLS SNI) is not supported yet"))]
_Listener = Annotated[Any, AfterValidator(rejecting("listener is not supported yet"))]
_CIDRGroup = Annotated[Any, AfterValidator(rejecting("cidrGroupRef is not supported yet"))]
_FromRequires = Annotated[Any, AfterValidator(rejecting(_REQUIRES.format("fromRequires")))]
_ToRequires = Annotated[Any, AfterValidator(rejecting(_REQUIRES.format("toRequires")))]
_FromNodes = Annotated[Any, AfterValidator(rejecting(_NODES.format("fromNodes")))]
_ToNodes = Annotated[Any, AfterValidator(rejecting(_NODES.format("toNodes")))]
_FromGroups = Annotated[Any, AfterValidator(rejecting("fromGroups is not supported yet"))]
_ToGroups = Annotated[Any, AfterValidator(rejecting("toGroups is not supported yet"))]
_ToServices = Annotated[Any, AfterValidator(rejecting("toServices is not supported yet"))]
_IngressFQDNs = Annotated[Any, AfterValidator(
    rejecting("toFQDNs is egress only (it selects destinations by DNS name)"))]
_Auth = Annotated[Any, AfterValidator(rejecting("authentication is not supported yet"))]


def _port_to_str(value: Any) -> Any:
    """CNP ports are strings in the API; YAML users write numbers too."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


# -- CiliumNetworkPolicy ------------------------------------------------------------------


class PortProtocol(StrictModel):
    """``toPorts[].ports[]``: a port (number, ``"0"``/empty = all, or a name), an
    optional inclusive ``endPort`` and a protocol (``ANY`` when omitted)."""

    port: Annotated[str, BeforeValidator(_port_to_str)] = ""
    end_port: int | None = None
    protocol: str = "ANY"

    @model_validator(mode="after")
    def _check(self) -> PortProtocol:
        if self.protocol not in CILIUM_PROTOCOLS:
            if self.protocol.upper() in ("ICMP", "ICMPV6"):
                raise FieldError(f"protocol {self.protocol} is not supported in toPorts; use "
                                 "an 'icmps' rule", "protocol")
            raise FieldError(f"unknown protocol {self.protocol!r} (valid: "
                             f"{', '.join(CILIUM_PROTOCOLS)})", "protocol")
        number = self.number
        if number is None:
            try:
                check_port_name(self.port.lower())  # Cilium compares names case-insensitively
            except ValueError as exc:
                raise FieldError(str(exc), "port") from None
            return self
        if not 0 <= number <= 65535:
            raise FieldError(f"{number} is out of range (0..65535)", "port")
        if self.end_port is not None and self.end_port != 0:
            if not 1 <= self.end_port <= 65535:
                raise FieldError(f"{self.end_port} is out of range (1..65535)", "endPort")
            if number == 0:
                raise FieldError("endPort needs a non-zero port", "endPort")
            if self.end_port < number:
                raise FieldError(f"endPort {self.end_port} is less than port {number}",
                                 "endPort")
        return self

    @property
    def number(self) -> int | None:
        """The numeric port (0 = all), or None for a named port."""
        if self.port == "":
            return 0
        return int(self.port) if self.port.isdigit() else None


def _check_regex(value: str, field: str) -> None:
    try:
        re.compile(value)
    except re.error as exc:
        raise FieldError(f"invalid regular expression {value!r}: {exc}", field) from None


class HeaderMatchRule(StrictModel):
    """``rules.http[].headerMatches[]``: a header that must have ``value``; ``mismatch``
    says what to do when it does not (empty: deny)."""

    name: str = Field(min_length=1)
    value: str = ""
    mismatch: Literal["", "LOG", "ADD", "DELETE", "REPLACE"] = ""
    secret: _Secret = None


class PortRuleHTTP(StrictModel):
    """``rules.http[]``: anchored regexes on method, path and Host, required headers."""

    method: str = ""
    path: str = ""
    host: str = ""
    headers: list[str] | None = None
    header_matches: list[HeaderMatchRule] | None = None

    @model_validator(mode="after")
    def _check(self) -> PortRuleHTTP:
        if self.path and not self.path.startswith("/"):
            raise FieldError(f"path {self.path!r} must start with '/'", "path")
        for name in ("method", "path", "host"):
            _check_regex(getattr(self, name), name)
        for index, header in enumerate(self.headers or ()):
            if not header.partition(":")[0].strip():
                raise FieldError(f"header {header!r} has no name", "headers", index)
        return self


class L7Rules(StrictModel):
    """``toPorts[].rules``: one L7 protocol per port rule (villi implements HTTP)."""

    http: list[PortRuleHTTP] | None = Field(None, alias="http")
    kafka: _Kafka = None
    dns: list[FQDNSelector] | None = None
    l7proto: _L7Proto = None
    l7: _L7Proto = None

    @model_validator(mode="before")
    @classmethod
    def _one_type(cls, data: Any) -> Any:
        if isinstance(data, dict):
            present = [k for k in ("http", "kafka", "dns", "l7proto") if data.get(k)]
            if len(present) > 1:
                raise FieldError(f"only one L7 type per port rule (found {present[0]} and "
                                 f"{present[1]})", present[1])
        return data


class PortRule(StrictModel):
    ports: list[PortProtocol] = Field(min_length=1)
    rules: L7Rules | None = None
    terminating_tls: _TLS = Field(None, alias="terminatingTLS")
    originating_tls: _TLS = Field(None, alias="originatingTLS")
    server_names: _ServerNames = None
    listener: _Listener = None

    @model_validator(mode="after")
    def _l7_on_tcp(self) -> PortRule:
        if self.rules is not None and self.rules.http is not None:
            for index, pp in enumerate(self.ports):
                if pp.protocol not in ("TCP", "ANY"):
                    raise FieldError(f"L7 HTTP rules can only apply to TCP (not "
                                     f"{pp.protocol})", "ports", index, "protocol")
        return self

    @property
    def http(self) -> list[PortRuleHTTP] | None:
        """The HTTP rules, None when the port rule has no L7 part."""
        return None if self.rules is None else self.rules.http

    @model_validator(mode="after")
    def _dns_port(self) -> PortRule:
        if self.rules is not None and self.rules.dns is not None:
            check_dns_ports(self.ports)
        return self


def _no_dns_rules(rule: Any, why: str) -> None:
    """``rules.dns`` anywhere in ``rule.to_ports`` is an error (ingress: egress only)."""
    for i, port_rule in enumerate(rule.to_ports or ()):
        if port_rule.rules is not None and port_rule.rules.dns is not None:
            raise FieldError(why, "toPorts", i, "rules", "dns")


class PortDenyRule(StrictModel):
    ports: list[PortProtocol] = Field(min_length=1)
    rules: _DenyL7 = None


class ICMPField(StrictModel):
    family: Literal["IPv4", "IPv6"] = "IPv4"
    type: Annotated[str, BeforeValidator(_port_to_str)]

    @model_validator(mode="after")
    def _check(self) -> ICMPField:
        if self.type.isdigit():
            if not 0 <= int(self.type) <= 255:
                raise FieldError(f"{self.type} is out of range (0..255)", "type")
        elif self.family == "IPv4" and self.type not in ICMP_TYPES:
            raise FieldError(f"unknown ICMP type {self.type!r}", "type")
        return self

    @property
    def number(self) -> int | None:
        """The ICMPv4 type number; None for every ``family: IPv6`` type (numbers too:
        ICMPv6 type 0 is not ICMPv4 echo reply). IPv6 is dropped by the datapath, so
        such a type selects nothing; the loader warns about it (``unenforced``)."""
        if self.family != "IPv4":
            return None
        if self.type.isdigit():
            return int(self.type)
        return ICMP_TYPES.get(self.type)


class ICMPRule(StrictModel):
    fields: list[ICMPField] = Field(min_length=1, max_length=40)


class CIDRRule(StrictModel):
    cidr: CIDR | None = None
    except_: list[CIDR] | None = Field(None, alias="except")
    cidr_group_ref: _CIDRGroup = None

    @model_validator(mode="after")
    def _check(self) -> CIDRRule:
        if self.cidr is None:
            raise FieldError("field required", "cidr")
        check_except(self.cidr, self.except_, "except")
        return self


def _exclusive(model: StrictModel, fields: tuple[str, ...]) -> None:
    """Cilium rejects rules that combine two L3 peer kinds ("not supported yet")."""
    present = [f for f in fields if getattr(model, f)]
    if len(present) > 1:
        names = [type(model).model_fields[f].alias or f for f in present]
        raise FieldError(f"combining {names[0]} and {names[1]} in one rule is not "
                         "supported; write them as separate rules", names[1])


def _icmps_xor_ports(rule: Any) -> None:
    if rule.icmps and rule.to_ports:
        raise FieldError("icmps may only be used without toPorts; define a separate rule "
                         "for the ports", "icmps")


class _IngressCommon(StrictModel):
    from_endpoints: list[EndpointSelector] | None = None
    from_requires: _FromRequires = None
    from_cidr: list[CIDR] | None = Field(None, alias="fromCIDR")
    from_cidr_set: list[CIDRRule] | None = Field(None, alias="fromCIDRSet")
    from_entities: list[Entity] | None = None
    from_nodes: _FromNodes = None
    from_groups: _FromGroups = None
    icmps: list[ICMPRule] | None = None

    @model_validator(mode="after")
    def _l3(self) -> _IngressCommon:
        _exclusive(self, ("from_endpoints", "from_cidr", "from_cidr_set", "from_entities"))
        _icmps_xor_ports(self)
        return self


class IngressRule(_IngressCommon):
    to_ports: list[PortRule] | None = None
    to_fqdns: _IngressFQDNs = Field(None, alias="toFQDNs")
    authentication: _Auth = None

    @model_validator(mode="after")
    def _egress_only(self) -> IngressRule:
        _no_dns_rules(self, "DNS rules are egress only (the DNS proxy sees a pod's queries)")
        return self


class IngressDenyRule(_IngressCommon):
    to_ports: list[PortDenyRule] | None = None


class _EgressCommon(StrictModel):
    to_endpoints: list[EndpointSelector] | None = None
    to_requires: _ToRequires = None
    to_cidr: list[CIDR] | None = Field(None, alias="toCIDR")
    to_cidr_set: list[CIDRRule] | None = Field(None, alias="toCIDRSet")
    to_entities: list[Entity] | None = None
    to_services: _ToServices = None
    to_groups: _ToGroups = None
    to_nodes: _ToNodes = None
    icmps: list[ICMPRule] | None = None

    @model_validator(mode="after")
    def _l3(self) -> _EgressCommon:
        _exclusive(self, ("to_endpoints", "to_cidr", "to_cidr_set", "to_entities"))
        _icmps_xor_ports(self)
        return self


class EgressRule(_EgressCommon):
    to_ports: list[PortRule] | None = None
    to_fqdns: list[FQDNSelector] | None = Field(None, alias="toFQDNs")
    authentication: _Auth = None

    @model_validator(mode="after")
    def _fqdns(self) -> EgressRule:
        _exclusive(self, ("to_fqdns", "to_endpoints", "to_cidr", "to_cidr_set", "to_entities"))
        if self.to_fqdns is not None and self.icmps:
            raise FieldError("toFQDNs cannot be combined with icmps", "icmps")
        return self


class EgressDenyRule(_EgressCommon):
    to_ports: list[PortDenyRule] | None = None


class DefaultDeny(StrictModel):
    ingress: bool | None = None
    egress: bool | None = None


class RuleLabel(StrictModel):
    key: str
    value: str = ""
    source: str = ""


class CiliumRule(StrictModel):
    """One Cilium ``Rule`` (a ``spec`` or an element of ``specs``)."""

    endpoint_selector: EndpointSelector | None = None
    node_selector: EndpointSelector | None = None
    ingress: list[IngressRule] | None = None
    ingress_deny: list[IngressDenyRule] | None = None
    egress: list[EgressRule] | None = None
    egress_deny: list[EgressDenyRule] | None = None
    enable_default_deny: DefaultDeny | None = None
    labels: list[RuleLabel] | None = None
    description: str | None = None

    @model_validator(mode="after")
    def _subject(self) -> CiliumRule:
        if self.endpoint_selector is None and self.node_selector is None:
            raise FieldError("a rule needs an endpointSelector (or, in a clusterwide "
                             "policy, a nodeSelector)", "endpointSelector")
        if self.endpoint_selector is not None and self.node_selector is not None:
            raise FieldError("endpointSelector and nodeSelector are mutually exclusive",
                             "nodeSelector")
        return self


class _CiliumPolicy(StrictModel):
    metadata: ObjectMeta
    spec: CiliumRule | None = None
    specs: list[CiliumRule] | None = None
    status: Any = None

    @model_validator(mode="after")
    def _specs(self) -> _CiliumPolicy:
        if self.spec is None and not self.specs:
            raise FieldError("a policy needs 'spec' or a non-empty 'specs'", "spec")
        for path, rule in self.rules:
            if rule.node_selector is not None:
                raise FieldError(self._node_selector_error, *path, "nodeSelector")
        return self

    _node_selector_error: ClassVar[str] = ""

    @property
    def rules(self) -> list[tuple[tuple[str | int, ...], CiliumRule]]:
        """Every rule with its field path (``("spec",)`` or ``("specs", i)``)."""
        found: list[tuple[tuple[str | int, ...], CiliumRule]] = []
        if self.spec is not None:
            found.append((("spec",), self.spec))
        found.extend((("specs", i), rule) for i, rule in enumerate(self.specs or ()))
        return found


class CiliumNetworkPolicy(_CiliumPolicy):
    api_version: Literal["cilium.io/v2"]
    kind: Literal["CiliumNetworkPolicy"]
    _node_selector_error: ClassVar[str] = (
        "nodeSelector is only allowed in a CiliumClusterwideNetworkPolicy")

    @property
    def namespace(self) -> str:
        return self.metadata.namespace or "default"


class CiliumClusterwideNetworkPolicy(_CiliumPolicy):
    api_version: Literal["cilium.io/v2"]
    kind: Literal["CiliumClusterwideNetworkPolicy"]
    _node_selector_error: ClassVar[str] = (
        "nodeSelector (host firewall policies) is not supported yet")

    @model_validator(mode="after")
    def _no_namespace(self) -> CiliumClusterwideNetworkPolicy:
        if self.metadata.namespace is not None:
            raise FieldError("a clusterwide policy has no namespace", "metadata", "namespace")
        return self

    @property
    def namespace(self) -> None:
        return None


Policy = CiliumNetworkPolicy | CiliumClusterwideNetworkPolicy | NetworkPolicy
Resource = CiliumNetworkPolicy | CiliumClusterwideNetworkPolicy | NetworkPolicy | Namespace

#: (apiVersion, kind) → model, for the loader's dispatch.
KINDS: dict[tuple[str, str], type[StrictModel]] = {
    ("cilium.io/v2", "CiliumNetworkPolicy"): CiliumNetworkPolicy,
    ("cilium.io/v2", "CiliumClusterwideNetworkPolicy"): CiliumClusterwideNetworkPolicy,
    ("networking.k8s.io/v1", "NetworkPolicy"): NetworkPolicy,
    ("v1", "Namespace"): Namespace,
}


def resource_key(resource: Resource) -> tuple[str, str | None, str]:
    """``(kind, namespace, name)``: what identifies a resource for apply and delete."""
    return (resource.kind, resource.namespace, resource.metadata.name)
