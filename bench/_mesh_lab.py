"""The lab half of bench/clustermesh.py: propagation and connections on real datapaths.

A 2-cluster lab (``villi lab up --clusters 2``, one node each) in one ClusterMesh mode.
A client pod in c1 may only send to ``app=target`` pods of cluster c2 (egress policy by
the cluster label). Pods are then added in c2 one by one; for each, the propagation
delay runs from the moment its ipcache entry is written in c2's etcd (seen by a watch
on c2's etcd) until the c1 client's TCP SYN to it is answered (an RST: the pod runs no
server, but the packet passed c1's egress policy, which needs c2's identity and ipcache
entry in c1's datapath — through c1's kvstoremesh and etcd, or directly). It also
counts the TCP connections c2's etcd sees from c1's agent and from c1's kvstoremesh.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
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


class IpcacheWatch:
    """Watches c2's etcd (from the underlay namespace, in a thread of its own) and
    records when each pod's ipcache entry was written there."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state
        self.seen: dict[str, float] = {}
        self.cond = threading.Condition()
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._thread.start()
        if not self.ready.wait(30):
            raise RuntimeError("could not watch c2's etcd")

    def _run(self) -> None:
        from villi._nsenter import in_netns

        with in_netns(self.state["underlay"]["netns"]):
            asyncio.run(self._watch())

    async def _watch(self) -> None:
        from villi.kvstore import EventType, open_store
        from villi.kvstore.tls import KvstoreTLS

        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        tls = KvstoreTLS.from_dict(self.state.get("kvstore_tls"))
        url = self.state["clusters"]["c2"]["kvstore"]
        prefix = "villi/state/ip/v1/"
        async with open_store(url, tls=tls) as store:
            rev = (await store.list(prefix)).revision
            self.ready.set()
            try:
                async for event in store.watch(prefix, rev + 1):
                    if event.type is EventType.PUT:
                        with self.cond:
                            self.seen.setdefault(event.key[len(prefix):], time.monotonic())
                            self.cond.notify_all()
            except asyncio.CancelledError:
                pass

    def wait_new(self, known: set[str], timeout: float) -> tuple[str, float]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                new = [ip for ip in self.seen if ip not in known]
                if new:
                    return new[0], self.seen[new[0]]
                left = deadline - time.monotonic()
                if left <= 0 or not self.cond.wait(left):
                    raise RuntimeError("no new pod entry in c2's etcd")

    def stop(self) -> None:
        if self._loop is not None and self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(10)


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

    watch: IpcacheWatch | None = None
    try:
        villi("lab", "up", "--clusters", "2", "--nodes", "1", "--clustermesh-mode", mode)
        policy = tmp / "policy.yaml"
        policy.write_text(POLICY)
        villi("apply", "-f", str(policy))
        villi("lab", "pod", "add", "prop/client", "--labels", "app=client")
        state = json.loads((tmp / "state.json").read_text())
        client = state["pods"]["prop/client"]
        watch = IpcacheWatch(state)
        watch.start()
        delays: list[float] = []
        known: set[str] = set()
        for i in range(pods):
            add = subprocess.Popen([*VILLI, "lab", "pod", "add", f"c2:prop/t{i}", "--labels",
                                    "app=target"], env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
            # t0: the pod's ipcache entry is in c2's etcd (written during its CNI ADD)
            ip, t0 = watch.wait_new(known, 60)
            known.add(ip)
            while not _connect_once(client["netns"], ip, 0.02):
                if time.monotonic() - t0 > 30:
                    raise RuntimeError(f"c2 pod {ip} not reachable from c1 after 30 s")
            delays.append(time.monotonic() - t0)
            _, err = add.communicate(timeout=120)
            if add.returncode != 0:
                raise RuntimeError(f"lab pod add c2:prop/t{i}: {err}")
        state = json.loads((tmp / "state.json").read_text())
        port = int(state["clusters"]["c2"]["etcd_port"])
        agent_pid = state["nodes"][0]["pid"]
        agent_conns = _connections(state["nodes"][0]["netns"], port).get(agent_pid, 0)
        kvm = (state["processes"].get("kvstoremesh") or {}).get("pid")
        kvm_conns = _connections(state["underlay"]["netns"], port).get(kvm, 0) if kvm else 0
        return {"mode": mode, "pods": pods,
                "propagation_s": {"p50": _pctl(delays, 0.5), "p99": _pctl(delays, 0.99),
                                  "max": max(delays), "mean": sum(delays) / len(delays)},
                "c2_etcd_connections": {"c1_agent": agent_conns, "c1_kvstoremesh": kvm_conns}}
    finally:
        if watch is not None:
            watch.stop()
        subprocess.run([*VILLI, "lab", "down"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(tmp, ignore_errors=True)
