"""Multi-cluster labs (``villi lab up --clusters N``): ClusterMesh on one machine.

Clusters ``c1`` … ``cN`` (ids 1 … N) share the lab's underlay bridge (native routing
between clusters: every node routes every other node's pod CIDRs, learned from its own
etcd or from the kvstoremesh cache) but nothing else: each has its own etcd (client
port 2379, 2381, …, with the lab's CA and client certificates), operator, kvstoremesh
and a quarter of the lab's cluster CIDR (10.64.0.0/10 → 10.64.0.0/12, 10.80.0.0/12, …)
as its pod pool. Every agent is given the *whole* lab CIDR as its cluster CIDR, so each
node namespace (and the underlay) holds an ``unreachable`` route for all clusters' pods.

Node names are unique across the lab (c1: node1…nodeN, c2: nodeN+1…), which keeps
sockets, logs, pins and cgroups apart; pods are per cluster (``c2:NS/NAME``).

The first cluster's state is the lab state's top level (a one-cluster lab is the same
file); the others live in ``state["clusters"][name]`` (see ``_state.view``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from villi.lab import _procs, _state
from villi.lab._state import LabError

MAX_CLUSTERS = 4
ETCD_BASE_PORT = 2379


def check(clusters: int, kvstore: str, ipam: str, cluster_cidr: str) -> None:
    if not 1 <= clusters <= MAX_CLUSTERS:
        raise LabError(f"--clusters must be between 1 and {MAX_CLUSTERS}, not {clusters}")
    if kvstore != "etcd":
        raise LabError("--clusters needs --kvstore etcd (one etcd per cluster)")
    if ipam != "cluster-pool":
        raise LabError("--clusters works with cluster-pool IPAM only")
    net = ipaddress.IPv4Network(cluster_cidr)
    if net.prefixlen > 22:
        raise LabError(f"the cluster CIDR {net} is too small to split between clusters")


def pools(cluster_cidr: str, count: int) -> list[str]:
    """Non-overlapping pod pools, one per cluster: the CIDR split in four."""
    net = ipaddress.IPv4Network(cluster_cidr)
    return [str(n) for n in net.subnets(prefixlen_diff=2)][:count]


def _agent_args(name: str, cid: int, urls: dict[str, str], mode: str) -> list[str]:
    args = ["--cluster-name", name, "--cluster-id", str(cid), "--clustermesh-mode", mode]
    for other, url in urls.items():
        if other != name:
            args += ["--remote-cluster", f"{other}={url}" if mode == "direct" else other]
    return args


def add_clusters(state: dict[str, Any], count: int, nodes: int, underlay: Any,
                 node_record: Callable[..., dict[str, Any]], mode: str = "kvstoremesh"
                 ) -> None:
    """Turn a fresh one-cluster state into a ``count``-cluster one (before anything runs).

    ``mode`` ``direct`` starts no kvstoremesh: every agent connects to every remote
    cluster's etcd itself (for comparison)."""
    if mode not in ("kvstoremesh", "direct"):
        raise LabError(f"--clustermesh-mode must be kvstoremesh or direct, not {mode!r}")
    names = [f"c{k}" for k in range(1, count + 1)]
    cidrs = pools(state["cluster_cidr"], count)
    d = Path(state["dir"])
    gw = state["underlay"]["gateway"]
    urls = {name: f"https://{gw}:{ETCD_BASE_PORT + 2 * k}" for k, name in enumerate(names)}
    state["mesh"] = {"clusters": names, "cidr": state["cluster_cidr"], "mode": mode}
    state.update({"mesh_name": names[0], "cluster_id": 1, "pool_cidr": cidrs[0],
                  "etcd_port": ETCD_BASE_PORT,
                  "agent_args": _agent_args(names[0], 1, urls, mode)})
    state["clusters"] = {}
    for k, name in enumerate(names[1:], start=2):
        port = ETCD_BASE_PORT + 2 * (k - 1)
        state["clusters"][name] = {
            "mesh_name": name, "cluster_id": k, "pool_cidr": cidrs[k - 1],
            "kvstore": urls[name], "etcd_port": port,
            "etcd_dir": str(d / f"etcd-{name}"),
            "agent_args": _agent_args(name, k, urls, mode),
            "processes": {}, "pods": {},
            "nodes": [node_record(state["id"], d, underlay, (k - 1) * nodes + i)
                      for i in range(1, nodes + 1)],
        }


def names(state: dict[str, Any]) -> list[str]:
    return _state.cluster_names(state.get("_root", state))


def views(state: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The view of every cluster, first first (just the state for one cluster)."""
    root = state.get("_root", state)
    cluster_names = _state.cluster_names(root)
    if not cluster_names:
        yield root
        return
    for name in cluster_names:
        yield _state.view(root, name)


def label(view: dict[str, Any], component: str) -> str:
    return f"{view['mesh_name']} {component}" if view.get("mesh_name") else component


def file_name(view: dict[str, Any], name: str) -> str:
    """Per-cluster log names; the first cluster keeps the one-cluster names."""
    if "_root" not in view:
        return name
    return f"{view['mesh_name']}-{name}"


def all_nodes(state: dict[str, Any]) -> list[dict[str, Any]]:
    return [n for v in views(state) for n in v["nodes"]]


def all_processes(state: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for v in views(state):
        for name, info in v.get("processes", {}).items():
            out.append((label(v, name) if "_root" in v else name, info))
    return out


def all_pods(state: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for v in views(state) for p in v.get("pods", {}).values()]


def start_kvstoremesh(state: dict[str, Any], view: dict[str, Any], villi: list[str]) -> int:
    """Start ``view``'s kvstoremesh in the underlay namespace; returns its pid."""
    remotes = [f"--remote={v['mesh_name']}={v['kvstore']}" for v in views(state)
               if v["mesh_name"] != view["mesh_name"]]
    cmd = [*villi, "--kvstore", view["kvstore"], "--netns", state["underlay"]["netns"],
           "kvstoremesh", "--cluster-name", view["mesh_name"],
           "--cluster-id", str(view["cluster_id"]), *remotes,
           "--lease-ttl", str(state["lease_ttl"])]
    log = Path(state["dir"]) / f"kvstoremesh-{view['mesh_name']}.log"
    pid = _procs.spawn(cmd, log)
    view["processes"]["kvstoremesh"] = {"pid": pid, "log": str(log), "cmd": cmd}
    return pid


def remote_status(nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """Per remote cluster: ready on how many of this cluster's agents, and why not."""
    out: dict[str, Any] = {}
    for n in nodes:
        mesh = ((n.get("health") or {}).get("clustermesh") or {})
        for r in mesh.get("remotes") or []:
            entry = out.setdefault(r["name"], {"ready": 0, "agents": 0, "errors": []})
            entry["agents"] += 1
            entry["ready"] += bool(r.get("ready"))
            if r.get("error") and r["error"] not in entry["errors"]:
                entry["errors"].append(r["error"])
    return out


def kvstoremesh_stop() -> dict[str, Any]:
    """Stop the selected cluster's kvstoremesh (SIGTERM; its cache stays in etcd)."""
    state = _state.require()
    info = state["processes"].get("kvstoremesh")
    if info is None:
        raise LabError("this lab has no kvstoremesh (create it with --clusters 2)")
    marker = f"{_state.PREFIX}{state['id']}"
    if not _procs.alive(info.get("pid"), marker):
        raise LabError("the kvstoremesh is not running")
    _procs.kill([info["pid"]], marker, grace=10.0)
    with _state.update() as st:
        st["processes"]["kvstoremesh"]["stopped"] = True
        return dict(st["processes"]["kvstoremesh"])


def kvstoremesh_start() -> int:
    """Start the selected cluster's kvstoremesh again with its flags."""
    state = _state.require()
    info = state["processes"].get("kvstoremesh")
    if info is None:
        raise LabError("this lab has no kvstoremesh (create it with --clusters 2)")
    if _procs.alive(info.get("pid"), f"{_state.PREFIX}{state['id']}"):
        raise LabError(f"the kvstoremesh is already running (pid {info['pid']})")
    pid = _procs.spawn(info["cmd"], Path(info["log"]))
    with _state.update() as st:
        st["processes"]["kvstoremesh"] = {**info, "pid": pid, "stopped": False}
    return pid
