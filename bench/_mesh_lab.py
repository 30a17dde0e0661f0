"""The lab half of bench/clustermesh.py: propagation and connections on real datapaths.

A 2-cluster lab (``villi lab up --clusters 2``, one node each) in one ClusterMesh mode.
A client pod in c1 may only send to ``app=target`` pods of cluster c2 (egress policy by
the cluster label). Pods are then added in c2 one by one; for each, the time from
``villi lab pod add`` returning (the CNI ADD is done, the pod's entry is in c2's etcd)
until the client's TCP SYN is answered (an RST: the pod runs no
server, but the packet passed c1's policy, which needs c2's identity and ipcache entry
in c1's datapath) is the propagation delay; ``from_pod_add_start_s`` also counts the
whole ``villi lab pod add`` (a process start, namespace, veth, CNI ADD). It also
counts the TCP connections c2's etcd sees from c1's agent and from c1's kvstoremesh.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VILLI = [sys.executable, "-m", "villi.cli.main"]

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client-to-c2-targets, namespace: prop}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints:
    - matchLabels: {app: target, io.cilium.k8s.policy.cluster: c2}
"""


def _connect_once(netns: str, ip: str, timeout: float) -> bool:
    """True when the SYN was answered (connected or refused)."""
    from villi._nsenter import in_netns

    with in_netns(netns):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((ip, 80))
        return True
    except ConnectionRefusedError:
        return True
    except OSError as e:
        if e.errno == errno.ECONNREFUSED:
            return True
        return False
    finally:
        s.close()


def _pctl(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def _connections(netns: str, port: int) -> dict[int, int]:
    res = subprocess.run(["ip", "netns", "exec", netns, "ss", "-Htnp", "state",
                          "established", "dport", f"= :{port}"], capture_output=True,
                         text=True, check=True)
    out: dict[int, int] = {}
    for line in res.stdout.splitlines():
        m = re.search(r"pid=(\d+)", line)
        if m:
            out[int(m.group(1))] = out.get(int(m.group(1)), 0) + 1
    return out


def measure(mode: str, pods: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix=f"villi-bench-mesh-{mode}-"))
    env = dict(os.environ, VILLI_LAB_STATE=str(tmp / "state.json"),
               PYTHONPATH=str(ROOT / "src"))
    env.pop("VILLI_KVSTORE", None)

    def villi(*args: str) -> str:
        res = subprocess.run([*VILLI, *args], env=env, capture_output=True, text=True,
                             timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"villi {' '.join(args)}: {res.stdout}{res.stderr}")
        return res.stdout

    try:
        villi("lab", "up", "--clusters", "2", "--nodes", "1", "--clustermesh-mode", mode)
        state = json.loads((tmp / "state.json").read_text())
        policy = tmp / "policy.yaml"
        policy.write_text(POLICY)
        villi("apply", "-f", str(policy))
        villi("lab", "pod", "add", "prop/client", "--labels", "app=client")
        state = json.loads((tmp / "state.json").read_text())
        client = state["pods"]["prop/client"]
        delays: list[float] = []
        totals: list[float] = []
        for i in range(pods):
            t_start = time.monotonic()
            villi("lab", "pod", "add", f"c2:prop/t{i}", "--labels", "app=target")
            t0 = time.monotonic()
            state = json.loads((tmp / "state.json").read_text())
            ip = state["clusters"]["c2"]["pods"][f"prop/t{i}"]["ip"]
            while not _connect_once(client["netns"], ip, 0.05):
                if time.monotonic() - t0 > 30:
                    raise RuntimeError(f"c2 pod {ip} not reachable from c1 after 30 s")
            delays.append(time.monotonic() - t0)
            totals.append(time.monotonic() - t_start)
        port = int(state["clusters"]["c2"]["etcd_port"])
        agent_pid = state["nodes"][0]["pid"]
        agent_conns = _connections(state["nodes"][0]["netns"], port).get(agent_pid, 0)
        kvm = (state["processes"].get("kvstoremesh") or {}).get("pid")
        kvm_conns = _connections(state["underlay"]["netns"], port).get(kvm, 0) if kvm else 0
        return {"mode": mode, "pods": pods,
                "propagation_s": {"p50": _pctl(delays, 0.5), "p99": _pctl(delays, 0.99),
                                  "max": max(delays), "mean": sum(delays) / len(delays)},
                "from_pod_add_start_s": {"p50": _pctl(totals, 0.5), "p99": _pctl(totals, 0.99)},
                "c2_etcd_connections": {"c1_agent": agent_conns, "c1_kvstoremesh": kvm_conns}}
    finally:
        subprocess.run([*VILLI, "lab", "down"], env=env, capture_output=True, timeout=120)
