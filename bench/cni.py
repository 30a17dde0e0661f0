"""Benchmark: 100 concurrent CNI ADDs (and DELs) on one node, through villi-cni.

A real agent runs in a node namespace (embedded store, static pod CIDR); 100 pod
namespaces are created up front; then 100 ``villi-cni ADD`` processes start at once,
exactly as a runtime would exec them. Reports ADD latency p50/p99, the time until all
100 pods answer a ping from one of them, the plugin's start-up time (VERSION), and DEL
latency. Goal: ADD p99 <= 200 ms, all reachable <= 10 s.

Run as root: python bench/cni.py [--pods 100]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from villi.lab.probe import ping
from villi.netns import create_netns, delete_netns
from villi.testing.agent import AgentProcess

RESULTS = Path(__file__).parent / "results"
CNI = str(Path(sys.executable).parent / "villi-cni")


def cni(agent: AgentProcess, command: str, cid: str, netns: str) -> tuple[float, int, dict]:
    conf = json.dumps({"cniVersion": "1.0.0", "name": "villi", "type": "villi-cni",
                       "agentSocket": str(agent.socket), "agentTimeout": 30})
    env = dict(os.environ, CNI_COMMAND=command, CNI_CONTAINERID=cid, CNI_NETNS=netns,
               CNI_IFNAME="eth0", CNI_PATH="/", CNI_ARGS=f"K8S_POD_NAME={cid}")
    t0 = time.perf_counter()
    res = subprocess.run([CNI], input=conf, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    return dt, res.returncode, json.loads(res.stdout) if res.stdout.strip() else {}


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", type=int, default=100)
    args = ap.parse_args()
    n = args.pods
    with AgentProcess(pod_cidr="10.71.0.0/22") as agent:
        names = [f"villi-t{agent.suffix}-b{i}" for i in range(n)]
        try:
            for name in names:
                create_netns(name)
            # Start-up time of the plugin (VERSION needs no agent).
            starts = []
            for _ in range(20):
                t0 = time.perf_counter()
                subprocess.run([CNI], input='{"cniVersion":"1.0.0"}', capture_output=True,
                               env=dict(os.environ, CNI_COMMAND="VERSION"), text=True)
                starts.append(time.perf_counter() - t0)
            t_start = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:
                adds = list(pool.map(lambda i: cni(agent, "ADD", f"b{i}-{agent.suffix}",
                                                   f"/var/run/netns/{names[i]}"), range(n)))
            t_added = time.perf_counter() - t_start
            failed = [r for r in adds if r[1] != 0]
            ips = [r[2]["ips"][0]["address"].split("/")[0] for r in adds if r[1] == 0]
            reachable = set()
            deadline = time.perf_counter() + 30
            while len(reachable) < len(ips) and time.perf_counter() < deadline:
                with ThreadPoolExecutor(16) as pool:
                    todo = [ip for ip in ips if ip not in reachable]
                    for ip, ok in zip(todo, pool.map(lambda ip: ping(names[0], ip), todo),
                                      strict=True):
                        if ok:
                            reachable.add(ip)
            t_reach = time.perf_counter() - t_start
            t0 = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:
                dels = list(pool.map(lambda i: cni(agent, "DEL", f"b{i}-{agent.suffix}",
                                                   f"/var/run/netns/{names[i]}"), range(n)))
            t_del = time.perf_counter() - t0
        finally:
            for name in names:
                delete_netns(name)
    add_lat = [r[0] * 1000 for r in adds]
    del_lat = [r[0] * 1000 for r in dels]
    result = {
        "pods": n, "failed_adds": len(failed),
        "add_ms": {"p50": pct(add_lat, 50), "p99": pct(add_lat, 99), "max": max(add_lat)},
        "all_added_s": t_added, "all_reachable_s": t_reach, "reachable": len(reachable),
        "cni_startup_ms": {"median": statistics.median(starts) * 1000},
        "del_ms": {"p50": pct(del_lat, 50), "p99": pct(del_lat, 99)}, "all_deleted_s": t_del,
        "goals": {"add_p99_ms": 200, "all_reachable_s": 10},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(f"{n} concurrent ADDs: p50 {result['add_ms']['p50']:.0f} ms, "
          f"p99 {result['add_ms']['p99']:.0f} ms (goal <= 200), failed {len(failed)}")
    print(f"all {len(reachable)}/{len(ips)} reachable after {t_reach:.2f} s (goal <= 10 s)")
    print(f"villi-cni start-up (VERSION): {result['cni_startup_ms']['median']:.1f} ms")
    print(f"{n} concurrent DELs: p50 {result['del_ms']['p50']:.0f} ms, "
          f"p99 {result['del_ms']['p99']:.0f} ms, all in {t_del:.2f} s")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cni.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
