"""Lab pods: a network namespace plugged in by ``villi-cni`` exactly as a runtime would.

``add()`` creates the pod's namespace, execs ``villi-cni`` with ``CNI_COMMAND=ADD``,
the container id, the netns path, ``CNI_ARGS`` (namespace, name, ``VILLI_LABELS``,
``VILLI_PORTS``) and the network config on stdin naming the node agent's socket, then
starts the echo server for ``--serve`` ports inside the pod (it enters the pod's
namespace itself; nothing runs through the node). Each served port is declared as the
named port ``serve-<port>-<proto>`` unless the spec names it (``web=8080/tcp``).
``delete()`` stops the server, execs ``CNI_COMMAND=DEL`` and removes the namespace.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from villi.lab import _cgroup, _procs, _state, world
from villi.lab._api import agent_call, healthz
from villi.lab._state import PREFIX, LabError
from villi.netns import create_netns, delete_netns

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
PORT_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([-a-z0-9]{0,13}[a-z0-9])?$")


def parse_ref(ref: str) -> tuple[str, str]:
    """``NS/NAME`` (or ``NAME`` in ``default``) → (namespace, name), validated."""
    ns, _, name = ref.rpartition("/")
    ns = ns or "default"
    if not DNS_LABEL.match(ns):
        raise LabError(f"{ref!r}: namespace {ns!r} must be a DNS label (a-z, 0-9, '-')")
    if not DNS_SUBDOMAIN.match(name):
        raise LabError(f"{ref!r}: pod name {name!r} must be lowercase a-z, 0-9, '-' or '.'")
    return ns, name


def parse_labels(text: str | None) -> dict[str, str]:
    """``k=v,k2=v2`` (``k:v`` also accepted) → dict."""
    out: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in (text or "").split(","))):
        sep = "=" if "=" in item else ":"
        key, found, value = item.partition(sep)
        if not found or not key:
            raise LabError(f"label {item!r} must look like key=value")
        if any(c in key + value for c in ",;:="):
            raise LabError(f"label {item!r}: keys and values cannot contain , ; : =")
        out[key] = value
    return out


def parse_serve(text: str | None) -> list[dict[str, Any]]:
    """``80/tcp,81/udp,web=8080/tcp`` → [{name, port, protocol}]."""
    out = []
    for item in filter(None, (p.strip() for p in (text or "").split(","))):
        name, _, spec = item.rpartition("=")
        port_s, _, proto = spec.partition("/")
        proto = (proto or "tcp").lower()
        try:
            port = int(port_s)
        except ValueError:
            raise LabError(f"--serve {item!r}: expected PORT/tcp, PORT/udp or "
                           "NAME=PORT/PROTO") from None
        if proto not in ("tcp", "udp") or not 1 <= port <= 65535:
            raise LabError(f"--serve {item!r}: port 1-65535, protocol tcp or udp")
        name = name or f"serve-{port}-{proto}"
        if not PORT_NAME.match(name):
            raise LabError(f"--serve {item!r}: port name {name!r} must be at most 15 "
                           "lowercase letters, digits or '-', with a letter")
        out.append({"name": name, "port": port, "protocol": proto})
    return out


def cni_binary() -> str:
    local = Path(sys.executable).with_name("villi-cni")
    return str(local) if local.exists() else (shutil.which("villi-cni") or "villi-cni")


def cni_exec(socket: str, command: str, container_id: str, netns: str, args: str = "",
             agent_timeout: float = 30.0) -> tuple[int, dict[str, Any]]:
    """Exec villi-cni as a runtime does: env vars, network config on stdin."""
    conf = {"cniVersion": "1.0.0", "name": "villi-lab", "type": "villi-cni",
            "agentSocket": socket, "agentTimeout": agent_timeout}
    env = dict(os.environ, CNI_COMMAND=command, CNI_CONTAINERID=container_id,
               CNI_NETNS=netns, CNI_IFNAME="eth0", CNI_PATH=str(Path(cni_binary()).parent),
               CNI_ARGS=args)
    env.pop("VILLI_AGENT_SOCKET", None)
    try:
        res = subprocess.run([cni_binary()], input=json.dumps(conf), env=env,
                             capture_output=True, text=True, timeout=agent_timeout + 30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LabError(f"villi-cni {command} failed to run: {e}") from e
    try:
        out = json.loads(res.stdout) if res.stdout.strip() else {}
    except ValueError:
        out = {"msg": res.stdout.strip() or res.stderr.strip()}
    return res.returncode, out


def _node(state: dict[str, Any], node: str | None) -> dict[str, Any]:
    nodes = state["nodes"]
    marker = f"{PREFIX}{state['id']}"
    if node is None:
        # the least-loaded live node, ties to the lowest index: pods spread round-robin
        live = [n for n in nodes if _procs.alive(n.get("pid"), marker)]
        if not live:
            raise LabError("no node of this lab has a running agent (see `villi lab status`)")
        counts = {n["name"]: 0 for n in nodes}
        for pod in state["pods"].values():
            counts[pod["node"]] = counts.get(pod["node"], 0) + 1
        return _place(state, live, counts)
    for n in nodes:
        if node in (n["name"], str(n["index"])):
            if not _procs.alive(n.get("pid"), marker):
                raise LabError(f"the agent of {n['name']} is not running (see `villi lab "
                               "status`); pick another node")
            return n
    raise LabError(f"no node {node!r} in this lab: use 1..{len(nodes)} or one of "
                   f"{', '.join(n['name'] for n in nodes)}")


def _place(state: dict[str, Any], live: list[dict[str, Any]], counts: dict[str, int]
           ) -> dict[str, Any]:
    """The node for a pod placed without ``--node``: never one with no allocatable pod
    IP (``villi.io/ip``, read live from each agent, minus pods being created there);
    with ENI IPAM the one with the most, else the least loaded. Every node full: a
    LabError at once, instead of a pod stuck in creation."""
    from villi.errors import PoolExhausted
    from villi.ipam.capacity import IPAMUsage, NodeCapacity, pick_node

    creating: dict[str, int] = {}
    for pod in state["pods"].values():
        if pod.get("status") == "creating":
            creating[pod["node"]] = creating.get(pod["node"], 0) + 1
    caps = []
    for n in live:
        ipam = (healthz(n["socket"], timeout=2.0) or {}).get("ipam") or {}
        try:
            usage = IPAMUsage(int(ipam["allocated"]), int(ipam["capacity"]))
        except (KeyError, TypeError, ValueError):
            usage = None
        caps.append(NodeCapacity(n["name"], usage))
    try:
        if state.get("ipam") == "eni":
            best = pick_node(caps, creating)
            return next(n for n in live if n["name"] == best)
        pick_node(caps, creating)  # raises when every node is known to be full
    except PoolExhausted as exc:
        raise LabError(f"cannot place the pod: {exc}") from None
    full = {c.name for c in caps
            if c.usage is not None and c.usage.free - creating.get(c.name, 0) <= 0}
    return min((n for n in live if n["name"] not in full),
               key=lambda n: (counts[n["name"]], n["index"]))


def add(ref: str, *, node: str | None = None, labels: dict[str, str] | None = None,
        serve: list[dict[str, Any]] | None = None, http_reply: str | None = None,
        http_routes: list[str] | None = None) -> dict[str, Any]:
    """Create pod ``ref`` (``NS/NAME``, or ``CLUSTER:NS/NAME`` in a multi-cluster lab)
    and return its record (ip, node, netns, ...)."""
    cluster, ref = _state.split_ref(ref)
    with _state.using(cluster):
        return _add(ref, node=node, labels=labels, serve=serve, http_reply=http_reply,
                    http_routes=http_routes)


def _add(ref: str, *, node: str | None, labels: dict[str, str] | None,
         serve: list[dict[str, Any]] | None, http_reply: str | None,
         http_routes: list[str] | None) -> dict[str, Any]:
    ns, name = parse_ref(ref)
    key = f"{ns}/{name}"
    labels, serve = labels or {}, serve or []
    from villi.lab.echo import parse_route

    for route in http_routes or ():
        try:
            parse_route(route)
        except ValueError as e:
            raise LabError(f"--http-route {e}") from None
    with _state.update() as state:   # reserve the name and the node
        if key in state["pods"]:
            raise LabError(f"pod {key} already exists (on {state['pods'][key]['node']})")
        n = _node(state, node)
        record: dict[str, Any] = {
            "namespace": ns, "name": name, "node": n["name"], "socket": n["socket"],
            "cgroup": n.get("cgroup"),
            "netns": _state.pod_netns(state["id"], ns, name) + (
                f"@{state['mesh_name']}" if "_root" in state else ""),
            "cluster": state.get("mesh_name"),
            "container_id": f"lab{state['id']}{uuid.uuid4().hex[:12]}",
            "labels": labels, "serve": serve, "http_reply": http_reply,
            "http_routes": list(http_routes or ()), "ip": None,
            "server_pid": None,
            "status": "creating"}
        state["pods"][key] = record
        lab_dir = Path(state["dir"])
    try:
        _create(record, lab_dir)
    except BaseException as failure:
        # The ADD's own error is what the user must see; a failing cleanup is a note
        # on it, and the pod record goes away whatever the cleanup did.
        try:
            _destroy(record)
        except Exception as cleanup:  # noqa: BLE001 - reported as a note, not lost
            failure.add_note(f"cleanup after the failed ADD: {cleanup}")
        finally:
            with _state.update() as state:
                state["pods"].pop(key, None)
        raise
    with _state.update() as state:
        record["status"] = "running"
        state["pods"][key] = record
    return record


def _create(record: dict[str, Any], lab_dir: Path) -> None:
    create_netns(record["netns"])
    world.write_resolv_conf(record["netns"])   # the lab DNS, for `villi lab exec`
    args = f"K8S_POD_NAMESPACE={record['namespace']};K8S_POD_NAME={record['name']}"
    if record["labels"]:
        args += ";VILLI_LABELS=" + ",".join(f"{k}:{v}" for k, v in record["labels"].items())
    if record["serve"]:
        args += ";VILLI_PORTS=" + ",".join(f"{p['name']}:{p['port']}/{p['protocol']}"
                                           for p in record["serve"])
    code, out = cni_exec(record["socket"], "ADD", record["container_id"],
                         f"/var/run/netns/{record['netns']}", args)
    if code != 0:
        raise LabError(f"villi-cni ADD for {record['namespace']}/{record['name']} failed "
                       f"(code {out.get('code', code)}): {out.get('msg', out)}"
                       + (f" ({out['details']})" if out.get("details") else ""))
    record["ip"] = out["ips"][0]["address"].split("/")[0]
    if record["serve"]:
        ports = [f"{p['port']}/{p['protocol']}" for p in record["serve"]]
        log = lab_dir / f"pod-{record['namespace']}.{record['name']}.log"
        record["log"] = str(log)
        cg = Path(record["cgroup"]) if record.get("cgroup") else None
        cmd = [*_cgroup.shell_prefix(cg), sys.executable, "-m", "villi.lab.echo",
               "--netns", record["netns"]]
        if record.get("http_reply") is not None:
            cmd += ["--http-reply", record["http_reply"]]
        for route in record.get("http_routes") or ():
            cmd += ["--http-route", route]
        try:
            record["server_pid"] = _procs.spawn([*cmd, *ports], log, ready_line="ready")
        except OSError as e:
            raise LabError(f"echo server in {record['netns']} did not start: {e}") from e


def _destroy(record: dict[str, Any]) -> None:
    """Undo a pod, whatever state it is in (idempotent)."""
    if record.get("server_pid"):
        _procs.kill([record["server_pid"]], record["netns"], grace=1.0)
    if record.get("log"):
        Path(record["log"]).with_suffix(".pid").unlink(missing_ok=True)
    for pid in _procs.find(record["netns"] + " "):   # anything else left in the pod
        _procs.kill([pid], record["netns"], grace=1.0)
    code: int = 0
    out: dict[str, Any] = {}
    if healthz(record["socket"]) is not None:   # a dead node's agent cannot answer
        code, out = cni_exec(record["socket"], "DEL", record["container_id"],
                             f"/var/run/netns/{record['netns']}", agent_timeout=10)
    delete_netns(record["netns"])
    world.remove_resolv_conf(record["netns"])
    if code != 0:
        raise LabError(f"villi-cni DEL for {record['namespace']}/{record['name']} failed: "
                       f"{out.get('msg', out)} (namespace removed; the agent may still hold "
                       "the endpoint)")


def delete(ref: str) -> dict[str, Any]:
    cluster, ref = _state.split_ref(ref)
    with _state.using(cluster):
        return _delete(ref)


def _delete(ref: str) -> dict[str, Any]:
    ns, name = parse_ref(ref)
    key = f"{ns}/{name}"
    state = _state.require()
    record = state["pods"].get(key)
    if record is None:
        raise LabError(f"no pod {key} in this lab (see `villi lab status`)")
    try:
        _destroy(record)
    finally:
        with _state.update() as state:
            state["pods"].pop(key, None)
    return record


def get(ref: str, state: dict[str, Any] | None = None) -> dict[str, Any]:
    cluster, ref = _state.split_ref(ref)
    ns, name = parse_ref(ref)
    state = state or _state.require()
    if cluster is not None:
        state = _state.view(state, cluster)
    record = state["pods"].get(f"{ns}/{name}")
    if record is None or not record.get("ip"):
        raise LabError(f"no pod {ns}/{name} in this lab (see `villi lab status`)")
    return record


def relabel(ref: str, labels: dict[str, str], remove: list[str] | None = None
            ) -> dict[str, Any]:
    """Set/remove labels of a running pod (a PATCH on its agent: the identity and every
    policy decision about the pod follow, on every node)."""
    record = get(ref)
    path = f"/v1/endpoint/pod:{record['namespace']}/{record['name']}"
    current = agent_call(record["socket"], "GET", path).get("labels") or {}
    new = {k: v for k, v in current.items() if k not in set(remove or [])}
    new.update(labels)
    view = agent_call(record["socket"], "PATCH", path, json={"labels": new}, timeout=30)
    with _state.using(_state.split_ref(ref)[0]), _state.update() as state:
        if f"{record['namespace']}/{record['name']}" in state["pods"]:
            state["pods"][f"{record['namespace']}/{record['name']}"]["labels"] = new
    return view


def endpoint(record: dict[str, Any]) -> dict[str, Any]:
    """The agent's view of a pod (identity, labels, policy enforcement)."""
    return agent_call(record["socket"], "GET",
                      f"/v1/endpoint/pod:{record['namespace']}/{record['name']}")


def enter_cgroup(record: dict[str, Any]) -> None:
    """Move this process into the cgroup of the pod's node (before it opens sockets),
    so the node's socket programs (service load balancing) apply to it."""
    _cgroup.enter(Path(record["cgroup"]) if record.get("cgroup") else None)


def exec_argv(ref: str, cmd: list[str]) -> list[str]:
    """The argv that runs ``cmd`` inside the pod's network namespace, in the cgroup of
    the pod's node (so the node's socket programs apply to it, as to the pod's own
    processes)."""
    record = get(ref)
    if not cmd:
        raise LabError("nothing to run: villi lab exec NS/NAME -- CMD ...")
    cg = Path(record["cgroup"]) if record.get("cgroup") else None
    return [*_cgroup.shell_prefix(cg), "ip", "netns", "exec", record["netns"], *cmd]


def target_ip(state: dict[str, Any], ref: str) -> tuple[str, str | None]:
    """(IP, pod key) of a probe target: ``NS/NAME``, a bare pod name, or an IP."""
    import ipaddress

    try:
        return str(ipaddress.IPv4Address(ref)), None
    except ValueError:
        record = get(ref, state)
        return record["ip"], f"{record['namespace']}/{record['name']}"


__all__ = ["PREFIX", "add", "delete", "exec_argv", "get", "parse_labels", "parse_ref",
           "parse_serve", "relabel", "target_ip"]
