"""The cluster state the debugging commands read: the kvstore, agents and pinned maps.

``villi policy trace/selectors`` rebuild the agents' view (resources, identities, every
pod's ipcache entry) from the kvstore; ``villi bpf …`` find each node's pin directory
(from the lab's state, else from the agent's ``/v1/healthz``, else ``--pin-dir``) and
name what they decode (identities → labels, IPs → pods, cookies → rules).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from villi._nsenter import in_netns
from villi.agentclient import AgentClient
from villi.cli.context import Target, load_lab_state
from villi.errors import VilliError

IDENTITIES = "villi/state/identities/v1/id/"
NODES = "villi/state/nodes/v1/"
IPCACHE = "villi/state/ip/v1/"
RESOURCES = "villi/resources/"


class NodeUnknown(VilliError):
    """A ``--node``/NODE argument names no node of the cluster."""


async def _lists(url: str, prefixes: list[str]) -> dict[str, list[tuple[str, bytes]]]:
    from villi.kvstore import BackoffPolicy, open_store

    opts: dict[str, Any] = {}
    if url.startswith(("http://", "https://")) or "," in url:
        opts = {"request_timeout": 10.0, "connect_timeout": 2.0,
                "backoff": BackoffPolicy(base=0.05, cap=0.5, max_attempts=3)}
    async with open_store(url, **opts) as store:
        out = {}
        for prefix in prefixes:
            res = await store.list(prefix)
            out[prefix] = [(kv.key, kv.value) for kv in res.items]
        return out


def store_lists(target: Target, *prefixes: str) -> dict[str, list[tuple[str, bytes]]]:
    try:
        with in_netns(target.kvstore_netns):
            return asyncio.run(_lists(target.kvstore, list(prefixes)))
    except VilliError as exc:
        raise VilliError(f"kvstore {target.kvstore}: {exc}") from None


@dataclass
class StoreState:
    """Identities and pods as the kvstore holds them (what every agent follows)."""

    identities: dict[int, list[str]] = field(default_factory=dict)
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)   # ip → ipcache entry
    resources: list[tuple[str, bytes]] = field(default_factory=list)
    node_ips: dict[str, str] = field(default_factory=dict)   # node IP → node name

    def labels_of(self, identity: int) -> list[str]:
        from villi.identity.reserved import RESERVED_LABELS, ReservedIdentity

        if identity in self.identities:
            return self.identities[identity]
        if 0 < identity < 256 and identity in ReservedIdentity._value2member_map_:
            return [str(lbl).rstrip("=") for lbl in RESERVED_LABELS[ReservedIdentity(identity)]]
        return []

    def pod_of(self, ip: str) -> str | None:
        entry = self.pods.get(ip)
        if entry is None:
            return None
        return f"{entry.get('namespace', 'default')}/{entry.get('podName', '?')}"


def read_state(target: Target, resources: bool = False) -> StoreState:
    prefixes = [IDENTITIES, IPCACHE, NODES] + ([RESOURCES] if resources else [])
    lists = store_lists(target, *prefixes)
    state = StoreState()
    for key, value in lists[IDENTITIES]:
        try:
            ident = int(key.rsplit("/", 1)[1])
        except ValueError:
            continue
        text = value.decode()
        state.identities[ident] = [p for p in text.split(";") if p]
    for key, value in lists[IPCACHE]:
        try:
            state.pods[key[len(IPCACHE):]] = json.loads(value)
        except ValueError:
            continue
    for _key, value in lists[NODES]:
        try:
            node = json.loads(value)
        except ValueError:
            continue
        if isinstance(node, dict) and node.get("ipv4") and node.get("name"):
            state.node_ips[str(node["ipv4"])] = str(node["name"])
    state.resources = lists.get(RESOURCES, [])
    return state


def cluster_view(target: Target) -> Any:
    """A :class:`villi.policy.trace.ClusterView` of the live cluster."""
    from villi import resources as codec
    from villi.identity.labels import LabelSet
    from villi.policy.trace import ClusterView, PodView, modes_from_endpoints

    state = read_state(target, resources=True)
    policy_kinds = {"CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy", "NetworkPolicy",
                    "Namespace"}
    items = []
    for key, raw in state.resources:
        parsed = codec.parse_resource_key(key)
        if parsed is None or parsed[0] not in policy_kinds:
            continue
        try:
            items.append(codec.decode(raw, key))
        except VilliError as exc:
            raise VilliError(f"stored resource {key} does not load: {exc}") from None
    identities = {i: LabelSet.parse(";".join(lbls)) for i, lbls in state.identities.items()}
    pods = []
    for ip, entry in state.pods.items():
        ports = {n: (int(p), str(pr)) for n, (p, pr) in (entry.get("namedPorts") or {}).items()}
        pods.append(PodView(entry.get("namespace", "default"), entry.get("podName", ip), ip,
                            int(entry.get("identity", 2)), entry.get("node", ""),
                            int(entry.get("endpointID", 0)), ports))
    modes = {}
    for _node, eps in agents_get(target, "/v1/endpoint")[0]:
        modes.update(modes_from_endpoints(eps))
    return ClusterView(items, identities, pods, modes, state.node_ips)


def agents_get(target: Target, path: str,
               nodes: list[str] | None = None) -> tuple[list[tuple[str, Any]], list[str]]:
    """(node, answer) from each (selected) agent, and the nodes that did not answer."""
    answers, missing = [], []
    for node, sock in target.agents.items():
        if nodes is not None and node not in nodes:
            continue
        try:
            with AgentClient(sock, timeout=5.0) as c:
                answers.append((node, c.get(path)))
        except VilliError:
            missing.append(node)
    return answers, missing


def pin_dirs(target: Target, node: str | None = None,
             pin_dir: str | None = None) -> dict[str, Path]:
    """node → its pin directory. A lab knows its cluster and nodes without any agent;
    elsewhere the agent's health says where it pinned (``--pin-dir`` when it is down)."""
    if pin_dir:
        return {node or "local": Path(pin_dir)}
    out: dict[str, Path] = {}
    lab = load_lab_state() if target.lab else None
    if lab is not None:
        from villi.datapath.loader import pin_root

        out = {n["name"]: pin_root(lab["cluster"], n["name"]) for n in lab.get("nodes", [])}
    else:
        for name, sock in target.agents.items():
            try:
                with AgentClient(sock, timeout=5.0) as c:
                    health = c.get("/v1/healthz")
            except VilliError as exc:
                raise VilliError(f"{exc}; without the agent pass --pin-dir "
                                 "/sys/fs/bpf/villi/<cluster>/<node>") from None
            out[health.get("node", name)] = Path(health["datapath"]["pinned"])
    if node is not None:
        if node not in out:
            raise NodeUnknown(f"unknown node {node!r} (nodes: {', '.join(sorted(out))})")
        return {node: out[node]}
    return out


def cookie_names(target: Target, node: str) -> dict[int, str] | None:
    """cookie → rule text from the node's agent; None when the agent does not answer."""
    answers, _missing = agents_get(target, "/v1/policy/cookies", [node])
    if not answers and len(target.agents) == 1 and node not in target.agents:
        answers, _missing = agents_get(target, "/v1/policy/cookies")
    if not answers:
        return None
    out = {}
    for cookie, info in answers[0][1].items():
        where = f"{info['namespace']}/" if info.get("namespace") else ""
        out[int(cookie)] = (f"{info['name']}" if info["kind"] == "reserved" else
                            f"{info['kind']} {where}{info['name']} {info['section']}")
    return out
