"""The node side of ENI IPAM: allocation from the operator's record, the release
handshake, exhaustion, persistence; and the agent's ENINodeIPAM against a real
operator allocator, a real cloud-sim and the embedded kvstore."""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from villi.agent.eni_ipam import ENINodeIPAM
from villi.cloudsim.model import Cloud
from villi.cloudsim.server import CloudSimServer, SimSettings, load_topology, serve
from villi.errors import PoolExhausted
from villi.ipam.eni import (
    DO_NOT_RELEASE,
    MARKED,
    READY_FOR_RELEASE,
    ENIAgentStatus,
    ENIInterface,
    ENIRecord,
    PoolParams,
    eni_status_key,
)
from villi.operator.cloud import CloudClient
from villi.operator.eni import NODE_TAG, ENIAllocator, ENISettings
from villi.operator.eni_cache import InterfaceCache
from villi.testing.kvstore import eventually, memory_store


def _record(n: int, release: dict[str, str] | None = None, attachable: int = 0) -> ENIRecord:
    ips = tuple(IPv4Address(f"10.70.0.{10 + i}") for i in range(n))
    return ENIRecord("n1", "i-1", "t.small", 3, 6,
                     (ENIInterface("eni-1", 1, "subnet-a", IPv4Address("10.70.0.5"), ips),),
                     release or {}, attachable=attachable)


def test_allocate_release_exhaustion_and_persistence(tmp_path: Path) -> None:
    pool = ENIPool(tmp_path)
    with pytest.raises(PoolExhausted, match="no ENI pool yet"):
        pool.allocate("a")
    pool.set_record(_record(2, attachable=5))
    a = pool.allocate("a")
    assert pool.allocate("a") == a  # retried ADD: same IP
    b = pool.allocate("b")
    assert a != b and pool.usage().free == 5  # nothing left in the pool, 5 attachable
    for _ in range(3):  # a runtime retrying the same pod counts once
        with pytest.raises(PoolExhausted, match=r"2 in use, 2 in pool.*attaching more"):
            pool.allocate("c")
    assert pool.status().pending == 1
    pool.release(str(a))
    # restart: allocations come back from disk
    again = ENIPool(tmp_path)
    assert dict(again.owners()) == {str(b): "b"}
    again.set_record(_record(2))
    assert again.allocate("d") == a


def test_release_handshake_never_hands_out_a_marked_ip(tmp_path: Path) -> None:
    pool = ENIPool(tmp_path)
    pool.set_record(_record(3))
    used = str(pool.allocate("a"))
    free = [f"10.70.0.{10 + i}" for i in range(3) if f"10.70.0.{10 + i}" != used]
    pool.set_record(_record(3, {used: MARKED, free[0]: MARKED}))
    answers = pool.status().release
    assert answers == {used: DO_NOT_RELEASE, free[0]: READY_FOR_RELEASE}
    assert str(pool.allocate("b")) == free[1]
    with pytest.raises(PoolExhausted, match="1 being released"):
        pool.allocate("c")
    # the operator drops the mark before unassigning: the acked IP stays blocked
    pool.set_record(_record(3))
    with pytest.raises(PoolExhausted):
        pool.allocate("c")
    assert ENIPool(tmp_path).status().used == pool.status().used


def ENIPool(tmp: Path):  # noqa: N802 - a short local factory
    from villi.ipam.eni_pool import ENIPool as Pool

    return Pool("n1", state_dir=tmp)


async def test_agent_and_operator_converge_over_the_store(tmp_path: Path) -> None:
    cloud = Cloud()
    load_topology(cloud, {
        "instanceTypes": [{"name": "t.small", "maxInterfaces": 3, "ipsPerInterface": 6}],
        "subnets": [{"id": "subnet-a", "cidr": "10.70.0.0/24"}]})
    cloud.RunInstances({"InstanceType": "t.small", "SubnetId": "subnet-a",
                        "Tags": {NODE_TAG: "n1"}})
    runner, port = await serve(CloudSimServer(cloud, SimSettings()), "127.0.0.1", 0)
    try:
        async with memory_store() as store, CloudClient(f"http://127.0.0.1:{port}") as client:
            alloc = ENIAllocator(store, InterfaceCache(client),
                                 ENISettings(op_interval_s=0.05, release_delay_s=0.3,
                                             pool=PoolParams(pre_allocate=3)))
            ipam = ENINodeIPAM(tmp_path, "n1")

            async def publish() -> None:
                return None

            ipam.start_reporting(store, publish, 0.05)
            tasks = [asyncio.create_task(ipam.follow()), asyncio.create_task(alloc.run())]
            try:
                await store.put("villi/state/nodes/v1/n1", b'{"name": "n1", "ipv4": null}')
                await eventually(lambda: len(ipam.cidrs) == 3, timeout=10)
                ips = [ipam.allocate(f"pod-{i}") for i in range(3)]
                assert all(ip.startswith("10.70.0.") for ip in ips)
                # refill at the watermark: 3 used -> 3 more
                await eventually(lambda: len(ipam.cidrs) == 6, timeout=10)
                # 3 free in the pool + room for 4 on the second interface (3 slots used)
                assert ipam.usage()["free"] == 3 + 4
                kv = await store.get(eni_status_key("n1"))
                assert kv is not None and len(ENIAgentStatus.decode(kv.value).used) == 3
                # excess after the delay: release all three pods -> pool shrinks to 3
                for ip in ips:
                    ipam.release(ip)
                ipam.notify()
                await eventually(lambda: len(ipam.cidrs) == 3, timeout=10)
                assert cloud.interfaces  # still attached, only IPs were given back
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await ipam.close()
    finally:
        await runner.cleanup()
