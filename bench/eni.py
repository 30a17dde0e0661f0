"""ENI IPAM in miniature: the seed's three measurements, each side by side in one run.

Everything runs on loopback: ``villi cloud-sim`` (a simulator, in-process, real HTTP,
``--latency`` ms per call) and the operator's real cache/allocator code over the real
embedded kvstore.

1. ``resync``: a full resync with ``--interfaces`` (1,500) interfaces in ``--subnets``
   (42) subnets — API requests and wall time of ``per-subnet`` (one paginated Describe
   per subnet, the old way) vs ``all`` (one paginated Describe, cilium#22478).
2. ``after-change``: ``--changes`` allocations on a cloud with ``--big`` (8,000)
   interfaces, each followed by the strategy's refresh — a full resync (``all``) vs an
   incremental per-instance resync (cilium#25619: ~20 s → ~2 s upstream).
3. ``burst``: ``--pods`` (100) pods on 4 nodes started at once under a
   ``--rate-limit`` (10) requests/s cloud limit — time until every pod has an IP, API
   calls per pod, throttling errors seen, and whether any operation asked for more than
   needed + max-above-watermark IPs; ``all`` vs ``incremental``.

Prints a table and ratios; writes ``bench/results/eni.json``.

    .venv/bin/python bench/eni.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from villi.agent.eni_ipam import ENINodeIPAM
from villi.cloudsim.model import Cloud
from villi.cloudsim.server import CloudSimServer, SimSettings, serve
from villi.errors import PoolExhausted
from villi.ipam.eni import PoolParams
from villi.kvstore.backoff import BackoffPolicy
from villi.kvstore.schema import NodeEntry, node_key
from villi.operator.cloud import CloudClient
from villi.operator.eni import NODE_TAG, ENIAllocator, ENISettings
from villi.operator.eni_cache import InterfaceCache
from villi.testing.kvstore import memory_store

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "eni.json"


def _cloud(subnets: int, instance_type: tuple[int, int]) -> Cloud:
    cloud = Cloud()
    cloud.add_instance_type("b.large", *instance_type)
    for i in range(subnets):
        cloud.add_subnet(f"10.{80 + i // 16}.{(i % 16) * 16}.0/20", subnet_id=f"subnet-{i:03d}")
    return cloud


def _populate(cloud: Cloud, interfaces: int, per_instance: int) -> list[str]:
    """``interfaces`` attached interfaces spread over subnets and instances (set-up
    through the model: not API calls)."""
    subnets = sorted(cloud.subnets)
    instances: list[str] = []
    made = 0
    while made < interfaces:
        sid = subnets[len(instances) % len(subnets)]
        iid = cloud.RunInstances({"InstanceType": "b.large", "SubnetId": sid,
                                  "Tags": {NODE_TAG: f"n{len(instances)}"}})["Instance"][
                                      "InstanceId"]
        instances.append(iid)
        made += 1
        for index in range(1, per_instance):
            if made >= interfaces:
                break
            eid = cloud.CreateNetworkInterface({"SubnetId": sid,
                                                "SecondaryPrivateIpAddressCount": 2})[
                                                    "NetworkInterface"]["NetworkInterfaceId"]
            cloud.AttachNetworkInterface({"NetworkInterfaceId": eid, "InstanceId": iid,
                                          "DeviceIndex": index})
            made += 1
    return instances


async def _serve(cloud: Cloud, settings: SimSettings) -> tuple[CloudSimServer, Any, str]:
    server = CloudSimServer(cloud, settings)
    runner, port = await serve(server, "127.0.0.1", 0)
    return server, runner, f"http://127.0.0.1:{port}"


async def bench_resync(n_ifaces: int, n_subnets: int, latency: float, page: int
                       ) -> dict[str, Any]:
    cloud = _cloud(n_subnets, (15, 10))
    _populate(cloud, n_ifaces, 15)
    server, runner, url = await _serve(cloud, SimSettings(latency_s=latency))
    out: dict[str, Any] = {"interfaces": n_ifaces, "subnets": n_subnets}
    try:
        for strategy in ("per-subnet", "all"):
            async with CloudClient(url) as client:
                cache = InterfaceCache(client, strategy=strategy)
                await cache.full_resync()  # warm (instance types)
                before = sum(client.calls.values())
                describes = client.calls["DescribeNetworkInterfaces"]
                t0 = time.perf_counter()
                await cache.full_resync()
                out[strategy] = {
                    "seconds": time.perf_counter() - t0,
                    "requests": sum(client.calls.values()) - before,
                    "describe_interfaces": client.calls["DescribeNetworkInterfaces"] - describes,
                    "seen": len(cache.interfaces)}
    finally:
        await runner.cleanup()
    return out


async def bench_after_change(n_ifaces: int, changes: int, latency: float) -> dict[str, Any]:
    cloud = _cloud(8, (15, 30))
    instances = _populate(cloud, n_ifaces, 15)
    server, runner, url = await _serve(cloud, SimSettings(latency_s=latency))
    out: dict[str, Any] = {"interfaces": n_ifaces, "changes": changes}
    try:
        for strategy in ("all", "incremental"):
            async with CloudClient(url) as client:
                cache = InterfaceCache(client, strategy=strategy)
                await cache.full_resync()
                before = dict(client.calls)
                t_refresh = 0.0
                t0 = time.perf_counter()
                for i in range(changes):
                    iid = instances[(i * 7) % len(instances)]
                    eni = next(e for e in cache.interfaces_of(iid) if (e.index or 0) >= 1)
                    await cache.assign(eni, 1)
                    t1 = time.perf_counter()
                    await cache.after_change(iid)
                    t_refresh += time.perf_counter() - t1
                out[strategy] = {
                    "seconds": time.perf_counter() - t0, "refresh_seconds": t_refresh,
                    "requests": sum(client.calls.values()) - sum(before.values()),
                    "describe_pages": client.calls["DescribeNetworkInterfaces"]
                    - before.get("DescribeNetworkInterfaces", 0)}
    finally:
        await runner.cleanup()
    return out


async def _burst_once(strategy: str, pods: int, nodes: int, rate: float, latency: float,
                      maw: int) -> dict[str, Any]:
    cloud = _cloud(2, (4, 16))
    for n in range(nodes):
        cloud.RunInstances({"InstanceType": "b.large", "SubnetId": "subnet-000",
                            "Tags": {NODE_TAG: f"node{n}"}})
    _populate(cloud, 200, 4)  # other tenants' instances: listings are not free
    server, runner, url = await _serve(cloud, SimSettings(latency_s=latency, rate_limit=rate,
                                                          burst=rate))
    tmp = tempfile.TemporaryDirectory()
    try:
        async with memory_store() as store, CloudClient(
                url, rate=rate, burst=rate, backoff=BackoffPolicy(0.05, 2.0, 50)) as client:
            settings = ENISettings(pool=PoolParams(max_above_watermark=maw), resync=strategy,
                                   op_interval_s=1.0, rate_limit=rate)
            alloc = ENIAllocator(store, InterfaceCache(client, strategy=strategy), settings)
            agents = []
            for n in range(nodes):
                (Path(tmp.name) / f"node{n}").mkdir()
                ipam = ENINodeIPAM(Path(tmp.name) / f"node{n}", f"node{n}")

                async def publish() -> None:
                    return None

                ipam.start_reporting(store, publish, 0.5)
                agents.append(ipam)
            tasks = [asyncio.create_task(a.follow()) for a in agents]
            tasks.append(asyncio.create_task(alloc.run()))
            for n in range(nodes):
                await store.put(node_key(f"node{n}"), NodeEntry(f"node{n}", None).encode())
            got: dict[int, float] = {}
            t0 = time.perf_counter()

            async def pod(i: int) -> None:
                ipam = agents[i % nodes]
                while True:
                    try:
                        ipam.allocate(f"pod-{i}")
                        got[i] = time.perf_counter() - t0
                        return
                    except PoolExhausted:
                        await asyncio.sleep(0.1)  # the runtime retries a code-11 ADD

            await asyncio.wait_for(asyncio.gather(*(pod(i) for i in range(pods))), 600)
            elapsed = time.perf_counter() - t0
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for a in agents:
                await a.close()
            over = [(r, b) for r, b in alloc.requested_per_op if r > b]
            return {"seconds_to_all_ips": elapsed,
                    "p50_seconds": sorted(got.values())[len(got) // 2],
                    "api_calls": sum(server.calls.values()),
                    "api_calls_per_pod": sum(server.calls.values()) / pods,
                    "throttled": sum(server.throttled.values()),
                    "operations": alloc.ops,
                    "max_requested_per_op": max((r for r, _ in alloc.requested_per_op),
                                                default=0),
                    "ops_over_needed_watermark_surge": len(over)}
    finally:
        await runner.cleanup()
        tmp.cleanup()


async def bench_burst(pods: int, nodes: int, rate: float, latency: float, maw: int
                      ) -> dict[str, Any]:
    out: dict[str, Any] = {"pods": pods, "nodes": nodes, "rate_limit": rate,
                           "max_above_watermark": maw}
    for strategy in ("all", "incremental"):
        out[strategy] = await _burst_once(strategy, pods, nodes, rate, latency, maw)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (CI, a shared machine)")
    ap.add_argument("--interfaces", type=int, default=1500)
    ap.add_argument("--subnets", type=int, default=42)
    ap.add_argument("--big", type=int, default=8000)
    ap.add_argument("--changes", type=int, default=20)
    ap.add_argument("--pods", type=int, default=100)
    ap.add_argument("--rate-limit", type=float, default=10.0)
    ap.add_argument("--latency", type=float, default=20.0, help="ms per cloud API call")
    ap.add_argument("--max-above-watermark", type=int, default=4)
    ap.add_argument("--page", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = ap.parse_args(argv)
    if a.quick:
        a.interfaces, a.big, a.changes, a.pods = 600, 2000, 10, 40
    lat = a.latency / 1000
    result: dict[str, Any] = {
        "machine": platform.node(), "python": sys.version.split()[0],
        "latency_ms": a.latency, "quick": a.quick,
        "resync": asyncio.run(bench_resync(a.interfaces, a.subnets, lat, a.page)),
        "after_change": asyncio.run(bench_after_change(a.big, a.changes, lat)),
        "burst": asyncio.run(bench_burst(a.pods, 4, a.rate_limit, lat,
                                         a.max_above_watermark)),
    }
    r, c, b = result["resync"], result["after_change"], result["burst"]
    result["ratios"] = {
        "resync_requests_per_subnet_over_all": r["per-subnet"]["requests"] / r["all"]["requests"],
        "resync_time_per_subnet_over_all": r["per-subnet"]["seconds"] / r["all"]["seconds"],
        "after_change_refresh_full_over_incremental":
            c["all"]["refresh_seconds"] / c["incremental"]["refresh_seconds"],
        "burst_time_all_over_incremental":
            b["all"]["seconds_to_all_ips"] / b["incremental"]["seconds_to_all_ips"],
    }
    print(f"resync, {r['interfaces']} interfaces in {r['subnets']} subnets "
          f"({a.latency:.0f} ms/call):")
    for s in ("per-subnet", "all"):
        print(f"  {s:<11} {r[s]['requests']:>5} requests  {r[s]['seconds']:7.2f} s  "
              f"({r[s]['seen']} interfaces)")
    print(f"refresh after each of {c['changes']} allocations, {c['interfaces']} interfaces:")
    for s in ("all", "incremental"):
        print(f"  {s:<11} {c[s]['requests']:>5} requests  {c[s]['refresh_seconds']:7.2f} s "
              f"refreshing ({c[s]['refresh_seconds'] / c['changes']:.3f} s per change)")
    print(f"burst of {b['pods']} pods on 4 nodes, {b['rate_limit']:.0f} requests/s limit:")
    for s in ("all", "incremental"):
        x = b[s]
        print(f"  {s:<11} all IPs in {x['seconds_to_all_ips']:6.2f} s  "
              f"{x['api_calls_per_pod']:.2f} calls/pod  {x['throttled']} throttled  "
              f"max {x['max_requested_per_op']} IPs/op  "
              f"{x['ops_over_needed_watermark_surge']} ops over needed+watermark+surge")
    for k, v in result["ratios"].items():
        print(f"  {k}: {v:.2f}x")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
