"""Run a real ``villi agent`` (and operator) in a throw-away node namespace.

For end-to-end tests of the agent API and the CNI plugin: the agent runs as its own
process inside a node netns created here, with an embedded store (or a given etcd URL)
and a state directory in a temp dir; ``close()`` stops it and removes the namespace,
the pinned maps and the temp dir.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from villi.datapath.loader import pin_root
from villi.datapath.node import remove_pins
from villi.netns import create_netns, delete_netns


def remove_node_cgroup(cluster: str, node: str) -> None:
    """Remove the node's service cgroup and its empty parents (villi/<cluster>)."""
    from villi.agent.services import node_cgroup
    from villi.datapath.cgroup import remove_cgroup

    path = node_cgroup(cluster, node)
    if path.exists():
        remove_cgroup(path)
    for parent in (path.parent, path.parent.parent):
        try:
            parent.rmdir()
        except OSError:
            break


class AgentProcess:
    """An agent in its own node namespace. Use as a context manager."""

    def __init__(self, *, pod_cidr: str | None = "10.66.0.0/24", kvstore: str | None = None,
                 extra_args: tuple[str, ...] = (), start: bool = True) -> None:
        self.suffix = uuid.uuid4().hex[:6]
        self.node = f"n{self.suffix}"
        self.cluster = f"t{self.suffix}"
        self.netns = f"villi-t{self.suffix}-node"
        self.tmp = Path(tempfile.mkdtemp(prefix="villi-agent-"))
        self.socket = self.tmp / "villi.sock"
        self.state_dir = self.tmp / "state"
        self.kvstore = kvstore or f"embedded://{self.tmp}/kv.db"
        self.pod_cidr = pod_cidr
        self.extra_args = extra_args
        self.log_path = self.tmp / "agent.log"
        self.proc: subprocess.Popen | None = None
        create_netns(self.netns, forwarding=True)
        if start:
            try:
                self.start()
            except BaseException:
                self.close()
                raise

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "villi.cli.main", "--netns", self.netns, "agent",
               "--node", self.node,
               "--cluster", self.cluster, "--kvstore", self.kvstore,
               "--api-socket", str(self.socket), "--state-dir", str(self.state_dir),
               "--metrics-port", "0", "--hubble-metrics-port", "0", "--lease-ttl", "5",
               "--ipam-node-update-rate", "1"]
        if self.pod_cidr:
            cmd += ["--pod-cidr", self.pod_cidr]
        return cmd + list(self.extra_args)

    def start(self, timeout: float = 60.0) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(),
                                     stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            if self.socket.exists() and self._healthy():
                return
            time.sleep(0.1)
        raise RuntimeError(f"agent did not become healthy in {timeout}s:\n{self.log()}")

    def _healthy(self) -> bool:
        from villi.agentclient import AgentClient
        from villi.errors import VilliError

        try:
            with AgentClient(str(self.socket), timeout=2) as c:
                return c.get("/v1/healthz").get("status") in ("ok", "degraded")
        except VilliError:
            return False

    def client(self):  # type: ignore[no-untyped-def]
        from villi.agentclient import AgentClient

        return AgentClient(str(self.socket))

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-4000:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop(signal.SIGKILL)
        delete_netns(self.netns)
        remove_pins(pin_root(self.cluster, self.node))
        remove_node_cgroup(self.cluster, self.node)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> AgentProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
