"""One node's datapath: its compiled programs, its pinned maps, its attachments.

``NodeDatapath`` is what the endpoint layer and the agent hold: it compiles and loads
``lxc.bpf.c`` for the node's settings, reuses the maps pinned under
``/sys/fs/bpf/villi/<cluster>/<node>/`` when they exist (so a restarted agent finds the
state the kernel kept enforcing), and attaches the programs to pod veths.
"""

from __future__ import annotations

import ctypes
import shutil
from pathlib import Path

from villi.datapath import abi, tc
from villi.datapath.compiler import DEFAULT_CACHE_DIR, NodeConfig, compile_program
from villi.datapath.loader import BpfObject, pin_root
from villi.datapath.maps import TypedMap
from villi.datapath.policycfg import U32 as CfgU32
from villi.datapath.policycfg import PolicyConfigMap
from villi.datapath.ringbuf import RingBuffer


class U32(ctypes.Structure):
    _fields_ = [("value", ctypes.c_uint32)]


class U64(ctypes.Structure):
    _fields_ = [("value", ctypes.c_uint64)]


class NodeDatapath:
    """Programs and maps of one node (one per agent)."""

    def __init__(self, cluster: str, node: str, config: NodeConfig | None = None,
                 *, cache_dir: Path = DEFAULT_CACHE_DIR) -> None:
        self.cluster = cluster
        self.node = node
        self.config = config or NodeConfig()
        self.pin_dir = pin_root(cluster, node)
        obj_path = compile_program("lxc", self.config, cache_dir=cache_dir)
        self.obj = BpfObject(obj_path, pin_root=self.pin_dir)
        self.from_pod = self.obj.program("from_pod")
        self.to_pod = self.obj.program("to_pod")
        self.from_netdev = self.obj.program("from_netdev")
        self.ipcache = TypedMap(self.obj.map("villi_ipcache"), abi.IpcacheKey, abi.IpcacheValue)
        self.guarded = TypedMap(self.obj.map("villi_guarded"), abi.GuardedKey, abi.IpcacheValue)
        self.endpoints = TypedMap(self.obj.map("villi_endpoints"), abi.EndpointKey,
                                  abi.EndpointValue)
        self.policy = TypedMap(self.obj.map("villi_policy"), abi.PolicyKey, abi.PolicyValue)
        self.ct = TypedMap(self.obj.map("villi_ct"), abi.CtKey, abi.CtValue)
        self.metrics = TypedMap(self.obj.map("villi_metrics"), U32, abi.MetricsValue)
        self.events_lost_map = TypedMap(self.obj.map("villi_events_lost"), U32, U64)
        self.policy_cfg = PolicyConfigMap(TypedMap(self.obj.map("villi_policy_cfg"), CfgU32,
                                                   CfgU32))
        self._events: RingBuffer | None = None

    # --- attachments ----------------------------------------------------------------
    def attach(self, ifindex: int, netns: str | None = None) -> None:
        """Put from_pod on tc ingress and to_pod on tc egress of a host-side veth."""
        tc.attach(ifindex, tc.TcHook.INGRESS, self.from_pod.fd, netns)
        tc.attach(ifindex, tc.TcHook.EGRESS, self.to_pod.fd, netns)

    def attach_netdev(self, ifindex: int, netns: str | None = None) -> None:
        """Put from_netdev on tc ingress of the node's underlay device (L7 redirects
        of traffic from other nodes)."""
        tc.attach(ifindex, tc.TcHook.INGRESS, self.from_netdev.fd, netns)

    def detach(self, ifindex: int, netns: str | None = None) -> None:
        tc.detach(ifindex, tc.TcHook.INGRESS, netns)
        tc.detach(ifindex, tc.TcHook.EGRESS, netns)

    # --- observation ----------------------------------------------------------------
    @property
    def events(self) -> RingBuffer:
        if self._events is None:
            self._events = RingBuffer(self.obj.map("villi_events"))
        return self._events

    def metrics_totals(self) -> dict[tuple[int, int], tuple[int, int]]:
        """{(reason, direction): (packets, bytes)} summed over CPUs, non-zero only."""
        out: dict[tuple[int, int], tuple[int, int]] = {}
        for key, per_cpu in self.metrics.items_percpu():
            pkts = sum(v.packets for v in per_cpu)
            if pkts:
                slot = key.value
                out[(slot >> 1, slot & 1)] = (pkts, sum(v.bytes for v in per_cpu))
        return out

    def events_lost(self) -> int:
        vals = self.events_lost_map.lookup_percpu(U32(0)) or []
        return sum(v.value for v in vals)

    # --- lifecycle ------------------------------------------------------------------
    def close(self) -> None:
        """Drop this process's handles; attached programs and pinned maps stay."""
        if self._events is not None:
            self._events.close()
            self._events = None
        for m in (self.ipcache, self.guarded, self.endpoints, self.policy, self.ct, self.metrics,
                  self.events_lost_map, self.policy_cfg.map):
            m.map.close()
        self.obj.close()

    def unpin(self) -> None:
        """Remove the node's pinned maps (after its veths are gone)."""
        remove_pins(self.pin_dir)


def remove_pins(pin_dir: Path) -> None:
    """Delete a pin directory and, when empty, its parents up to /sys/fs/bpf/villi."""
    if pin_dir.exists():
        shutil.rmtree(pin_dir, ignore_errors=True)
    parent = pin_dir.parent
    while parent.name and parent != Path("/sys/fs/bpf"):
        try:
            parent.rmdir()
        except OSError:
            break
        parent = parent.parent
