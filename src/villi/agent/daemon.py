"""The node agent: owns the node's endpoints and datapath, follows the cluster state.

Wiring only — each rule lives in the package that owns it:

    store ──► NodeSync (routes, node IPs)         IdentityCache ──┐
          ├─► IpcacheSync (remote pods)                            ├─► PolicySync ──► maps
          ├─► resources (policies, namespaces, pods) ──────────────┘
    CNI ──► API ──► create_endpoint: IPAM → identity → veth/maps → policy → publish

Start-up never disturbs live traffic: endpoints are re-adopted from the state
directory and the pinned maps (programs re-attached with REPLACE, policy diffed
against what the kernel holds), IP allocations come back from disk, and only then
does the agent reconcile with the store.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from villi.agent import keys
from villi.agent.api import ApiError, build_app, serve_unix
from villi.agent.config import AgentConfig
from villi.agent.eni_ipam import ENINodeIPAM
from villi.agent.flowserver import serve_flows_tcp
from villi.agent.guard import guard_control_plane, kvstore_endpoints
from villi.agent.ipam import NodeIPAM
from villi.agent.l7 import L7Proxy
from villi.agent.observe import AgentMetrics, build_observer, flow_routes, start_metrics_servers
from villi.agent.policy_sync import PolicySync
from villi.agent.services import ServiceSync
from villi.agent.sync import IpcacheSync, NodeSync, StoreHealth
from villi.datapath.compiler import NodeConfig
from villi.datapath.node import NodeDatapath
from villi.endpoint.manager import Endpoint, EndpointManager
from villi.endpoint.request import RequestError, validate_endpoint_request, validate_labels
from villi.errors import EndpointError, StoreUnavailable, VilliError
from villi.identity.allocator import IdentityAllocator, ref_key
from villi.identity.cache import IdentityCache
from villi.identity.labels import LabelSet, pod_identity_labels
from villi.ipam.usage import usage_report
from villi.kvstore import EtcdStore, LeaseID, LeaseKeeper, Store, open_store
from villi.kvstore.backoff import Backoff, BackoffPolicy
from villi.netns import neigh, routes, set_sysctl
from villi.netns.veth import GATEWAY_IPV4

log = logging.getLogger("villi.agent")
MAX_ENDPOINT_ID = 65535
KVSTORE_ADD_DEADLINE = 3.0  # seconds of kvstore work one CNI ADD may wait for (in all)


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


class Agent:
    """One node's agent. ``await start()``, serve, ``await stop()``."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.node = config.node
        self.store: Store | None = None
        self.lease: LeaseKeeper | None = None
        self.tasks: list[asyncio.Task[Any]] = []
        self._cleanups: set[asyncio.Task[Any]] = set()
        self._runner: Any = None
        self._lock = asyncio.Lock()
        self._held: dict[int, LabelSet] = {}   # endpoint id -> label set it holds
        self.kvstore_status = "connecting"
        self.started = asyncio.Event()
        # pyroute2's synchronous API runs its own event loop, so netlink work cannot
        # run on ours: it goes to one worker thread, which also keeps it serialised.
        self._kernel_pool = ThreadPoolExecutor(1, thread_name_prefix="villi-kernel")

    async def kernel(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a netlink-touching call on the kernel thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._kernel_pool, partial(fn, *args, **kwargs))

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        if in_root_netns() and not cfg.allow_root_netns:
            raise VilliError("refusing to run in the machine's root network namespace: villi "
                             "would add pod routes there. Run the agent inside a node "
                             "namespace (villi lab does) or pass --allow-root-netns.")
        state = cfg.state_path
        state.mkdir(parents=True, exist_ok=True)
        # The node namespace routes pods; anything else in the cluster range dies here.
        set_sysctl(None, "net/ipv4/ip_forward", "1")
        await self.kernel(routes.ensure_unreachable, cfg.cluster_cidr)
        self.node_ip = cfg.node_ip or await self.kernel(routes.first_ipv4)

        self.datapath = NodeDatapath(cfg.cluster, self.node, NodeConfig(
            node_ipv4=self.node_ip or "0.0.0.0", monitor_aggregation=cfg.aggregation_level,
            host_routing=cfg.host_routing,
            defines={"EVENTS_RINGBUF_SIZE": str(cfg.events_ringbuf_size)}))
        guard_control_plane(self.datapath, kvstore_endpoints(cfg.kvstore))
        self.services = ServiceSync(self)
        self.endpoints = EndpointManager(self.datapath, node_netns=None, state_dir=state)
        restored = await self.kernel(self.endpoints.restore)
        log.info("restored %d endpoints from %s", len(restored), state)
        self.ipam = _make_ipam(cfg, state, self.node)
        self.ipam.reconcile({ep.ipv4: _owner(ep) for ep in restored})

        if cfg.start_jitter > 0:
            # Restored endpoints already forward; only the store connection waits, so a
            # fleet restarted at once reaches etcd spread over the window.
            delay = random.uniform(0.0, cfg.start_jitter)
            log.info("start jitter: connecting to the kvstore in %.2f s", delay)
            await asyncio.sleep(delay)
        self.store = open_store(cfg.kvstore)
        if isinstance(self.store, EtcdStore):
            self.store.rewatch_jitter = cfg.kvstore_rewatch_jitter
        self.lease = LeaseKeeper(self.store, cfg.lease_ttl, on_lost=self._lease_lost,
                                 backoff=BackoffPolicy(0.1, cfg.kvstore_retry_cap, None))
        await self.lease.start()
        self.kvstore_status = "ok"
        self.store_health = StoreHealth(self.store, cap=cfg.kvstore_retry_cap,
                                        interval=cfg.kvstore_health_interval)
        self._spawn(self.store_health.run(), "kvstore-health")
        self.identities = IdentityAllocator(self.store, self.node, lease=self.lease.lease)
        self.identity_cache = IdentityCache()
        self.metrics = AgentMetrics(self)
        self.policy = PolicySync(self)
        # The initial sync allocates hundreds of thousands of small objects (policy
        # entries, map keys): no collector runs while it does.
        gc.disable()
        self.node_sync = NodeSync(self.store, self.datapath, self.node, kernel=self.kernel)
        self.ipcache_sync = IpcacheSync(self.store, self.datapath, self.node,
                                        on_change=self._on_pod_change)

        if isinstance(self.ipam, ENINodeIPAM):
            self.ipam.start_reporting(self.store, self._publish_usage,
                                      cfg.ipam_node_update_rate,
                                      lambda: self.lease.lease if self.lease else None)
            self.ipam.on_pool_change = self._publish_node
            self._spawn(self.ipam.follow(), "eni-ipam")
        else:
            await self._acquire_pod_cidr()
            self.neigh = await self._size_neighbour_table()
            self.ipam.start_reporting(self.store, self._publish_usage,
                                      cfg.ipam_node_update_rate)
        await self._publish_node()
        await self._publish_usage()

        ready = asyncio.Event()
        self._spawn(self.identity_cache.run(self.store, ready), "identity-cache")
        self._spawn(self.node_sync.run(), "node-sync")
        self._spawn(self.ipcache_sync.run(), "ipcache-sync")
        self._spawn(self.policy.run(), "policy-sync")
        await asyncio.wait_for(ready.wait(), timeout=30)
        await self.policy.wait_synced()
        await self.ipcache_sync.sync.synced.wait()
        self.services.prune()

        # Re-take identity references of restored endpoints, then bring policy current.
        for ep in restored:
            await self._refresh_identity(ep.id)
        from villi.agent.fqdn import restore_learned

        restore_learned(self)   # IPs the DNS proxy learned stay allowed across restarts
        await self.policy.regenerate_all()
        # What start-up built lives as long as the agent: move it out of the collector's
        # sight and collect rarely, which keeps policy updates' p99 low (bench/policy.py).
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        gc.enable()
        for ep in restored:
            await self._publish_endpoint(ep)

        self.observer, self.flow_context = build_observer(self)
        self.observer.start()
        self.l7 = L7Proxy(self)
        await self.l7.start()
        self._metrics_servers = await start_metrics_servers(self)
        self._runner = await serve_unix(build_app(self), cfg.api_socket)
        self._flow_runner = await serve_flows_tcp(self)
        self.started.set()
        log.info("agent %s ready (node IP %s, pod CIDRs %s, API %s)", self.node,
                 self.node_ip, self.ipam.cidrs, cfg.api_socket)

    async def stop(self) -> None:
        """Stop serving and following the store; the datapath keeps enforcing."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for server in getattr(self, "_metrics_servers", ()):
            await server.close()
        if hasattr(self, "l7"):
            await self.l7.stop()
        if getattr(self, "_flow_runner", None) is not None:
            await self._flow_runner.cleanup()
            self._flow_runner = None
        if hasattr(self, "observer"):
            await self.observer.stop()
        for t in self.tasks:
            t.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()
        if self.lease is not None:
            # Do not revoke: a restarting agent's pods keep their entries until the TTL.
            await self.lease.stop(revoke=False)
        if self.store is not None:
            await self.store.close()
        if hasattr(self, "ipam"):
            await self.ipam.close()
        if hasattr(self, "services"):
            self.services.close()
        if hasattr(self, "datapath"):
            self.datapath.close()
        self._kernel_pool.shutdown(wait=True)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"villi-{name}")
        task.add_done_callback(self._task_done)
        self.tasks.append(task)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("agent task %s failed: %r", task.get_name(), task.exception())
            self.kvstore_status = f"error: {task.get_name()} failed: {task.exception()}"

    async def _lease_lost(self, lease: LeaseID) -> None:
        """The old lease expired: every key that lived under it must be written again."""
        assert self.store is not None
        self.identities.lease = lease
        await self._publish_node()
        await self._publish_usage()
        for ep in self.endpoints.endpoints.values():
            await self._publish_endpoint(ep)
        for labels in set(self._held.values()):
            await self.store.put(ref_key(labels, self.node), b"", lease=lease)

    # --- node and IPAM ------------------------------------------------------------------
    async def _acquire_pod_cidr(self) -> None:
        """Use the static --pod-cidr, else wait for the operator to hand one out."""
        assert self.store is not None
        if self.config.pod_cidr:
            self.ipam.set_cidrs([self.config.pod_cidr])
            return
        key = keys.podcidrs_key(self.node)
        await self._publish_node()  # the operator allocates for nodes it sees
        deadline = asyncio.get_running_loop().time() + self.config.cidr_wait_timeout
        backoff = Backoff(BackoffPolicy(base=0.05, cap=self.config.pod_cidr_backoff_cap,
                                        max_attempts=None))
        while True:
            kv = await self.store.get(key)
            if kv is not None:
                cidrs = json.loads(kv.value).get("cidrs", [])
                if cidrs:
                    self.ipam.set_cidrs(cidrs)
                    self._spawn(self._follow_pod_cidrs(key, kv.mod_revision), "podcidrs")
                    return
            if asyncio.get_running_loop().time() > deadline:
                raise VilliError(f"no pod CIDR for node {self.node} after "
                                 f"{self.config.cidr_wait_timeout:.0f}s: is `villi operator` "
                                 "running against the same kvstore?")
            await backoff.failed()  # full jitter: a fleet waiting together polls spread

    async def _size_neighbour_table(self) -> dict[str, Any]:
        """What this node needs of the neighbour table, and (``--neigh-gc-thresh auto``,
        where the sysctls exist in this namespace) raise the thresholds to it."""
        underlay = None
        if self.node_ip:
            try:
                underlay = await self.kernel(routes.ipv4_interface_of, self.node_ip)
            except Exception as e:  # report without the subnet rather than fail start-up
                log.warning("cannot read the underlay prefix of %s: %s", self.node_ip, e)
        demand = neigh.neighbour_demand(self.ipam.usage().get("capacity", 0), underlay)
        want = neigh.recommended(demand)
        info: dict[str, Any] = {"demand": demand, "underlay": underlay,
                                "recommended": want.as_dict(),
                                "mode": self.config.neigh_gc_thresh}
        current = neigh.read_thresholds()
        if self.config.neigh_gc_thresh == "auto":
            try:
                current = neigh.write_thresholds(want)
                info["set"] = True
            except OSError as e:
                info["set"] = False
                log.warning("--neigh-gc-thresh auto: %s; set %s", e,
                            " ".join(want.sysctl_lines()))
        info["current"] = current.as_dict() if current else None
        warning = neigh.check(demand, current)
        if warning:
            log.warning("%s", warning)
        return info

    async def _follow_pod_cidrs(self, key: str, revision: int) -> None:
        assert self.store is not None
        async for event in self.store.watch(key, start_revision=revision + 1):
            if event.value:
                self.ipam.set_cidrs(json.loads(event.value).get("cidrs", []))
                await self._publish_node()

    def node_entry(self) -> dict[str, Any]:
        # No usage here: every agent watches every node entry (villi.ipam.keys).
        entry: dict[str, Any] = {"name": self.node, "ipv4": self.node_ip,
                                 "podCIDRs": self.ipam.cidrs,
                                 "apiSocket": str(self.config.api_socket)}
        if isinstance(self.ipam, ENINodeIPAM):
            entry["eni"] = self.ipam.interfaces()
        return entry

    async def _timed(self, action: str, coro: Any) -> Any:
        """Run a kvstore operation, recording its duration and outcome."""
        t0 = time.perf_counter()
        outcome = "success"
        try:
            return await coro
        except BaseException:
            outcome = "fail"
            raise
        finally:
            if hasattr(self, "metrics"):
                self.metrics.kvstore_ops.labels(action, outcome).observe(
                    time.perf_counter() - t0)

    async def _publish_node(self) -> None:
        assert self.store is not None and self.lease is not None
        await self._timed("update", self.store.put(
            keys.node_key(self.node), json.dumps(self.node_entry()).encode(),
            lease=self.lease.lease))

    async def _publish_usage(self) -> None:
        assert self.store is not None and self.lease is not None
        await self._timed("update", self.store.put(
            keys.usage_key(self.node), usage_report(self.ipam.usage()),
            lease=self.lease.lease))

    # --- endpoints ----------------------------------------------------------------------
    def _find(self, ref: str, ifname: str = "eth0") -> Endpoint | None:
        if ref.startswith("container-id:"):
            cid = ref[len("container-id:"):]
            for ep in self.endpoints.endpoints.values():
                if ep.container_id == cid and ep.ifname == ifname:
                    return ep
            return None
        if ref.startswith("pod:"):
            ns, _, name = ref[len("pod:"):].partition("/")
            for ep in self.endpoints.endpoints.values():
                if ep.namespace == ns and ep.pod_name == name:
                    return ep
            return None
        try:
            return self.endpoints.endpoints.get(int(ref))
        except ValueError:
            raise ApiError(400, f"bad endpoint id {ref!r}: a number, container-id:<id> or "
                           "pod:<ns>/<name>") from None

    def get_endpoint(self, ref: str, ifname: str = "eth0") -> dict[str, Any]:
        ep = self._find(ref, ifname)
        if ep is None:
            raise ApiError(404, f"no endpoint {ref} (ifname {ifname}) on node {self.node}")
        return self.endpoint_view(ep)

    def list_endpoints(self) -> list[dict[str, Any]]:
        return [self.endpoint_view(ep) for ep in sorted(self.endpoints.endpoints.values(),
                                                        key=lambda e: e.id)]

    def endpoint_view(self, ep: Endpoint) -> dict[str, Any]:
        return {
            "id": ep.id, "containerID": ep.container_id, "ifname": ep.ifname,
            "netns": ep.netns, "namespace": ep.namespace, "podName": ep.pod_name,
            "labels": ep.labels, "identity": ep.identity, "ipv4": ep.ipv4,
            "ipv4Pool": self.ipam.cidr_of(ep.ipv4), "gateway": GATEWAY_IPV4,
            "mac": ep.pod_mac, "hostIfname": ep.host_ifname, "hostMac": ep.host_mac,
            "namedPorts": ep.named_ports, "node": self.node,
            "policy": {"ingress": "enabled" if ep.ingress_enforced else "disabled",
                       "egress": "enabled" if ep.egress_enforced else "disabled"},
            "state": ep.state,
        }

    def _next_endpoint_id(self) -> int:
        used = set(self.endpoints.endpoints)
        for i in range(1, MAX_ENDPOINT_ID + 1):
            if i not in used:
                return i
        raise EndpointError("no free endpoint id on this node")

    def identity_labels(self, namespace: str, labels: dict[str, str]) -> LabelSet:
        return pod_identity_labels(namespace, labels, self.policy.namespace_labels(namespace),
                                   cluster=self.config.cluster)

    async def create_endpoint(self, req: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        """CNI ADD: IP, identity, veth, maps, policy, publish — or nothing at all."""
        # Every field is checked before anything is allocated (no IP leaks on 400).
        try:
            checked = validate_endpoint_request(req)
        except RequestError as exc:
            raise ApiError(400, f"bad endpoint request: {exc}", 4) from None
        cid, netns, ifname = checked.container_id, checked.netns, checked.ifname
        if not os.path.exists(netns):
            raise ApiError(400, f"network namespace {netns} does not exist", 3)
        async with self._lock:
            existing = self._find(f"container-id:{cid}", ifname)
            if existing is not None:
                return False, self.endpoint_view(existing)
            namespace = checked.namespace
            pod_name = checked.pod_name or cid[:12]
            labels = dict(await self.policy.pod_labels(namespace, pod_name))
            labels.update(checked.labels)
            named_ports = dict(checked.named_ports)
            named_ports.update(await self.policy.pod_named_ports(namespace, pod_name))
            owner = f"container-id:{cid}/{ifname}"
            ip = self.ipam.allocate(owner)
            id_labels = self.identity_labels(namespace, labels)
            identity: int | None = None
            held = False
            ep: Endpoint | None = None
            deadline = asyncio.get_running_loop().time() + KVSTORE_ADD_DEADLINE
            try:
                identity = int(await self._kvstore_bounded(
                    self.identities.allocate(id_labels), "allocating the pod's identity",
                    deadline))
                held = True
                ep = await self.kernel(
                    self.endpoints.create,
                    endpoint_id=self._next_endpoint_id(), ipv4=ip, netns=netns, ifname=ifname,
                    identity=identity, attach_key=owner, namespace=namespace,
                    pod_name=pod_name, container_id=cid, labels=labels,
                    named_ports=named_ports)
                self.identity_cache.upsert(identity, id_labels)
                await self.policy.endpoint_added(ep)
                await self._kvstore_bounded(self._publish_endpoint(ep),
                                            "publishing the pod's address", deadline)
            except BaseException:
                if ep is not None:
                    self.policy.endpoint_removed(ep)
                    await self.kernel(self.endpoints.delete, ep.id)
                    self._cleanup_later(self._unpublish_endpoint(ep.ipv4), ep.ipv4)
                if held:
                    self._cleanup_later(self._release(id_labels), str(id_labels))
                self.ipam.release(ip)
                raise
            self._held[ep.id] = id_labels
            self.ipam.notify()
            return True, self.endpoint_view(self.endpoints.endpoints[ep.id])

    def _cleanup_later(self, coro: Any, what: str) -> None:
        """Undo a failed ADD's kvstore writes in the background: the kvstore may be the
        reason the ADD failed, and the ADD's answer must not wait for it."""
        async def run() -> None:
            try:
                await coro
            except VilliError as exc:
                log.warning("cleaning up %s after a failed ADD: %s", what, exc)

        task = asyncio.get_running_loop().create_task(run(), name=f"villi-cleanup {what}")
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _kvstore_bounded(self, coro: Any, doing: str, deadline: float) -> Any:
        """A kvstore step of a CNI ADD; all steps together end by ``deadline``
        (``KVSTORE_ADD_DEADLINE`` after the first): a frozen kvstore must fail the ADD
        within seconds (the runtime retries; code 11), not hold it for the client's
        whole retry budget."""
        remaining = max(0.1, deadline - asyncio.get_running_loop().time())
        try:
            return await asyncio.wait_for(coro, remaining)
        except TimeoutError:
            raise StoreUnavailable(
                f"kvstore {self.config.kvstore} did not answer within "
                f"{KVSTORE_ADD_DEADLINE:g} s while {doing}; the pod was not created"
            ) from None

    async def delete_endpoint(self, ref: str, ifname: str = "eth0") -> bool:
        """CNI DEL: idempotent; False when there was nothing to delete."""
        async with self._lock:
            ep = self._find(ref, ifname)
            if ep is None:
                if ref.startswith("container-id:"):
                    self.ipam.release_owner(f"{ref}/{ifname}")
                return False
            self.flow_context.forget(ep.ipv4, self.flow_context.pod_of(ep.ipv4))
            self.policy.endpoint_removed(ep)
            await self.kernel(self.endpoints.delete, ep.id)
            # The address stops being a service backend before it can be reused.
            self.services.on_pod(ep.ipv4, None)
            await self._unpublish_endpoint(ep.ipv4)
            held = self._held.pop(ep.id, None)
            if held is not None:
                await self._release(held)
            self.ipam.release(ep.ipv4)
            self.ipam.notify()
            return True

    async def set_endpoint_labels(self, ref: str, ifname: str, labels: dict[str, str]
                                  ) -> dict[str, Any]:
        """Change a running pod's labels: its identity and every policy follow."""
        async with self._lock:
            ep = self._find(ref, ifname)
            if ep is None:
                raise ApiError(404, f"no endpoint {ref} on node {self.node}")
            try:
                labels = validate_labels(labels)
            except RequestError as exc:
                raise ApiError(400, f"bad labels: {exc}") from None
            ep.labels = dict(labels)
            self.endpoints.save(ep)
            await self._refresh_identity(ep.id)
            return self.endpoint_view(self.endpoints.endpoints[ep.id])

    async def apply_pod_resource(self, namespace: str, name: str, pod: Any) -> None:
        """A Pod resource changed: the running endpoint takes its labels and ports."""
        async with self._lock:
            ep = self._find(f"pod:{namespace}/{name}")
            if ep is None:
                return
            ports = pod.named_ports()
            if ep.labels == pod.labels and ep.named_ports == ports:
                return
            ports_changed = ep.named_ports != ports
            ep.labels, ep.named_ports = pod.labels, ports
            self.endpoints.save(ep)
            await self._refresh_identity(ep.id)
            if ports_changed:
                await self.policy.identity_changed(ep, ep.identity)
                await self._publish_endpoint(ep)

    async def _refresh_identity(self, ep_id: int) -> None:
        """Give an endpoint the identity of its current labels and namespace labels.

        Each endpoint holds exactly one reference, on the label set it was last given
        (kept in ``_held``): the new set is acquired before the old one is released,
        so an identity shared with other pods never drops to zero in between.
        """
        ep = self.endpoints.endpoints[ep_id]
        new_labels = self.identity_labels(ep.namespace, ep.labels)
        old_labels = self._held.get(ep_id)
        if new_labels == old_labels and ep.identity == self.identities.lookup(new_labels):
            return
        new_id = int(await self.identities.allocate(new_labels))
        self._held[ep_id] = new_labels
        self.identity_cache.upsert(new_id, new_labels)
        old_id = ep.identity
        self.endpoints.set_identity(ep_id, new_id, ep.labels)
        if new_id != old_id:
            await self._publish_endpoint(self.endpoints.endpoints[ep_id])
            await self.policy.identity_changed(self.endpoints.endpoints[ep_id], old_id)
        if old_labels is not None:
            await self._release(old_labels)

    async def _release(self, labels: LabelSet) -> None:
        try:
            await self.identities.release(labels)
        except VilliError as e:
            log.warning("releasing identity %s: %s", labels, e)

    async def refresh_namespace(self, namespace: str) -> None:
        """A namespace's labels changed: identities of its pods follow."""
        async with self._lock:
            for ep in list(self.endpoints.endpoints.values()):
                if ep.namespace == namespace:
                    await self._refresh_identity(ep.id)

    async def _publish_endpoint(self, ep: Endpoint) -> None:
        assert self.store is not None and self.lease is not None
        entry = {"identity": ep.identity, "node": self.node, "nodeIP": self.node_ip,
                 "namespace": ep.namespace, "podName": ep.pod_name, "endpointID": ep.id,
                 "labels": ep.labels, "namedPorts": ep.named_ports}
        await self._timed("update", self.store.put(
            keys.ipcache_key(ep.ipv4), json.dumps(entry).encode(), lease=self.lease.lease))

    async def _unpublish_endpoint(self, ip: str) -> None:
        assert self.store is not None
        await self._timed("delete", self.store.delete(keys.ipcache_key(ip)))

    # --- IPAM API -----------------------------------------------------------------------
    async def ipam_allocate(self, owner: str) -> dict[str, Any]:
        ip = self.ipam.allocate(owner)
        self.ipam.notify()
        return {"ipv4": {"ip": ip, "cidr": self.ipam.cidr_of(ip), "gateway": GATEWAY_IPV4}}

    async def ipam_release(self, ip: str) -> bool:
        if any(ep.ipv4 == ip for ep in self.endpoints.endpoints.values()):
            raise ApiError(409, f"{ip} belongs to a live endpoint; delete the endpoint")
        released = self.ipam.release(ip)
        self.ipam.notify()
        return released

    # --- views --------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        usage = self.ipam.usage()
        kvstore = self.kvstore_status
        if kvstore == "ok" and hasattr(self, "store_health"):
            kvstore = self.store_health.status
        status = "ok" if kvstore == "ok" else "degraded"
        return {
            "status": status, "node": self.node, "nodeIP": self.node_ip,
            "kvstore": {"status": kvstore, "url": self.config.kvstore},
            "datapath": {"status": "ok", "pinned": str(self.datapath.pin_dir)},
            "ipam": {"status": f"IPv4: {usage['allocated']}/{usage['capacity']} allocated"
                               f" from {_pool_summary(self.ipam)}",
                     **usage, "cidrs": self.ipam.cidrs, "villi.io/ip": usage["free"]},
            "endpoints": len(self.endpoints.endpoints),
            "neigh": getattr(self, "neigh", None),
        }

    def policy_view(self) -> dict[str, Any]:
        return self.policy.view()

    def identity_view(self) -> list[dict[str, Any]]:
        return [{"id": int(i), "labels": [str(lbl) for lbl in labels]}
                for i, labels in sorted(self.identity_cache.items())]

    def extra_routes(self) -> list[tuple[str, str, Any]]:
        """Routes contributed by optional parts (observer, services)."""
        async def services(request: Any) -> Any:
            from aiohttp import web

            return web.json_response(self.service_view())

        from villi.agent.fqdn import fqdn_routes

        return [*flow_routes(self), ("GET", "/v1/service", services), *fqdn_routes(self)]

    def service_of(self, ip: str, port: int) -> tuple[str, str] | None:
        """(namespace, name) of the service a backend address serves, when known."""
        return self.services.table.service_of(ip, port)

    def _on_pod_change(self, ip: str, data: dict | None) -> None:
        """A pod anywhere in the cluster appeared, changed or went away."""
        self.policy.on_ipcache_change(ip, data)
        self.services.on_pod(ip, data)
        if hasattr(self, "l7"):
            self.l7.request_push()

    def service_view(self) -> list[dict[str, Any]]:
        return self.services.table.view()


def _make_ipam(cfg: Any, state: Any, node: str) -> NodeIPAM | ENINodeIPAM:
    """The IPAM of ``--ipam``: cluster-pool CIDRs, or the operator's ENI pool."""
    if cfg.ipam == "eni":
        if cfg.pod_cidr:
            raise VilliError("--pod-cidr cannot be used with --ipam eni")
        from villi.agent.eni_links import ENILinks

        # routing per interface only in a node namespace (never the machine's own)
        return ENINodeIPAM(state, node, None if cfg.allow_root_netns else ENILinks())
    if cfg.ipam != "cluster-pool":
        raise VilliError(f"--ipam must be cluster-pool or eni, not {cfg.ipam!r}")
    return NodeIPAM(state, node)


def _pool_summary(ipam: NodeIPAM | ENINodeIPAM) -> str:
    if isinstance(ipam, ENINodeIPAM):
        ifaces = ipam.interfaces()
        return (f"{len(ifaces)} ENI(s) {', '.join(e['id'] for e in ifaces)}" if ifaces
                else "no ENI yet")
    return ", ".join(ipam.cidrs) or "no CIDR"


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


__all__ = ["Agent", "Path", "run_agent"]
