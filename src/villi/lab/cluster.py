"""Bring a lab up, tear it down, report on it.

``up()`` builds, in this order: the state file and registry entry (so that a crash at
any later point leaves something ``down()`` can follow), the underlay namespace with
its bridge, one namespace per node wired to it, etcd on the underlay (or an embedded
store file), the operator, and one agent per node started with ``villi --netns``
(never ``ip netns exec``: that would give the agent a private /sys and so a private
bpffs, and its pinned maps would vanish). It then waits until every agent is healthy
and has a pod CIDR. Any failure tears down what was built and raises ``LabError``
with the failing component's log.

``down()`` is idempotent and works without a state file: it finds a lab's processes by
command line, its namespaces by name, its pins under ``/sys/fs/bpf/villi/lab-<id>`` and
its directory, and removes them all. Labs that another live state file still claims
are left alone.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from villi._nsenter import in_netns
from villi.kvstore.tls import KvstoreTLS, make_pki
from villi.lab import _cgroup, _mesh, _network, _observe, _procs, _state, world
from villi.lab import eni as _eni
from villi.lab._api import healthz, node_entries
from villi.lab._state import PREFIX, LabError

ETCD = "/usr/bin/etcd"
ETCD_PORT = 2379
ETCD_MAX_TXN_OPS = 100_000
ETCD_MAX_REQUEST_BYTES = 64 * 1024 * 1024
DEFAULT_CLUSTER_CIDR = "10.64.0.0/10"
PIN_BASE = Path("/sys/fs/bpf/villi")
NETNS_DIR = Path("/var/run/netns")

#: progress(component, status, detail): status is "start", "ok" or "fail".
Progress = Callable[[str, str, str], None]


def _quiet(component: str, status: str, detail: str = "") -> None:
    pass


def villi_cmd(*args: str) -> list[str]:
    """``villi ARGS`` run by this interpreter (works from a venv without PATH)."""
    return [sys.executable, "-m", "villi.cli.main", *args]


# --- up --------------------------------------------------------------------------------------

def up(nodes: int = 2, kvstore: str = "etcd", *, lease_ttl: int = 900,
       underlay_cidr: str = _network.DEFAULT_UNDERLAY,
       cluster_cidr: str = DEFAULT_CLUSTER_CIDR, timeout: float = 120.0,
       progress: Progress = _quiet, ipam: str = "cluster-pool", cloud_latency_ms: float = 0.0,
       cloud_rate_limit: float = 0.0, excess_ip_release_delay: float = 180.0,
       clusters: int = 1, clustermesh_mode: str = "kvstoremesh") -> dict[str, Any]:
    """Create a lab and return its state; LabError when one is already running.

    ``ipam="eni"`` adds a simulated cloud (:mod:`villi.lab.eni`) with that latency per
    call and rate limit (calls/s, 0 = none); the operator then attaches interfaces."""
    cloud = _eni.settings(ipam, cloud_latency_ms, cloud_rate_limit, excess_ip_release_delay)
    if not 1 <= nodes <= 64:
        raise LabError(f"--nodes must be between 1 and 64, not {nodes}")
    if kvstore not in ("etcd", "embedded"):
        raise LabError(f"--kvstore must be etcd or embedded, not {kvstore!r}")
    if kvstore == "etcd" and not os.access(ETCD, os.X_OK):
        raise LabError(f"{ETCD} is missing: install etcd (apt-get install etcd-server) or "
                       "use --kvstore embedded")
    underlay = _network.check_underlay(underlay_cidr, cluster_cidr)
    if clusters != 1:
        _mesh.check(clusters, kvstore, ipam, cluster_cidr)
    if nodes * clusters > underlay.max_nodes:
        raise LabError(f"the underlay {underlay_cidr} has room for {underlay.max_nodes} nodes")

    with _state.locked():
        old = _state.load()
        if old is not None:
            if running() is not None:
                raise already_running(old)
            progress("previous lab", "start", f"removing crashed lab {old['id']}")
            teardown(old["id"])
            _state.remove()
            progress("previous lab", "ok", f"removed crashed lab {old['id']}")
        lab_id = _new_id()
        state = _initial_state(lab_id, nodes, kvstore, lease_ttl, underlay.cidr, cluster_cidr)
        if ipam == "eni":
            state["ipam"], state["cloud"] = "eni", cloud
        if clusters > 1:
            _mesh.add_clusters(state, clusters, nodes, _underlay(state), node_record,
                               clustermesh_mode)
        # state first, registry second: a concurrent `lab down` scanning for orphans
        # must never see this id registered without the state file that owns it
        _state.save(state)
        _state.register(lab_id)
    try:
        _build(state, timeout, progress)
    except BaseException as e:
        progress("teardown", "start", "removing what was built")
        teardown(state["id"])
        _state.remove()
        progress("teardown", "ok", "")
        if isinstance(e, LabError):
            raise
        if isinstance(e, KeyboardInterrupt):
            raise
        raise LabError(f"lab up failed: {e}") from e
    return state


def already_running(state: dict[str, Any]) -> LabError:
    return LabError(f"a lab is already running (id {state['id']}, {len(state['nodes'])} "
                    f"nodes, state {_state.state_path()}); use it, or remove it with "
                    "`villi lab down` first")


def _new_id() -> str:
    while True:
        lab_id = secrets.token_hex(3)
        if not any(n.startswith(f"{PREFIX}{lab_id}") for n in _netns_names()):
            return lab_id


def _initial_state(lab_id: str, n: int, kvstore: str, lease_ttl: int, underlay_cidr: str,
                   cluster_cidr: str) -> dict[str, Any]:
    names = _state.names(lab_id)
    d = _state.lab_dir(lab_id)
    underlay = _network.Underlay(names["underlay"], underlay_cidr)
    tls = None
    if kvstore == "etcd":
        # etcd speaks TLS and wants a client certificate (docs/security.md): the
        # certificates are made in _build; clients find them through the state file.
        url, kv_ns = f"https://{underlay.gateway}:{ETCD_PORT}", underlay.netns
        pki = d / "pki"
        tls = {"ca": str(pki / "ca.crt"), "cert": str(pki / "client.crt"),
               "key": str(pki / "client.key")}
    else:
        url, kv_ns = f"embedded://{d}/kvstore.db", None
    return {
        "id": lab_id, "cluster": names["cluster"], "status": "starting",
        "created": time.time(), "dir": str(d), "kvstore": url, "kvstore_kind": kvstore,
        "kvstore_netns": kv_ns, "kvstore_tls": tls, "cluster_cidr": cluster_cidr,
        "lease_ttl": lease_ttl,
        "underlay": {"netns": underlay.netns, "cidr": underlay_cidr,
                     "gateway": underlay.gateway, "world_ip": underlay.world_ip,
                     "bridge": _network.BRIDGE},
        "processes": {},
        "nodes": [node_record(lab_id, d, underlay, i) for i in range(1, n + 1)],
        "pods": {},
    }


def node_record(lab_id: str, d: Path, underlay: _network.Underlay, i: int) -> dict[str, Any]:
    """The state of node number ``i`` (1-based), before its agent runs."""
    return {"name": f"node{i}", "index": i,
            "netns": _state.node_netns(lab_id, i), "ip": underlay.node_ip(i),
            "socket": str(d / f"node{i}.sock"), "state_dir": str(d / f"node{i}"),
            "log": str(d / f"node{i}.log"), "pid": None}


def _underlay(state: dict[str, Any]) -> _network.Underlay:
    return _network.Underlay(state["underlay"]["netns"], state["underlay"]["cidr"])


def _build(state: dict[str, Any], timeout: float, progress: Progress) -> None:
    d = Path(state["dir"])
    d.mkdir(parents=True, exist_ok=True)
    underlay = _underlay(state)
    marker = f"{PREFIX}{state['id']}"

    progress("underlay", "start", f"{underlay.netns}, bridge {_network.BRIDGE}")
    _network.create_underlay(underlay, state["cluster_cidr"])
    for node in _mesh.all_nodes(state):
        _network.attach_node(underlay, node["index"], node["netns"])
    progress("underlay", "ok", f"{underlay.cidr} · {len(_mesh.all_nodes(state))} node "
             "namespaces "
             "wired to the bridge")

    progress("dns", "start", f"dnsmasq at {world.DNS_IP}")
    world.setup(state)
    _state.save(state)
    progress("dns", "ok", f"{world.DNS_IP}:53 in {underlay.netns} (outside world: "
             f"{', '.join(world.OUTSIDE_NETS)})")

    if state["kvstore_kind"] == "etcd":
        if state.get("kvstore_tls"):
            make_pki(Path(state["kvstore_tls"]["ca"]).parent, [underlay.gateway])
        for view in _mesh.views(state):
            what = _mesh.label(view, "etcd")
            progress(what, "start", view["kvstore"])
            log = d / _mesh.file_name(view, "etcd.log")
            pid = _procs.spawn(etcd_cmd(view), log)
            view["processes"]["etcd"] = {"pid": pid, "log": str(log)}
            _state.save(state)
            wait_etcd(view, pid, min(timeout, 30.0))
            progress(what, "ok", f"{view['kvstore']} in {underlay.netns}")
    else:
        progress("etcd", "ok", f"embedded store {state['kvstore']}")

    if state.get("ipam") == "eni":
        progress("cloud-sim", "start", _eni.url(state))
        _eni.start(state, villi_cmd, timeout=min(timeout, 30.0))
        _state.save(state)
        progress("cloud-sim", "ok", f"simulated cloud API {_eni.url(state)} · "
                 f"{len(state['nodes'])} instances")

    for view in _mesh.views(state):
        what = _mesh.label(view, "operator")
        progress(what, "start", "")
        op_cmd = villi_cmd("--kvstore", view["kvstore"], *_tls_flags(view),
                           "--netns", underlay.netns, "operator",
                           "--cluster-cidr", view.get("pool_cidr") or view["cluster_cidr"])
        if view.get("ipam") == "eni":
            op_cmd += _eni.operator_args(view)
        log = d / _mesh.file_name(view, "operator.log")
        pid = _procs.spawn(op_cmd, log)
        view["processes"]["operator"] = {"pid": pid, "log": str(log)}
        _state.save(state)
        progress(what, "ok", f"pid {pid}")
    if state.get("mesh") and state["mesh"].get("mode") == "kvstoremesh":
        for view in _mesh.views(state):
            what = _mesh.label(view, "kvstoremesh")
            progress(what, "start", "")
            pid = _mesh.start_kvstoremesh(state, view, villi_cmd(*_tls_flags(view)))
            _state.save(state)
            progress(what, "ok", f"pid {pid} · caching "
                     f"{', '.join(n for n in _mesh.names(state) if n != view['mesh_name'])}")

    _observe.write_token(state)
    for view, node in ((v, n) for v in _mesh.views(state) for n in v["nodes"]):
        progress(node["name"], "start", "starting agent")
        # the agent attaches its socket programs here; the node's pods run here
        cg = _cgroup.node_cgroup(state["cluster"], node["name"])
        _cgroup.ensure(cg)
        node["cgroup"] = str(cg) if cg else None
        node["pid"] = _procs.spawn(agent_cmd(view, node), Path(node["log"]))
    _state.save(state)

    deadline = time.monotonic() + timeout
    pending = {n["name"]: n for n in _mesh.all_nodes(state)}
    while pending:
        for name, node in list(pending.items()):
            if not _procs.alive(node["pid"], marker):
                raise LabError(f"the agent of {name} exited during start-up "
                               f"({_procs.exit_status(node['pid'])}):\n"
                               f"{log_tail(node['log'])}")
            h = healthz(node["socket"], timeout=1.0)
            if h and h.get("status") == "ok" and h.get("ipam", {}).get("cidrs"):
                node["pod_cidrs"] = h["ipam"]["cidrs"]
                pods = (f"{len(node['pod_cidrs'])} ENI IPs" if state.get("ipam") == "eni"
                        else ", ".join(node["pod_cidrs"]))
                progress(name, "ok", f"{node['ip']} · pods {pods}")
                del pending[name]
        for proc, info in _mesh.all_processes(state):
            if not _procs.alive(info["pid"], marker):
                raise LabError(f"{proc} exited during start-up "
                               f"({_procs.exit_status(info['pid'])}):\n{log_tail(info['log'])}")
        if pending and time.monotonic() > deadline:
            name, node = next(iter(pending.items()))
            raise LabError(f"the agent of {name} is not healthy after {timeout:.0f}s:\n"
                           f"{log_tail(node['log'])}")
        time.sleep(0.1)

    progress("relay + ui", "start", "")
    _observe.start(state, min(timeout, 30.0))
    _state.save(state)
    progress("relay + ui", "ok", state["ui_url"])

    sync_underlay_routes(state)
    state["status"] = "running"
    _state.save(state)


def etcd_cmd(state: dict[str, Any]) -> list[str]:
    gw, name = state["underlay"]["gateway"], f"lab-{state['id']}"
    port = int(state.get("etcd_port") or ETCD_PORT)
    if port != ETCD_PORT:   # a further cluster of a multi-cluster lab
        name += f"-{state['mesh_name']}"
    peer = f"http://127.0.0.1:{port + 1}"
    tls = state.get("kvstore_tls")
    scheme = "https" if tls else "http"
    cmd = ["ip", "netns", "exec", state["underlay"]["netns"], ETCD, "--name", name,
           "--data-dir", state.get("etcd_dir") or f"{state['dir']}/etcd",
           "--listen-client-urls",
           f"{scheme}://{gw}:{port},{scheme}://127.0.0.1:{port}",
           "--advertise-client-urls", f"{scheme}://{gw}:{port}",
           "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
           "--initial-cluster", f"{name}={peer}",
           "--initial-cluster-token",
           f"{PREFIX}{state['id']}" + ("" if port == ETCD_PORT else f"-{port}"),
           "--initial-cluster-state", "new", "--log-level", "warn",
           # One `villi apply` is one transaction (docs/policy.md): allow large ones.
           "--max-txn-ops", str(ETCD_MAX_TXN_OPS),
           "--max-request-bytes", str(ETCD_MAX_REQUEST_BYTES)]
    if tls:
        pki = Path(tls["ca"]).parent
        cmd += ["--client-cert-auth", "--trusted-ca-file", tls["ca"],
                "--cert-file", str(pki / "server.crt"), "--key-file", str(pki / "server.key")]
    return cmd


def _tls_flags(state: dict[str, Any]) -> list[str]:
    """The client-certificate flags of the lab's villi processes (none without TLS)."""
    tls = KvstoreTLS.from_dict(state.get("kvstore_tls"))
    return tls.as_flags() if tls is not None else []


def wait_etcd(state: dict[str, Any], pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    log = state["processes"]["etcd"]["log"]
    while time.monotonic() < deadline:
        if not _procs.alive(pid):
            raise LabError(f"etcd exited during start-up ({_procs.exit_status(pid)}):\n"
                           f"{log_tail(log)}")
        try:
            with in_netns(state["underlay"]["netns"]):
                tls = KvstoreTLS.from_dict(state.get("kvstore_tls"))
                ctx = tls.context() if tls is not None else None
                with urllib.request.urlopen(state["kvstore"] + "/health", timeout=1,
                                            context=ctx) as r:
                    if b'"true"' in r.read():
                        return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise LabError(f"etcd is not healthy after {timeout:.0f}s:\n{log_tail(log)}")


def agent_cmd(state: dict[str, Any], node: dict[str, Any]) -> list[str]:
    return villi_cmd(*_tls_flags(state), "--netns", node["netns"], "agent",
                     "--node", node["name"],
                     "--cluster", state["cluster"], "--kvstore", state["kvstore"],
                     "--api-socket", node["socket"], "--state-dir", node["state_dir"],
                     "--node-ip", node["ip"], "--cluster-cidr", state["cluster_cidr"],
                     "--lease-ttl", str(state["lease_ttl"]), "--ipam-node-update-rate", "1",
                     # a few agents: probe etcd often, so drills see an outage at once
                     "--kvstore-health-interval", "2",
                     *(["--ipam", "eni"] if state.get("ipam") == "eni" else []),
                     *state.get("agent_args", []),
                     *_observe.agent_args(state, node))


def sync_underlay_routes(state: dict[str, Any]) -> dict[str, str]:
    """Route every live node's pod CIDRs in the underlay (for pod ↔ "world" replies)."""
    wanted = {}
    for view in _mesh.views(state):
        for entry in node_entries(view).values():
            for cidr in entry.get("podCIDRs") or []:
                if entry.get("ipv4"):
                    wanted[cidr] = entry["ipv4"]
    _network.sync_pod_routes(_underlay(state), wanted)
    return wanted


def log_tail(path: str | Path, lines: int = 25) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(f"  | {line}" for line in text.splitlines()[-lines:])


def agent_pid(state: dict[str, Any], node: dict[str, Any]) -> int | None:
    """The pid of ``node``'s agent: the one in the state when it still runs, else one
    found by its command line (an agent restarted outside ``villi lab agent start``),
    else None."""
    marker = f"{PREFIX}{state['id']}"
    if _procs.alive(node.get("pid"), marker):
        return int(node["pid"])
    found = _procs.find(f"--netns {node['netns']} agent --node {node['name']} ")
    return found[0] if found else None


def all_pids(state: dict[str, Any]) -> list[int]:
    pids = [n.get("pid") for n in _mesh.all_nodes(state)]
    pids += [p.get("pid") for _, p in _mesh.all_processes(state)]
    pids += [p.get("server_pid") for p in _mesh.all_pods(state)]
    pids += [p.get("server_pid") for p in state.get("externals", {}).values()]
    return [p for p in pids if p]


# --- down ------------------------------------------------------------------------------------

def _netns_names() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except OSError:
        return []


def leftover_ids() -> set[str]:
    """Ids of every lab that has anything on this machine (namespaces, pins,
    processes, directories, registry entries)."""
    ids: set[str] = set()
    for name in _netns_names():
        ids.update(_state.ID_RE.findall(name + " "))
    try:
        ids.update(p.name[4:] for p in PIN_BASE.iterdir() if p.name.startswith("lab-"))
    except OSError:
        pass
    for pid in _procs.find(PREFIX):
        ids.update(_state.ID_RE.findall(_procs.cmdline(pid) + " "))
    cg = _cgroup.root()
    if cg is not None and (cg / "villi").is_dir():
        ids.update(p.name[4:] for p in (cg / "villi").iterdir()
                   if p.is_dir() and p.name.startswith("lab-"))
    try:
        ids.update(p.stem for p in _state.REGISTRY.glob("*.json"))
    except OSError:
        pass
    state_dir = _state.state_path().parent
    if state_dir.is_dir():
        ids.update(p.name[len(PREFIX):] for p in state_dir.glob(f"{PREFIX}*"))
    return {i for i in ids if len(i) == 6}


def leftovers(lab_id: str) -> dict[str, list[str]]:
    """What of lab ``lab_id`` exists on this machine right now (empty lists: nothing)."""
    marker = f"{PREFIX}{lab_id}"
    out: dict[str, list[str]] = {
        "namespaces": [n for n in _netns_names() if n.startswith(marker + "-")],
        "processes": [f"{p} {_procs.cmdline(p)[:80]}" for p in _procs.find(marker)],
        "pins": [str(PIN_BASE / f"lab-{lab_id}")] if (PIN_BASE / f"lab-{lab_id}").exists()
        else [],
        "mounts": [],
        "directories": [str(p) for p in [_state.lab_dir(lab_id)] if p.exists()],
        "cgroups": [str(cg) for cg in [_cgroup.lab_cgroup(lab_id)] if cg and cg.exists()],
    }
    try:
        with open("/proc/self/mounts") as f:
            out["mounts"] = [line.split()[1] for line in f if marker in line]
    except OSError:
        pass
    return out


def teardown(lab_id: str, progress: Progress = _quiet) -> dict[str, int]:
    """Remove everything of lab ``lab_id``; returns counts of what was removed."""
    marker = f"{PREFIX}{lab_id}"
    counts = {"processes": 0, "namespaces": 0, "pins": 0, "mounts": 0, "directories": 0,
              "cgroups": 0}
    # Pods' servers and agents first, the store last (agents shut down against it).
    pids = _procs.find(marker)
    etcd = [p for p in pids if "etcd" in _procs.cmdline(p).split(" ", 1)[0]]
    counts["processes"] += len(_procs.kill([p for p in pids if p not in etcd], marker,
                                           grace=3.0))
    counts["processes"] += len(_procs.kill(etcd, marker, grace=3.0))
    progress("processes", "ok", f"{counts['processes']} stopped")
    names = [n for n in _netns_names() if n.startswith(marker + "-")]
    # pods, then nodes, then the underlay (deleting a pod's netns deletes its veth)
    names.sort(key=lambda n: (n.endswith("-underlay"), "-node" in n[len(marker):]))
    for name in names:
        if subprocess_ok(["ip", "netns", "delete", name]):
            counts["namespaces"] += 1
    progress("namespaces", "ok", f"{counts['namespaces']} deleted")
    world.remove_lab_files(lab_id)   # pods' /etc/netns/<netns>/resolv.conf
    if _cgroup.remove_lab(lab_id):
        counts["cgroups"] = 1
    pins = PIN_BASE / f"lab-{lab_id}"
    if pins.exists():
        shutil.rmtree(pins, ignore_errors=True)
        counts["pins"] += 1
        try:
            PIN_BASE.rmdir()   # only when no other cluster pins there
        except OSError:
            pass
    for mount in leftovers(lab_id)["mounts"]:
        if subprocess_ok(["umount", "-l", mount]):
            counts["mounts"] += 1
        if mount.startswith(str(NETNS_DIR) + "/"):
            Path(mount).unlink(missing_ok=True)
    d = _state.lab_dir(lab_id)
    if d.exists():
        shutil.rmtree(d, ignore_errors=True)
        counts["directories"] += 1
    _state.unregister(lab_id)
    progress("files", "ok", "pins, sockets, logs and data removed")
    return counts


def subprocess_ok(cmd: list[str]) -> bool:
    import subprocess

    return subprocess.run(cmd, capture_output=True).returncode == 0


def down(progress: Progress = _quiet) -> dict[str, Any]:
    """Tear down this state file's lab, and any crashed lab nobody claims.

    Returns ``{"lab": id or None, "orphans": [ids], "counts": {...}}``."""
    with _state.locked():
        state = _state.load()
        mine = state["id"] if state else None
        own_path = _state.state_path().resolve()
        orphans = []
        for lab_id in sorted(leftover_ids() - {mine} if mine else leftover_ids()):
            owner = _state.owner_state(lab_id)
            if owner is None or owner.resolve() == own_path:
                orphans.append(lab_id)
        total: dict[str, int] = {}
        for lab_id in ([mine] if mine else []) + orphans:
            for k, v in teardown(lab_id, progress).items():
                total[k] = total.get(k, 0) + v
    _state.remove()   # the state file (if any) and the lock file
    return {"lab": mine, "orphans": orphans, "counts": total}


def running() -> dict[str, Any] | None:
    """The state of this state file's lab when any of its processes still runs."""
    state = _state.load()
    if state is not None and any(_procs.alive(p, f"{PREFIX}{state['id']}")
                                 for p in all_pids(state)):
        return state
    return None


# --- status ----------------------------------------------------------------------------------

def status(state: dict[str, Any] | None = None) -> dict[str, Any]:
    """The lab as it is now: processes alive, agent health, node entries, pods."""
    state = state or _state.require()
    marker = f"{PREFIX}{state['id']}"
    procs = {name: {"pid": info["pid"], "alive": _procs.alive(info["pid"], marker),
                    "stopped": bool(info.get("stopped"))}
             for name, info in state.get("processes", {}).items()}
    nodes = []
    for node in state["nodes"]:
        pid = agent_pid(state, node)
        h = healthz(node["socket"], timeout=2.0) if pid else None
        nodes.append({**node, "pid": pid or node.get("pid"), "alive": pid is not None,
                      "health": h})
    try:
        entries = node_entries(state, quick=True)
    except Exception as e:   # the store may be down: status must still show the rest
        entries = {"_error": {"error": str(e)}}
    out: dict[str, Any] = {"state": state, "processes": procs, "nodes": nodes,
                           "entries": entries}
    root = state.get("_root", state)
    if root.get("mesh") and state is root:
        out["clusters"] = {
            view["mesh_name"]: status(view) if view is not root else
            {"processes": procs, "nodes": nodes, "entries": entries}
            for view in _mesh.views(root)}
        for sub in out["clusters"].values():
            sub.pop("state", None)
            sub["remotes"] = _mesh.remote_status(sub["nodes"])
    return out
