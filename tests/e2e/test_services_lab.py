"""Issue 7 end-to-end: ClusterIP services in a 2-node lab, through the socket LB.

Backends on both nodes, TCP and UDP through the VIP, spreading, scale down/up followed
within a second, ClientIP affinity, a service without backends refusing at once,
policy deciding by the backend's identity, and flows naming the service.
"""

from __future__ import annotations

import collections
import json
import sys
import time
from collections.abc import Iterator

import pytest

from tests.e2e import _lab
from tests.e2e._lab import running_lab

pytestmark = [pytest.mark.e2e, pytest.mark.etcd]

VILLI = [sys.executable, "-m", "villi.cli.main"]

WEB = """\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 80, protocol: TCP}
  - {name: echo, port: 82, targetPort: udp-echo, protocol: UDP}
"""
STICKY = """\
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: default}
spec:
  selector: {app: web}
  sessionAffinity: ClientIP
  ports:
  - {port: 8080, targetPort: 80}
"""
EMPTY = """\
apiVersion: v1
kind: Service
metadata: {name: nobody, namespace: default}
spec:
  selector: {app: nothing-matches}
  ports:
  - {port: 80}
"""
ONLY_CLIENT = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-only-client, namespace: default}
spec:
  endpointSelector:
    matchLabels: {app: web}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: client}
"""


class Lab(_lab.Lab):
    """The lab driver plus the service views these tests read."""

    def services(self) -> dict[str, dict]:
        return {s["name"]: s for s in json.loads(self.ok("get", "services", "-o", "json"))}

    def backends(self, name: str) -> list[int]:
        """How many backends each node's agent has for ``name`` (direct API calls, so
        the measurement is not the CLI's start-up time)."""
        from villi.lab._api import agent_call

        state = self.state
        counts = []
        for node in state["nodes"]:
            svcs = {s["name"]: s for s in agent_call(node["socket"], "GET", "/v1/service")}
            counts.append(len(svcs[name]["ports"][0]["backends"]) if name in svcs else -1)
        return counts

    def vip(self, name: str, backends: int) -> str:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            svc = self.services().get(name)
            if svc and svc.get("clusterIP") and len(svc["ports"][0]["backends"]) == backends:
                return svc["clusterIP"]
            time.sleep(0.1)
        raise AssertionError(f"service {name} did not get {backends} backends: "
                             f"{self.services().get(name)}")

    def curl(self, pod: str, url: str, timeout: float = 2) -> str | None:
        res = self.run("lab", "exec", pod, "--", "curl", "-s", "-m", str(timeout), url)
        return res.stdout.strip() if res.returncode == 0 else None

    def probe_detail(self, src: str, dst: str, port: str,
                     timeout: float = 1.0) -> tuple[bool, str]:
        res = self.run("lab", "probe", src, dst, port, "--timeout", str(timeout))
        return res.returncode == 0, res.stdout + res.stderr


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(tmp_path_factory, "svclab", "--nodes", "2", lab_class=Lab) as lab:
        assert isinstance(lab, Lab)
        lab.ok("lab", "pod", "add", "default/web-1", "--node", "1", "--labels", "app=web",
               "--serve", "80/tcp,udp-echo=82/udp", "--http-reply", "web-1")
        lab.ok("lab", "pod", "add", "default/web-2", "--node", "2", "--labels", "app=web",
               "--serve", "80/tcp,udp-echo=82/udp", "--http-reply", "web-2")
        lab.ok("lab", "pod", "add", "default/client", "--node", "1", "--labels", "app=client")
        lab.ok("lab", "pod", "add", "default/other", "--node", "2", "--labels", "app=other")
        lab.apply(WEB, "web")
        yield lab

def test_tcp_spreads_over_backends_on_both_nodes(lab: Lab) -> None:
    vip = lab.vip("web", 2)
    for client in ("default/client", "default/other"):   # one on each node
        seen = collections.Counter(lab.curl(client, f"http://{vip}/") for _ in range(12))
        assert set(seen) == {"web-1", "web-2"}, seen


def test_udp_through_the_vip(lab: Lab) -> None:
    vip = lab.vip("web", 2)
    ok, out = lab.probe_detail("default/other", vip, "82/udp")
    assert ok, out


def test_scale_down_and_up_followed_within_a_second(lab: Lab) -> None:
    vip = lab.vip("web", 2)
    lab.ok("lab", "pod", "del", "default/web-2")
    t0 = time.monotonic()
    while lab.backends("web") != [1, 1]:
        assert time.monotonic() - t0 < 1.0, "scale-down not followed within 1 s"
        time.sleep(0.02)
    assert {lab.curl("default/client", f"http://{vip}/") for _ in range(6)} == {"web-1"}
    lab.ok("lab", "pod", "add", "default/web-2", "--node", "2", "--labels", "app=web",
           "--serve", "80/tcp,udp-echo=82/udp", "--http-reply", "web-2")
    t0 = time.monotonic()
    while lab.backends("web") != [2, 2]:
        assert time.monotonic() - t0 < 1.0, "scale-up not followed within 1 s"
        time.sleep(0.02)
    seen = {lab.curl("default/client", f"http://{vip}/") for _ in range(12)}
    assert seen == {"web-1", "web-2"}


def test_client_ip_affinity(lab: Lab) -> None:
    lab.apply(STICKY, "sticky")
    vip = lab.vip("sticky", 2)
    seen = {lab.curl("default/client", f"http://{vip}:8080/") for _ in range(8)}
    assert len(seen) == 1 and None not in seen, seen
    # Without it, web's backends belong to one service only (flows name one service).
    lab.apply(STICKY, "sticky", delete=True)


def test_service_without_backends_refuses_at_once(lab: Lab) -> None:
    lab.apply(EMPTY, "nobody")
    vip = lab.vip("nobody", 0)
    t0 = time.monotonic()
    ok, out = lab.probe_detail("default/client", vip, "80/tcp", timeout=5)
    assert not ok and "refused" in out.lower(), out
    assert time.monotonic() - t0 < 3.0      # the CLI's own start-up included
    # The refusal is visible: a drop flow naming the service and the reason.
    out = lab.ok("observe", "--verdict", "DROPPED", "--to-ip", vip, "-o", "json")
    flows = [json.loads(line)["flow"] for line in out.splitlines() if line.strip()]
    assert any(f["drop_reason_desc"] == "SERVICE_BACKEND_NOT_FOUND"
               and f.get("destination_service", {}).get("name") == "nobody" for f in flows)


def test_policy_decides_by_backend_identity_and_flows_name_the_service(lab: Lab) -> None:
    vip = lab.vip("web", 2)
    lab.apply(ONLY_CLIENT, "policy")
    deadline = time.monotonic() + 10
    while lab.curl("default/other", f"http://{vip}/", timeout=1) is not None:
        assert time.monotonic() < deadline, "policy not enforced through the VIP"
    assert lab.curl("default/client", f"http://{vip}/") in ("web-1", "web-2")
    out = lab.ok("observe", "--to-port", "80", "--last", "200", "-o", "json")
    flows = [json.loads(line)["flow"] for line in out.splitlines() if line.strip()]
    named = [f for f in flows if f.get("destination_service", {}).get("name") == "web"]
    assert named, "no flow names the service"
    dropped = [f for f in named if f["verdict"] == "DROPPED"]
    assert dropped and all(f["source"].get("pod_name") == "other" for f in dropped)
    # The service filters select exactly the flows to (and from) the service, on
    # every node, and a service that had no traffic selects nothing.
    out = lab.ok("observe", "--to-service", "default/web", "--last", "200", "-o", "json")
    to_web = [json.loads(line)["flow"] for line in out.splitlines() if line.strip()]
    assert to_web and all(f["destination_service"]["name"] == "web" for f in to_web)
    assert any(f["verdict"] == "DROPPED" and f["source"].get("pod_name") == "other"
               for f in to_web)
    out = lab.ok("observe", "--from-service", "web", "--last", "200", "-o", "json")
    from_web = [json.loads(line)["flow"] for line in out.splitlines() if line.strip()]
    assert from_web and all(f["source_service"]["name"] == "web" for f in from_web)
    assert lab.ok("observe", "--service", "default/nobody-else", "--to-port", "80").strip() == ""
    lab.apply(ONLY_CLIENT, "policy", delete=True)
