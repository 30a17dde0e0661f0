"""Throw-away veth topologies for the benchmarks: the same shape with and without villi.

Both builders make a node namespace and one namespace per pod, joined by veth pairs,
addressed the way villi addresses pods (``villi.netns.veth``): the pod holds its IP as
a /32 on ``eth0``, an on-link route to the gateway 169.254.1.1, a default route via it
and a permanent neighbour entry mapping the gateway to the host-side veth's MAC; the
node namespace holds a /32 route per pod through the host-side veth and forwards.

* ``PlainVeth`` builds that with ``ip`` alone: no BPF program anywhere, packets go
  pod -> node IP stack -> pod. It is the baseline.
* ``VilliNode`` builds it through villi's own ``EndpointManager`` (which also attaches
  ``from_pod``/``to_pod`` and fills the endpoint, ipcache and policy maps).

Every namespace name is ``villi-b<suffix>-<role>`` with a random suffix; every address
and route lives inside those namespaces, never in the root one. ``close()`` removes the
namespaces (and with them the veths and tc attachments), the processes started in
them and the pinned maps; it keeps going when one step fails and is safe to call twice.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from villi.datapath.compiler import NodeConfig
from villi.datapath.loader import pin_root
from villi.datapath.node import NodeDatapath, remove_pins
from villi.endpoint.manager import EndpointManager, host_ifname_for
from villi.netns import create_netns, delete_netns
from villi.netns.veth import GATEWAY_IPV4

PREFIX = "villi-b"
CLUSTER = "bench"


@dataclass
class BenchPod:
    name: str
    netns: str
    ip: str
    identity: int = 0
    endpoint_id: int = 0


@dataclass
class _Topology:
    """What both topologies share: names, pods, processes started inside, cleanup."""

    label: str
    suffix: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    pods: dict[str, BenchPod] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    _next_ip: int = 10
    _closed: bool = False

    @property
    def node_netns(self) -> str:
        return f"{PREFIX}{self.suffix}-node"

    def _pod_netns(self, name: str) -> str:
        return f"{PREFIX}{self.suffix}-{name}"

    def _new_ip(self) -> str:
        # 10.198.<suffix byte>.<n>: only ever configured inside our own namespaces.
        ip = f"10.198.{int(self.suffix[:2], 16)}.{self._next_ip}"
        self._next_ip += 1
        return ip

    def _create_netns(self, name: str, *, forwarding: bool = False) -> None:
        self.namespaces.append(name)  # recorded first: a half-made netns is removed too
        create_netns(name, forwarding=forwarding)

    def spawn(self, pod: str, argv: list[str], **kw: object) -> subprocess.Popen:
        """Start ``argv`` inside a pod's netns (``ip netns exec`` execs it: same pid)."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.pods[pod].netns, *argv],
                                **kw)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> list[str]:
        """Remove everything; returns the errors met on the way (never raises)."""
        if self._closed:
            return []
        self._closed = True
        errors: list[str] = []
        for proc in list(self.procs):
            try:
                self.stop(proc)
            except Exception as e:  # noqa: BLE001 - cleanup must go on
                errors.append(f"stop pid {proc.pid}: {e}")
        # Pods first, the node last (the host-side veths go with the pods' peers).
        for ns in reversed(self.namespaces):
            try:
                delete_netns(ns)
            except Exception as e:  # noqa: BLE001
                errors.append(f"delete netns {ns}: {e}")
        errors += self._close_extra()
        return errors

    def _close_extra(self) -> list[str]:
        return []


class PlainVeth(_Topology):
    """The baseline: the same namespaces, veths, addresses and routes; no BPF at all.

    Built with ``ip`` (each call under a timeout) rather than villi's helpers, so that
    the baseline shares no code with what it is compared against.
    """

    def __init__(self) -> None:
        super().__init__(label="plain")
        try:
            self._plain_netns(self.node_netns)
            _ip("netns", "exec", self.node_netns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        except BaseException:
            self.close()
            raise

    def _plain_netns(self, name: str) -> None:
        self.namespaces.append(name)
        _ip("netns", "add", name)
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("netns", "exec", name, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1")

    def add_pod(self, name: str, identity: int = 0) -> BenchPod:
        netns = self._pod_netns(name)
        self._plain_netns(netns)
        ip = self._new_ip()
        node = self.node_netns
        host = host_ifname_for(f"{netns}/eth0")
        _ip("-n", node, "link", "add", host, "mtu", "1500", "type", "veth", "peer", "name",
            "eth0", "mtu", "1500", "netns", netns)
        host_mac = json.loads(_ip("-n", node, "-j", "link", "show", host))[0]["address"]
        _ip("netns", "exec", node, "sysctl", "-qw", f"net.ipv6.conf.{host}.disable_ipv6=1")
        _ip("-n", node, "link", "set", host, "up")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "addr", "add", f"{ip}/32", "dev", "eth0")
        _ip("-n", netns, "route", "add", f"{GATEWAY_IPV4}/32", "dev", "eth0", "scope", "link")
        _ip("-n", netns, "route", "add", "default", "via", GATEWAY_IPV4, "dev", "eth0")
        _ip("-n", netns, "neigh", "add", GATEWAY_IPV4, "lladdr", host_mac, "dev", "eth0",
            "nud", "permanent")
        _ip("-n", node, "route", "add", f"{ip}/32", "dev", host, "scope", "link")
        bp = BenchPod(name, netns, ip, identity)
        self.pods[name] = bp
        return bp


def _ip(*argv: str, timeout: float = 10.0) -> str:
    """Run ``ip ARGV`` (or ``ip netns exec``); raise with its stderr when it fails."""
    res = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(argv)}: {res.stderr.strip()}")
    return res.stdout


class VilliNode(_Topology):
    """A node namespace whose pods are plugged in by villi's EndpointManager."""

    def __init__(self, label: str, config: NodeConfig) -> None:
        super().__init__(label=label)
        self.config = config
        self.node_name = f"b{self.suffix}"
        self.pin_dir = pin_root(CLUSTER, self.node_name)
        self.state_dir = Path(tempfile.mkdtemp(prefix="villi-bench-"))
        self.datapath: NodeDatapath | None = None
        self._next_id = 1
        try:
            self._create_netns(self.node_netns, forwarding=True)
            self.datapath = NodeDatapath(CLUSTER, self.node_name, config)
            self.manager = EndpointManager(self.datapath, node_netns=self.node_netns,
                                           state_dir=self.state_dir)
        except BaseException:
            self.close()
            raise

    def add_pod(self, name: str, identity: int) -> BenchPod:
        netns = self._pod_netns(name)
        self._create_netns(netns)
        ip = self._new_ip()
        ep = self.manager.create(endpoint_id=self._next_id, ipv4=ip, netns=netns,
                                 identity=identity, pod_name=name)
        self._next_id += 1
        bp = BenchPod(name, netns, ip, identity, ep.id)
        self.pods[name] = bp
        return bp

    def _close_extra(self) -> list[str]:
        errors: list[str] = []
        if self.datapath is not None:
            try:
                self.datapath.close()
            except Exception as e:  # noqa: BLE001
                errors.append(f"close datapath {self.node_name}: {e}")
        try:
            remove_pins(self.pin_dir)
        except Exception as e:  # noqa: BLE001
            errors.append(f"remove pins {self.pin_dir}: {e}")
        if self.pin_dir.exists():
            errors.append(f"pins left at {self.pin_dir}")
        shutil.rmtree(self.state_dir, ignore_errors=True)
        return errors


def wait_listening(netns: str, port: int, proto: str = "tcp", timeout: float = 5.0) -> None:
    """Wait until something in ``netns`` listens on ``port`` (``ss`` inside the netns)."""
    flag = "-Hltn" if proto == "tcp" else "-Hlun"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["ip", "netns", "exec", netns, "ss", flag, f"sport = :{port}"],
                             capture_output=True, text=True).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {proto}/{port} in {netns} after {timeout}s")
