"""Issue 4 acceptance with a real CNI client: podman (CNI backend) → villi-cni → agent.

Containers get IPs from the agent's pool, reach each other, a policy applied with
`villi apply` is enforced between them, and `podman rm` releases everything.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e._cluster import eventually, villi
from villi.testing.agent import AgentProcess
from villi.testing.podman import Podman, available

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(available() is not None,
                                                  reason=str(available()))]

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: web-from-friends
  namespace: default
spec:
  endpointSelector:
    matchLabels:
      app: web
  ingress:
  - fromEndpoints:
    - matchLabels:
        role: friend
    toPorts:
    - ports:
      - port: "80"
        protocol: TCP
"""


def http_ok(pm: Podman, client: str, ip: str) -> bool:
    res = pm.exec(client, "sh", "-c",
                  f"printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {ip} 80")
    return res.returncode == 0 and "200 OK" in res.stdout


PODS = """\
apiVersion: v1
kind: Pod
metadata: {name: web, labels: {app: web}}
spec:
  containers:
  - {name: httpd, image: localhost/villi-busybox, ports: [{name: http, containerPort: 80}]}
---
apiVersion: v1
kind: Pod
metadata: {name: friend, labels: {role: friend}}
spec:
  containers: [{name: c, image: localhost/villi-busybox}]
---
apiVersion: v1
kind: Pod
metadata: {name: stranger, labels: {role: stranger}}
spec:
  containers: [{name: c, image: localhost/villi-busybox}]
"""


@pytest.fixture(scope="module")
def env() -> Iterator[tuple[AgentProcess, Podman]]:
    with AgentProcess(pod_cidr="10.70.0.0/24") as agent, Podman(str(agent.socket)) as pm:
        yield agent, pm


def test_podman_containers_get_ips_and_connect(env: tuple[AgentProcess, Podman]) -> None:
    agent, pm = env
    web = pm.start("web", "httpd", "-f", "-p", "80", "-h", "/www")
    pm.start("friend", "sleep", "600")
    pm.start("stranger", "sleep", "600")
    assert web.startswith("10.70.0.")
    with agent.client() as c:
        eps = {e["podName"]: e for e in c.get("/v1/endpoint")}
    assert set(eps) >= {"web", "friend", "stranger"}
    assert eps["web"]["ipv4"] == web
    assert http_ok(pm, "friend", web) and http_ok(pm, "stranger", web)


def test_policy_enforced_between_containers(env: tuple[AgentProcess, Podman],
                                            tmp_path: Path) -> None:
    agent, pm = env
    web = pm.ip("web")
    # podman names the pod after the container (K8S_POD_NAME); Pod resources applied
    # with villi give the running containers their labels, as an API server would.
    pods = tmp_path / "pods.yaml"
    pods.write_text(PODS)
    res = villi("apply", "-f", str(pods), kvstore=agent.kvstore)
    assert res.returncode == 0, res.stderr
    with agent.client() as c:
        assert eventually(lambda: {e["podName"]: e["labels"] for e in c.get("/v1/endpoint")}
                          .get("web") == {"app": "web"})
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    res = villi("apply", "-f", str(path), kvstore=agent.kvstore)
    assert res.returncode == 0, res.stderr
    assert eventually(lambda: not http_ok(pm, "stranger", web), timeout=15)
    assert http_ok(pm, "friend", web)


def test_podman_rm_releases_everything(env: tuple[AgentProcess, Podman]) -> None:
    agent, pm = env
    for name in ("web", "friend", "stranger"):
        pm.remove(name)
    with agent.client() as c:
        assert c.get("/v1/endpoint") == []
        assert c.get("/v1/healthz")["ipam"]["allocated"] == 0
