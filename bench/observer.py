"""Benchmark: flow events per second through the observer, on one core.

1. The kernel fills a 64 MiB ``villi_events`` ring: ``from_pod`` runs N times through
   BPF_PROG_TEST_RUN with monitor aggregation ``none`` (one event per packet).
2. The observer drains it stage by stage, each timed on its own: ringbuf read (mmap +
   strided numpy view), + flow ring append, + Hubble metrics (numpy group-by), + a
   filter (``--from-pod``), and read-time enrichment of 1% of the flows into Hubble JSON
   (what a reader asks for).
3. The CPU cost of observation during an iperf3 run between two pods (aggregation
   ``medium``, the default, and ``none``): CPU seconds the drain loop used per second.

Prints events/s per stage and writes bench/results/observer.json.
Run as root: python bench/observer.py [--events N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from villi.datapath import abi
from villi.datapath.compiler import NodeConfig
from villi.datapath.node import NodeDatapath
from villi.datapath.testrun import run
from villi.endpoint.manager import ip_be
from villi.observer.context import PodInfo, StaticContext
from villi.observer.filters import FilterSpec, Predicate, match
from villi.observer.flow import to_flow
from villi.observer.metrics import HubbleMetrics
from villi.observer.metricsconfig import parse as parse_metrics
from villi.observer.ring import FlowRing
from villi.testing import packets as pk
from villi.testing.topology import SingleNode

RESULTS = Path(__file__).parent / "results"
RING_BYTES = 64 * 1024 * 1024


def fill_ring(n: int) -> tuple[NodeDatapath, float]:
    dp = NodeDatapath("bench", f"obs{uuid.uuid4().hex[:6]}", NodeConfig(
        monitor_aggregation=abi.Aggregation.NONE,
        defines={"EVENTS_RINGBUF_SIZE": str(RING_BYTES)}))
    v = abi.EndpointValue(ifindex=1, identity=1000, endpoint_id=1)
    dp.endpoints.update(abi.EndpointKey(addr=ip_be("10.190.0.1")), v)
    dp.ipcache.update(abi.IpcacheKey(prefixlen=32, addr=ip_be("10.190.0.2")),
                      abi.IpcacheValue(identity=1001))
    pkt = pk.tcp("10.190.0.1", "10.190.0.2", 40000, 80, pk.SYN)
    t0 = time.perf_counter()
    run(dp.from_pod.fd, pkt, repeat=n)
    return dp, n / (time.perf_counter() - t0)


def stage(name: str, fn, batches: list[np.ndarray]) -> dict:  # type: ignore[no-untyped-def]
    total = sum(len(b) for b in batches)
    t0 = time.process_time()
    for b in batches:
        fn(b)
    dt = time.process_time() - t0
    rate = total / dt if dt else float("inf")
    print(f"  {name:<44} {rate / 1e6:8.2f} M events/s")
    return {"stage": name, "events": total, "cpu_seconds": dt, "events_per_second": rate}


def kernel_side(n: int) -> dict:
    dp, produce_rate = fill_ring(n)
    try:
        t0 = time.process_time()
        batches = []
        while True:
            b = dp.events.read_batch(65536)
            if not len(b):
                break
            batches.append(b)
        read_cpu = time.process_time() - t0
        total = sum(len(b) for b in batches)
        lost = dp.events_lost()
    finally:
        dp.close()
        dp.unpin()
    print(f"kernel produced {total:,} events ({lost:,} lost) at {produce_rate / 1e6:.2f} M/s")
    print(f"  {'ringbuf read (mmap + numpy view)':<44} {total / read_cpu / 1e6:8.2f} M events/s")
    ctx = StaticContext(node="bench", labels={1000: ["k8s:app=a"], 1001: ["k8s:app=b"]},
                        pods={"10.190.0.1": PodInfo("default", "a", 1),
                              "10.190.0.2": PodInfo("default", "b", 2)})
    ring, metrics = FlowRing(4095), HubbleMetrics()
    spec = FilterSpec([Predicate("from-pod", ["default/a"])])
    rows = [{"stage": "ringbuf read", "events": total, "cpu_seconds": read_cpu,
             "events_per_second": total / read_cpu}]
    rows.append(stage("flow ring append", ring.append, batches))
    rows.append(stage("hubble metrics (numpy group-by)", metrics.count, batches))
    ctx_metrics = HubbleMetrics(config=parse_metrics(
        "drop flow policy:sourceContext=app|pod;destinationContext=pod;"
        "labelsContext=source_namespace,destination_namespace"), ctx=ctx)
    rows.append(stage("hubble metrics with context labels", ctx_metrics.count, batches))
    rows.append(stage("filter --from-pod (numpy isin)", lambda b: match(spec, b, ctx), batches))

    def full(b: np.ndarray) -> None:
        ring.append(b)
        metrics.count(b)
        match(spec, b, ctx)
    rows.append(stage("ring + metrics + filter (the ingest path)", full, batches))
    sample = np.concatenate(batches)[:: 100][:20000]
    t0 = time.process_time()
    for r in sample:
        to_flow(r, 0, ctx)
    dt = time.process_time() - t0
    print(f"  {'enrich to Hubble JSON (read time, per flow)':<44} "
          f"{len(sample) / dt / 1e3:8.1f} K flows/s")
    rows.append({"stage": "enrich to Hubble JSON", "events": len(sample), "cpu_seconds": dt,
                 "events_per_second": len(sample) / dt})
    return {"produced": total, "lost": lost, "kernel_events_per_second": produce_rate,
            "stages": rows}


def iperf_cost(seconds: int, aggregation: int) -> dict:
    with SingleNode(NodeConfig(monitor_aggregation=aggregation), prefix="villi-bo") as node:
        a = node.add_pod("a", 3001)
        b = node.add_pod("b", 3002)
        srv = subprocess.Popen(["ip", "netns", "exec", b.netns, "iperf3", "-s", "-1"],
                               stdout=subprocess.DEVNULL)
        time.sleep(0.5)
        ctx = StaticContext()
        ring, metrics = FlowRing(4095), HubbleMetrics()
        stop = threading.Event()
        usage: dict[str, float] = {}
        count = [0]

        def drain() -> None:
            r0 = resource.getrusage(resource.RUSAGE_THREAD)
            while not stop.is_set():
                node.datapath.events.wait(0.1)
                batch = node.datapath.events.read_batch()
                if len(batch):
                    ring.append(batch)
                    metrics.count(batch)
                    count[0] += len(batch)
            r1 = resource.getrusage(resource.RUSAGE_THREAD)
            usage["cpu"] = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)

        t = threading.Thread(target=drain)
        t.start()
        out = subprocess.run(["ip", "netns", "exec", a.netns, "iperf3", "-c", b.ip, "-t",
                              str(seconds), "-J"], capture_output=True, text=True)
        stop.set()
        t.join()
        srv.wait(timeout=10)
        gbps = json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9
        _ = ctx
    name = {0: "none", 2: "medium"}.get(aggregation, str(aggregation))
    print(f"iperf3 {seconds}s, aggregation {name}: {gbps:.2f} Gbit/s, {count[0]:,} events, "
          f"observer CPU {usage['cpu'] / seconds * 100:.2f}% of one core")
    return {"aggregation": name, "gbps": gbps, "events": count[0],
            "observer_cpu_fraction": usage["cpu"] / seconds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--iperf-seconds", type=int, default=5)
    args = ap.parse_args()
    result = {"machine": {"kernel": platform.release(), "cpus": os.cpu_count()},
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    result["kernel_side"] = kernel_side(args.events)
    result["iperf"] = [iperf_cost(args.iperf_seconds, a) for a in (2, 0)]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "observer.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS / 'observer.json'}")


if __name__ == "__main__":
    main()
