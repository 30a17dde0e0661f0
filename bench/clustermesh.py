"""ClusterMesh at scale: KVStoreMesh vs direct mode, with real etcds on loopback.

Many remote clusters are simulated with synthetic state (cluster config, nodes, pods'
ipcache entries, identities, Service resources) in real etcds, one per cluster. Then:

- ``kvstoremesh``: one ``villi kvstoremesh`` process caches every remote into the local
  etcd; its CPU time, peak RSS and time to write every canary are measured; then
  ``--agents`` simulated agents (bench/_mesh_follower.py, the agent's clustermesh code
  with a counting sink) follow the local cache: time to sync, RSS, CPU;
- ``direct``: the same agents connect to every remote etcd themselves.

In each mode one agent is first timed alone (what an agent on its own node sees), then
``--agents`` at once (on this one machine they also compete for its cores).

For both it counts the TCP connections each remote etcd sees (from the kvstoremesh, or
from the agents): the fault-isolation and scale argument of docs/clustermesh.md.

    .venv/bin/python bench/clustermesh.py [--quick]    (writes bench/results/clustermesh.json)

Full size: 20 clusters × 200 nodes × 30 pods (120 000 remote pods), 10 agents. Only the
``--quick`` size (3 × 20 × 10, 4 agents) is meant for a shared 2-core machine.

With ``--lab-pods N`` (default 50; needs root) it also brings up a 2-cluster lab in each
mode and measures the propagation of N pods added in c2 to c1's datapath (p50/p99)
and the connections c2's etcd sees from c1 (bench/_mesh_lab.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from villi.clustermesh import keys  # noqa: E402
from villi.clustermesh.ids import ClusterInfo  # noqa: E402
from villi.identity.labels import pod_identity_labels  # noqa: E402
from villi.kvstore import TxnOp, open_store  # noqa: E402
from villi.testing.etcd import EtcdServer  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "clustermesh.json"
PY = sys.executable


async def seed(url: str, info: ClusterInfo, nodes: int, pods: int, apps: int) -> int:
    """Write one synthetic cluster's state; returns the number of keys."""
    low, _ = info.identity_range
    kvs: list[tuple[str, bytes]] = [
        (keys.cluster_config_key(info.name), json.dumps(info.config()).encode())]
    for a in range(apps):
        labels = pod_identity_labels("bench", {"app": f"app{a}"}, cluster=info.name)
        kvs.append((f"villi/state/identities/v1/id/{low + a}", labels.canonical.encode()))
    for n in range(nodes):
        node_ip = f"172.{16 + info.id // 16}.{(info.id % 16) * 16 + n // 256}.{n % 256}"
        kvs.append((f"villi/state/nodes/v1/node{n}", json.dumps(
            {"ipv4": node_ip, "podCIDRs": [f"10.{info.id}.{n}.0/24"]}).encode()))
        for p in range(pods):
            kvs.append((f"villi/state/ip/v1/10.{info.id}.{n}.{p + 1}", json.dumps(
                {"identity": low + (n * pods + p) % apps, "node": f"node{n}",
                 "nodeIP": node_ip, "namespace": "bench", "podName": f"p{n}-{p}",
                 "labels": {"app": f"app{(n * pods + p) % apps}"},
                 "namedPorts": {}}).encode()))
    for s in range(max(1, apps // 2)):
        kvs.append((f"villi/resources/Service/bench/svc{s}", json.dumps(
            {"apiVersion": "v1", "kind": "Service",
             "metadata": {"name": f"svc{s}", "namespace": "bench",
                          "annotations": {"service.cilium.io/global": "true"}},
             "spec": {"selector": {"app": f"app{s}"},
                      "ports": [{"port": 80, "protocol": "TCP"}]}}).encode()))
    async with open_store(url) as store:   # 100 writes a transaction, 4 in flight
        batches = [kvs[i:i + 100] for i in range(0, len(kvs), 100)]
        for i in range(0, len(batches), 4):
            await asyncio.gather(*(store.commit([TxnOp(k, v) for k, v in batch], {})
                                   for batch in batches[i:i + 4]))
    return len(kvs)


async def seed_all(urls: dict[str, str], nodes: int, pods: int, apps: int) -> int:
    """Every remote cluster seeded at once (they are separate etcds)."""
    counts = await asyncio.gather(*(seed(url, ClusterInfo(name, i + 2), nodes, pods, apps)
                                    for i, (name, url) in enumerate(urls.items())))
    return sum(counts)


def proc_usage(pid: int) -> dict[str, float]:
    """CPU seconds and resident set (current and peak) of a live process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024   # type: ignore[union-attr]
    hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024   # type: ignore[union-attr]
    return {"cpu_s": cpu, "rss_mb": rss, "peak_rss_mb": hwm}


def connections(ports: dict[str, int]) -> dict[int, dict[str, int]]:
    """pid → {remote cluster: established connections to its etcd} (loopback, root ns)."""
    res = subprocess.run(["ss", "-Htnp", "state", "established"], capture_output=True,
                         text=True, check=True)
    by_port = {port: name for name, port in ports.items()}
    out: dict[int, dict[str, int]] = {}
    for line in res.stdout.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        peer_port = int(parts[3].rsplit(":", 1)[1])
        name = by_port.get(peer_port)
        pid = re.search(r"pid=(\d+)", line)
        if name is None or pid is None:
            continue
        counts = out.setdefault(int(pid.group(1)), {})
        counts[name] = counts.get(name, 0) + 1
    return out


async def wait_canaries(url: str, names: list[str], timeout: float) -> float:
    t0 = time.monotonic()
    want = {keys.synced_key(n, k) for n in names for k in keys.KINDS}
    async with open_store(url) as store:
        while True:
            got = {kv.key for kv in (await store.list(keys.SYNCED)).items}
            if want <= got:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"canaries missing: {sorted(want - got)[:5]}")
            await asyncio.sleep(0.05)


def start_followers(mode: str, local: str, remotes: dict[str, str], count: int
                    ) -> list[subprocess.Popen[str]]:
    args = [PY, str(ROOT / "bench" / "_mesh_follower.py"), "--mode", mode, "--local", local]
    for name, url in remotes.items():
        args += ["--remote", f"{name}={url}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return [subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env=env) for _ in range(count)]


def collect(followers: list[subprocess.Popen[str]], ports: dict[str, int]
            ) -> dict[str, Any]:
    reports = [json.loads(p.stdout.readline()) for p in followers]   # type: ignore[union-attr]
    conns = connections(ports)
    per_remote = {name: sum(conns.get(p.pid, {}).get(name, 0) for p in followers)
                  for name in ports}
    for p in followers:
        p.stdin.close()   # type: ignore[union-attr]
        p.wait(30)
    syncs = sorted(r["sync_s"] for r in reports)
    return {"agents": len(reports), "all_synced": all(r["synced"] for r in reports),
            "sync_s_max": syncs[-1], "sync_s_median": syncs[len(syncs) // 2],
            "rss_mb_mean": sum(r["rss_mb"] for r in reports) / len(reports),
            "cpu_s_mean": sum(r["cpu_s"] for r in reports) / len(reports),
            "pods_seen": reports[0]["pods"], "identities_seen": reports[0]["identities"],
            "agent_connections_per_remote_etcd": per_remote}


def run(a: argparse.Namespace) -> dict[str, Any]:
    with ExitStack() as stack:
        local = stack.enter_context(EtcdServer())
        remotes: dict[str, EtcdServer] = {}
        for i in range(a.clusters):
            remotes[f"r{i + 2}"] = stack.enter_context(EtcdServer())
        urls = {n: s.endpoint for n, s in remotes.items()}
        ports = {n: s.client_port for n, s in remotes.items()}
        t0 = time.monotonic()
        total = asyncio.run(seed_all(urls, a.nodes, a.pods, a.apps))
        seed_s = time.monotonic() - t0
        print(f"seeded {a.clusters} clusters × {a.nodes} nodes × {a.pods} pods "
              f"({total} keys) in {seed_s:.1f} s", flush=True)

        # --- kvstoremesh ---
        cmd = [PY, "-m", "villi.cli.main", "--kvstore", local.endpoint, "kvstoremesh",
               "--cluster-name", "local", "--cluster-id", "1"]
        for name, url in urls.items():
            cmd += ["--remote", f"{name}={url}"]
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        kvm = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        try:
            cache_s = asyncio.run(wait_canaries(local.endpoint, list(urls), a.timeout))
            kvm_usage = proc_usage(kvm.pid)
            kvm_conns = connections(ports).get(kvm.pid, {})
            alone = collect(start_followers("kvstoremesh", local.endpoint, urls, 1), ports)
            followers = start_followers("kvstoremesh", local.endpoint, urls, a.agents)
            mesh = collect(followers, ports)
            mesh["alone"] = alone
            kvm_after = proc_usage(kvm.pid)
        finally:
            kvm.terminate()
            kvm.wait(30)
        mesh.update({"kvstoremesh_cache_s": cache_s, "kvstoremesh": kvm_usage,
                     "kvstoremesh_steady": kvm_after,
                     "kvstoremesh_connections_per_remote_etcd": kvm_conns})
        print(f"kvstoremesh: cached everything in {cache_s:.2f} s, "
              f"cpu {kvm_usage['cpu_s']:.1f} s, rss {kvm_usage['rss_mb']:.0f} MiB; "
              f"agents synced in ≤ {mesh['sync_s_max']:.2f} s", flush=True)

        # --- direct ---
        alone = collect(start_followers("direct", local.endpoint, urls, 1), ports)
        followers = start_followers("direct", local.endpoint, urls, a.agents)
        direct = collect(followers, ports)
        direct["alone"] = alone
        print(f"direct: agents synced in ≤ {direct['sync_s_max']:.2f} s", flush=True)
    return {"seed_s": seed_s, "keys": total, "kvstoremesh": mesh, "direct": direct}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a shared machine)")
    ap.add_argument("--clusters", type=int, default=20)
    ap.add_argument("--nodes", type=int, default=200)
    ap.add_argument("--pods", type=int, default=30, help="pods per node")
    ap.add_argument("--apps", type=int, default=50, help="identities per cluster")
    ap.add_argument("--agents", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--lab-pods", type=int, default=50, help="pods added in c2 for the "
                    "propagation measurement on a 2-cluster lab (root; 0 = skip)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = ap.parse_args(argv)
    if a.quick:
        a.clusters, a.nodes, a.pods, a.apps, a.agents = 3, 20, 10, 10, 4
    result: dict[str, Any] = {
        "machine": platform.node(), "python": sys.version.split()[0], "quick": a.quick,
        "clusters": a.clusters, "nodes_per_cluster": a.nodes, "pods_per_node": a.pods,
        "identities_per_cluster": a.apps, "agents": a.agents, **run(a)}
    if a.lab_pods:
        sys.path.insert(0, str(ROOT / "bench"))
        from _mesh_lab import measure  # type: ignore[import-not-found]

        result["lab"] = {mode: measure(mode, a.lab_pods) for mode in ("kvstoremesh", "direct")}
        for mode, r in result["lab"].items():
            p = r["propagation_s"]
            print(f"lab, {mode}: pod added in c2 → allowed from c1: p50 {p['p50'] * 1000:.0f} ms"
                  f", p99 {p['p99'] * 1000:.0f} ms over {r['pods']} pods (from the write "
                  f"in c2's etcd); c2's etcd sees "
                  f"{r['c2_etcd_connections']['c1_agent']} connections from c1's agent, "
                  f"{r['c2_etcd_connections']['c1_kvstoremesh']} from c1's kvstoremesh",
                  flush=True)
    m, d = result["kvstoremesh"], result["direct"]
    conns_m = sum(m["agent_connections_per_remote_etcd"].values()) + \
        sum(m["kvstoremesh_connections_per_remote_etcd"].values())
    conns_d = sum(d["agent_connections_per_remote_etcd"].values())
    result["ratios"] = {
        "remote_etcd_connections_direct_over_kvstoremesh": conns_d / max(conns_m, 1),
        "agent_sync_s_direct_over_kvstoremesh": d["sync_s_max"] / max(m["sync_s_max"], 1e-9),
        "agent_alone_sync_s_direct_over_kvstoremesh":
            d["alone"]["sync_s_max"] / max(m["alone"]["sync_s_max"], 1e-9),
        "agent_rss_direct_over_kvstoremesh": d["rss_mb_mean"] / max(m["rss_mb_mean"], 1e-9),
        "agent_cpu_direct_over_kvstoremesh": d["cpu_s_mean"] / max(m["cpu_s_mean"], 1e-9),
    }
    print(f"\n{a.clusters} remote clusters × {a.nodes} nodes × {a.pods} pods, "
          f"{a.agents} agents")
    print(f"{'':<12}{'conns/remote etcd':>18}{'agent sync max':>16}{'agent RSS':>11}"
          f"{'agent CPU':>11}{'one agent alone: sync':>23}")
    for name, r, extra in (("kvstoremesh", m, m["kvstoremesh_connections_per_remote_etcd"]),
                           ("direct", d, {})):
        per = {k: v + extra.get(k, 0) for k, v in r["agent_connections_per_remote_etcd"].items()}
        conns = max(per.values()) if per else 0
        print(f"{name:<12}{conns:>18}{r['sync_s_max']:>15.2f}s{r['rss_mb_mean']:>9.0f}MB"
              f"{r['cpu_s_mean']:>10.2f}s{r['alone']['sync_s_max']:>22.2f}s")
    print(f"kvstoremesh process: cache {m['kvstoremesh_cache_s']:.2f} s, cpu "
          f"{m['kvstoremesh']['cpu_s']:.1f} s, peak RSS {m['kvstoremesh']['peak_rss_mb']:.0f} MB")
    for k, v in result["ratios"].items():
        print(f"  {k}: {v:.2f}")
    out = a.out if not a.quick or a.out != DEFAULT_OUT else \
        DEFAULT_OUT.with_name("clustermesh-quick.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
