"""A node datapath without the kernel: dict-backed maps and fake veths.

``FakeNodeDatapath`` has the maps and attach calls of ``villi.datapath.node.NodeDatapath``
(endpoints, ipcache, policy, guarded; ``attach``), each map a :class:`DictMap` that keeps
the same ctypes keys and values the kernel would, compared by their bytes. With
:class:`FakePodLinks` in place of the netlink veth work, the real
``EndpointManager`` — and through it the agent's endpoint lifecycle and policy writes —
runs in unit tests without root. ``fail_on`` makes a chosen map operation fail once, to
test rollback.
"""

from __future__ import annotations

import ctypes
import itertools
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Generic, TypeVar

from villi.datapath.compiler import NodeConfig
from villi.errors import MapError
from villi.netns.veth import PodLink

K = TypeVar("K", bound=ctypes.Structure)
V = TypeVar("V", bound=ctypes.Structure)


class DictMap(Generic[K, V]):
    """A BPF hash map's Python face (``TypedMap``'s methods) over a dict."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._items: dict[bytes, tuple[K, V]] = {}
        self.fail_next: str | None = None   # "update" or "delete": fail that call once

    def _check(self, op: str) -> None:
        if self.fail_next == op:
            self.fail_next = None
            raise MapError(f"{self.name}: injected {op} failure")

    def lookup(self, key: K) -> V | None:
        item = self._items.get(bytes(key))
        return item[1] if item is not None else None

    def update(self, key: K, value: V, flags: int = 0) -> None:
        self._check("update")
        self._items[bytes(key)] = (_copy(key), _copy(value))

    def update_many(self, items: Iterable[tuple[K, V]]) -> None:
        for key, value in items:
            self.update(key, value)

    def delete(self, key: K) -> bool:
        self._check("delete")
        return self._items.pop(bytes(key), None) is not None

    def keys(self) -> list[K]:
        return [k for k, _ in self._items.values()]

    def items(self) -> list[tuple[K, V]]:
        return list(self._items.values())

    def clear(self) -> int:
        n = len(self._items)
        self._items.clear()
        return n

    def __len__(self) -> int:
        return len(self._items)


def _copy(value: Any) -> Any:
    return type(value).from_buffer_copy(bytes(value))


class FakeNodeDatapath:
    """The maps and attachments of one node, in memory."""

    def __init__(self, cluster: str = "test", node: str = "n1",
                 config: NodeConfig | None = None) -> None:
        self.cluster, self.node = cluster, node
        self.config = config or NodeConfig()
        self.pin_dir = Path("/nonexistent/villi-fake") / cluster / node
        self.ipcache: DictMap[Any, Any] = DictMap("villi_ipcache")
        self.guarded: DictMap[Any, Any] = DictMap("villi_guarded")
        self.endpoints: DictMap[Any, Any] = DictMap("villi_endpoints")
        self.policy: DictMap[Any, Any] = DictMap("villi_policy")
        self.attached: set[int] = set()
        self.netdevs: set[int] = set()
        self.closed = False

    def attach(self, ifindex: int, netns: str | None = None) -> None:
        self.attached.add(ifindex)

    def attach_netdev(self, ifindex: int, netns: str | None = None) -> None:
        self.netdevs.add(ifindex)

    def detach(self, ifindex: int, netns: str | None = None) -> None:
        self.attached.discard(ifindex)

    def metrics_totals(self) -> dict[tuple[int, int], tuple[int, int]]:
        return {}

    def events_lost(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True


class FakePodLinks:
    """Veth pairs that exist only in this object (``EndpointManager(links=...)``)."""

    def __init__(self) -> None:
        self.links: dict[tuple[str | None, str], PodLink] = {}
        self._index = itertools.count(100)
        self.fail_create: Exception | None = None

    def create(self, *, host_ifname: str, host_netns: str | None, pod_netns: str,
               pod_ifname: str, ipv4: str) -> PodLink:
        if self.fail_create is not None:
            exc, self.fail_create = self.fail_create, None
            raise exc
        n = next(self._index)
        link = PodLink(host_ifname=host_ifname, host_ifindex=n,
                       host_mac=f"02:00:00:00:{n >> 8 & 0xff:02x}:{n & 0xff:02x}",
                       pod_ifname=pod_ifname, pod_ifindex=n + 10_000,
                       pod_mac=f"02:00:00:01:{n >> 8 & 0xff:02x}:{n & 0xff:02x}", ipv4=ipv4)
        self.links[(host_netns, host_ifname)] = link
        return link

    def delete(self, ifname: str, netns: str | None = None) -> bool:
        return self.links.pop((netns, ifname), None) is not None

    def info(self, ifname: str, netns: str | None = None) -> tuple[int, str] | None:
        link = self.links.get((netns, ifname))
        return (link.host_ifindex, link.host_mac) if link is not None else None


__all__ = ["DictMap", "FakeNodeDatapath", "FakePodLinks"]
