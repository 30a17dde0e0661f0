"""The Kubernetes ``v1`` Service resource, as users write it in YAML.

villi load-balances ClusterIP services at the socket layer (see ``docs/services.md``).
The model accepts real-world Service YAML: fields villi implements are validated
strictly (ports, protocols, selector, ``clusterIP``, session affinity); fields it
recognises but does not implement (``type: NodePort``, ``externalIPs``, dual-stack, …)
are rejected with a message that says "not supported" instead of "unknown field", and
unknown fields are errors, as for policies. Cross-field checks raise
:class:`~villi.policy._modelbase.FieldError` so the loader's message names the exact
sub-field (``spec.ports[1].name: duplicate port name 'http'``).
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator

from villi.policy._modelbase import (
    FieldError,
    ObjectMeta,
    StrictModel,
    check_label_key,
    check_label_value,
    check_port_name,
    rejecting,
)

__all__ = [
    "DEFAULT_AFFINITY_TIMEOUT", "DEFAULT_SERVICE_CIDR", "RESERVED_CIDRS", "SERVICE_KINDS",
    "ClientIPConfig", "Service", "ServicePort", "ServiceSpec", "SessionAffinityConfig",
    "check_cluster_ip", "check_service_cidr",
]

#: The default service CIDR ClusterIPs are allocated from (``--service-cidr``).
DEFAULT_SERVICE_CIDR = "10.32.0.0/16"
#: Ranges a service CIDR must not overlap: the lab underlay and the default cluster
#: (pod) CIDR. A VIP inside them would shadow a node or a pod address.
RESERVED_CIDRS = ("10.255.0.0/16", "10.64.0.0/10")
#: Kubernetes' default ``sessionAffinityConfig.clientIP.timeoutSeconds`` (3 hours).
DEFAULT_AFFINITY_TIMEOUT = 10800
MAX_AFFINITY_TIMEOUT = 86400
PROTOCOLS = ("TCP", "UDP")


def check_service_cidr(cidr: str) -> ipaddress.IPv4Network:
    """A usable IPv4 service CIDR: /8 to /28, overlapping none of ``RESERVED_CIDRS``."""
    try:
        net = ipaddress.ip_network(cidr, strict=True)
    except ValueError as exc:
        raise ValueError(f"service CIDR {cidr!r} is not a valid network ({exc})") from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise ValueError(f"service CIDR {cidr} is not IPv4 (only IPv4 is supported)")
    if not 8 <= net.prefixlen <= 28:
        raise ValueError(f"service CIDR {cidr} must be between /8 and /28")
    for reserved in RESERVED_CIDRS:
        if net.overlaps(ipaddress.IPv4Network(reserved)):
            raise ValueError(f"service CIDR {cidr} overlaps {reserved}, which villi uses "
                             "for nodes or pods")
    return net


def check_cluster_ip(ip: str, cidr: str = DEFAULT_SERVICE_CIDR) -> str:
    """``ip`` as a canonical IPv4 string, or ValueError saying why it cannot be a VIP."""
    net = check_service_cidr(cidr)
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        raise ValueError(f"{ip!r} is not a valid IP address") from None
    if not isinstance(addr, ipaddress.IPv4Address):
        raise ValueError(f"{ip} is not an IPv4 address (only IPv4 is supported)")
    if addr not in net:
        raise ValueError(f"{ip} is outside the service CIDR {net}")
    if addr in (net.network_address, net.broadcast_address):
        raise ValueError(f"{ip} is the {'network' if addr == net.network_address else 'broadcast'}"
                         f" address of the service CIDR {net}")
    return str(addr)


def _target_port(value: Any) -> Any:
    """IntOrString: a port number or a named container port."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected a port number or a port name, got {value!r}")
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int):
        if not 1 <= value <= 65535:
            raise ValueError(f"{value} is out of range (1..65535)")
        return value
    check_port_name(value)
    return value


_NOT_SUPPORTED = "{} is not supported (villi implements ClusterIP services only)"
_NodePort = Annotated[Any, AfterValidator(rejecting(
    "nodePort is not supported (only ClusterIP services are)"))]
_ExternalIPs = Annotated[Any, AfterValidator(rejecting(
    _NOT_SUPPORTED.format("externalIPs")))]
_ExternalName = Annotated[Any, AfterValidator(rejecting(
    _NOT_SUPPORTED.format("externalName")))]
_LBIP = Annotated[Any, AfterValidator(rejecting(
    _NOT_SUPPORTED.format("loadBalancerIP")))]
_LBSourceRanges = Annotated[Any, AfterValidator(rejecting(
    _NOT_SUPPORTED.format("loadBalancerSourceRanges")))]
_LBClass = Annotated[Any, AfterValidator(rejecting(
    _NOT_SUPPORTED.format("loadBalancerClass")))]
_LBNodePorts = Annotated[Any, AfterValidator(rejecting(
    _NOT_SUPPORTED.format("allocateLoadBalancerNodePorts")))]
_HealthCheckNodePort = Annotated[Any, AfterValidator(rejecting(
    _NOT_SUPPORTED.format("healthCheckNodePort")))]
_TrafficDistribution = Annotated[Any, AfterValidator(rejecting(
    "trafficDistribution is not supported"))]


class ServicePort(StrictModel):
    name: str | None = None
    protocol: str = "TCP"
    port: int
    target_port: Annotated[Any, AfterValidator(_target_port)] = None
    app_protocol: str | None = None
    node_port: _NodePort = None

    @model_validator(mode="after")
    def _check(self) -> ServicePort:
        if self.protocol not in PROTOCOLS:
            if self.protocol == "SCTP":
                raise FieldError("protocol SCTP is not supported (TCP or UDP)", "protocol")
            raise FieldError(f"unknown protocol {self.protocol!r} (valid: TCP, UDP)", "protocol")
        if not 1 <= self.port <= 65535:
            raise FieldError(f"{self.port} is out of range (1..65535)", "port")
        if self.name is not None and self.name != "":
            try:
                check_port_name(self.name)
            except ValueError:
                raise FieldError(f"{self.name!r} is not a valid port name (at most 15 "
                                 "lowercase letters, digits and '-')", "name") from None
        return self

    @property
    def target(self) -> int | str:
        """The backend port: a number, or a container port name resolved per pod."""
        return self.port if self.target_port is None else self.target_port


class ClientIPConfig(StrictModel):
    timeout_seconds: int = DEFAULT_AFFINITY_TIMEOUT

    @model_validator(mode="after")
    def _check(self) -> ClientIPConfig:
        if not 1 <= self.timeout_seconds <= MAX_AFFINITY_TIMEOUT:
            raise FieldError(f"{self.timeout_seconds} is out of range "
                             f"(1..{MAX_AFFINITY_TIMEOUT})", "timeoutSeconds")
        return self


class SessionAffinityConfig(StrictModel):
    client_ip: ClientIPConfig | None = Field(None, alias="clientIP")


class ServiceSpec(StrictModel):
    type: str = "ClusterIP"
    ports: list[ServicePort] | None = None
    selector: dict[str, str] | None = None
    cluster_ip: str | None = Field(None, alias="clusterIP")
    cluster_ips: list[str] | None = Field(None, alias="clusterIPs")
    session_affinity: str = "None"
    session_affinity_config: SessionAffinityConfig | None = None
    ip_families: list[str] | None = None
    ip_family_policy: str | None = None
    internal_traffic_policy: str | None = None
    external_traffic_policy: str | None = None
    publish_not_ready_addresses: bool | None = None
    external_ips: _ExternalIPs = Field(
        None, alias="externalIPs")
    external_name: _ExternalName = None
    load_balancer_ip: _LBIP = Field(
        None, alias="loadBalancerIP")
    load_balancer_source_ranges: _LBSourceRanges = None
    load_balancer_class: _LBClass = None
    allocate_load_balancer_node_ports: _LBNodePorts = None
    health_check_node_port: _HealthCheckNodePort = None
    traffic_distribution: _TrafficDistribution = None

    @model_validator(mode="after")
    def _check(self) -> ServiceSpec:
        if self.type != "ClusterIP":
            raise FieldError(f"type {self.type} is not supported (villi implements ClusterIP "
                             "services only)", "type")
        if self.cluster_ip == "None":
            raise FieldError("headless services (clusterIP: None) are not supported",
                             "clusterIP")
        if self.cluster_ip:
            try:
                check_cluster_ip(self.cluster_ip)
            except ValueError as exc:
                raise FieldError(str(exc), "clusterIP") from None
        self._check_cluster_ips()
        self._check_families()
        if not self.ports:
            raise FieldError("a ClusterIP service needs at least one port", "ports")
        self._check_ports(self.ports)
        for key, value in (self.selector or {}).items():
            try:
                check_label_key(key)
                check_label_value(value)
            except ValueError as exc:
                raise FieldError(str(exc), "selector", key) from None
        if self.session_affinity not in ("None", "ClientIP"):
            raise FieldError(f"unknown session affinity {self.session_affinity!r} (valid: None, "
                             "ClientIP)", "sessionAffinity")
        if self.session_affinity == "None" and self.session_affinity_config is not None:
            raise FieldError("must not be set when sessionAffinity is None",
                             "sessionAffinityConfig")
        return self

    def _check_cluster_ips(self) -> None:
        if self.cluster_ips is None:
            return
        if len(self.cluster_ips) > 1:
            raise FieldError("dual-stack services are not supported (one IPv4 ClusterIP)",
                             "clusterIPs")
        if self.cluster_ips and self.cluster_ips[0] != (self.cluster_ip or ""):
            raise FieldError(f"must equal clusterIP ({self.cluster_ip or 'unset'}), "
                             f"got {self.cluster_ips[0]}", "clusterIPs", 0)

    def _check_families(self) -> None:
        if self.ip_families is not None and self.ip_families not in ([], ["IPv4"]):
            raise FieldError("only IPv4 is supported (ipFamilies: [IPv4])", "ipFamilies")
        if self.ip_family_policy not in (None, "SingleStack"):
            raise FieldError(f"ipFamilyPolicy {self.ip_family_policy} is not supported (only "
                             "SingleStack)", "ipFamilyPolicy")
        if self.internal_traffic_policy not in (None, "Cluster"):
            raise FieldError(f"internalTrafficPolicy {self.internal_traffic_policy} is not "
                             "supported (only Cluster)", "internalTrafficPolicy")
        if self.external_traffic_policy is not None:
            raise FieldError("externalTrafficPolicy only applies to NodePort and LoadBalancer "
                             "services, which are not supported", "externalTrafficPolicy")

    @staticmethod
    def _check_ports(ports: list[ServicePort]) -> None:
        names: dict[str, int] = {}
        numbers: dict[tuple[int, str], int] = {}
        for i, port in enumerate(ports):
            if len(ports) > 1 and not port.name:
                raise FieldError("every port needs a name when a service has more than one",
                                 "ports", i, "name")
            if port.name:
                if port.name in names:
                    raise FieldError(f"duplicate port name {port.name!r} (also ports"
                                     f"[{names[port.name]}])", "ports", i, "name")
                names[port.name] = i
            key = (port.port, port.protocol)
            if key in numbers:
                raise FieldError(f"duplicate port {port.port}/{port.protocol} (also ports"
                                 f"[{numbers[key]}])", "ports", i, "port")
            numbers[key] = i


#: ClusterMesh annotations of global services and their values (Cilium's).
MESH_ANNOTATIONS: dict[str, tuple[str, ...]] = {
    "service.cilium.io/global": ("true", "false"),
    "service.cilium.io/shared": ("true", "false"),
    "service.cilium.io/affinity": ("local", "remote", "none"),
}


class Service(StrictModel):
    """A Kubernetes ``v1`` Service of type ClusterIP."""

    api_version: Literal["v1"]
    kind: Literal["Service"]
    metadata: ObjectMeta
    spec: ServiceSpec
    status: Any = None

    @model_validator(mode="after")
    def _mesh_annotations(self) -> Service:
        """ClusterMesh annotations (service.cilium.io/global|shared|affinity) must have
        one of their values: a typo would silently make a service local."""
        for key, allowed in MESH_ANNOTATIONS.items():
            value = (self.metadata.annotations or {}).get(key)
            if value is not None and value.strip().lower() not in allowed:
                raise FieldError(f"{value!r} is not one of {', '.join(allowed)}",
                                 "metadata", "annotations", key)
        return self

    @property
    def namespace(self) -> str:
        return self.metadata.namespace or "default"

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def ports(self) -> list[ServicePort]:
        return list(self.spec.ports or ())

    @property
    def selector(self) -> dict[str, str]:
        return dict(self.spec.selector or {})

    @property
    def requested_cluster_ip(self) -> str | None:
        """The ClusterIP the user asked for, or None to allocate one."""
        return self.spec.cluster_ip or None

    @property
    def affinity_timeout(self) -> int:
        """Seconds a client sticks to its backend; 0 = no session affinity."""
        if self.spec.session_affinity != "ClientIP":
            return 0
        cfg = self.spec.session_affinity_config
        if cfg is None or cfg.client_ip is None:
            return DEFAULT_AFFINITY_TIMEOUT
        return cfg.client_ip.timeout_seconds


#: (apiVersion, kind) → model, merged into the resource loader's dispatch table.
SERVICE_KINDS: dict[tuple[str, str], Any] = {("v1", "Service"): Service}
