"""The operator's ENI IPAM against a real cloud-sim over loopback HTTP and the real
embedded kvstore: watermarks, queue order, excess release handshake, GC, resync
strategies, throttling and eventual consistency."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from aiohttp import web

from villi.cloudsim.model import Cloud
from villi.cloudsim.server import CloudSimServer, SimSettings, load_topology, serve
from villi.ipam.eni import (
    MARKED,
    READY_FOR_RELEASE,
    ENIAgentStatus,
    ENIRecord,
    PoolParams,
    eni_key,
)
from villi.kvstore.backoff import BackoffPolicy
from villi.operator.cloud import CloudClient
from villi.operator.eni import NODE_TAG, ENIAllocator, ENISettings
from villi.operator.eni_cache import InterfaceCache
from villi.testing.kvstore import memory_store

TOPOLOGY = {
    "instanceTypes": [{"name": "t.small", "maxInterfaces": 3, "ipsPerInterface": 6}],
    "subnets": [{"id": "subnet-a", "cidr": "10.70.0.0/24"},
                {"id": "subnet-b", "cidr": "10.70.1.0/24"},
                {"id": "subnet-c", "cidr": "10.70.2.0/24"}],
}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Env:
    server: CloudSimServer
    url: str
    clock: Clock


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    yield_env = await _env(SimSettings())
    try:
        yield yield_env[0]
    finally:
        await yield_env[1].cleanup()


async def _env(settings: SimSettings) -> tuple[Env, web.AppRunner]:
    clock = Clock()
    cloud = Cloud(consistency_delay_s=settings.consistency_delay_s)
    load_topology(cloud, TOPOLOGY)
    server = CloudSimServer(cloud, settings)
    runner, port = await serve(server, "127.0.0.1", 0)
    return Env(server, f"http://127.0.0.1:{port}", clock), runner


def _launch(env: Env, node: str, subnet: str = "subnet-a") -> str:
    doc = env.server.cloud.RunInstances({"InstanceType": "t.small", "SubnetId": subnet,
                                         "Tags": {NODE_TAG: node}})
    return str(doc["Instance"]["InstanceId"])


def _alloc(env: Env, store: object, cloud: CloudClient, **kw: object) -> ENIAllocator:
    strategy = str(kw.pop("strategy", "incremental"))
    kw.setdefault("gc_interval_s", 0.0)
    settings = ENISettings(op_interval_s=1.0, release_delay_s=5.0, node_grace_s=0.0,
                           **kw)  # type: ignore[arg-type]
    cache = InterfaceCache(cloud, strategy=strategy, clock=env.clock)
    return ENIAllocator(store, cache, settings, clock=env.clock)  # type: ignore[arg-type]


async def _record(store: object, node: str) -> ENIRecord:
    kv = await store.get(eni_key(node))  # type: ignore[attr-defined]
    assert kv is not None
    return ENIRecord.decode(kv.value)


async def test_bootstrap_refill_and_queue_order(env: Env) -> None:
    iid = _launch(env, "n1")
    _launch(env, "n2")
    async with memory_store() as store, CloudClient(env.url) as cloud:
        alloc = _alloc(env, store, cloud)
        alloc.node_seen("n1")
        alloc.node_seen("n2")
        alloc.status_seen("n2", ENIAgentStatus(pending=0))
        assert await alloc.cycle()  # both need 8: one op each (≤1 op/node/s)
        rec = await _record(store, "n1")
        assert rec.instance_id == iid and len(rec.pool()) == 5  # 6 IPs/iface - primary
        assert [i.index for i in rec.interfaces] == [1]
        assert rec.needed == 3
        # attachable: 0 room left + 1 free slot * 5
        assert rec.attachable == 5
        await alloc.cycle()  # within the same second: no new operation
        assert len(alloc.op_log) == 2
        env.clock.now += 1
        await alloc.cycle()
        rec = await _record(store, "n1")
        assert len(rec.pool()) == 8 and [i.index for i in rec.interfaces] == [1, 2]
        assert rec.needed == 0 and rec.attachable == 2
        # n1 uses 6: needed 6 but only 2 attachable: assign 2, then a clear error
        used = {str(ip): f"pod-{i}" for i, ip in enumerate(sorted(rec.pool())[:6])}
        alloc.status_seen("n1", ENIAgentStatus(used))
        alloc.status_seen("n2", ENIAgentStatus(
            {str(ip): "p" for ip in sorted((await _record(store, "n2")).pool())[:2]}))
        env.clock.now += 1
        before = len(alloc.op_log)
        await alloc.cycle()
        # queue ordered by deficit: n1 (needs 6) goes before n2 (needs 2)
        assert [n for n, _ in alloc.op_log[before:]] == ["n1", "n2"]
        env.clock.now += 1
        await alloc.cycle()
        rec = await _record(store, "n1")
        assert len(rec.pool()) == 10 and rec.attachable == 0
        assert "InstanceFull" in rec.error
    for requested, bound in alloc.requested_per_op:
        assert requested <= bound


async def test_excess_released_after_delay_with_handshake(env: Env) -> None:
    _launch(env, "n1")
    async with memory_store() as store, CloudClient(env.url) as cloud:
        alloc = _alloc(env, store, cloud, pool=PoolParams(pre_allocate=2))
        alloc.node_seen("n1")
        alloc.status_seen("n1", ENIAgentStatus(pending=9))  # surge: 9 pods waiting
        await alloc.cycle()
        rec = await _record(store, "n1")
        assert len(rec.pool()) == 5  # surge capped by the interface's room
        alloc.status_seen("n1", ENIAgentStatus({str(sorted(rec.pool())[0]): "pod"}))
        await alloc.cycle()  # excess = 5 - 1 - 2 = 2, timer starts
        env.clock.now += 4
        await alloc.cycle()
        assert not (await _record(store, "n1")).release  # not before the delay
        env.clock.now += 1.5
        await alloc.cycle()
        rec = await _record(store, "n1")
        marked = sorted(rec.release)
        assert len(marked) == 2 and set(rec.release.values()) == {MARKED}
        env.clock.now += 1.5
        await alloc.cycle()  # no ack yet: nothing unassigned
        assert len((await _record(store, "n1")).pool()) == 5
        alloc.status_seen("n1", ENIAgentStatus(
            {str(sorted(rec.pool())[0]): "pod"}, {ip: READY_FOR_RELEASE for ip in marked}))
        await alloc.cycle()
        rec = await _record(store, "n1")
        assert len(rec.pool()) == 3 and not rec.release
        assert not {str(ip) for ip in rec.pool()} & set(marked)
    assert env.server.calls["UnassignPrivateIpAddresses"] == 1


async def test_node_delete_and_terminated_instance_are_collected(env: Env) -> None:
    _launch(env, "n1")
    iid2 = _launch(env, "n2")
    async with memory_store() as store, CloudClient(env.url) as cloud:
        alloc = _alloc(env, store, cloud)
        alloc.node_seen("n1")
        alloc.node_seen("n2")
        await alloc.cycle()
        ours = [e for e in env.server.cloud.interfaces.values() if e.tags]
        assert len(ours) == 2
        alloc.node_gone("n1")
        env.clock.now += 1
        await alloc.cycle()
        assert await store.get(eni_key("n1")) is None
        created = env.server.calls["CreateNetworkInterface"]  # n2 kept allocating
        env.server.cloud.TerminateInstances({"InstanceIds": [iid2]})
        alloc.node_gone("n2")
        for _ in range(3):
            env.clock.now += 61
            await alloc.cycle()
        assert [e for e in env.server.cloud.interfaces.values() if e.tags] == []
        assert env.server.calls["DeleteNetworkInterface"] == created == 3


@pytest.mark.parametrize(("strategy", "describes_full", "by_instance"), [
    ("per-subnet", 3, False), ("all", 1, False), ("incremental", 1, True)])
async def test_resync_strategies(env: Env, strategy: str, describes_full: int,
                                 by_instance: bool) -> None:
    _launch(env, "n1")
    async with memory_store() as store, CloudClient(env.url) as cloud:
        alloc = _alloc(env, store, cloud, strategy=strategy, gc_interval_s=1e6)
        await alloc.cache.full_resync()
        assert cloud.calls["DescribeNetworkInterfaces"] == describes_full
        alloc.last_full = alloc.last_gc = env.clock.now
        alloc.node_seen("n1")
        before = cloud.calls["DescribeNetworkInterfaces"]
        await alloc.cycle()
        after_change = cloud.calls["DescribeNetworkInterfaces"] - before
        assert after_change == describes_full
        assert (alloc.cache.instance_resyncs == 1) is by_instance
        assert len((await _record(store, "n1")).pool()) == 5


async def test_throttled_cloud_still_fills_pools_within_bounds() -> None:
    env, runner = await _env(SimSettings(rate_limit=15, burst=3))
    try:
        for n in ("n1", "n2", "n3"):
            _launch(env, n)
        async with memory_store() as store, CloudClient(
                env.url, backoff=BackoffPolicy(0.02, 0.5, 30)) as cloud:
            alloc = _alloc(env, store, cloud)
            for n in ("n1", "n2", "n3"):
                alloc.node_seen(n)
            for _ in range(3):
                await alloc.cycle()
                env.clock.now += 1
            for n in ("n1", "n2", "n3"):
                assert len((await _record(store, n)).pool()) == 8  # pre-allocate
            assert sum(env.server.throttled.values()) == cloud.throttled > 0
        for requested, bound in alloc.requested_per_op:
            assert requested <= bound
    finally:
        await runner.cleanup()


async def test_eventual_consistency_does_not_double_create() -> None:
    env, runner = await _env(SimSettings(consistency_delay_s=30))
    try:
        _launch(env, "n1")
        async with memory_store() as store, CloudClient(env.url) as cloud:
            alloc = _alloc(env, store, cloud, pool=PoolParams(pre_allocate=4))
            alloc.node_seen("n1")
            await alloc.cycle()
            env.clock.now += 1
            await alloc.cycle()
            env.clock.now += 1
            await alloc.cycle()
            assert env.server.calls["CreateNetworkInterface"] == 1
            assert len((await _record(store, "n1")).pool()) == 4
    finally:
        await runner.cleanup()


def test_operator_flags() -> None:
    import argparse

    from villi.operator.eni_flags import add_eni_arguments, eni_settings_from_args

    ap = argparse.ArgumentParser()
    ap.add_argument("--reclaim-grace", type=float, default=30.0)
    add_eni_arguments(ap)
    s = eni_settings_from_args(ap.parse_args(
        ["--ipam", "eni", "--cloud-url", "http://127.0.0.1:1", "--eni-resync", "all",
         "--pre-allocate", "4", "--max-above-watermark", "2",
         "--excess-ip-release-delay", "5"]))
    assert (s.resync, s.pool.pre_allocate, s.pool.max_above_watermark, s.release_delay_s) \
        == ("all", 4, 2, 5.0)
    assert s.pool.min_allocate == 0 and s.op_interval_s == 1.0
    with pytest.raises(SystemExit, match="needs --cloud-url"):
        eni_settings_from_args(ap.parse_args(["--ipam", "eni"]))
    with pytest.raises(SystemExit, match="max-allocate must be >= min-allocate"):
        eni_settings_from_args(ap.parse_args(
            ["--cloud-url", "x", "--min-allocate", "5", "--max-allocate", "2"]))
    with pytest.raises(ValueError, match="unknown ENI resync strategy"):
        InterfaceCache(None, strategy="sometimes")  # type: ignore[arg-type]
