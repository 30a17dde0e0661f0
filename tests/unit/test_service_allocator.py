"""ClusterIP allocation against the embedded store: atomic claims, stable re-apply,
release, conflicts, exhaustion and orphan collection."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator

import pytest

from villi.kvstore import EmbeddedStore
from villi.service import allocator
from villi.service.allocator import (
    ClusterIPError,
    allocate_cluster_ip,
    claim_key,
    cluster_ip_of,
    collect_garbage,
    owner_key,
    release_cluster_ip,
)


@pytest.fixture
async def store() -> AsyncIterator[EmbeddedStore]:
    s = EmbeddedStore(None)
    try:
        yield s
    finally:
        await s.close()


async def test_allocates_inside_the_cidr_and_records_the_claim(store: EmbeddedStore) -> None:
    ip = await allocate_cluster_ip(store, "shop", "web", None)
    addr = ipaddress.IPv4Address(ip)
    net = ipaddress.IPv4Network("10.32.0.0/16")
    assert addr in net and addr not in (net.network_address, net.broadcast_address)
    claim = await store.get(claim_key(ip))
    assert claim is not None and claim.value == b"shop/web"
    owner = await store.get(owner_key("shop", "web"))
    assert owner is not None and owner.value.decode() == ip


async def test_reapplying_keeps_the_address(store: EmbeddedStore) -> None:
    ip = await allocate_cluster_ip(store, "shop", "web", None)
    assert await allocate_cluster_ip(store, "shop", "web", None) == ip
    assert await allocate_cluster_ip(store, "shop", "web", ip) == ip
    assert await cluster_ip_of(store, "shop", "web") == ip


async def test_requested_address(store: EmbeddedStore) -> None:
    assert await allocate_cluster_ip(store, "shop", "web", "10.32.0.10") == "10.32.0.10"
    with pytest.raises(ClusterIPError, match="10.32.0.10 is already allocated to shop/web"):
        await allocate_cluster_ip(store, "shop", "other", "10.32.0.10")
    # the loser holds nothing
    assert await cluster_ip_of(store, "shop", "other") is None


async def test_changing_the_requested_address_releases_the_old_one(
        store: EmbeddedStore) -> None:
    old = await allocate_cluster_ip(store, "shop", "web", None)
    new = await allocate_cluster_ip(store, "shop", "web", "10.32.7.7")
    assert new == "10.32.7.7" and old != new
    assert await store.get(claim_key(old)) is None
    assert await allocate_cluster_ip(store, "shop", "other", old) == old


async def test_release_frees_the_address(store: EmbeddedStore) -> None:
    ip = await allocate_cluster_ip(store, "shop", "web", None)
    assert await release_cluster_ip(store, "shop", "web") == ip
    assert await store.get(claim_key(ip)) is None
    assert await store.get(owner_key("shop", "web")) is None
    assert await release_cluster_ip(store, "shop", "web") is None
    assert await allocate_cluster_ip(store, "shop", "db", ip) == ip


async def test_out_of_cidr_and_bad_cidr(store: EmbeddedStore) -> None:
    with pytest.raises(ClusterIPError, match="outside the service CIDR 10.32.0.0/16") as exc:
        await allocate_cluster_ip(store, "shop", "web", "10.33.0.1")
    assert exc.value.field == "spec.clusterIP"
    with pytest.raises(ClusterIPError, match="overlaps 10.255.0.0/16"):
        await allocate_cluster_ip(store, "shop", "web", None, cidr="10.255.0.0/24")


async def test_concurrent_allocations_never_share_an_address(store: EmbeddedStore) -> None:
    ips = await asyncio.gather(*(allocate_cluster_ip(store, "ns", f"s{i}", None,
                                                     cidr="10.40.0.0/26") for i in range(40)))
    assert len(set(ips)) == 40


async def test_a_small_cidr_fills_up_then_fails_clearly(store: EmbeddedStore,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "RANDOM_TRIES", 2)
    ips = {await allocate_cluster_ip(store, "ns", f"s{i}", None, cidr="10.40.0.0/28")
           for i in range(14)}
    assert len(ips) == 14  # every host address of a /28, found after random misses
    with pytest.raises(ClusterIPError, match="service CIDR 10.40.0.0/28 is exhausted"):
        await allocate_cluster_ip(store, "ns", "one-too-many", None, cidr="10.40.0.0/28")


async def test_garbage_collection_drops_orphans(store: EmbeddedStore) -> None:
    keep = await allocate_cluster_ip(store, "shop", "web", None)
    gone = await allocate_cluster_ip(store, "shop", "old", None)
    await store.create(claim_key("10.32.99.99"), b"shop/crashed")  # claim without index
    released = await collect_garbage(store, [("shop", "web")])
    assert sorted(released) == sorted([gone, "10.32.99.99"])
    assert await cluster_ip_of(store, "shop", "web") == keep
    assert await store.get(owner_key("shop", "old")) is None
