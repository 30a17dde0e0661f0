"""The ``v1`` Pod resource: where a workload's labels and named ports come from.

In Kubernetes the agent learns a pod's labels from the API server; here a Pod applied
with ``villi apply`` plays that part for runtimes that cannot pass labels through CNI
(podman passes the container name as ``K8S_POD_NAME``). Only ``metadata`` and the
containers' ``ports`` mean anything to villi; the rest of a real Pod manifest (images,
commands, volumes …) is accepted and ignored, so manifests apply unchanged. Changing
a Pod's labels changes the running endpoint's identity on its node.

``hostPort`` is rejected, not ignored: villi maps no host ports (Cilium does, with its
NodePort datapath), and accepting it would let a manifest look published when nothing
listens on the node. Runtimes publish host ports themselves (CNI ``portmap`` chained
after villi, docs/cni.md); leave ``hostPort`` out of the Pod applied to villi or set it
to 0. ``hostIP`` (Kubernetes' spelling) is accepted: without a host port it means
nothing.
"""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import ConfigDict, Field, field_validator

from villi.policy._modelbase import ObjectMeta, StrictModel

HOST_PORT_UNSUPPORTED = (
    "hostPort {port} is not supported: villi maps no host ports (publish it with the "
    "runtime's CNI portmap plugin chained after villi, see docs/cni.md, or use a "
    "Service) — remove hostPort from this Pod")


class ContainerPort(StrictModel):
    container_port: int = Field(ge=1, le=65535)
    name: str | None = Field(None, max_length=15)
    protocol: Literal["TCP", "UDP", "SCTP"] = "TCP"
    host_port: int | None = None
    host_ip: str | None = Field(None, alias="hostIP")

    @field_validator("host_port")
    @classmethod
    def _no_host_port(cls, value: int | None) -> int | None:
        if value:  # 0 / absent: no host port, as in Kubernetes
            raise ValueError(HOST_PORT_UNSUPPORTED.format(port=value))
        return value

    @field_validator("host_ip")
    @classmethod
    def _ip(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise ValueError(f"{value!r} is not an IP address") from None
        return value


class Container(StrictModel):
    model_config = ConfigDict(extra="ignore")  # image, command, env …: not villi's business
    name: str
    ports: list[ContainerPort] | None = None


class PodSpec(StrictModel):
    model_config = ConfigDict(extra="ignore")
    containers: list[Container] = Field(default_factory=list)


class Pod(StrictModel):
    api_version: Literal["v1"]
    kind: Literal["Pod"]
    metadata: ObjectMeta
    spec: PodSpec = Field(default_factory=PodSpec)
    status: object = None

    @property
    def namespace(self) -> str:
        return self.metadata.namespace or "default"

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.metadata.labels or {})

    def named_ports(self) -> dict[str, list]:
        """``{name: [port, protocol]}`` of every named container port."""
        return {p.name: [p.container_port, p.protocol]
                for c in self.spec.containers for p in (c.ports or []) if p.name}


POD_KINDS = {("v1", "Pod"): Pod}
