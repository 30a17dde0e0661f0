"""Issue 4 end-to-end: villi-cni exec'd against a real agent, failures, restart.

Every failure case checks the CNI error code, that the message says what is wrong,
and that nothing is left behind: no veth in the node namespace, no endpoint, no IP
allocation, no policy or endpoint map entry.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.e2e._cluster import CniPod, add_pod, cni_call, eventually, remove_pod
from villi._nsenter import in_netns
from villi.datapath.maps import BpfMap
from villi.lab.probe import tcp_connect
from villi.netns import create_netns, delete_netns
from villi.netns._ipr import ipr_in
from villi.testing.agent import AgentProcess

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentProcess]:
    # A /29 pool: 6 usable addresses, so exhaustion is cheap to reach.
    with AgentProcess(pod_cidr="10.67.0.0/29") as ag:
        yield ag


def host_links(agent: AgentProcess) -> set[str]:
    with ipr_in(agent.netns) as ipr:
        return {link.get("ifname") for link in ipr.get_links()} - {"lo"}


def map_count(agent: AgentProcess, name: str) -> int:
    m = BpfMap.open_pinned(f"/sys/fs/bpf/villi/{agent.cluster}/{agent.node}/{name}")
    try:
        return sum(1 for _ in m.keys_raw())
    finally:
        m.close()


def snapshot(agent: AgentProcess) -> dict:
    with agent.client() as c:
        health = c.get("/v1/healthz")
        eps = c.get("/v1/endpoint")
    return {"links": host_links(agent), "endpoints": len(eps),
            "allocated": health["ipam"]["allocated"],
            "ep_map": map_count(agent, "villi_endpoints"),
            "policy_map": map_count(agent, "villi_policy")}


def test_add_check_del_version_status_gc(agent: AgentProcess) -> None:
    before = snapshot(agent)
    pod = add_pod(agent, "basic", labels={"app": "basic"})
    try:
        res = pod.result
        assert res["cniVersion"] == "1.0.0"
        host_if, pod_if = res["interfaces"]
        assert pod_if["name"] == "eth0" and pod_if["sandbox"].endswith(pod.netns)
        assert host_if["name"].startswith("lxc") and "sandbox" not in host_if
        assert res["ips"][0]["gateway"] == "169.254.1.1" and res["ips"][0]["interface"] == 1
        assert res["routes"] == [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]
        assert host_if["name"] in host_links(agent)
        netns = f"/var/run/netns/{pod.netns}"
        code, _ = cni_call(agent, "CHECK", container_id=pod.container_id, netns=netns,
                           config={"prevResult": res})
        assert code == 0
        code, out = cni_call(agent, "VERSION", container_id="", netns="")
        assert code == 0 and "1.1.0" in out["supportedVersions"]
        code, out = cni_call(agent, "STATUS", container_id="", netns="",
                             config={"cniVersion": "1.1.0"})
        assert code == 0, out
        # GC with the pod listed as valid keeps it; an empty list removes it.
        valid = [{"containerID": pod.container_id, "ifname": "eth0"}]
        code, _ = cni_call(agent, "GC", container_id="", netns="",
                           config={"cniVersion": "1.1.0", "cni.dev/valid-attachments": valid})
        assert code == 0 and snapshot(agent)["endpoints"] == before["endpoints"] + 1
        code, _ = cni_call(agent, "GC", container_id="", netns="",
                           config={"cniVersion": "1.1.0", "cni.dev/valid-attachments": []})
        assert code == 0 and snapshot(agent) == before
        # DEL after GC: already gone, still success (idempotent).
        for _ in range(2):
            code, _ = cni_call(agent, "DEL", container_id=pod.container_id, netns=netns)
            assert code == 0
    finally:
        delete_netns(pod.netns)
    assert snapshot(agent) == before


FAILURES = [
    # (name, kwargs for cni_call, expected code, words the message must contain)
    ("netns missing", dict(netns="/var/run/netns/villi-does-not-exist"), 3, "does not exist"),
    ("unknown cniVersion", dict(config={"cniVersion": "9.9.9"}), 1, "9.9.9"),
    ("bad type", dict(config={"type": "other"}), 7, "type"),
    ("missing container id", dict(container_id=""), 4, "CNI_CONTAINERID"),
    ("bad ifname", dict(ifname="a/b"), 4, "CNI_IFNAME"),
    ("bad labels", dict(args="VILLI_LABELS=nocolon"), 4, "VILLI_LABELS"),
    ("ipam section", dict(config={"ipam": {"type": "host-local"}}), 2, "ipam"),
    ("agent down", dict(config={"agentSocket": "/nonexistent/villi.sock",
                                "agentTimeout": 1}), 11, "not reachable"),
]


@pytest.mark.parametrize("name,kw,code,words", FAILURES, ids=[f[0] for f in FAILURES])
def test_add_failures_leave_nothing(agent: AgentProcess, name: str, kw: dict, code: int,
                                    words: str) -> None:
    before = snapshot(agent)
    netns = f"villi-t{agent.suffix}-f{uuid.uuid4().hex[:4]}"
    create_netns(netns)
    try:
        call = dict(container_id=f"fail-{uuid.uuid4().hex[:6]}", netns=f"/var/run/netns/{netns}")
        call.update(kw)
        got, out = cni_call(agent, "ADD", **call)
        assert got != 0 and out["code"] == code, out
        assert words.lower() in out["msg"].lower() + json.dumps(out.get("details", "")).lower()
    finally:
        delete_netns(netns)
    assert snapshot(agent) == before


def test_malformed_config(agent: AgentProcess) -> None:
    import os
    import subprocess

    from tests.e2e._cluster import CNI

    env = dict(os.environ, CNI_COMMAND="ADD", CNI_CONTAINERID="x", CNI_NETNS="/tmp",
               CNI_IFNAME="eth0", CNI_PATH="/")
    res = subprocess.run([CNI], input="{not json", env=env, capture_output=True, text=True)
    assert res.returncode != 0 and json.loads(res.stdout)["code"] == 6


def test_pool_exhausted_then_released(agent: AgentProcess) -> None:
    before = snapshot(agent)
    pods: list[CniPod] = []
    try:
        with agent.client() as c:
            free = c.get("/v1/healthz")["ipam"]["free"]
        for i in range(free):
            pods.append(add_pod(agent, f"fill{i}"))
        full = snapshot(agent)
        netns = f"villi-t{agent.suffix}-full"
        create_netns(netns)
        try:
            code, out = cni_call(agent, "ADD", container_id="one-too-many",
                                 netns=f"/var/run/netns/{netns}")
        finally:
            delete_netns(netns)
        assert code != 0 and out["code"] == 11 and "no free ipv4" in out["msg"].lower(), out
        assert snapshot(agent) == full
    finally:
        for pod in pods:
            remove_pod(agent, pod)
    assert snapshot(agent) == before


def test_agent_down_is_bounded() -> None:
    t0 = time.monotonic()
    with AgentProcess(start=False) as ag:
        netns = f"villi-t{ag.suffix}-x"
        create_netns(netns)
        try:
            code, out = cni_call(ag, "ADD", container_id="c", netns=f"/var/run/netns/{netns}",
                                 config={"agentTimeout": 2})
        finally:
            delete_netns(netns)
    assert code != 0 and out["code"] == 11 and "not reachable" in out["msg"]
    assert time.monotonic() - t0 < 10


def test_agent_restart_keeps_traffic_and_allocations(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Established connections survive a restart, IPs are not handed out twice and
    policy keeps being enforced while the agent is down."""
    from tests.e2e._cluster import villi

    with AgentProcess(pod_cidr="10.68.0.0/24") as ag:
        pods = [add_pod(ag, n, labels={"app": n}, serve=("80/tcp",))
                for n in ("client", "server", "stranger")]
        try:
            client, server, stranger = pods
            policy = tmp_path / "p.yaml"
            policy.write_text(
                "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n"
                "  name: server\n  namespace: default\nspec:\n  endpointSelector:\n"
                "    matchLabels: {app: server}\n  ingress:\n  - fromEndpoints:\n"
                "    - matchLabels: {app: client}\n")
            assert villi("apply", "-f", str(policy), kvstore=ag.kvstore).returncode == 0
            assert eventually(lambda: not tcp_connect(stranger.netns, server.ip, 80, 0.5))
            with in_netns(client.netns):
                conn = socket.create_connection((server.ip, 80), timeout=2)
            try:
                ag.stop()                                    # SIGTERM: agent gone
                assert not tcp_connect(stranger.netns, server.ip, 80, 0.5)
                assert tcp_connect(client.netns, server.ip, 80)
                conn.sendall(b"during\n")
                assert conn.recv(16) == b"during\n"
                ag.start()                                   # restores, reconciles
                conn.sendall(b"after\n")
                assert conn.recv(16) == b"after\n"
                assert not tcp_connect(stranger.netns, server.ip, 80, 0.5)
                with ag.client() as c:
                    eps = c.get("/v1/endpoint")
                assert sorted(e["ipv4"] for e in eps) == sorted(p.ip for p in pods)
                fresh = add_pod(ag, "fresh")
                pods.append(fresh)
                assert fresh.ip not in {p.ip for p in pods[:-1]}
            finally:
                conn.close()
        finally:
            for pod in pods:
                remove_pod(ag, pod)
