"""The agent's writes of cluster state, all under its lease, each one timed.

Node entry, pod (ipcache) entries and identity references go to the store through
here, with the key and value shapes of ``villi.kvstore.schema``; the duration and
outcome of every write lands in ``villi_kvstore_operations_duration_seconds``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar

from villi.endpoint.manager import Endpoint
from villi.identity.allocator import ref_key
from villi.identity.labels import LabelSet
from villi.kvstore import LeaseID, Store
from villi.kvstore.schema import IpcacheEntry, NodeEntry, ipcache_key, node_key, usage_key

T = TypeVar("T")


class Lease(Protocol):
    """The agent's current lease (``villi.kvstore.LeaseKeeper``; it changes when the
    old one expired and a new one was granted)."""

    @property
    def lease(self) -> LeaseID | None: ...


def ipcache_entry(ep: Endpoint, node: str, node_ip: str | None) -> IpcacheEntry:
    """What every node learns of a local endpoint."""
    return IpcacheEntry(identity=ep.identity, node=node, node_ip=node_ip,
                        namespace=ep.namespace, pod_name=ep.pod_name, endpoint_id=ep.id,
                        labels=ep.labels,
                        named_ports={n: (int(p), str(pr))
                                     for n, (p, pr) in ep.named_ports.items()})


class StatePublisher:
    def __init__(self, store: Store, lease: Lease, node: str, node_ip: str | None,
                 ops_histogram: Any = None) -> None:
        self.store = store
        self.lease = lease
        self.node = node
        self.node_ip = node_ip
        self.ops_histogram = ops_histogram   # set once the agent's metrics exist

    async def _timed(self, action: str, op: Awaitable[T]) -> T:
        """Run a kvstore operation, recording its duration and outcome."""
        t0 = time.perf_counter()
        outcome = "success"
        try:
            return await op
        except BaseException:
            outcome = "fail"
            raise
        finally:
            if self.ops_histogram is not None:
                self.ops_histogram.labels(action, outcome).observe(time.perf_counter() - t0)

    async def node_entry(self, entry: NodeEntry) -> None:
        await self._timed("update", self.store.put(node_key(self.node), entry.encode(),
                                                   lease=self.lease.lease))

    async def usage(self, report: bytes) -> None:
        """This node's IPAM usage report (``villi.ipam.usage``), under the lease."""
        await self._timed("update", self.store.put(usage_key(self.node), report,
                                                   lease=self.lease.lease))

    async def endpoint(self, ep: Endpoint) -> None:
        entry = ipcache_entry(ep, self.node, self.node_ip)
        await self._timed("update", self.store.put(ipcache_key(ep.ipv4), entry.encode(),
                                                   lease=self.lease.lease))

    async def unpublish_endpoint(self, ip: str) -> None:
        await self._timed("delete", self.store.delete(ipcache_key(ip)))

    async def identity_ref(self, labels: LabelSet) -> None:
        """This node's reference on an identity (re-written after a lease loss)."""
        await self.store.put(ref_key(labels, self.node), b"", lease=self.lease.lease)


__all__ = ["StatePublisher", "ipcache_entry"]
