#!/usr/bin/env python3
"""Lab benchmark (issue 5): lab start-up time, pod creation rate, cross-node throughput.

1. ``villi lab up --nodes N`` for N = 2, 4, 8, timed end to end as a user runs it (the
   CLI process, from nothing to every agent healthy with a pod CIDR), ``--repeats``
   times each, and ``villi lab down`` after each.
2. Pods per second through the CNI path: in a 2-node lab, ``--pods`` pods created with
   the lab's pod API, which execs ``villi-cni ADD`` exactly as a runtime would (new
   netns, the plugin process, the agent's endpoint creation), first one at a time,
   then ``--concurrency`` at a time; and deleted again (``villi-cni DEL``).
3. iperf3 TCP throughput from a client pod to a server pod on the same node and on the
   other node (native routing over the underlay veths and bridge), interleaved,
   ``--repeats`` runs of ``--duration`` seconds; prints the cross/same ratio.

Uses its own lab state file in a temp dir, so a lab the user is running is untouched;
everything is torn down at the end, also on an error or Ctrl-C. Prints a table and
writes JSON to ``bench/results/lab.json``.

    .venv/bin/python bench/lab.py            # about 2 minutes
    .venv/bin/python bench/lab.py --quick

Not a test: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

TMP = Path(tempfile.mkdtemp(prefix="villi-bench-lab-"))
os.environ["VILLI_LAB_STATE"] = str(TMP / "state.json")   # before villi.lab reads it

from villi.lab import _state, cluster, pods  # noqa: E402

VILLI = [sys.executable, "-m", "villi.cli.main"]
RESULTS = Path(__file__).resolve().parent / "results" / "lab.json"


def lab_up(nodes: int) -> float:
    t0 = time.monotonic()
    res = subprocess.run([*VILLI, "lab", "up", "--nodes", str(nodes)], capture_output=True,
                         text=True, timeout=300)
    dt = time.monotonic() - t0
    if res.returncode != 0:
        raise RuntimeError(f"lab up --nodes {nodes} failed:\n{res.stdout}\n{res.stderr}")
    return dt


def lab_down() -> float:
    t0 = time.monotonic()
    res = subprocess.run([*VILLI, "lab", "down"], capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise RuntimeError(f"lab down failed:\n{res.stdout}\n{res.stderr}")
    return time.monotonic() - t0


def bench_up(sizes: list[int], repeats: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in sizes:
        ups, downs = [], []
        for _ in range(repeats):
            ups.append(lab_up(n))
            downs.append(lab_down())
        out[str(n)] = {"up_s": ups, "up_median_s": statistics.median(ups),
                       "down_median_s": statistics.median(downs)}
        print(f"  lab up --nodes {n}: median {statistics.median(ups):.2f}s "
              f"(runs {', '.join(f'{x:.2f}' for x in ups)}); down "
              f"{statistics.median(downs):.2f}s", flush=True)
    return out


def bench_pods(count: int, concurrency: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, workers in (("sequential", 1), (f"concurrency {concurrency}", concurrency)):
        names = [f"bench/p{label[0]}{i}" for i in range(count)]
        t0 = time.monotonic()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda n: pods.add(n), names))
        add_s = time.monotonic() - t0
        t0 = time.monotonic()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(pods.delete, names))
        del_s = time.monotonic() - t0
        out[label] = {"pods": count, "workers": workers, "add_s": add_s,
                      "add_per_s": count / add_s, "del_s": del_s, "del_per_s": count / del_s}
        print(f"  {label:16} {count / add_s:6.1f} pods/s created "
              f"({add_s / count * 1000:.0f} ms each), {count / del_s:6.1f} pods/s deleted",
              flush=True)
    return out


def iperf(client_ns: str, server_ip: str, seconds: float) -> float:
    res = subprocess.run(["ip", "netns", "exec", client_ns, "iperf3", "-c", server_ip, "-t",
                          str(seconds), "-J"], capture_output=True, text=True,
                         timeout=seconds + 30)
    data = json.loads(res.stdout)
    if "error" in data:
        raise RuntimeError(f"iperf3: {data['error']}")
    return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9


def bench_throughput(duration: float, repeats: int) -> dict[str, Any]:
    server = pods.add("bench/iperf-server", node="1")
    same = pods.add("bench/client-same", node="1")
    cross = pods.add("bench/client-cross", node="2")
    srv = subprocess.Popen(["ip", "netns", "exec", server["netns"], "iperf3", "-s"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        runs: dict[str, list[float]] = {"same-node": [], "cross-node": []}
        for i in range(repeats):
            order = [("same-node", same), ("cross-node", cross)]
            for name, client in (order if i % 2 == 0 else order[::-1]):
                runs[name].append(iperf(client["netns"], server["ip"], duration))
    finally:
        srv.terminate()
        srv.wait()
    same_g = statistics.median(runs["same-node"])
    cross_g = statistics.median(runs["cross-node"])
    for name, value in (("same-node", same_g), ("cross-node", cross_g)):
        each = ", ".join(f"{x:.2f}" for x in runs[name])
        print(f"  {name:10} {value:6.2f} Gbit/s (runs {each})")
    print(f"  ratio cross/same: {cross_g / same_g:.3f}", flush=True)
    return {"runs_gbps": runs, "same_node_gbps": same_g, "cross_node_gbps": cross_g,
            "ratio_cross_over_same": cross_g / same_g, "duration_s": duration}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="2,4,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pods", type=int, default=40)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--quick", action="store_true", help="1 repeat, 16 pods, 2 s iperf3")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.pods, args.duration = 1, 16, 2.0
    if os.geteuid() != 0:
        print("bench/lab.py needs root (namespaces, eBPF)", file=sys.stderr)
        return 2

    def bail(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, bail)
    result: dict[str, Any] = {
        "benchmark": "lab", "when": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                    "python": platform.python_version()},
        "params": vars(args)}
    try:
        print("1. lab start-up (villi lab up, CLI process to all agents healthy)", flush=True)
        result["lab_up"] = bench_up([int(s) for s in args.sizes.split(",")], args.repeats)
        lab_up(2)
        print(f"2. pods through villi-cni ({args.pods} pods, 2 nodes)", flush=True)
        result["pods"] = bench_pods(args.pods, args.concurrency)
        print(f"3. iperf3 TCP, same node vs cross node ({args.repeats} x {args.duration}s)",
              flush=True)
        result["throughput"] = bench_throughput(args.duration, args.repeats)
    finally:
        cluster.down()
        _state.remove()
        try:
            TMP.rmdir()
        except OSError:
            pass
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
