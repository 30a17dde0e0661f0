"""Issue 3 end-to-end: policy YAML applied with `villi apply` reaches real packets.

A real agent runs in a node namespace with the embedded store; pods come through the
real CNI plugin; `villi apply/delete` write to the same store; enforcement is checked
with real TCP connections. Label changes and policy deletion are followed.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e._cluster import CniPod, add_pod, eventually, remove_pod, villi
from villi.lab.probe import tcp_connect
from villi.testing.agent import AgentProcess

pytestmark = pytest.mark.e2e

CNP = textwrap.dedent("""\
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata:
      name: backend-allow-frontend
      namespace: default
    spec:
      endpointSelector:
        matchLabels:
          app: backend
      ingress:
      - fromEndpoints:
        - matchLabels:
            app: frontend
        toPorts:
        - ports:
          - port: "80"
            protocol: TCP
    """)

KNP = textwrap.dedent("""\
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata:
      name: db-allow-backend
      namespace: default
    spec:
      podSelector:
        matchLabels:
          app: db
      policyTypes: [Ingress]
      ingress:
      - from:
        - podSelector:
            matchLabels:
              app: backend
        ports:
        - protocol: TCP
          port: 81
    """)


class Cluster:
    def __init__(self, agent: AgentProcess, pods: dict[str, CniPod], tmp: Path) -> None:
        self.agent, self.pods, self.tmp = agent, pods, tmp

    def can(self, src: str, dst: str, port: int) -> bool:
        return tcp_connect(self.pods[src].netns, self.pods[dst].ip, port, timeout=0.5)

    def apply(self, name: str, text: str) -> None:
        path = self.tmp / name
        path.write_text(text)
        res = villi("apply", "-f", str(path), kvstore=self.agent.kvstore)
        assert res.returncode == 0, res.stderr

    def delete(self, name: str) -> None:
        res = villi("delete", "-f", str(self.tmp / name), kvstore=self.agent.kvstore)
        assert res.returncode == 0, res.stderr


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with AgentProcess() as agent:
        pods: dict[str, CniPod] = {}
        try:
            for name, app in (("frontend", "frontend"), ("backend", "backend"),
                              ("db", "db"), ("other", "other")):
                pods[name] = add_pod(agent, name, labels={"app": app},
                                     serve=("80/tcp", "81/tcp"))
            yield Cluster(agent, pods, tmp_path_factory.mktemp("policies"))
        finally:
            for pod in pods.values():
                remove_pod(agent, pod)


def test_no_policy_all_reach_all(cluster: Cluster) -> None:
    for src in ("frontend", "other", "db"):
        assert cluster.can(src, "backend", 80)
        assert cluster.can(src, "backend", 81)


def test_cnp_allows_only_frontend_to_port_80(cluster: Cluster) -> None:
    cluster.apply("cnp.yaml", CNP)
    assert eventually(lambda: not cluster.can("other", "backend", 80))
    assert cluster.can("frontend", "backend", 80)
    assert not cluster.can("frontend", "backend", 81)
    assert cluster.can("backend", "frontend", 80)  # egress of backend is not enforced


def test_knp_ingress_with_ports(cluster: Cluster) -> None:
    cluster.apply("knp.yaml", KNP)
    assert eventually(lambda: not cluster.can("frontend", "db", 81))
    assert cluster.can("backend", "db", 81)
    assert not cluster.can("backend", "db", 80)


def test_label_change_moves_identity(cluster: Cluster) -> None:
    other = cluster.pods["other"]
    with cluster.agent.client() as c:
        c.request("PATCH", f"/v1/endpoint/container-id:{other.container_id}",
                  params={"ifname": "eth0"}, json={"labels": {"app": "frontend"}})
    assert eventually(lambda: cluster.can("other", "backend", 80))
    with cluster.agent.client() as c:
        c.request("PATCH", f"/v1/endpoint/container-id:{other.container_id}",
                  params={"ifname": "eth0"}, json={"labels": {"app": "other"}})
    assert eventually(lambda: not cluster.can("other", "backend", 80))


def test_delete_policy_restores_access(cluster: Cluster) -> None:
    cluster.delete("cnp.yaml")
    assert eventually(lambda: cluster.can("other", "backend", 80))
    assert cluster.can("frontend", "backend", 81)
    cluster.delete("knp.yaml")
    assert eventually(lambda: cluster.can("frontend", "db", 81))


def test_get_commands_show_state(cluster: Cluster) -> None:
    res = villi("--agent-socket", str(cluster.agent.socket), "get", "endpoints")
    assert res.returncode == 0, res.stderr
    assert "ENDPOINT" in res.stdout and cluster.pods["backend"].ip in res.stdout
    res = villi("get", "identities", kvstore=cluster.agent.kvstore)
    assert res.returncode == 0 and "k8s:app=backend" in res.stdout
    res = villi("--agent-socket", str(cluster.agent.socket), "status", "--brief")
    assert res.stdout.strip() == "OK", res.stdout + res.stderr


def test_malformed_policy_applies_nothing(cluster: Cluster) -> None:
    bad = CNP.replace('port: "80"', 'port: "80000"')
    path = cluster.tmp / "bad.yaml"
    path.write_text(CNP.replace("backend-allow-frontend", "first") + "---\n" + bad)
    res = villi("apply", "-f", str(path), kvstore=cluster.agent.kvstore)
    assert res.returncode == 1
    assert "bad.yaml" in res.stderr and "document 2" in res.stderr and "port" in res.stderr
    res = villi("get", "policies", "-o", "json", kvstore=cluster.agent.kvstore)
    assert '"first"' not in res.stdout
