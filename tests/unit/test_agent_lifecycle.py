"""The agent's endpoint lifecycle without root: the real EndpointManager, PolicySync,
IdentityAllocator, IPAM and store publisher, on villi.testing's fake node datapath
(dict-backed maps, fake veths) and an in-memory store.

Covers what must hold whatever the kernel does: a failed CNI ADD leaves nothing
behind (maps, veth, IP, identity reference, store entry), DEL undoes ADD, a relabel
moves the pod to a new identity and every policy follows in the maps, and after a
lease loss every key the agent kept under its lease is written again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from villi import resources
from villi.agent.endpoints import EndpointLifecycle
from villi.agent.ipam import NodeIPAM
from villi.agent.observe import AgentMetrics
from villi.agent.pods import PodIndex
from villi.agent.policy_sync import PolicySync
from villi.agent.publish import StatePublisher
from villi.agent.watcher import ResourceEvent
from villi.datapath import abi
from villi.endpoint.manager import EndpointManager, ip_be
from villi.errors import BadRequest, EndpointNotFound, MapError, StoreUnavailable
from villi.identity.allocator import VALUE_PREFIX, IdentityAllocator
from villi.identity.cache import IdentityCache
from villi.kvstore import LeaseKeeper, Store
from villi.kvstore.schema import IPCACHE, IpcacheEntry, ipcache_key
from villi.policy.loader import load_text
from villi.testing.datapath import FakeNodeDatapath, FakePodLinks
from villi.testing.kvstore import eventually, memory_store

NODE = "n1"

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: server-from-client, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""


class Node:
    """One node's lifecycle, wired as ``villi.agent.daemon.Agent`` wires it."""

    def __init__(self, tmp: Path, store: Store, lease: LeaseKeeper,
                 spawn: Callable[[Coroutine[Any, Any, Any], str], Any]) -> None:
        self.tmp = tmp
        self.store = store
        self.lease = lease
        self.datapath = FakeNodeDatapath(node=NODE)
        self.links = FakePodLinks()
        self.manager = EndpointManager(self.datapath, node_netns=None, state_dir=tmp,
                                       links=self.links)
        self.ipam = NodeIPAM(tmp, NODE)
        self.ipam.set_cidrs(["10.70.0.0/24"])
        self.identities = IdentityAllocator(store, NODE, lease=lease.lease)
        self.cache = IdentityCache()
        metrics = AgentMetrics(self.datapath, self.ipam, self.manager)
        self.policy = PolicySync(self.manager, self.datapath.ipcache, metrics, "test")
        self.cache.add_listener(self.policy.on_identities)
        self.pods = PodIndex()
        self.publisher = StatePublisher(store, lease, NODE, "192.168.0.1")

        async def kernel(fn: Any, *args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

        self.lifecycle = EndpointLifecycle(
            NODE, self.manager, self.ipam, self.identities, self.cache, self.policy,
            self.pods, self.publisher, kernel, spawn, "memory://")

    def netns(self, name: str) -> str:
        path = self.tmp / f"netns-{name}"
        path.touch()
        return str(path)

    def request(self, name: str, **labels: str) -> dict[str, Any]:
        return {"containerID": f"cid-{name}", "netns": self.netns(name), "ifname": "eth0",
                "namespace": "shop", "podName": name, "labels": labels}

    def apply(self, text: str) -> None:
        for res in load_text(text, "policy.yaml", resources.all_kinds()):
            self.policy.on_resource(ResourceEvent(res.kind, res.namespace,
                                                  res.metadata.name, res, 0.0))

    def ingress_identities(self, ep_id: int) -> set[int]:
        """Peer identities the fake kernel's policy map allows into ``ep_id``."""
        return {int(k.identity) for k, _ in self.datapath.policy.items()
                if k.endpoint_id == ep_id and k.direction == int(abi.Dir.INGRESS)}

    def kernel_holds(self, ip: str) -> bool:
        return (self.datapath.endpoints.lookup(abi.EndpointKey(addr=ip_be(ip))) is not None
                or self.datapath.ipcache.lookup(abi.IpcacheKey(prefixlen=32, addr=ip_be(ip)))
                is not None)

    async def refs(self) -> list[str]:
        return [kv.key for kv in (await self.store.list(VALUE_PREFIX)).items
                if kv.key.endswith("/" + NODE)]


@contextlib.asynccontextmanager
async def node(tmp_path: Path, ttl: int = 60) -> AsyncIterator[Node]:
    async with memory_store() as store, asyncio.TaskGroup() as group:
        lease = LeaseKeeper(store, ttl)
        await lease.start()
        n = Node(tmp_path, store, lease, lambda coro, name: group.create_task(coro))
        try:
            yield n
        finally:
            await lease.stop(revoke=False)


async def test_add_then_del_leaves_nothing(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        created, view = await n.lifecycle.create(n.request("web", app="server"))
        ip, ep_id = view["ipv4"], view["id"]
        assert created and n.kernel_holds(ip) and len(n.links.links) == 1
        entry = IpcacheEntry.decode((await n.store.get(ipcache_key(ip))).value)  # type: ignore[union-attr]
        assert (entry.node, entry.pod_name, entry.identity) == (NODE, "web", view["identity"])
        assert await n.refs()
        # ADD again for the same container: the same endpoint, nothing new
        again, view2 = await n.lifecycle.create(n.request("web", app="server"))
        assert not again and view2["id"] == ep_id

        assert await n.lifecycle.delete("container-id:cid-web")
        assert not n.kernel_holds(ip) and not n.links.links
        assert await n.store.get(ipcache_key(ip)) is None
        assert not await n.refs()
        assert n.ipam.usage()["allocated"] == 0
        assert not await n.lifecycle.delete("container-id:cid-web")   # idempotent
        with pytest.raises(EndpointNotFound):
            n.lifecycle.get(str(ep_id))


@pytest.mark.parametrize("fail", ["veth", "map", "publish"])
async def test_failed_add_rolls_back_every_step(tmp_path: Path, fail: str) -> None:
    async with node(tmp_path) as n:
        publish = n.publisher.endpoint
        if fail == "veth":
            n.links.fail_create = OSError("veth creation failed")
            expected: type[BaseException] = OSError
        elif fail == "map":
            n.datapath.ipcache.fail_next = "update"
            expected = MapError
        else:
            async def unreachable(ep: Any) -> None:
                raise StoreUnavailable("kvstore went away")
            n.publisher.endpoint = unreachable  # type: ignore[method-assign]
            expected = StoreUnavailable
        with pytest.raises(expected):
            await n.lifecycle.create(n.request("web", app="server"))
        assert not n.manager.endpoints and not n.links.links
        assert not n.datapath.endpoints and not n.datapath.ipcache and not n.datapath.policy
        assert n.ipam.usage()["allocated"] == 0
        assert not n.lifecycle.held
        # The identity reference and any published entry go in the background.
        await eventually(lambda: _no_refs(n), timeout=5)
        assert not (await n.store.list(IPCACHE)).items
        # and the next ADD works
        n.publisher.endpoint = publish  # type: ignore[method-assign]
        created, _ = await n.lifecycle.create(n.request("web", app="server"))
        assert created


async def _no_refs(n: Node) -> bool:
    return not await n.refs()


async def test_bad_requests_allocate_nothing(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        with pytest.raises(BadRequest) as exc:
            await n.lifecycle.create({"containerID": "x", "ifname": "eth0"})
        assert exc.value.cni_code == 4
        req = n.request("web")
        req["netns"] = str(tmp_path / "missing")
        with pytest.raises(BadRequest) as exc:
            await n.lifecycle.create(req)
        assert exc.value.cni_code == 3
        assert n.ipam.usage()["allocated"] == 0


async def test_relabel_moves_identity_and_policy_follows(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        n.apply(POLICY)
        _, server = await n.lifecycle.create(n.request("server", app="server"))
        _, client = await n.lifecycle.create(n.request("client", app="client"))
        assert client["identity"] in n.ingress_identities(server["id"])

        view = await n.lifecycle.set_labels("pod:shop/client", "eth0", {"app": "other"})
        new_id = view["identity"]
        assert new_id != client["identity"]
        # The pod's traffic now carries the new identity, which the policy does not
        # allow (the old identity still means app=client until it is collected).
        assert new_id not in n.ingress_identities(server["id"])
        kernel_ep = n.datapath.endpoints.lookup(abi.EndpointKey(addr=ip_be(client["ipv4"])))
        assert kernel_ep is not None and kernel_ep.identity == new_id
        # the pod's published entry carries the new identity
        raw = await n.store.get(ipcache_key(client["ipv4"]))
        assert raw is not None and json.loads(raw.value)["identity"] == new_id

        await n.lifecycle.set_labels("pod:shop/client", "eth0", {"app": "client"})
        back = n.lifecycle.get("pod:shop/client")["identity"]
        assert back in n.ingress_identities(server["id"])


async def test_lease_loss_republishes_every_key(tmp_path: Path) -> None:
    async with memory_store() as store, asyncio.TaskGroup() as group:
        republished = asyncio.Event()
        box: dict[str, Node] = {}

        async def lost(lease: Any) -> None:   # what Agent._lease_lost does
            n = box["n"]
            n.identities.lease = lease
            await n.lifecycle.republish()
            republished.set()

        lease = LeaseKeeper(store, 3, on_lost=lost)
        await lease.start()
        n = box["n"] = Node(tmp_path, store, lease, lambda coro, name: group.create_task(coro))
        try:
            _, view = await n.lifecycle.create(n.request("web", app="server"))
            old = lease.lease
            assert old is not None
            await store.revoke_lease(old)       # the store forgot us: keys are gone
            assert await store.get(ipcache_key(view["ipv4"])) is None
            await asyncio.wait_for(republished.wait(), 15)
            assert lease.lease != old
            kv = await store.get(ipcache_key(view["ipv4"]))
            assert kv is not None and kv.lease == lease.lease
            assert await n.refs()
        finally:
            await lease.stop(revoke=False)


def test_watcher_dispatches_each_kind_to_its_handler() -> None:
    from villi.agent.watcher import POLICY_KINDS, ResourceWatcher
    from villi.kvstore import EventType, WatchEvent

    seen: list[tuple[str, str, str | None, bool]] = []
    watcher = ResourceWatcher(None)  # type: ignore[arg-type]  # dispatch needs no store
    watcher.watch(POLICY_KINDS, lambda e: seen.append(("policy", e.kind, e.namespace,
                                                       e.deleted)))
    watcher.watch("Namespace", lambda e: seen.append(("namespace", e.kind, e.namespace,
                                                      e.deleted)))
    (res,) = load_text(POLICY, "p.yaml")
    key = resources.key_of(res)
    watcher.dispatch(WatchEvent(EventType.PUT, key, resources.encode(res), 1))
    watcher.dispatch(WatchEvent(EventType.DELETE, key, b"", 2))
    watcher.dispatch(WatchEvent(EventType.PUT, "villi/resources/Namespace/_/shop",
                                b'{"apiVersion": "v1", "kind": "Namespace", '
                                b'"metadata": {"name": "shop"}}', 3))
    watcher.dispatch(WatchEvent(EventType.PUT, "villi/resources/Gadget/_/x", b"{}", 4))
    watcher.dispatch(WatchEvent(EventType.PUT, key, b"not json", 5))   # logged, skipped
    assert seen == [("policy", "CiliumNetworkPolicy", "shop", False),
                    ("policy", "CiliumNetworkPolicy", "shop", True),
                    ("namespace", "Namespace", None, False)]


async def test_agent_restores_gc_settings_when_start_fails(tmp_path: Path) -> None:
    import gc

    from villi.agent.config import AgentConfig
    from villi.agent.daemon import Agent, gc_paused, in_root_netns

    before = gc.get_threshold()
    with pytest.raises(RuntimeError), gc_paused():
        assert not gc.isenabled()
        raise RuntimeError("sync failed")
    assert gc.isenabled()
    if not in_root_netns():
        pytest.skip("the refusal to start is only in the root namespace")
    agent = Agent(AgentConfig(node="n1", state_dir=tmp_path, api_socket=tmp_path / "s"))
    with pytest.raises(Exception, match="root network namespace"):
        await agent.start()
    await agent.stop()
    assert gc.isenabled() and gc.get_threshold() == before
