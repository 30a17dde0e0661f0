"""villi cloud-sim over real HTTP on loopback: limits, pagination, throttling,
eventual consistency, counters; and the operator's client against it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest

from villi.cloudsim.model import Cloud
from villi.cloudsim.server import CloudSimServer, SimSettings, load_topology, serve
from villi.errors import CloudAPIError
from villi.kvstore.backoff import BackoffPolicy
from villi.operator.cloud import CloudClient

TOPOLOGY = {
    "instanceTypes": [{"name": "t.small", "maxInterfaces": 2, "ipsPerInterface": 4}],
    "subnets": [{"id": "subnet-a", "cidr": "10.70.0.0/28"},
                {"id": "subnet-b", "cidr": "10.70.1.0/24"}],
}


async def _start(settings: SimSettings) -> tuple[CloudSimServer, aiohttp.web.AppRunner, str]:
    cloud = Cloud(consistency_delay_s=settings.consistency_delay_s)
    load_topology(cloud, TOPOLOGY)
    server = CloudSimServer(cloud, settings)
    runner, port = await serve(server, "127.0.0.1", 0)
    return server, runner, f"http://127.0.0.1:{port}"


@pytest.fixture
async def sim() -> AsyncIterator[tuple[CloudSimServer, str]]:
    server, runner, url = await _start(SimSettings())
    try:
        yield server, url
    finally:
        await runner.cleanup()


async def _post(url: str, action: str, **params: object) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s, s.post(f"{url}/api/{action}", json=params) as r:
        return r.status, await r.json()


async def test_interface_lifecycle_respects_instance_limits(sim: tuple[CloudSimServer, str]
                                                            ) -> None:
    server, url = sim
    async with CloudClient(url) as cloud:
        inst = (await cloud.call("RunInstances", InstanceType="t.small", SubnetId="subnet-b",
                                 Tags={"villi-node": "n1"}))["Instance"]
        iid = inst["InstanceId"]
        eni = (await cloud.call("CreateNetworkInterface", SubnetId="subnet-b",
                                SecondaryPrivateIpAddressCount=2, Tags={"c": "x"})
               )["NetworkInterface"]
        assert len(eni["PrivateIpAddresses"]) == 3
        await cloud.call("AttachNetworkInterface", NetworkInterfaceId=eni["NetworkInterfaceId"],
                         InstanceId=iid, DeviceIndex=1)
        got = await cloud.call("AssignPrivateIpAddresses",
                               NetworkInterfaceId=eni["NetworkInterfaceId"],
                               SecondaryPrivateIpAddressCount=1)
        assert len(got["AssignedPrivateIpAddresses"]) == 1
        with pytest.raises(CloudAPIError) as exc:  # 4 IPs per interface on t.small
            await cloud.call("AssignPrivateIpAddresses",
                             NetworkInterfaceId=eni["NetworkInterfaceId"],
                             SecondaryPrivateIpAddressCount=1)
        assert exc.value.code == "PrivateIpAddressLimitExceeded"
        second = (await cloud.call("CreateNetworkInterface", SubnetId="subnet-b")
                  )["NetworkInterface"]["NetworkInterfaceId"]
        with pytest.raises(CloudAPIError) as exc:  # primary + one = 2 interfaces
            await cloud.call("AttachNetworkInterface", NetworkInterfaceId=second,
                             InstanceId=iid, DeviceIndex=2)
        assert exc.value.code == "AttachmentLimitExceeded"
        with pytest.raises(CloudAPIError) as exc:
            await cloud.call("DeleteNetworkInterface",
                             NetworkInterfaceId=eni["NetworkInterfaceId"])
        assert exc.value.code == "InvalidNetworkInterface.InUse"
        await cloud.call("UnassignPrivateIpAddresses",
                         NetworkInterfaceId=eni["NetworkInterfaceId"],
                         PrivateIpAddresses=got["AssignedPrivateIpAddresses"])
        await cloud.call("DetachNetworkInterface", NetworkInterfaceId=eni["NetworkInterfaceId"])
        await cloud.call("DeleteNetworkInterface", NetworkInterfaceId=eni["NetworkInterfaceId"])
        by_inst = await cloud.describe_all("DescribeNetworkInterfaces", "NetworkInterfaces",
                                           InstanceIds=[iid])
        assert [e["Attachment"]["DeviceIndex"] for e in by_inst] == [0]
    assert server.calls["AttachNetworkInterface"] == 2
    assert server.errors["AttachNetworkInterface"] == 1


async def test_subnet_runs_out_with_a_clear_error(sim: tuple[CloudSimServer, str]) -> None:
    _, url = sim
    # a /28 has 16 - 5 reserved = 11 addresses
    status, doc = await _post(url, "CreateNetworkInterface", SubnetId="subnet-a",
                              SecondaryPrivateIpAddressCount=11)
    assert status == 400
    assert doc["Error"]["Code"] == "InsufficientFreeAddressesInSubnet"
    status, doc = await _post(url, "DescribeSubnets", SubnetIds=["subnet-a"])
    assert doc["Subnets"][0]["AvailableIpAddressCount"] == 11  # nothing half-taken
    status, doc = await _post(url, "CreateNetworkInterface", SubnetId="nope")
    assert (status, doc["Error"]["Code"]) == (400, "InvalidSubnetID.NotFound")
    status, doc = await _post(url, "AssignPrivateIpAddresses", NetworkInterfaceId="eni-x",
                              SecondaryPrivateIpAddressCount="two")
    assert doc["Error"]["Code"] in ("InvalidNetworkInterfaceID.NotFound",
                                    "InvalidParameterValue")


async def test_describe_paginates_and_filters_by_subnet(sim: tuple[CloudSimServer, str]
                                                        ) -> None:
    _, url = sim
    async with CloudClient(url) as cloud:
        for _ in range(12):
            await cloud.call("CreateNetworkInterface", SubnetId="subnet-b")
        await cloud.call("CreateNetworkInterface", SubnetId="subnet-a")
        first = await cloud.call("DescribeNetworkInterfaces", MaxResults=5)
        assert len(first["NetworkInterfaces"]) == 5 and first["NextToken"]
        before = cloud.calls["DescribeNetworkInterfaces"]
        every = await cloud.describe_all("DescribeNetworkInterfaces", "NetworkInterfaces",
                                         page_size=5)
        assert len({e["NetworkInterfaceId"] for e in every}) == 13
        assert cloud.calls["DescribeNetworkInterfaces"] - before == 3
        in_a = await cloud.describe_all("DescribeNetworkInterfaces", "NetworkInterfaces",
                                        SubnetIds=["subnet-a"])
        assert [e["SubnetId"] for e in in_a] == ["subnet-a"]


async def test_new_interface_is_eventually_consistent() -> None:
    server, runner, url = await _start(SimSettings(consistency_delay_s=0.3))
    try:
        async with CloudClient(url) as cloud:
            eni = (await cloud.call("CreateNetworkInterface", SubnetId="subnet-b")
                   )["NetworkInterface"]["NetworkInterfaceId"]
            listed = await cloud.describe_all("DescribeNetworkInterfaces", "NetworkInterfaces")
            assert listed == []
            # acting on it by id works at once
            await cloud.call("AssignPrivateIpAddresses", NetworkInterfaceId=eni,
                             SecondaryPrivateIpAddressCount=1)
            await asyncio.sleep(0.35)
            listed = await cloud.describe_all("DescribeNetworkInterfaces", "NetworkInterfaces")
            assert [e["NetworkInterfaceId"] for e in listed] == [eni]
    finally:
        await runner.cleanup()


async def test_rate_limit_throttles_and_client_backs_off() -> None:
    server, runner, url = await _start(SimSettings(rate_limit=20, burst=2, latency_s=0.01))
    try:
        async with aiohttp.ClientSession() as s:
            codes = []
            for _ in range(6):
                async with s.post(f"{url}/api/DescribeSubnets", json={}) as r:
                    codes.append((r.status, (await r.json()).get("Error", {}).get("Code")))
        assert (503, "RequestLimitExceeded") in codes
        # without a client-side limiter the client sees throttles and retries through them
        async with CloudClient(url, backoff=BackoffPolicy(0.02, 0.2, 20)) as cloud:
            await asyncio.gather(*(cloud.call("DescribeSubnets") for _ in range(8)))
            assert cloud.throttled > 0
        # with a limiter under the server's rate it never is
        await asyncio.sleep(0.2)
        async with CloudClient(url, rate=15, burst=1) as cloud:
            await asyncio.gather(*(cloud.call("DescribeSubnets") for _ in range(8)))
            assert cloud.throttled == 0
        async with aiohttp.ClientSession() as s, s.get(f"{url}/metrics") as r:
            text = await r.text()
        assert 'villi_cloudsim_api_throttled_total{action="DescribeSubnets"}' in text
        calls = [ln for ln in text.splitlines()
                 if ln.startswith('villi_cloudsim_api_calls_total{action="DescribeSubnets"}')]
        assert int(calls[0].split()[-1]) == server.calls["DescribeSubnets"] >= 22
    finally:
        await runner.cleanup()


async def test_throttling_past_the_bound_is_a_clear_error() -> None:
    server, runner, url = await _start(SimSettings(rate_limit=0.001, burst=1))
    try:
        async with CloudClient(url, backoff=BackoffPolicy(0.001, 0.002, 3)) as cloud:
            await cloud.call("DescribeSubnets")
            with pytest.raises(CloudAPIError) as exc:
                await cloud.call("DescribeSubnets")
            assert exc.value.code == "RequestLimitExceeded"
            assert cloud.throttled == 3
    finally:
        await runner.cleanup()


def test_topology_errors_name_the_entry() -> None:
    cloud = Cloud()
    with pytest.raises(ValueError, match=r"subnets\[1\]\.cidr: .*overlaps"):
        load_topology(cloud, {"subnets": [{"cidr": "10.0.0.0/24"}, {"cidr": "10.0.0.0/25"}]})
    assert cloud.subnets == {}  # nothing half-applied
    with pytest.raises(ValueError, match=r"instanceTypes\[0\]"):
        load_topology(cloud, {"instanceTypes": [{"name": "x"}]})
    with pytest.raises(ValueError, match="unknown field"):
        load_topology(cloud, json.loads('{"subnet": []}'))
