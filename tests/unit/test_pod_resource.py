"""v1 Pod resources: labels and named ports, real manifests accepted unchanged."""

from __future__ import annotations

import pytest

from villi import resources
from villi.errors import ResourceError
from villi.policy import loader
from villi.policy.models import KINDS


def load_text(text: str, filename: str) -> loader.Loaded:
    return loader.load_text(text, filename, resources.all_kinds())


def test_kinds_have_one_registry_and_it_is_not_mutated() -> None:
    """Every kind comes from ``villi.resources.all_kinds()``; loading through it adds
    nothing to the policy engine's own table (no run-time mutation)."""
    before = dict(KINDS)
    load_text(POD, "pod.yaml")
    assert KINDS == before
    assert ("v1", "Pod") not in KINDS and ("v1", "Service") not in KINDS
    assert {("v1", "Pod"), ("v1", "Service")} <= set(resources.all_kinds())
    with pytest.raises(ResourceError, match="unknown kind 'Pod'"):
        loader.load_text(POD, "pod.yaml")  # the policy engine alone knows no Pod

POD = """\
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: shop
  labels: {app: web, tier: front}
spec:
  restartPolicy: Always
  containers:
  - name: nginx
    image: nginx:1.25
    args: ["-g", "daemon off;"]
    resources: {limits: {cpu: 100m}}
    ports:
    - {name: http, containerPort: 80}
    - {name: dns, containerPort: 53, protocol: UDP}
    - {containerPort: 9000}
"""


def test_pod_labels_and_named_ports() -> None:
    (pod,) = load_text(POD, "pod.yaml")
    assert pod.namespace == "shop" and pod.labels == {"app": "web", "tier": "front"}
    assert pod.named_ports() == {"http": [80, "TCP"], "dns": [53, "UDP"]}
    again = resources.decode(resources.encode(pod))
    assert again.named_ports() == pod.named_ports()


@pytest.mark.parametrize("bad,words", [
    (POD.replace("containerPort: 80}", "containerPort: 0}"), "containerPort"),
    (POD.replace("protocol: UDP", "protocol: ICMP"), "protocol"),
    (POD.replace("kind: Pod", "kind: Pod\nbogus: 1"), "bogus"),
    (POD.replace("tier: front", "tier: 'not valid!'"), "labels"),
])
def test_bad_pods_are_rejected_with_the_field(bad: str, words: str) -> None:
    with pytest.raises(ResourceError) as info:
        load_text(bad, "pod.yaml")
    assert "pod.yaml" in str(info.value) and words in str(info.value)


def test_host_port_is_rejected_with_file_and_field() -> None:
    bad = POD.replace("{name: dns, containerPort: 53, protocol: UDP}",
                      "{name: dns, containerPort: 53, protocol: UDP, hostPort: 5353}")
    with pytest.raises(ResourceError) as info:
        load_text(bad, "pod.yaml")
    msg = str(info.value)
    assert "pod.yaml" in msg and "spec.containers[0].ports[1].hostPort" in msg
    assert "hostPort 5353 is not supported" in msg and "portmap" in msg


def test_host_ip_is_accepted_as_kubernetes_spells_it() -> None:
    ok = POD.replace("{containerPort: 9000}", "{containerPort: 9000, hostIP: 127.0.0.1, "
                     "hostPort: 0}")
    (pod,) = load_text(ok, "pod.yaml")
    assert pod.spec.containers[0].ports[2].host_ip == "127.0.0.1"
    assert b'"hostIP": "127.0.0.1"' in resources.encode(pod)
    with pytest.raises(ResourceError, match="hostIP.*not an IP address"):
        load_text(POD.replace("{containerPort: 9000}", "{containerPort: 9000, hostIP: x}"),
                  "pod.yaml")
