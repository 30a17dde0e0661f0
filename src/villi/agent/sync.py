"""Store → kernel loops of the agent: other nodes (routes) and every pod (ipcache).

Each loop follows one prefix with list-then-watch (``villi.kvstore.sync``), keeps the
last state it applied, and turns each change into the smallest kernel change: a route
replaced or deleted, an ipcache entry written or removed. A node whose lease expires
(its agent silent for the whole lease TTL, 15 min by default) or that is deleted on
purpose (``villi.operator.nodes``) disappears from the store, and with it from every
other node's routes and ipcache. While the store itself is unreachable nothing is
withdrawn: the kernel keeps the last state (fail-static).

:class:`StoreHealth` is the agent's view of the store's reachability, for
``/v1/healthz`` and ``villi status``: a watch that is retrying is not an error anyone
would otherwise see.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from villi.datapath import abi
from villi.endpoint.manager import ip_be
from villi.errors import IPAMError, NetnsError, SchemaError
from villi.kvstore import EventType, Store, WatchEvent, schema
from villi.kvstore.backoff import Backoff, BackoffPolicy, SleepFn, UniformSource
from villi.kvstore.schema import IpcacheEntry, NodeEntry
from villi.kvstore.sync import PrefixSync
from villi.netns import routes

if TYPE_CHECKING:
    from pyroute2 import IPRoute

log = logging.getLogger(__name__)


class IpcacheMap(Protocol):
    """The node's ipcache map (``NodeDatapath.ipcache``; a ``DictMap`` in tests)."""

    def update(self, key: Any, value: Any) -> None: ...
    def delete(self, key: Any) -> bool: ...


class HasIpcache(Protocol):
    @property
    def ipcache(self) -> IpcacheMap: ...


def _node_entry(event: WatchEvent) -> NodeEntry | None:
    if event.type is EventType.DELETE:
        return None
    try:
        return NodeEntry.decode(event.value, key=event.key)
    except IPAMError as e:
        log.warning("ignoring malformed node entry: %s", e)
        return None


def _ipcache_entry(event: WatchEvent) -> IpcacheEntry | None:
    if event.type is EventType.DELETE:
        return None
    try:
        return IpcacheEntry.decode(event.value, event.key)
    except SchemaError as e:
        log.warning("ignoring malformed ipcache entry: %s", e)
        return None


def _routing(entry: NodeEntry) -> tuple[Any, ...]:
    """What of a node entry the kernel cares about: its IP and pod CIDRs."""
    return entry.ipv4, entry.pod_cidrs


class NodeSync:
    """Routes to other nodes' pod CIDRs and ipcache entries for node IPs."""

    def __init__(self, store: Store, datapath: HasIpcache, self_name: str,
                 on_change: Callable[[], None] | None = None,
                 kernel: Callable[..., Awaitable[Any]] | None = None) -> None:
        self.kernel = kernel
        self.store = store
        self.datapath = datapath
        self.self_name = self_name
        self.nodes: dict[str, NodeEntry] = {}
        self._routes: dict[str, list[str]] = {}   # node -> pod CIDRs routed via it
        self.on_change = on_change
        self.sync = PrefixSync(store, schema.NODES)
        # One netlink socket for every route, opened by the first apply (on the kernel
        # thread, in the agent's namespace): a socket per route cost 60% more per node.
        self._ipr: IPRoute | None = None

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    def _netlink(self) -> IPRoute:
        if self._ipr is None:
            self._ipr = routes.open_netlink()
        return self._ipr

    async def run(self) -> None:
        async for event in self.sync:
            if self.kernel is not None:
                await self.kernel(self.apply, event)
            else:
                self.apply(event)

    def apply(self, event: WatchEvent) -> None:
        """Runs on the agent's kernel thread (routes go through netlink)."""
        name = schema.name_in(schema.NODES, event.key)
        data = _node_entry(event)
        old = self.nodes.get(name)
        if data is not None and old is not None and name in self._routes \
                and _routing(data) == _routing(old):
            # Only the IPAM usage changed (a report every --ipam-node-update-rate per
            # node): nothing to do in the kernel. Redoing the routes made every agent's
            # work grow with the cluster's report rate, i.e. with N (docs/scale.md).
            self.nodes[name] = data
            return
        old = self.nodes.pop(name, None)
        if old is not None and old.ipv4 is not None:
            self._set_node_ip(str(old.ipv4), None)
        for cidr in self._routes.pop(name, []):
            routes.delete_route(cidr, ipr=self._netlink())
        if data is not None:
            self.nodes[name] = data
            ip = str(data.ipv4) if data.ipv4 is not None else None
            if ip:
                ident = abi.ReservedIdentity.HOST if name == self.self_name \
                    else abi.ReservedIdentity.REMOTE_NODE
                self._set_node_ip(ip, int(ident))
            if name != self.self_name and ip:
                for net in data.pod_cidrs:
                    cidr = str(net)
                    try:
                        routes.replace_route(cidr, ip, ipr=self._netlink())
                        self._routes.setdefault(name, []).append(cidr)
                    except NetnsError as e:
                        log.warning("route to node %s: %s", name, e)

    def _set_node_ip(self, ip: str, identity: int | None) -> None:
        key = abi.IpcacheKey(prefixlen=32, addr=ip_be(ip))
        if identity is None:
            self.datapath.ipcache.delete(key)
        else:
            self.datapath.ipcache.update(key, abi.IpcacheValue(identity=identity))


class RawEntries(Mapping[str, IpcacheEntry]):
    """IP → ipcache entry, kept as the stored JSON bytes and decoded on access.

    An agent holds one entry per pod of the cluster; as dicts (labels, named ports)
    they cost about 2 KiB each, as the bytes they arrived in about 350 B
    (bench/scale.py, docs/scale.md). Readers (flow enrichment) touch few of them."""

    def __init__(self) -> None:
        self._raw: dict[str, bytes] = {}

    def set_raw(self, ip: str, raw: bytes) -> None:
        self._raw[ip] = bytes(raw)

    def __getitem__(self, ip: str) -> IpcacheEntry:
        return IpcacheEntry.decode(self._raw[ip], ip)

    def pop_raw(self, ip: str) -> bytes | None:
        return self._raw.pop(ip, None)

    def __contains__(self, ip: object) -> bool:
        return ip in self._raw

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)


class IpcacheSync:
    """Every pod's IP → identity, from the store into this node's ipcache map.

    Local endpoints are written by the endpoint manager directly (no round trip through
    the store); entries of other nodes come from here.
    """

    def __init__(self, store: Store, datapath: HasIpcache, self_name: str,
                 on_change: Callable[[str, IpcacheEntry | None], None] | None = None
                 ) -> None:
        self.store = store
        self.datapath = datapath
        self.self_name = self_name
        self.entries = RawEntries()
        # Recently removed entries, so flows of departed pods still carry names.
        self.departed: collections.OrderedDict[str, IpcacheEntry] = collections.OrderedDict()
        self.on_change = on_change
        self.sync = PrefixSync(store, schema.IPCACHE)

    async def run(self) -> None:
        async for event in self.sync:
            self.apply(event)

    def apply(self, event: WatchEvent) -> None:
        ip = schema.name_in(schema.IPCACHE, event.key)
        data = _ipcache_entry(event)
        raw = self.entries.pop_raw(ip)
        old = IpcacheEntry.decode(raw, ip) if raw is not None else None
        if old is not None and data is None:
            self.departed[ip] = old
            while len(self.departed) > 1024:
                self.departed.popitem(last=False)
        if data is None:
            if old is not None and old.node != self.self_name:
                self.datapath.ipcache.delete(abi.IpcacheKey(prefixlen=32, addr=ip_be(ip)))
        else:
            self.entries.set_raw(ip, event.value)
            if data.node != self.self_name:
                node_ip = data.node_ip
                self.datapath.ipcache.update(
                    abi.IpcacheKey(prefixlen=32, addr=ip_be(ip)),
                    abi.IpcacheValue(identity=data.identity,
                                     node_ip=ip_be(node_ip) if node_ip else 0))
        if self.on_change:
            self.on_change(ip, data)


#: Default of ``--kvstore-health-interval`` (s). Probing every 2 s cost etcd N/2
#: requests per second (10,000/s at 20,000 nodes: bench/scale.py); most are skipped anyway
#: (see :class:`StoreHealth`), and an outage is also seen at once by a failing request.
DEFAULT_HEALTH_INTERVAL = 30.0


class StoreHealth:
    """Probes the kvstore and says whether it is reachable right now.

    One cheap request (``store.revision()``) every ``interval`` seconds (drawn uniformly
    in ``[interval/2, 3*interval/2]`` so agents restarted together do not probe in step),
    each bounded by ``timeout``: a frozen etcd (process alive, not answering) counts as
    unreachable after ``timeout``, not after the client's own retries. While it fails,
    probes back off with full jitter up to ``cap``. ``status`` is ``"ok"`` or
    ``"unreachable: <why> (for N s)"``.

    The probe piggybacks on the agent's own traffic: when the store answered anything
    (a lease keep-alive, a watch event, a write; ``store.last_answer``) within the last
    ``interval``, that answer is the proof and no request is sent. A busy agent thus
    adds no load at all; an idle one adds 1/``interval`` requests per second.
    """

    def __init__(self, store: Store, *, interval: float = DEFAULT_HEALTH_INTERVAL,
                 timeout: float = 2.0,
                 cap: float = 5.0, rng: UniformSource | None = None,
                 sleep: SleepFn | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if interval <= 0:
            raise ValueError(f"health probe interval must be > 0 s, got {interval}")
        self.store = store
        self.interval = interval
        self.timeout = timeout
        self._rng: UniformSource = rng or random.Random()
        self._sleep: SleepFn = sleep or asyncio.sleep
        self._backoff = Backoff(BackoffPolicy(base=min(0.2, cap), cap=cap, max_attempts=None),
                                rng=self._rng, sleep=self._sleep)
        self._clock = clock
        self.error: str | None = None
        self.failing_since: float | None = None
        self.probes = 0
        self.skipped = 0

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def status(self) -> str:
        if self.error is None:
            return "ok"
        since = self._clock() - (self.failing_since or self._clock())
        return f"unreachable: {self.error} (for {since:.0f} s)"

    async def probe(self) -> bool:
        """One probe; updates and returns the state."""
        self.probes += 1
        try:
            async with asyncio.timeout(self.timeout):
                await self.store.revision()
        except TimeoutError:
            self._fail(f"no answer within {self.timeout:g} s")
            return False
        except Exception as exc:  # any failure to reach the store is "unreachable"
            self._fail(str(exc) or type(exc).__name__)
            return False
        if self.error is not None:
            log.info("kvstore reachable again after %.0f s",
                     self._clock() - (self.failing_since or self._clock()))
        self.error, self.failing_since = None, None
        return True

    def _fail(self, why: str) -> None:
        if self.error is None:
            log.warning("kvstore unreachable: %s", why)
            self.failing_since = self._clock()
        self.error = why

    def _answered_recently(self) -> bool:
        last = getattr(self.store, "last_answer", None)
        return (self.error is None and isinstance(last, float)
                and self._clock() - last < self.interval)

    async def run(self) -> None:
        while True:
            if self._answered_recently():
                self.skipped += 1
                await self._sleep(self._rng.uniform(self.interval / 2, self.interval * 1.5))
            elif await self.probe():
                self._backoff.reset()
                await self._sleep(self._rng.uniform(self.interval / 2, self.interval * 1.5))
            else:
                await self._backoff.failed()
