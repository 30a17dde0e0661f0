"""Policy operations: enforcement and audit settings, per-endpoint audit, degradation.

    villi config set [--node NODE] EnablePolicy=always PolicyAuditMode=enabled
    villi config unset [--node NODE] PolicyAuditMode
    villi config get [-o json]
    villi endpoint config ID|NS/POD PolicyAuditMode=enabled [--node NODE]
    villi datapath policy degrade|restore|status --node NODE [--cluster C]
    villi policy degrade --all | villi policy restore --all

``config`` writes the kvstore (cluster-wide key, or the node's key with ``--node``);
every agent follows it. ``datapath policy`` opens the node's pinned map directly
(``villi.datapath.policycfg``): the last-resort switch needs neither the agent nor etcd.
``policy degrade --all`` is the cluster-wide switch through the kvstore.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from villi.cli.context import Target, load_lab_state, resolve
from villi.cli.output import dump_json, table
from villi.errors import VilliError
from villi.policy.modes import (
    CLUSTER_CONFIG_KEY,
    ENDPOINT_SETTINGS,
    SETTINGS,
    PolicySettings,
    merge,
    node_config_key,
    parse_assignments,
)


def _family(sub: Any, name: str, help_text: str, dest: str) -> Any:
    """The subcommands of family ``name`` (``villi policy …``), made here or reused when
    another module registered the family first (``villi policy trace``, ``villi endpoint
    get``): both modules' verbs then live under one parser."""
    parser = sub.choices.get(name)
    if parser is None:
        parser = sub.add_parser(name, help=help_text)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return parser.add_subparsers(dest=dest, metavar="VERB", required=True)


def add_parsers(sub: Any) -> None:
    """Register ``config``, ``endpoint config``, ``datapath policy`` and ``policy
    degrade|restore``. Every parser made here sets ``policyops``, which is how
    ``villi.cli.main`` knows to call :func:`run` (other verbs of the same families
    belong to other modules)."""
    keys = ", ".join(f"{k}={'|'.join(v)}" for k, v in SETTINGS.items())
    csub = _family(sub, "config", "cluster-wide or per-node policy settings (kvstore)",
                   "config_command")
    s = csub.add_parser("set", help=f"set settings: {keys}")
    s.add_argument("settings", nargs="+", metavar="KEY=VALUE")
    s.add_argument("--node", help="this node only (overrides the cluster-wide setting)")
    s.set_defaults(policyops="config")
    s = csub.add_parser("unset", help="remove settings (the next layer applies again)")
    s.add_argument("keys", nargs="+", metavar="KEY", choices=sorted(SETTINGS))
    s.add_argument("--node")
    s.set_defaults(policyops="config")
    s = csub.add_parser("get", help="stored settings and what each agent enforces")
    s.add_argument("-o", "--output", choices=["table", "json"], default="table")
    s.set_defaults(policyops="config")

    esub = _family(sub, "endpoint", "endpoint operations", "endpoint_command")
    s = esub.add_parser("config", help="set an endpoint's options, e.g. PolicyAuditMode=enabled")
    s.add_argument("endpoint", metavar="ID|NS/POD")
    s.add_argument("settings", nargs="+", metavar="KEY=VALUE")
    s.add_argument("--node", help="the endpoint's node (needed for a numeric ID when "
                   "several agents run)")
    s.set_defaults(policyops="endpoint")

    dsub = _family(sub, "datapath", "act on a node's pinned datapath state directly",
                   "datapath_command")
    pol = dsub.add_parser("policy", help="the last-resort policy switch")
    psub = pol.add_subparsers(dest="switch", metavar="VERB", required=True)
    for verb, what in (("degrade", "forward what policy would drop (reported as AUDIT); "
                        "works with the agent and etcd down"),
                       ("restore", "enforce policy again"),
                       ("status", "what the node's datapath enforces now")):
        s = psub.add_parser(verb, help=what)
        s.add_argument("--node", required=verb != "status", help="node name")
        s.add_argument("--cluster", help="cluster name (default: the lab's, else default)")
        s.add_argument("--bpffs", default="/sys/fs/bpf", help=argparse.SUPPRESS)
        s.set_defaults(policyops="datapath")

    polsub = _family(sub, "policy", "policy operations", "policy_command")
    for verb, what in (("degrade", "degrade policy on every node through the kvstore"),
                       ("restore", "end a cluster-wide degradation")):
        s = polsub.add_parser(verb, help=what)
        s.add_argument("--all", action="store_true", required=True,
                       help="every node (one node: villi datapath policy " + verb + ")")
        s.set_defaults(policyops="policy", policy_switch=verb)


def run(args: argparse.Namespace) -> int:
    kind = getattr(args, "policyops", None)
    if kind == "config":
        return _config(args)
    if kind == "endpoint":
        return _endpoint_config(args)
    if kind == "datapath":
        return _datapath_policy(args)
    if kind == "policy":
        return _cluster_switch(args)
    raise VilliError(f"villi {args.command}: not a policy-operations command")


# --- kvstore settings ------------------------------------------------------------------

def _store_run(target: Target, fn: Any) -> Any:
    from villi._nsenter import in_netns
    from villi.cli.resources import _store_options
    from villi.kvstore import open_store

    async def go() -> Any:
        async with open_store(target.kvstore, **_store_options(target.kvstore)) as store:
            return await asyncio.wait_for(fn(store), 15)

    with in_netns(target.kvstore_netns):
        try:
            return asyncio.run(go())
        except TimeoutError:
            raise VilliError(f"kvstore {target.kvstore} did not answer in 15 s; nothing "
                             "was changed. A node can be degraded without it: villi "
                             "datapath policy degrade --node NODE") from None


def _update_key(target: Target, key: str, changes: dict[str, str],
                unset: tuple[str, ...] = ()) -> bytes:
    async def fn(store: Any) -> bytes:
        kv = await store.get(key)
        value = merge(kv.value if kv is not None else None, changes, unset, where=key)
        if json.loads(value):
            await store.put(key, value)
        elif kv is not None:
            await store.delete(key)   # nothing left: the next layer applies again
        return value

    value: bytes = _store_run(target, fn)
    return value


def _config(args: argparse.Namespace) -> int:
    target = resolve(args.kvstore, args.agent_socket)
    if args.config_command == "get":
        return _config_get(target, args)
    key = node_config_key(args.node) if args.node else CLUSTER_CONFIG_KEY
    where = f"node {args.node}" if args.node else "cluster-wide"
    if args.config_command == "set":
        changes = parse_assignments(args.settings)
        value = _update_key(target, key, changes)
    else:
        value = _update_key(target, key, {}, tuple(args.keys))
    print(f"{where} settings: {json.loads(value) or '{}'} (agents apply them within a second)")
    return 0


def _config_get(target: Target, args: argparse.Namespace) -> int:
    from villi.agentclient import AgentClient
    from villi.errors import AgentUnavailable
    from villi.policy.modes import CONFIG_PREFIX

    async def fn(store: Any) -> dict[str, Any]:
        return {kv.key: json.loads(kv.value) for kv in (await store.list(CONFIG_PREFIX)).items}

    stored = _store_run(target, fn)
    nodes: dict[str, Any] = {}
    for node, sock in target.agents.items():
        try:
            with AgentClient(sock) as c:
                nodes[node] = c.get("/v1/config")
        except (AgentUnavailable, VilliError) as e:
            nodes[node] = {"error": str(e)}
    if args.output == "json":
        dump_json({"stored": stored, "nodes": nodes})
        return 0
    rows = [[k[len(CONFIG_PREFIX):], json.dumps(v, sort_keys=True)] for k, v in stored.items()]
    table(["KEY", "SETTINGS"], rows or [["-", "(nothing stored: the agents' flags apply)"]])
    print()
    table(["NODE", "ENABLE POLICY", "AUDIT MODE", "DEGRADED"],
          [[n, r.get("enablePolicy", "?"), _audit_text(r), _degraded_text(r)]
           if "error" not in r else [n, "-", "-", r["error"]] for n, r in nodes.items()])
    return 0


def _audit_text(r: dict[str, Any]) -> str:
    return f"{'enabled' if r.get('auditMode') else 'disabled'} ({r.get('auditModeSource')})"


def _degraded_text(r: dict[str, Any]) -> str:
    return "DEGRADED" if r.get("degraded") else "no"


# --- per endpoint ----------------------------------------------------------------------

def _endpoint_config(args: argparse.Namespace) -> int:
    from villi.agentclient import AgentClient
    from villi.errors import AgentUnavailable

    changes = parse_assignments(args.settings, ENDPOINT_SETTINGS)
    target = resolve(args.kvstore, args.agent_socket)
    ref = args.endpoint
    if "/" in ref and not ref.startswith(("pod:", "container-id:")):
        ref = f"pod:{ref}"
    agents = target.agents
    if args.node:
        if args.node not in agents:
            raise VilliError(f"no agent for node {args.node!r}; nodes: {', '.join(agents)}")
        agents = {args.node: agents[args.node]}
    elif not ref.startswith("pod:") and len(agents) > 1:
        raise VilliError(f"endpoint ids are per node: add --node ({', '.join(agents)}) or "
                         "name the pod as NAMESPACE/NAME")
    errors = []
    for node, sock in agents.items():
        try:
            with AgentClient(sock) as c:
                ep = c.request("PATCH", f"/v1/config/endpoint/{ref}", json=changes)
        except AgentUnavailable as e:
            errors.append(str(e))
            continue
        except VilliError as e:
            if "no endpoint" in str(e):
                errors.append(f"{node}: {e}")
                continue
            raise
        pol = ep["policy"]
        print(f"endpoint {ep['id']} ({ep['namespace']}/{ep['podName']}) on {node}: "
              f"PolicyAuditMode={'enabled' if pol.get('auditMode') else 'disabled'}; "
              f"policy ingress {pol['ingress']}, egress {pol['egress']}")
        return 0
    raise VilliError(f"endpoint {args.endpoint} not found: " + "; ".join(errors))


# --- the last-resort switch --------------------------------------------------------------

def pin_dir_of(node: str, cluster: str | None, bpffs: str = "/sys/fs/bpf") -> Path:
    """Where ``node``'s datapath state is pinned (the lab's cluster name by default)."""
    lab = load_lab_state()
    if cluster is None and lab is not None:
        names = [n["name"] for n in lab.get("nodes", [])]
        if node not in names:
            raise VilliError(f"node {node!r} is not in the running lab (nodes: "
                             f"{', '.join(names)}); pass --cluster for another cluster")
        cluster = lab["cluster"]
    return Path(bpffs) / "villi" / (cluster or "default") / node


def _datapath_policy(args: argparse.Namespace) -> int:
    from villi.datapath.policycfg import PolicyConfigMap

    if args.switch == "status":
        return _switch_status(args)
    pin = pin_dir_of(args.node, args.cluster, args.bpffs)
    cfg = PolicyConfigMap.open_pinned(pin)
    try:
        if args.switch == "degrade":
            since = cfg.degrade()
            print(f"policy on {args.node} is DEGRADED since {_when(since)}: packets policy "
                  "would drop are forwarded and reported as AUDIT (villi observe --verdict "
                  f"AUDIT). End it with: villi datapath policy restore --node {args.node}")
        else:
            was = cfg.restore()
            left = cfg.read()
            msg = "restored: policy is enforced again" if was else \
                "was not degraded by the switch"
            if left.cluster_degraded:
                msg += "; still degraded cluster-wide (villi policy restore --all)"
            print(f"policy on {args.node}: {msg}")
    finally:
        cfg.close()
    return 0


def _switch_status(args: argparse.Namespace) -> int:
    from villi.datapath.policycfg import read_pinned

    lab = load_lab_state()
    nodes = [args.node] if args.node else [n["name"] for n in (lab or {}).get("nodes", [])]
    if not nodes:
        raise VilliError("--node is required outside a lab")
    rows, degraded = [], False
    for node in nodes:
        sw = read_pinned(pin_dir_of(node, args.cluster, args.bpffs))
        if sw is None:
            rows.append([node, "-", "-", "no pinned state"])
            continue
        degraded |= sw.degraded
        rows.append([node, sw.enforcement, "enabled" if sw.audit else "disabled",
                     degraded_line(sw.as_dict()) or "no"])
    table(["NODE", "ENFORCEMENT", "AUDIT MODE", "DEGRADED"], rows)
    return 1 if degraded else 0


def degraded_line(sw: dict[str, Any]) -> str | None:
    """``DEGRADED since …`` for a switches dict (PolicySwitches.as_dict), or None."""
    if not sw.get("degraded"):
        return None
    parts = []
    if sw.get("degradedSince"):
        parts.append(f"since {_when(int(sw['degradedSince']))} (node switch)")
    if sw.get("clusterDegraded"):
        parts.append("cluster-wide (villi policy degrade --all)")
    return "DEGRADED " + ", ".join(parts)


def _cluster_switch(args: argparse.Namespace) -> int:
    target = resolve(args.kvstore, args.agent_socket)
    on = args.policy_switch == "degrade"
    if on:
        value = _update_key(target, CLUSTER_CONFIG_KEY, {"PolicyDegraded": "enabled"})
    else:
        value = _update_key(target, CLUSTER_CONFIG_KEY, {}, ("PolicyDegraded",))
    PolicySettings.from_bytes(value, CLUSTER_CONFIG_KEY)
    if on:
        print("policy DEGRADED on every node (through the kvstore): packets policy would "
              "drop are forwarded and reported as AUDIT. End it with: villi policy restore "
              "--all")
    else:
        print("cluster-wide degradation ended (nodes degraded by their own switch stay so "
              "until villi datapath policy restore --node NODE)")
    return 0


def _when(since: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since))
