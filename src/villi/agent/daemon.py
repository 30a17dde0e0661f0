"""The node agent: the composition root that builds and wires its collaborators.

No rule lives here; each lives in the module that owns it, and each collaborator
depends on a small Protocol (or plain values), never on :class:`Agent`:

    store ──► NodeSync (routes, node IPs)           IdentityCache ─┐
          ├─► IpcacheSync (every pod) ──► PolicySync, ServiceSync, L7 ─┤
          └─► ResourceWatcher ─┬─ policies ─────────► PolicySync ──► policy maps
                               ├─ Namespace ────────► PolicySync, then EndpointLifecycle
                               ├─ Service ──────────► ServiceSync ──► socket-LB maps
                               └─ Pod ──────────────► PodIndex ──► EndpointLifecycle
    CNI ──► api (HTTP; maps villi.errors to statuses) ──► EndpointLifecycle:
              IPAM → identity → veth/maps (EndpointManager) → policy → StatePublisher

Every background task runs in the agent's ``asyncio.TaskGroup`` (:meth:`spawn`); a
task that fails is logged and shown in ``/v1/healthz`` without stopping the others.

Start-up never disturbs live traffic: endpoints are re-adopted from the state
directory and the pinned maps (programs re-attached with REPLACE, policy diffed
against what the kernel holds), IP allocations come back from disk, and only then
does the agent reconcile with the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import random
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from villi.agent import clustermesh
from villi.agent import node as node_setup
from villi.agent.api import build_app, serve_unix
from villi.agent.config import AgentConfig
from villi.agent.endpoints import EndpointLifecycle
from villi.agent.eni_ipam import ENINodeIPAM
from villi.agent.flowserver import serve_flows_tcp
from villi.agent.fqdn import fqdn_routes, proxy_args, restore_learned
from villi.agent.guard import guard_control_plane, kvstore_endpoints
from villi.agent.l7 import L7Proxy
from villi.agent.observe import (
    AgentFlowContext,
    AgentMetrics,
    build_observer,
    flow_routes,
    start_metrics_servers,
)
from villi.agent.pods import PodIndex
from villi.agent.policy_debug import policy_debug_routes
from villi.agent.policy_sync import PolicySync
from villi.agent.policymode import PolicyModes, PolicyModesCollector
from villi.agent.publish import StatePublisher
from villi.agent.services import ServiceSync
from villi.agent.sync import IpcacheSync, NodeSync, StoreHealth
from villi.agent.watcher import POLICY_KINDS, ResourceEvent, ResourceWatcher
from villi.clustermesh.remote import RemoteClusters
from villi.datapath.compiler import NodeConfig
from villi.datapath.node import NodeDatapath
from villi.endpoint.manager import Endpoint, EndpointManager
from villi.errors import VilliError
from villi.identity.allocator import IdentityAllocator
from villi.identity.cache import IdentityCache
from villi.ipam.usage import usage_report
from villi.kvstore import EtcdStore, LeaseID, LeaseKeeper, Store, open_store
from villi.kvstore.backoff import BackoffPolicy
from villi.kvstore.schema import IpcacheEntry
from villi.netns import routes, set_sysctl
from villi.policy.modes import PolicySettings

log = logging.getLogger("villi.agent")


def in_root_netns() -> bool:
    """Whether this process shares init's network namespace (or, where /proc/1 is out
    of reach, whether it is in no named namespace — villi's nodes always are)."""
    own = os.stat("/proc/self/ns/net").st_ino
    try:
        return own == os.stat("/proc/1/ns/net").st_ino
    except OSError:
        pass
    try:
        names = os.listdir("/var/run/netns")
    except OSError:
        return True
    for name in names:
        try:
            if os.stat(os.path.join("/var/run/netns", name)).st_ino == own:
                return False
        except OSError:
            continue
    return True


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No collection while the initial sync allocates hundreds of thousands of small
    objects (policy entries, map keys); the collector is back on however this ends."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class Agent:
    """One node's agent. ``await start()``, serve, ``await stop()`` — from one task
    (``run_agent`` does both), since that task owns the agent's TaskGroup."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.node = config.node
        self.node_ip: str | None = None
        self.store: Store | None = None
        self.lease: LeaseKeeper | None = None
        self.kvstore_status = "connecting"
        self.started = asyncio.Event()
        self.neigh: dict[str, Any] | None = None
        self._group: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        # async () -> None, each run in reverse order by stop(): the front (servers, L7,
        # observer) before the background tasks end, the back (lease, store, IPAM,
        # datapath) after.
        self._front: list[Callable[[], Awaitable[Any]]] = []
        self._back: list[Callable[[], Awaitable[Any]]] = []
        #: Called for every pod of the cluster that appears, changes or goes away.
        self.pod_handlers: list[Callable[[str, IpcacheEntry | None], None]] = []
        #: Called for every pod of a remote cluster (ClusterMesh) likewise.
        self.remote_pod_handlers: list[Callable[[str, IpcacheEntry | None], None]] = []
        self.mesh: RemoteClusters | None = None
        self._gc_threshold = gc.get_threshold()
        # pyroute2's synchronous API runs its own event loop, so netlink work cannot
        # run on ours: it goes to one worker thread, which also keeps it serialised.
        self._kernel_pool = ThreadPoolExecutor(1, thread_name_prefix="villi-kernel")

    async def kernel(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a netlink-touching call on the kernel thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._kernel_pool, partial(fn, *args, **kwargs))

    # --- background tasks ---------------------------------------------------------------
    def spawn(self, coro: Coroutine[Any, Any, Any], name: str, *, vital: bool = False
              ) -> asyncio.Task[Any]:
        """Run ``coro`` in the agent's TaskGroup; a failure is logged and does not
        cancel the other tasks. A ``vital`` task (a loop the agent needs: store syncs,
        the resource watcher) that fails also marks the agent degraded in
        ``/v1/healthz``; a one-shot task (a clean-up, one resource's update) does not."""
        if self._group is None:
            coro.close()
            raise VilliError(f"agent task {name}: the agent is not running")
        task = self._group.create_task(self._guarded(coro, name, vital),
                                       name=f"villi-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _guarded(self, coro: Coroutine[Any, Any, Any], name: str, vital: bool) -> None:
        try:
            await coro
        except Exception as exc:  # noqa: BLE001 - one task's failure is reported, not fatal
            log.error("agent task villi-%s failed: %r", name, exc, exc_info=exc)
            if vital:
                self.kvstore_status = f"error: villi-{name} failed: {exc}"

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        if in_root_netns() and not cfg.allow_root_netns:
            raise VilliError("refusing to run in the machine's root network namespace: villi "
                             "would add pod routes there. Run the agent inside a node "
                             "namespace (villi lab does) or pass --allow-root-netns.")
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        state = cfg.state_path
        state.mkdir(parents=True, exist_ok=True)
        # The node namespace routes pods; anything else in the cluster range dies here.
        set_sysctl(None, "net/ipv4/ip_forward", "1")
        await self.kernel(routes.ensure_unreachable, cfg.cluster_cidr)
        self.node_ip = cfg.node_ip or await self.kernel(routes.first_ipv4)

        # --- the node's datapath and its local endpoints (no store needed) ---
        self.datapath = NodeDatapath(cfg.cluster, self.node, NodeConfig(
            node_ipv4=self.node_ip or "0.0.0.0", monitor_aggregation=cfg.aggregation_level,
            host_routing=cfg.host_routing,
            defines={"EVENTS_RINGBUF_SIZE": str(cfg.events_ringbuf_size)}))
        self._back.append(self._close_datapath)
        guard_control_plane(self.datapath, kvstore_endpoints(cfg.kvstore))
        self.services = ServiceSync(cfg.cluster, self.node, cfg.service_cgroup,
                                    self.datapath.config, self.spawn)
        self._back.append(self._close_services)
        self.endpoints = EndpointManager(self.datapath, node_netns=None, state_dir=state)
        # Enforcement/audit settings and the degradation switch live in the datapath;
        # an active degradation is reported here and never undone (docs/policy.md).
        self.policy_modes = PolicyModes(self.node, self.datapath.policy_cfg, self.endpoints,
                                        PolicySettings(enable_policy=cfg.enable_policy,
                                                       audit=cfg.policy_audit_mode))
        restored = await self.kernel(self.endpoints.restore)
        log.info("restored %d endpoints from %s", len(restored), state)
        self.ipam = node_setup.make_ipam(cfg)
        self._back.append(self.ipam.close)
        self.ipam.reconcile({ep.ipv4: _owner(ep) for ep in restored})

        if cfg.start_jitter > 0:
            # Restored endpoints already forward; only the store connection waits, so a
            # fleet restarted at once reaches etcd spread over the window.
            delay = random.uniform(0.0, cfg.start_jitter)
            log.info("start jitter: connecting to the kvstore in %.2f s", delay)
            await asyncio.sleep(delay)

        # --- the store, the lease and what is published under it ---
        self.store = store = open_store(cfg.kvstore)
        if isinstance(store, EtcdStore):   # a fleet re-watches spread after an outage
            store.rewatch_jitter = cfg.kvstore_rewatch_jitter
        self._back.append(store.close)
        self.lease = LeaseKeeper(store, cfg.lease_ttl, on_lost=self._lease_lost,
                                 backoff=BackoffPolicy(0.1, cfg.kvstore_retry_cap, None))
        await self.lease.start()
        self._back.append(self._stop_lease)
        self.kvstore_status = "ok"
        self.services.store = store
        self.store_health = StoreHealth(store, cap=cfg.kvstore_retry_cap,
                                        interval=cfg.kvstore_health_interval)
        self.spawn(self.store_health.run(), "kvstore-health", vital=True)
        low, high = clustermesh.identity_bounds(cfg)   # this cluster's identity range
        self.identities = IdentityAllocator(store, self.node, lease=self.lease.lease,
                                            min_id=low, max_id=high)
        self.identity_cache = IdentityCache()
        self.metrics = AgentMetrics(self.datapath, self.ipam, self.endpoints)
        self.publisher = StatePublisher(store, self.lease, self.node, self.node_ip,
                                        self.metrics.kvstore_ops)

        # --- policy, resources, endpoints: wired through small Protocols ---
        self.policy = PolicySync(self.endpoints, self.datapath.ipcache, self.metrics,
                                 cfg.mesh_name)
        self.identity_cache.add_listener(self.policy.on_identities)
        self.metrics.registry.register(PolicyModesCollector(self.policy_modes))
        await self.policy_modes.follow(store, self.spawn)
        self.pods = PodIndex()
        self.lifecycle = EndpointLifecycle(
            self.node, self.endpoints, self.ipam, self.identities, self.identity_cache,
            self.policy, self.pods, self.publisher, self.kernel, self.spawn, cfg.kvstore)
        self.lifecycle.policy_view = self.policy_modes.endpoint_policy
        self.pods.on_change = lambda ns, name, pod: self.spawn(
            self.lifecycle.apply_pod(ns, name, pod), f"pod {ns}/{name}")
        self.watcher = ResourceWatcher(store)
        self.watcher.watch(POLICY_KINDS, self.policy.on_resource)
        self.watcher.watch("Namespace", self._on_namespace)
        self.watcher.watch("Service", self.services.on_resource)
        self.watcher.watch("Pod", self.pods.on_resource)
        self.node_sync = NodeSync(store, self.datapath, self.node, kernel=self.kernel)
        self._back.append(self._close_node_sync)
        self.ipcache_sync = IpcacheSync(store, self.datapath, self.node,
                                        on_change=self._on_pod_change)
        self.pod_handlers += [self.policy.on_ipcache_change, self.services.on_pod]

        with gc_paused():
            await self._sync_with_store(restored)
        # What start-up built lives as long as the agent: move it out of the collector's
        # sight and collect rarely, which keeps policy updates' p99 low (bench/policy.py).
        # stop() puts the collector's settings back.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        for ep in restored:
            await self.publisher.endpoint(ep)

        # --- observability, L7, the API ---
        self.flow_context = AgentFlowContext(
            self.node, cfg.mesh_name, self.endpoints, self.ipcache_sync, self.identity_cache,
            self.policy.resolver, self.service_of, state)
        self.lifecycle.on_removed.append(self.flow_context.forget_endpoint)
        # The address stops being a service backend before it can be reused.
        self.lifecycle.on_removed.append(lambda ep: self.services.on_pod(ep.ipv4, None))
        self.observer = build_observer(cfg, self.datapath, self.flow_context)
        self.observer.start(self.spawn)
        self._front.append(self.observer.stop)
        self.l7 = L7Proxy(state, self.node_ip, _L7Sources(self), self.kernel,
                          self.datapath.attach_netdev, self.metrics.registry, self.spawn,
                          on_records=self.observer.ingest_l7,
                          proxy_args=proxy_args(cfg, self.datapath.pin_dir))
        self.policy.listeners.append(self.l7.request_push)
        l7 = self.l7
        self.pod_handlers.append(lambda ip, entry: l7.request_push())
        self.remote_pod_handlers.append(lambda ip, entry: l7.request_push())
        await self.l7.start()
        self._front.append(self.l7.stop)
        for server in await start_metrics_servers(cfg, self.metrics.registry,
                                                  self.observer.metrics.registry):
            self._front.append(server.close)
        runner = await serve_unix(build_app(self), cfg.api_socket)
        self._front.append(runner.cleanup)
        flow_runner = await serve_flows_tcp(cfg, flow_routes(self.observer))
        if flow_runner is not None:
            self._front.append(flow_runner.cleanup)
        self.started.set()
        log.info("agent %s ready (node IP %s, pod CIDRs %s, API %s)", self.node,
                 self.node_ip, self.ipam.cidrs, cfg.api_socket)

    async def _sync_with_store(self, restored: list[Endpoint]) -> None:
        """Publish the node, follow the store until every view is current, then bring
        restored endpoints' identities and policy up to date."""
        cfg = self.config
        assert self.store is not None and self.lease is not None
        if isinstance(self.ipam, ENINodeIPAM):
            lease = self.lease
            self.ipam.start_reporting(self.store, self._publish_usage,
                                      cfg.ipam_node_update_rate, lambda: lease.lease)
            self.ipam.on_pool_change = self._publish_node
            self.spawn(self.ipam.follow(), "eni-ipam", vital=True)
        else:
            await node_setup.acquire_pod_cidr(cfg, self.store, self.ipam, self._publish_node,
                                              self.spawn)
            self.neigh = await node_setup.size_neighbour_table(
                self.kernel, self.node_ip, self.ipam.usage().get("capacity", 0),
                cfg.neigh_gc_thresh)
            self.ipam.start_reporting(self.store, self._publish_usage,
                                      cfg.ipam_node_update_rate)
        await self._publish_node()
        await self._publish_usage()

        ready = asyncio.Event()
        self.mesh = clustermesh.start(self)   # remote clusters (None outside a mesh)
        self.spawn(self.identity_cache.run(self.store, ready), "identity-cache", vital=True)
        self.spawn(self.node_sync.run(), "node-sync", vital=True)
        self.spawn(self.ipcache_sync.run(), "ipcache-sync", vital=True)
        self.spawn(self.watcher.run(), "resource-watcher", vital=True)
        await asyncio.wait_for(ready.wait(), timeout=30)
        await self.watcher.wait_synced()
        await self.ipcache_sync.sync.synced.wait()
        # Ready means the datapath knows every pod *and* every node (routes, remote-node
        # entries): the bench's "full sync" (docs/scale.md) counts both at ready.
        await self.node_sync.sync.synced.wait()
        self.services.prune()
        await clustermesh.wait_synced(self)   # remote state in before regeneration
        # Re-take identity references of restored endpoints, then bring policy current.
        for ep in restored:
            await self.lifecycle.refresh_identity(ep.id)
        restore_learned(self.policy, cfg.state_path)  # DNS-learned IPs stay allowed
        await self.policy.regenerate_all()

    async def stop(self) -> None:
        """Stop serving and following the store; the datapath keeps enforcing. Safe
        after a start() that failed part-way: only what was built is closed."""
        front, self._front = self._front, []
        back, self._back = self._back, []
        for close in reversed(front):
            await _quietly(close)
        for task in list(self._tasks):
            task.cancel()
        group, self._group = self._group, None
        if group is not None:
            await group.__aexit__(None, None, None)
        for close in reversed(back):
            await _quietly(close)
        self._kernel_pool.shutdown(wait=True)
        gc.unfreeze()
        gc.set_threshold(*self._gc_threshold)

    async def _stop_lease(self) -> None:
        if self.lease is not None:
            # Do not revoke: a restarting agent's pods keep their entries until the TTL.
            await self.lease.stop(revoke=False)

    async def _close_node_sync(self) -> None:
        await self.kernel(self.node_sync.close)   # its socket lives on the kernel thread

    async def _close_services(self) -> None:
        self.services.close()

    async def _close_datapath(self) -> None:
        self.datapath.close()

    # --- store events and publishing ----------------------------------------------------
    async def _lease_lost(self, lease: LeaseID) -> None:
        """The old lease expired: every key that lived under it must be written again."""
        self.identities.lease = lease
        await self._publish_node()
        await self._publish_usage()
        await self.lifecycle.republish()

    async def _publish_node(self) -> None:
        await self.publisher.node_entry(node_setup.node_entry(
            self.node, self.node_ip, self.ipam, str(self.config.api_socket)))

    async def _publish_usage(self) -> None:
        """IPAM usage under its own key (only the operator watches it)."""
        await self.publisher.usage(usage_report(self.ipam.usage()))

    def _on_namespace(self, event: ResourceEvent) -> None:
        """Namespace labels feed policy selectors and the identities of its pods."""
        self.policy.on_resource(event)
        self.spawn(self.lifecycle.refresh_namespace(event.name), f"namespace {event.name}")

    def _on_pod_change(self, ip: str, entry: IpcacheEntry | None) -> None:
        """A pod anywhere in the cluster appeared, changed or went away."""
        for handler in self.pod_handlers:
            handler(ip, entry)

    # --- the API (villi.agent.api.AgentAPI) ---------------------------------------------
    def list_endpoints(self) -> list[dict[str, Any]]:
        return self.lifecycle.list()

    def get_endpoint(self, ref: str, ifname: str = "eth0") -> dict[str, Any]:
        return self.lifecycle.get(ref, ifname)

    async def create_endpoint(self, req: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        return await self.lifecycle.create(req)

    async def delete_endpoint(self, ref: str, ifname: str = "eth0") -> bool:
        return await self.lifecycle.delete(ref, ifname)

    async def set_endpoint_labels(self, ref: str, ifname: str, labels: dict[str, str]
                                  ) -> dict[str, Any]:
        return await self.lifecycle.set_labels(ref, ifname, labels)

    async def ipam_allocate(self, owner: str) -> dict[str, Any]:
        return await self.lifecycle.ipam_allocate(owner)

    async def ipam_release(self, ip: str) -> bool:
        return await self.lifecycle.ipam_release(ip)

    def health(self) -> dict[str, Any]:
        usage = self.ipam.usage()
        kvstore = self.kvstore_status
        if kvstore == "ok":
            kvstore = self.store_health.status
        status = "ok" if kvstore == "ok" else "degraded"
        return {
            "status": status, "node": self.node, "nodeIP": self.node_ip,
            "kvstore": {"status": kvstore, "url": self.config.kvstore},
            "datapath": {"status": "ok", "pinned": str(self.datapath.pin_dir)},
            "ipam": {"status": f"IPv4: {usage['allocated']}/{usage['capacity']} allocated"
                               f" from {node_setup.pool_summary(self.ipam)}",
                     **usage, "cidrs": self.ipam.cidrs, "villi.io/ip": usage["free"]},
            "endpoints": len(self.endpoints.endpoints),
            "neigh": self.neigh,
            "policy": self.policy_modes.status(),
            "clustermesh": clustermesh.view(self),
        }

    def policy_view(self) -> dict[str, Any]:
        return self.policy.view()

    def identity_view(self) -> list[dict[str, Any]]:
        return [{"id": int(i), "labels": [str(lbl) for lbl in labels]}
                for i, labels in sorted(self.identity_cache.items())]

    def service_view(self) -> list[dict[str, Any]]:
        return self.services.table.view()

    def service_of(self, ip: str, port: int) -> tuple[str, str] | None:
        """(namespace, name) of the service a backend address serves, when known."""
        return self.services.table.service_of(ip, port)

    def extra_routes(self) -> list[tuple[str, str, Any]]:
        """Routes of the optional parts (flows, services, FQDN, policy modes and
        debugging)."""
        async def services(request: Any) -> Any:
            from aiohttp import web

            return web.json_response(self.service_view())

        return [*flow_routes(self.observer), ("GET", "/v1/service", services),
                *fqdn_routes(self.policy, self.config.state_path, self.l7),
                *policy_debug_routes(self),
                *self.policy_modes.routes(self.lifecycle.find, self.lifecycle.view)]


class _L7Sources:
    """The L7 proxy's view of the agent's state (``villi.agent.l7.L7Sources``)."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    @property
    def endpoints(self) -> dict[int, Endpoint]:
        return self._agent.endpoints.endpoints

    @property
    def policy(self) -> PolicySync:
        return self._agent.policy

    @property
    def remote(self) -> Any:
        return self._agent.ipcache_sync.entries


async def _quietly(close: Any) -> None:
    try:
        await close()
    except Exception as exc:  # noqa: BLE001 - shutting down: close everything else too
        log.warning("stopping %s: %r", getattr(close, "__qualname__", close), exc)


def _owner(ep: Endpoint) -> str:
    return f"container-id:{ep.container_id}/{ep.ifname}" if ep.container_id \
        else f"endpoint:{ep.id}"


async def run_agent(config: AgentConfig) -> None:
    """Run an agent until cancelled (SIGTERM/SIGINT in the CLI)."""
    agent = Agent(config)
    try:
        await agent.start()
        await asyncio.Event().wait()
    finally:
        await agent.stop()


__all__ = ["Agent", "Path", "gc_paused", "run_agent"]
