"""The ``v1`` Pod resource: where a workload's labels and named ports come from.

In Kubernetes the agent learns a pod's labels from the API server; here a Pod applied
with ``villi apply`` plays that part for runtimes that cannot pass labels through CNI
(podman passes the container name as ``K8S_POD_NAME``). Only ``metadata`` and the
containers' ``ports`` mean anything to villi; the rest of a real Pod manifest (images,
commands, volumes …) is accepted and ignored, so manifests apply unchanged. Changing
a Pod's labels changes the running endpoint's identity on its node.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from villi.policy._modelbase import ObjectMeta, StrictModel


class ContainerPort(StrictModel):
    container_port: int = Field(ge=1, le=65535)
    name: str | None = Field(None, max_length=15)
    protocol: Literal["TCP", "UDP", "SCTP"] = "TCP"
    host_port: int | None = None
    host_ip: str | None = None


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
