"""ClusterMesh: identity layout, validation of remote state, the kvstoremesh cache and
the agent-side consumer (fake sink, in-memory stores; the lab e2e tests use real etcd)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from villi.clustermesh import keys
from villi.clustermesh.ids import (
    ClusterInfo,
    ClusterMeshError,
    cluster_id_shift,
    cluster_of_identity,
    identity_range,
    parse_remote,
)
from villi.clustermesh.kvstoremesh import KVStoreMesh
from villi.clustermesh.remote import CachedSource, DirectSource, RemoteClusters
from villi.clustermesh.validate import check_config, check_identity, check_ipcache
from villi.identity.allocator import IdentityAllocator, id_key
from villi.identity.labels import CLUSTER_LABEL, LabelSet, pod_identity_labels
from villi.kvstore import Store
from villi.policy.entry import Protocol
from villi.policy.simulate import PolicySimulator
from villi.testing.kvstore import eventually, memory_store

C1 = ClusterInfo("c1", 1)
C2 = ClusterInfo("c2", 2)


# --- identity layout --------------------------------------------------------------------------

def test_cluster_id_shift_follows_cilium() -> None:
    assert cluster_id_shift(255) == 16
    assert cluster_id_shift(511) == 15
    with pytest.raises(ClusterMeshError, match="255 or 511"):
        cluster_id_shift(1023)


def test_identity_ranges() -> None:
    assert identity_range(0) == (256, 65535)
    assert identity_range(1) == (65536, 131071)
    assert identity_range(2) == (131072, 196607)
    assert identity_range(255) == (255 << 16, (256 << 16) - 1)
    assert identity_range(1, 511) == (32768, 65535)
    assert identity_range(511, 511) == (511 << 15, (512 << 15) - 1)
    assert cluster_of_identity(131072 + 17) == 2
    assert cluster_of_identity(3 << 15, 511) == 3
    with pytest.raises(ClusterMeshError, match="between 0 and 255"):
        identity_range(256)


def test_cluster_names_and_remote_flags() -> None:
    with pytest.raises(ClusterMeshError, match="invalid cluster name"):
        ClusterInfo("C_1", 1)
    with pytest.raises(ClusterMeshError, match="between 0 and 255"):
        ClusterInfo("c1", 300)
    assert ClusterInfo("c1", 300, 511).identity_range[0] == 300 << 15
    assert parse_remote("c2=https://10.0.0.1:2379") == ("c2", "https://10.0.0.1:2379")
    with pytest.raises(ClusterMeshError, match="NAME=URL"):
        parse_remote("c2")


async def test_identities_are_allocated_in_the_clusters_range() -> None:
    low, high = C2.identity_range
    async with memory_store() as store:
        alloc = IdentityAllocator(store, "node1", min_id=low, max_id=high)
        first = await alloc.allocate(pod_identity_labels("ns", {"app": "x"}, cluster="c2"))
        second = await alloc.allocate(pod_identity_labels("ns", {"app": "y"}, cluster="c2"))
        assert {first, second} == {low, low + 1}
        assert cluster_of_identity(first) == 2


def test_endpoint_labels_carry_the_cluster() -> None:
    labels = pod_identity_labels("ns", {"app": "x"}, cluster="c2")
    assert f"k8s:{CLUSTER_LABEL}=c2" in {str(lbl) for lbl in labels}


def test_policy_selects_by_cluster_label() -> None:
    """allow from c2 app=x; the same app in c1 (and c2's other apps) stay denied."""
    sim = PolicySimulator()
    sim.apply_yaml("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: from-c2-x, namespace: ns}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: x, io.cilium.k8s.policy.cluster: c2}
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
""")
    sim.add_pod("ns/server", {"app": "server", CLUSTER_LABEL: "c1"}, "10.64.0.10",
                {"http": (80, Protocol.TCP)})
    sim.add_pod("ns/x-c2", {"app": "x", CLUSTER_LABEL: "c2"}, "10.80.0.10")
    sim.add_pod("ns/x-c1", {"app": "x", CLUSTER_LABEL: "c1"}, "10.64.0.11")
    sim.add_pod("ns/y-c2", {"app": "y", CLUSTER_LABEL: "c2"}, "10.80.0.11")
    assert sim.allowed("ns/x-c2", "ns/server", "TCP", 80)
    assert not sim.allowed("ns/x-c1", "ns/server", "TCP", 80)
    assert not sim.allowed("ns/y-c2", "ns/server", "TCP", 80)


# --- validation -----------------------------------------------------------------------------

def _labels(cluster: str, app: str = "x") -> bytes:
    return pod_identity_labels("ns", {"app": app}, cluster=cluster).canonical.encode()


def test_remote_identity_must_fit_range_and_name() -> None:
    low, _ = C2.identity_range
    labels, why = check_identity(C2, low + 5, _labels("c2"))
    assert labels is not None and why is None
    _, why = check_identity(C2, 65536 + 5, _labels("c2"))
    assert why is not None and "outside cluster c2's range 131072..196607" in why
    _, why = check_identity(C2, low + 5, _labels("c1"))
    assert why is not None and "cluster label c1, expected" in why
    _, why = check_identity(C2, 2, b"reserved:world;")
    assert why is not None and "reserved" in why


def test_remote_ipcache_entry_must_fit() -> None:
    low, _ = C2.identity_range
    ok = json.dumps({"identity": low, "nodeIP": "192.168.1.5"}).encode()
    assert check_ipcache(C2, "10.80.0.5", ok)[1] is None
    bad = json.dumps({"identity": 70000, "nodeIP": "192.168.1.5"}).encode()
    assert "outside cluster c2's range" in (check_ipcache(C2, "10.80.0.5", bad)[1] or "")
    assert "not an IPv4" in (check_ipcache(C2, "nope", ok)[1] or "")
    reserved = json.dumps({"identity": 1}).encode()
    assert "reserved" in (check_ipcache(C2, "10.80.0.5", reserved)[1] or "")


def test_remote_config_checks() -> None:
    raw = json.dumps(C2.config()).encode()
    assert check_config("c2", raw, local=C1)[0] == C2
    assert "expected 'c3'" in (check_config("c3", raw, local=C1)[1] or "")
    same = json.dumps(ClusterInfo("c2", 1).config()).encode()
    assert "same id" in (check_config("c2", same, local=C1)[1] or "")
    big = json.dumps(ClusterInfo("c2", 2, 511).config()).encode()
    assert "max-connected-clusters" in (check_config("c2", big, local=C1)[1] or "")


# --- the agent-side consumer ---------------------------------------------------------------------

class FakeSink:
    def __init__(self) -> None:
        self.identities: dict[int, LabelSet] = {}
        self.pods: dict[str, dict[str, Any]] = {}
        self.nodes: dict[tuple[str, str], dict[str, Any]] = {}
        self.services: dict[tuple[str, str, str], bytes] = {}

    def upsert_identity(self, identity: int, labels: LabelSet) -> None:
        self.identities[identity] = labels

    def delete_identity(self, identity: int) -> None:
        self.identities.pop(identity, None)

    def set_pod(self, cluster: str, ip: str, entry: dict[str, Any] | None) -> None:
        if entry is None:
            self.pods.pop(ip, None)
        else:
            self.pods[ip] = entry

    async def set_node(self, cluster: str, name: str, entry: dict[str, Any] | None) -> None:
        if entry is None:
            self.nodes.pop((cluster, name), None)
        else:
            self.nodes[(cluster, name)] = entry

    def set_service(self, cluster: str, namespace: str, name: str, raw: bytes | None) -> None:
        if raw is None:
            self.services.pop((cluster, namespace, name), None)
        else:
            self.services[(cluster, namespace, name)] = raw


async def test_remote_clusters_reject_with_a_logged_reason(caplog: Any) -> None:
    sink = FakeSink()
    clusters = RemoteClusters(C1, sink)
    low, _ = C2.identity_range
    # state that arrives before the cluster's config waits for it
    await clusters.apply("c2", keys.IDENTITIES, str(low), _labels("c2"))
    assert not sink.identities
    await clusters.set_config("c2", json.dumps(C2.config()).encode())
    assert low in sink.identities
    with caplog.at_level(logging.WARNING):
        await clusters.apply("c2", keys.IDENTITIES, "65540", _labels("c2"))
        await clusters.apply("c2", keys.IPCACHE, "10.80.0.9",
                             json.dumps({"identity": 65540}).encode())
    assert 65540 not in sink.identities and "10.80.0.9" not in sink.pods
    assert "rejected identity 65540 from cluster c2: identity 65540 is outside" in caplog.text
    assert "rejected ipcache 10.80.0.9 from cluster c2" in caplog.text
    assert clusters.remotes["c2"].rejected == 2
    await clusters.apply("c2", keys.IPCACHE, "10.80.0.9",
                         json.dumps({"identity": low, "nodeIP": "192.168.1.9"}).encode())
    assert sink.pods["10.80.0.9"]["cluster"] == "c2"


# --- kvstoremesh end to end (in-memory stores) --------------------------------------------------

async def _seed_remote(store: Store, info: ClusterInfo, pods: int = 3) -> None:
    low, _ = info.identity_range
    await store.put(keys.cluster_config_key(info.name), json.dumps(info.config()).encode())
    await store.put(id_key(low), _labels(info.name))
    await store.put(f"villi/state/identities/v1/value/{_labels(info.name).decode()}",
                    str(low).encode())   # value keys are not mirrored
    await store.put("villi/state/nodes/v1/node1", json.dumps(
        {"ipv4": "192.168.9.2", "podCIDRs": ["10.80.0.0/24"]}).encode())
    for i in range(pods):
        await store.put(f"villi/state/ip/v1/10.80.0.{10 + i}", json.dumps(
            {"identity": low, "nodeIP": "192.168.9.2", "namespace": "ns",
             "labels": {"app": "x"}}).encode())
    await store.put("villi/resources/Service/ns/web", b'{"kind": "Service"}')


async def test_kvstoremesh_caches_remote_state_and_agents_follow_the_cache() -> None:
    async with memory_store() as local, memory_store() as remote:
        await _seed_remote(remote, C2)
        mesh = KVStoreMesh(local, C1, {"c2": "mem://c2"}, opener=lambda url: _Shared(remote),
                           probe_interval=0.1)
        task = asyncio.create_task(mesh.run())
        try:
            await eventually(lambda: len(mesh.mirrors["c2"].synced) == 4)
            listing = await local.list(keys.CACHE)
            got = {kv.key for kv in listing.items}
            assert "villi/cache/ip/v1/c2/10.80.0.10" in got
            assert f"villi/cache/identities/v1/c2/{C2.identity_range[0]}" in got
            assert "villi/cache/nodes/v1/c2/node1" in got
            assert "villi/cache/services/v1/c2/ns/web" in got
            assert not any("/value/" in k for k in got)
            assert all(kv.lease for kv in listing.items)
            for kind in keys.KINDS:
                assert await local.get(keys.synced_key("c2", kind)) is not None
            cfg = json.loads((await local.get(keys.cluster_config_key("c2"))).value)
            assert cfg["capabilities"]["cached"] is True
            assert json.loads((await local.get(keys.cluster_config_key("c1"))).value)["id"] == 1

            sink = FakeSink()
            clusters = RemoteClusters(C1, sink)
            source = CachedSource(local, clusters)
            follower = asyncio.create_task(source.run())
            try:
                assert await clusters.wait_synced(["c2"], 5.0)
                assert len(sink.pods) == 3 and C2.identity_range[0] in sink.identities
                assert ("c2", "node1") in sink.nodes
                assert ("c2", "ns", "web") in sink.services
                await eventually(lambda: clusters.ready(["c2"]))
                # a change in c2 reaches the agent through the cache
                await remote.delete("villi/state/ip/v1/10.80.0.10")
                await eventually(lambda: "10.80.0.10" not in sink.pods)
            finally:
                follower.cancel()
                await asyncio.gather(follower, return_exceptions=True)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_kvstoremesh_restart_drops_only_what_vanished() -> None:
    async with memory_store() as local, memory_store() as remote:
        await _seed_remote(remote, C2)
        stale = "villi/cache/ip/v1/c2/10.80.9.9"
        await local.put(stale, json.dumps({"identity": C2.identity_range[0]}).encode())
        mesh = KVStoreMesh(local, C1, {"c2": "x"}, opener=lambda url: _Shared(remote))
        task = asyncio.create_task(mesh.run())
        try:
            await eventually(lambda: len(mesh.mirrors["c2"].synced) == 4)
            assert await local.get(stale) is None
            assert await local.get("villi/cache/ip/v1/c2/10.80.0.10") is not None
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_kvstoremesh_does_not_cache_foreign_identities(caplog: Any) -> None:
    async with memory_store() as local, memory_store() as remote:
        await _seed_remote(remote, C2, pods=1)
        await remote.put(id_key(65600), _labels("c2"))   # in c1's range: a lie
        mesh = KVStoreMesh(local, C1, {"c2": "x"}, opener=lambda url: _Shared(remote))
        with caplog.at_level(logging.WARNING):
            task = asyncio.create_task(mesh.run())
            try:
                await eventually(lambda: len(mesh.mirrors["c2"].synced) == 4)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        assert await local.get("villi/cache/identities/v1/c2/65600") is None
        assert "not caching identities 65600 of cluster c2" in caplog.text


async def test_direct_mode_reads_the_remote_store() -> None:
    async with memory_store() as remote:
        await _seed_remote(remote, C2)
        sink = FakeSink()
        clusters = RemoteClusters(C1, sink)
        source = DirectSource({"c2": "x"}, clusters, opener=lambda url: _Shared(remote))
        task = asyncio.create_task(source.run())
        try:
            assert await clusters.wait_synced(["c2"], 5.0)
            assert len(sink.pods) == 3
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class _Shared:
    """A store handed to code that closes it: closing must not close the test's store."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def close(self) -> None:
        return None


# --- global services ----------------------------------------------------------------------------

def _service(cluster_ip: str = "", **annotations: str) -> Any:
    from villi.policy.loader import load_files  # noqa: F401 - registers kinds
    from villi.resources import decode

    data = {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "ns", "annotations": annotations},
            "spec": {"selector": {"app": "web"},
                     "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]}}
    return decode(json.dumps(data).encode())


def _raw(model: Any) -> bytes:
    from villi.resources import encode

    return encode(model)


def test_global_service_merges_remote_backends() -> None:
    from villi.clustermesh.services import MeshServices
    from villi.service.backends import Backend, PortKey

    changed: list[tuple[str, str]] = []
    mesh = MeshServices(on_change=changed.append)
    key = PortKey("ns", "web", 80, "TCP")
    local = [Backend("10.64.0.5", 8080)]
    pod = {"namespace": "ns", "labels": {"app": "web"}}
    mesh.on_pod("c2", "10.80.0.5", pod)
    mesh.on_remote_service("c2", "ns", "web", _raw(_service(**{
        "service.cilium.io/global": "true"})))
    assert changed == [("ns", "web")]
    both = [Backend("10.64.0.5", 8080), Backend("10.80.0.5", 8080)]
    glob = _service(**{"service.cilium.io/global": "true"})
    assert mesh.merge(key, glob, local) == both
    # a local service that is not global never gets remote backends
    assert mesh.merge(key, _service(), local) == local
    # affinity: the preferred side while it has backends
    loc = _service(**{"service.cilium.io/global": "true", "service.cilium.io/affinity": "local"})
    assert mesh.merge(key, loc, local) == local
    assert mesh.merge(key, loc, []) == [Backend("10.80.0.5", 8080)]
    rem = _service(**{"service.cilium.io/global": "true",
                      "service.cilium.io/affinity": "remote"})
    assert mesh.merge(key, rem, local) == [Backend("10.80.0.5", 8080)]
    # shared: "false" in c2 keeps c2's backends in c2
    mesh.on_remote_service("c2", "ns", "web", _raw(_service(**{
        "service.cilium.io/global": "true", "service.cilium.io/shared": "false"})))
    assert mesh.merge(key, glob, local) == local
    # pods of other namespaces or labels are not backends
    mesh.on_remote_service("c2", "ns", "web", _raw(glob))
    mesh.on_pod("c2", "10.80.0.6", {"namespace": "other", "labels": {"app": "web"}})
    mesh.on_pod("c2", "10.80.0.5", None)
    assert mesh.merge(key, glob, local) == local


def test_mesh_annotations_are_validated() -> None:
    from villi.policy.loader import load_files  # noqa: F401
    from villi.resources import decode

    data = {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "ns",
                         "annotations": {"service.cilium.io/affinity": "nearby"}},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}}
    with pytest.raises(Exception, match="nearby"):
        decode(json.dumps(data).encode())


async def test_cache_expiry_withdraws_an_unreachable_remote() -> None:
    async with memory_store() as local, memory_store() as remote:
        await _seed_remote(remote, C2, pods=1)
        mesh = KVStoreMesh(local, C1, {"c2": "x"}, opener=lambda url: _Shared(remote),
                           cache_expiry=0.2, probe_interval=3600)
        task = asyncio.create_task(mesh.run())
        try:
            await eventually(lambda: len(mesh.mirrors["c2"].synced) == 4)
            assert (await local.list(keys.CACHE)).items
            mirror = mesh.mirrors["c2"]
            mesh._connected(mirror, False, "gone")
            mirror.since -= 1.0
            async def withdrawn() -> bool:
                return not (await local.list(keys.CACHE)).items and \
                    not (await local.list(keys.SYNCED)).items
            deadline = asyncio.get_running_loop().time() + 5
            while not await withdrawn():
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_local_resync_keeps_remote_identities() -> None:
    from villi.identity.cache import IdentityCache

    async with memory_store() as store:
        low, high = C1.identity_range
        await store.put(id_key(low), _labels("c1"))
        cache = IdentityCache()
        cache.owned = lambda i: low <= i <= high
        remote = C2.identity_range[0]
        cache.upsert(remote, LabelSet.parse(_labels("c2").decode()))
        await cache.resync(store)
        assert low in cache and remote in cache
        await store.delete(id_key(low))
        await cache.resync(store)
        assert low not in cache and remote in cache


def test_service_view_shows_the_merged_backends_of_a_global_service() -> None:
    """`villi get services` shows what the socket LB uses: a global service's remote
    backends merged in, this cluster's own under localBackends."""
    from villi.clustermesh.services import MeshServices
    from villi.service.table import ServiceTable

    table = ServiceTable(None)
    mesh = MeshServices(on_change=table.reprogram)
    table.merge = mesh.merge
    glob = _service(**{"service.cilium.io/global": "true"})
    table.upsert_service(glob, "10.32.0.9")
    table.upsert_pod("10.64.0.5", "ns", {"app": "web"})
    mesh.on_pod("c2", "10.80.0.5", {"namespace": "ns", "labels": {"app": "web"}})
    mesh.on_remote_service("c2", "ns", "web", _raw(glob))
    (view,) = table.view()
    (port,) = view["ports"]
    assert port["backends"] == ["10.64.0.5:8080", "10.80.0.5:8080"]
    assert port["localBackends"] == ["10.64.0.5:8080"]
    table.upsert_service(_service(), "10.32.0.9")   # no longer global: local only
    (port,) = table.view()[0]["ports"]
    assert port["backends"] == ["10.64.0.5:8080"] and "localBackends" not in port


def test_cache_writes_are_split_into_bounded_transactions() -> None:
    """etcd refuses transactions over --max-txn-ops (128) or --max-request-bytes: the
    kvstoremesh's batches stay under TXN_OPS writes and TXN_BYTES of values."""
    from villi.clustermesh import kvstoremesh as kvm

    small = [(f"k{i}", b"v") for i in range(250)]
    assert [len(p) for p in kvm._split(small)] == [100, 100, 50]
    big = b"x" * (kvm.TXN_BYTES // 3)
    parts = kvm._split([("a", big), ("b", big), ("c", big), ("d", None)])
    assert [[k for k, _ in p] for p in parts] == [["a", "b"], ["c", "d"]]
    huge = b"x" * (kvm.TXN_BYTES + 1)
    assert [[k for k, _ in p] for p in kvm._split([("a", b"1"), ("h", huge), ("z", b"2")])] \
        == [["a"], ["h"], ["z"]]
