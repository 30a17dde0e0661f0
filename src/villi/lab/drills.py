"""Failure drills: take one part of a running lab down, and bring it back.

``villi lab agent stop|start|restart|kill NODE``, ``villi lab etcd stop|start`` and
``villi lab node add|del`` call these. Each one changes the real processes and
namespaces and then records what it did in the state file (new pids, a ``stopped``
mark), so ``villi lab status`` always describes the lab as it is.

What each drill leaves running is the point of it: a stopped or killed agent leaves its
node's BPF programs and pinned maps in place, so the node's pods keep talking and policy
keeps being enforced (and other nodes keep their routes and ipcache entries until the
agent's lease TTL); ``agent start`` restores the node's endpoints from its state
directory and pinned maps. A stopped etcd keeps its data directory; ``etcd start`` runs
it again on the same one. ``node del`` is removal on purpose: pods deleted, agent
stopped, the node's entries withdrawn from the store at once
(:func:`villi.operator.nodes.delete_node`, which also tells the operator to reclaim the
pod CIDR without a grace period), namespace, pins and files removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from villi.lab import _cgroup, _network, _procs, _state, cluster
from villi.lab._api import healthz, store_run
from villi.lab._state import PREFIX, LabError

AGENT_STOP_GRACE = 10.0
ETCD_STOP_GRACE = 10.0


def find_node(state: dict[str, Any], ref: str) -> dict[str, Any]:
    """A node by name (``node2``) or index (``2``); LabError naming the choices."""
    for node in state["nodes"]:
        if ref in (node["name"], str(node["index"])):
            return node
    raise LabError(f"no node {ref!r} in this lab: one of "
                   f"{', '.join(n['name'] for n in state['nodes']) or '(none)'}")


# --- agents ----------------------------------------------------------------------------------

def agent_stop(ref: str, *, kill: bool = False) -> dict[str, Any]:
    """Stop ``ref``'s agent: SIGTERM (it shuts down cleanly, keeps its lease and its
    datapath), or with ``kill`` SIGKILL (a crash). Returns the node record."""
    state = _state.require()
    node = find_node(state, ref)
    pid = cluster.agent_pid(state, node)
    if pid is None:
        raise LabError(f"the agent of {node['name']} is not running "
                       f"(start it with `villi lab agent start {node['name']}`)")
    marker = f"{PREFIX}{state['id']}"
    if kill:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, 5.0)
    else:
        _procs.kill([pid], marker, grace=AGENT_STOP_GRACE)
    with _state.update() as st:
        n = find_node(st, node["name"])
        n["pid"] = None
        n["agent"] = "killed" if kill else "stopped"
        return n


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _procs.alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)   # our child when this process started it
        time.sleep(0.02)


def agent_start(ref: str, *, timeout: float = 60.0) -> dict[str, Any]:
    """Start ``ref``'s agent again (same flags, same state directory: it restores its
    endpoints from there and from the pinned maps) and wait until it is healthy."""
    state = _state.require()
    node = find_node(state, ref)
    if cluster.agent_pid(state, node) is not None:
        raise LabError(f"the agent of {node['name']} is already running "
                       f"(pid {cluster.agent_pid(state, node)})")
    pid = _procs.spawn(cluster.agent_cmd(state, node), Path(node["log"]))
    with _state.update() as st:
        n = find_node(st, node["name"])
        n["pid"], n["agent"] = pid, "starting"
    try:
        health = _wait_agent(state, node, pid, timeout)
    except LabError:
        with _state.update() as st:
            find_node(st, node["name"])["agent"] = "failed"
        raise
    with _state.update() as st:
        n = find_node(st, node["name"])
        n["agent"] = "running"
        n["pod_cidrs"] = health.get("ipam", {}).get("cidrs") or n.get("pod_cidrs")
        return n


def agent_restart(ref: str, *, timeout: float = 60.0) -> dict[str, Any]:
    state = _state.require()
    node = find_node(state, ref)
    if cluster.agent_pid(state, node) is not None:
        agent_stop(ref)
    return agent_start(ref, timeout=timeout)


def _wait_agent(state: dict[str, Any], node: dict[str, Any], pid: int,
                timeout: float) -> dict[str, Any]:
    marker = f"{PREFIX}{state['id']}"
    deadline = time.monotonic() + timeout
    while True:
        if not _procs.alive(pid, marker):
            raise LabError(f"the agent of {node['name']} exited during start-up "
                           f"({_procs.exit_status(pid)}):\n{cluster.log_tail(node['log'])}")
        h = healthz(node["socket"], timeout=1.0)
        if h and h.get("status") == "ok" and h.get("ipam", {}).get("cidrs"):
            return h
        if time.monotonic() > deadline:
            why = f"its health: {h}" if h else "its API does not answer"
            raise LabError(f"the agent of {node['name']} is not healthy after "
                           f"{timeout:.0f}s ({why}):\n{cluster.log_tail(node['log'])}")
        time.sleep(0.1)


# --- etcd ------------------------------------------------------------------------------------

def _require_etcd(state: dict[str, Any]) -> None:
    if state.get("kvstore_kind", "etcd") != "etcd":
        raise LabError("this lab uses the embedded store (no etcd process to stop or start); "
                       "create the lab with `villi lab up --kvstore etcd`")


def etcd_stop() -> dict[str, Any]:
    """Stop etcd (SIGTERM: the process exits; its data directory stays)."""
    state = _state.require()
    _require_etcd(state)
    info = state["processes"].get("etcd", {})
    marker = f"{PREFIX}{state['id']}"
    if not _procs.alive(info.get("pid"), marker):
        raise LabError("etcd is not running (start it with `villi lab etcd start`)")
    _procs.kill([info["pid"]], marker, grace=ETCD_STOP_GRACE)
    with _state.update() as st:
        st["processes"]["etcd"]["stopped"] = True
        return dict(st["processes"]["etcd"])


def etcd_start(*, timeout: float = 30.0) -> dict[str, Any]:
    """Start etcd again on the same data directory and wait until it is healthy."""
    state = _state.require()
    _require_etcd(state)
    info = state["processes"].get("etcd", {})
    marker = f"{PREFIX}{state['id']}"
    if _procs.alive(info.get("pid"), marker):
        raise LabError(f"etcd is already running (pid {info['pid']})")
    log = Path(info.get("log") or Path(state["dir"]) / "etcd.log")
    pid = _procs.spawn(cluster.etcd_cmd(state), log)
    with _state.update() as st:
        st["processes"]["etcd"] = {"pid": pid, "log": str(log)}
        state = st
    cluster.wait_etcd(state, pid, timeout)
    return dict(state["processes"]["etcd"])


# --- nodes -----------------------------------------------------------------------------------

def _refuse_multi_cluster(what: str) -> None:
    if _state.cluster_names(_state.require()):
        raise LabError(f"`villi lab {what}` is not supported in a multi-cluster lab yet "
                       "(make the lab with the nodes it needs: --nodes N)")


def node_add(*, timeout: float = 60.0) -> dict[str, Any]:
    """Add one node (the next free index): namespace wired to the underlay, its agent,
    a pod CIDR from the operator. Returns its record."""
    _refuse_multi_cluster("node add")
    with _state.update() as st:
        underlay = _network.Underlay(st["underlay"]["netns"], st["underlay"]["cidr"])
        index = max((n["index"] for n in st["nodes"]), default=0) + 1
        if index > underlay.max_nodes:
            raise LabError(f"the underlay {underlay.cidr} has room for {underlay.max_nodes} "
                           "nodes")
        node = cluster.node_record(st["id"], Path(st["dir"]), underlay, index)
        node["agent"] = "starting"
        st["nodes"].append(node)
        state = dict(st)
    try:
        _network.attach_node(underlay, index, node["netns"])
        cg = _cgroup.node_cgroup(state["cluster"], node["name"])
        _cgroup.ensure(cg)
        node["cgroup"] = str(cg) if cg else None
        node["pid"] = _procs.spawn(cluster.agent_cmd(state, node), Path(node["log"]))
        with _state.update() as st:
            find_node(st, node["name"]).update(pid=node["pid"], cgroup=node["cgroup"])
        health = _wait_agent(state, node, node["pid"], timeout)
    except BaseException:
        _remove_node_local(state, node)
        with _state.update() as st:
            st["nodes"] = [n for n in st["nodes"] if n["name"] != node["name"]]
        raise
    with _state.update() as st:
        n = find_node(st, node["name"])
        n["agent"] = "running"
        n["pod_cidrs"] = health["ipam"]["cidrs"]
        state = st
        node = dict(n)
    cluster.sync_underlay_routes(state)
    return node


def node_del(ref: str) -> dict[str, Any]:
    """Remove node ``ref`` on purpose: its pods, its agent, its entries in the store (at
    once, not after the lease TTL), its pod CIDR (reclaimed by the operator at once),
    its namespace, pins and files."""
    _refuse_multi_cluster("node del")
    from villi.lab import pods
    from villi.operator.nodes import delete_node

    state = _state.require()
    node = find_node(state, ref)
    for key, record in sorted(state["pods"].items()):
        if record["node"] == node["name"]:
            pods.delete(key)
    if cluster.agent_pid(state, node) is not None:
        agent_stop(node["name"])
    try:
        withdrawn = store_run(state, lambda store: delete_node(store, node["name"]))
    except Exception as e:
        raise LabError(f"the agent of {node['name']} is stopped but its entries could not be "
                       f"withdrawn from the kvstore ({e}); nothing else was removed: run "
                       f"`villi lab node del {node['name']}` again when the store is back"
                       ) from e
    _remove_node_local(state, node)
    with _state.update() as st:
        st["nodes"] = [n for n in st["nodes"] if n["name"] != node["name"]]
        state = st
    cluster.sync_underlay_routes(state)
    return {**node, "withdrawn": {"ipcache": withdrawn.ipcache,
                                  "identity_refs": withdrawn.identity_refs}}


def _remove_node_local(state: dict[str, Any], node: dict[str, Any]) -> None:
    """The node's processes, namespace (its underlay veth goes with it), pins, cgroup
    and files; idempotent."""
    from villi.netns import delete_netns

    marker = f"--netns {node['netns']} "
    _procs.kill(_procs.find(marker), f"{PREFIX}{state['id']}", grace=AGENT_STOP_GRACE)
    delete_netns(node["netns"])
    shutil.rmtree(cluster.PIN_BASE / f"lab-{state['id']}" / node["name"], ignore_errors=True)
    if node.get("cgroup"):
        with contextlib.suppress(OSError):
            Path(node["cgroup"]).rmdir()
    shutil.rmtree(node["state_dir"], ignore_errors=True)
    for path in (node["socket"], node["log"], str(Path(node["log"]).with_suffix(".pid"))):
        Path(path).unlink(missing_ok=True)
