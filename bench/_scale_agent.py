"""One real ``villi agent`` in a node namespace syncing the whole cluster state.

The agent is the real program (``villi --netns … agent``, the real datapath loaded and
pinned, real netlink routes to every other node's pod CIDR over a dummy underlay
interface inside its namespace, etcd reached through its unix socket). Measured: time
to first ready (the agent serves its API only after the initial sync of nodes, ipcache,
identities and resources), the pinned ipcache map's entry count at that moment, RSS
against an agent of the same build on an empty store, CNI-style endpoint creation
(policy computed for a new pod against every policy and every remote pod), and the
latency of a policy change from the store write until the new key is in the kernel's
policy map, polled with a map lookup.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _scale_sessions import pct
from _scale_state import ClusterState, node_cidr

from villi import resources
from villi.agentclient import AgentClient
from villi.datapath import abi
from villi.datapath.loader import pin_root
from villi.datapath.maps import BpfMap, TypedMap
from villi.endpoint.policymap import kernel_key
from villi.netns import create_netns, delete_netns
from villi.policy.entry import Direction, Protocol
from villi.policy.loader import load_text
from villi.policy.mapstate import MapKey
from villi.testing.agent import AgentProcess

UNDERLAY_ADDR = "172.20.0.1/16"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _agent(kvstore: str) -> AgentProcess:
    agent = AgentProcess(pod_cidr=node_cidr(0), kvstore=kvstore, start=False,
                         extra_args=("--node-ip", UNDERLAY_ADDR.split("/")[0],
                                     "--neigh-gc-thresh", "auto"))
    try:
        for cmd in (["link", "add", "u0", "type", "veth", "peer", "name", "u1"],
                    ["addr", "add", UNDERLAY_ADDR, "dev", "u0"],
                    ["link", "set", "u1", "up"], ["link", "set", "u0", "up"]):
            subprocess.run(["ip", "-n", agent.netns, *cmd], check=True, capture_output=True)
    except BaseException:
        agent.close()
        raise
    return agent


def baseline_rss(kvstore: str) -> int:
    """RSS (KiB) of the same agent, fully started, on an empty cluster state."""
    agent = _agent(kvstore)
    try:
        agent.start(timeout=120)
        assert agent.proc is not None
        time.sleep(1.0)
        return rss_kib(agent.proc.pid)
    finally:
        agent.close()


def count_map(path: Path) -> int:
    m = BpfMap.open_pinned(path)
    try:
        return sum(1 for _ in m.keys_raw())
    finally:
        m.close()


def _pod_netns(agent: AgentProcess, i: int) -> str:
    return f"{agent.netns[:-5]}-p{i}"


def _policy(k: int, port: int) -> Any:
    (doc,) = load_text(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: "
        "{name: scale-change, namespace: ns0}\nspec:\n"
        "  endpointSelector: {matchLabels: {app: app0}}\n"
        "  ingress:\n  - fromEndpoints: [{matchLabels: {app: app1}}]\n"
        f"    toPorts: [{{ports: [{{port: \"{port}\", protocol: TCP}}]}}]\n", f"change-{k}")
    return doc


def run(kvstore: str, put: Callable[[str, bytes], object], state: ClusterState, *, local_pods: int,
              changes: int, timeout: float) -> dict[str, Any]:
    result: dict[str, Any] = {}
    agent = _agent(kvstore)
    pods: list[str] = []
    try:
        t0 = time.monotonic()
        agent.start(timeout=timeout)
        result["ready_s"] = time.monotonic() - t0
        assert agent.proc is not None
        pins = pin_root(agent.cluster, agent.node)
        t1 = time.monotonic()
        entries = count_map(pins / "villi_ipcache")
        result["ipcache_map_entries"] = entries
        result["ipcache_expected_min"] = state.size.pods + state.size.nodes - 1
        result["ipcache_complete_at_ready"] = entries >= result["ipcache_expected_min"]
        result["ipcache_count_s"] = time.monotonic() - t1
        result["ipcache_max_entries"] = BpfMap.open_pinned(pins / "villi_ipcache").max_entries
        result["rss_kib_ready"] = rss_kib(agent.proc.pid)
        with AgentClient(str(agent.socket), timeout=120) as client:
            result["health"] = client.get("/v1/healthz")
            adds = []
            ids = []
            for i in range(local_pods):
                name = _pod_netns(agent, i)
                create_netns(name)
                pods.append(name)
                t = time.monotonic()
                ep = client.request("POST", "/v1/endpoint", json={
                    "containerID": f"scale{i:04d}", "netns": f"/var/run/netns/{name}",
                    "ifname": "eth0", "namespace": "ns0", "podName": f"local-{i}",
                    "labels": {"app": f"app{i % 3}", "tier": ("fe", "be")[i % 3 % 2]}})
                adds.append(time.monotonic() - t)
                ids.append(int(ep["id"]))
            result["endpoint_add_s"] = adds
            policy_map = TypedMap(BpfMap.open_pinned(pins / "villi_policy"),
                                  abi.PolicyKey, abi.PolicyValue)
            per_ep: dict[int, int] = dict.fromkeys(ids, 0)
            for key in policy_map.keys():
                if key.endpoint_id in per_ep:
                    per_ep[key.endpoint_id] += 1
            result["policy_map_keys_per_endpoint"] = list(per_ep.values())
            result["policy_view_entries"] = [
                len(v["entries"]) for v in client.get("/v1/policy")["endpoints"].values()]

            # Policy change → kernel: the local app0 endpoint gets a new port each time.
            peer = state.identity_of(0, 1)
            latencies = []
            for k in range(changes):
                port = 20000 + k
                doc = _policy(k, port)
                want = kernel_key(ids[0], MapKey(identity=peer, direction=int(Direction.INGRESS),
                                                 protocol=int(Protocol.TCP), port=port,
                                                 prefix_bits=16))
                t = time.monotonic()
                put(resources.key_of(doc), resources.encode(doc))
                deadline = t + 30
                while policy_map.lookup(want) is None:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"policy change {k} not in the kernel after 30 s")
                    time.sleep(0.0005)
                latencies.append(time.monotonic() - t)
            result["policy_change_s"] = {"n": len(latencies), "p50": pct(latencies, 0.5),
                                         "p99": pct(latencies, 0.99), "max": max(latencies)}
            result["rss_kib_end"] = rss_kib(agent.proc.pid)
            for i in range(local_pods):
                client.request("DELETE", f"/v1/endpoint/container-id:scale{i:04d}")
    except BaseException:
        result["log_tail"] = agent.log()[-3000:]
        raise
    finally:
        agent.close()
        for name in pods:
            delete_netns(name)
    return result

