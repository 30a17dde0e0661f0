"""A one-node topology in throw-away namespaces: a node netns, pods, the datapath.

Used by the end-to-end tests and the single-node demo. Every name carries a random
suffix so two runs never collide; ``close()`` (or leaving the ``with`` block) removes
the namespaces, the echo servers and the pinned maps, even after a failure.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from villi.datapath.compiler import NodeConfig
from villi.datapath.loader import pin_root
from villi.datapath.node import NodeDatapath, remove_pins
from villi.endpoint.manager import Endpoint, EndpointManager
from villi.netns import create_netns, delete_netns


@dataclass
class Pod:
    name: str
    netns: str
    endpoint: Endpoint
    servers: list[subprocess.Popen] = field(default_factory=list)

    @property
    def ip(self) -> str:
        return self.endpoint.ipv4


class SingleNode:
    """A node namespace with pods plugged in through villi's datapath."""

    CLUSTER = "test"

    def __init__(self, config: NodeConfig | None = None, prefix: str = "villi-t") -> None:
        self.suffix = uuid.uuid4().hex[:6]
        self.node_name = f"n{self.suffix}"
        self.prefix = prefix
        self.node_netns = f"{prefix}{self.suffix}-node"
        self.state_dir = Path(tempfile.mkdtemp(prefix="villi-test-"))
        self.pods: dict[str, Pod] = {}
        self._next_ip = 10
        self._next_id = 1
        create_netns(self.node_netns, forwarding=True)
        try:
            self.datapath = NodeDatapath(self.CLUSTER, self.node_name, config or NodeConfig())
            self.manager = EndpointManager(self.datapath, node_netns=self.node_netns,
                                           state_dir=self.state_dir)
        except BaseException:
            self.close()
            raise

    def add_pod(self, name: str, identity: int, serve: tuple[str, ...] = ()) -> Pod:
        netns = f"{self.prefix}{self.suffix}-{name}"
        create_netns(netns)
        ip = f"10.199.{int(self.suffix[:2], 16)}.{self._next_ip}"
        self._next_ip += 1
        ep = self.manager.create(endpoint_id=self._next_id, ipv4=ip, netns=netns,
                                 identity=identity, pod_name=name)
        self._next_id += 1
        pod = Pod(name, netns, ep)
        self.pods[name] = pod
        if serve:
            pod.servers.append(start_echo(netns, serve))
        return pod

    def close(self) -> None:
        for pod in self.pods.values():
            for proc in pod.servers:
                proc.kill()
                proc.wait()
            delete_netns(pod.netns)
        self.pods.clear()
        delete_netns(self.node_netns)
        dp = getattr(self, "datapath", None)
        if dp is not None:
            dp.close()
        remove_pins(pin_root(self.CLUSTER, self.node_name))
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> SingleNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_echo(netns: str, ports: tuple[str, ...]) -> subprocess.Popen:
    """Start villi's echo server in ``netns`` and wait until it listens."""
    proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-m",
                             "villi.lab.echo", *ports], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    proc.stdout.close()  # the server prints nothing after "ready"
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"echo server in {netns} did not start")
    return proc
