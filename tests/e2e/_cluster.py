"""Helpers for end-to-end tests that drive a real agent through the CNI plugin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from villi.netns import create_netns, delete_netns
from villi.testing.agent import AgentProcess
from villi.testing.topology import start_echo

VENV_BIN = Path(sys.executable).parent
CNI = str(VENV_BIN / "villi-cni")
VILLI = str(VENV_BIN / "villi")


@dataclass
class CniPod:
    name: str
    namespace: str
    netns: str
    container_id: str
    result: dict
    servers: list[subprocess.Popen] = field(default_factory=list)

    @property
    def ip(self) -> str:
        return self.result["ips"][0]["address"].split("/")[0]


def cni_call(agent: AgentProcess, command: str, *, container_id: str, netns: str,
             ifname: str = "eth0", args: str = "", config: dict | None = None,
             timeout: float = 30) -> tuple[int, dict]:
    """Exec villi-cni exactly as a runtime would; returns (exit code, parsed stdout)."""
    conf = {"cniVersion": "1.0.0", "name": "villi", "type": "villi-cni",
            "agentSocket": str(agent.socket)}
    conf.update(config or {})
    env = dict(os.environ, CNI_COMMAND=command, CNI_CONTAINERID=container_id,
               CNI_NETNS=netns, CNI_IFNAME=ifname, CNI_PATH=str(VENV_BIN), CNI_ARGS=args)
    res = subprocess.run([CNI], input=json.dumps(conf), env=env, capture_output=True,
                         text=True, timeout=timeout)
    out = json.loads(res.stdout) if res.stdout.strip() else {}
    return res.returncode, out


def add_pod(agent: AgentProcess, name: str, *, namespace: str = "default",
            labels: dict[str, str] | None = None, serve: tuple[str, ...] = ()) -> CniPod:
    netns = f"villi-t{agent.suffix}-{name}"
    create_netns(netns)
    cid = f"{name}-{agent.suffix}"
    lab = ",".join(f"{k}:{v}" for k, v in (labels or {}).items())
    args = f"K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}"
    if lab:
        args += f";VILLI_LABELS={lab}"
    code, out = cni_call(agent, "ADD", container_id=cid, netns=f"/var/run/netns/{netns}",
                         args=args)
    if code != 0:
        delete_netns(netns)
        raise AssertionError(f"CNI ADD of {name} failed ({code}): {out}\n{agent.log()}")
    pod = CniPod(name, namespace, netns, cid, out)
    if serve:
        pod.servers.append(start_echo(netns, serve))
    return pod


def remove_pod(agent: AgentProcess, pod: CniPod) -> None:
    for proc in pod.servers:
        proc.kill()
        proc.wait()
    cni_call(agent, "DEL", container_id=pod.container_id,
             netns=f"/var/run/netns/{pod.netns}")
    delete_netns(pod.netns)


def villi(*args: str, kvstore: str | None = None) -> subprocess.CompletedProcess:
    cmd = [VILLI] + (["--kvstore", kvstore] if kvstore else []) + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def eventually(check: Callable[[], bool], timeout: float = 10.0, interval: float = 0.1) -> bool:
    """Poll ``check`` until it holds or ``timeout`` passes (policy propagation is async)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()
