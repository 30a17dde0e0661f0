"""``villi get endpoints|identities|policies|services|nodes``."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from villi._nsenter import in_netns
from villi.agentclient import AgentClient
from villi.cli.context import Target, resolve
from villi.cli.output import dump_json, table
from villi.errors import AgentUnavailable
from villi.kvstore import schema


def _from_agents(target: Target, path: str) -> tuple[list[tuple[str, Any]], list[str]]:
    """(node, answer) from every agent, and the nodes that did not answer."""
    answers, missing = [], []
    for node, sock in target.agents.items():
        try:
            with AgentClient(sock) as c:
                answers.append((node, c.get(path)))
        except AgentUnavailable:
            missing.append(node)
    if not answers and missing:
        raise AgentUnavailable(f"no agent answered ({', '.join(target.agents.values())}); "
                               "is `villi agent` or `villi lab up` running?")
    return answers, missing


async def _list(url: str, prefix: str) -> list[tuple[str, bytes]]:
    from villi.kvstore import open_store

    async with open_store(url) as store:
        res = await store.list(prefix)
        return [(kv.key, kv.value) for kv in res.items]


def _store_list(target: Target, prefix: str) -> list[tuple[str, bytes]]:
    with in_netns(target.kvstore_netns):
        return asyncio.run(_list(target.kvstore, prefix))


def _labels(labels: dict[str, str]) -> list[str]:
    return [f"k8s:{k}={v}" for k, v in sorted(labels.items())] or [""]


def get_command(args: argparse.Namespace) -> int:
    target = resolve(args.kvstore, args.agent_socket)
    what = args.what
    if what == "endpoints":
        answers, missing = _from_agents(target, "/v1/endpoint")
        eps = [dict(ep, node=ep.get("node", node)) for node, lst in answers for ep in lst]
        if args.output == "json":
            dump_json(eps)
        else:
            table(["ENDPOINT", "NODE", "POD", "NAMESPACE", "POLICY (ingress)",
                   "POLICY (egress)", "IDENTITY", "LABELS", "IPv4", "STATUS"],
                  [[e["id"], e["node"], e["podName"], e["namespace"],
                    e["policy"]["ingress"].capitalize(), e["policy"]["egress"].capitalize(),
                    e["identity"], _labels(e["labels"]), e["ipv4"], e["state"]] for e in eps],
                  no_headers=args.no_headers)
        _warn_missing(missing)
        return 0
    if what == "identities":
        items = _store_list(target, schema.IDENTITY_IDS)
        rows = [(int(k.rsplit("/", 1)[1]), v.decode()) for k, v in items]
        if args.output == "json":
            dump_json([{"id": i, "labels": lbl.split(";") if lbl else []} for i, lbl in rows])
        else:
            table(["ID", "LABELS"], [[i, lbl.split(";") if lbl else [""]]
                                     for i, lbl in sorted(rows)], no_headers=args.no_headers)
        return 0
    if what == "nodes":
        from villi.ipam.usage import merge_usage

        items = _store_list(target, schema.NODES)
        nodes = merge_usage([schema.NodeEntry.decode(v, key=k).to_json() for k, v in items],
                            _store_list(target, schema.USAGE))
        if args.output == "json":
            dump_json(nodes)
        elif any("eni" in n for n in nodes):
            _eni_nodes_table(nodes, args.no_headers)
        else:
            table(["NAME", "IPv4", "POD CIDRS", "IPAM", "ALLOCATABLE"],
                  [[n["name"], n.get("ipv4") or "-", n.get("podCIDRs") or ["-"],
                    f"{n.get('ipam', {}).get('allocated', 0)}/"
                    f"{n.get('ipam', {}).get('capacity', 0)}", _allocatable(n)]
                   for n in nodes],
                  no_headers=args.no_headers)
        return 0
    if what == "services":
        return _services(target, args)
    if what == "fqdn-cache":
        return _fqdn_cache(target, args)
    kinds = {"policies": ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy",
                          "NetworkPolicy"),
             "services": ("Service",)}[what]
    items = _store_list(target, schema.RESOURCES)
    res = []
    for key, value in items:
        kind, ns, name = schema.name_in(schema.RESOURCES, key).split("/")
        if kind in kinds:
            res.append({"kind": kind, "namespace": None if ns == "_" else ns, "name": name,
                        "resource": json.loads(value)})
    if args.output == "json":
        dump_json(res)
    else:
        table(["KIND", "NAMESPACE", "NAME"], [[r["kind"], r["namespace"] or "-", r["name"]]
                                             for r in res], no_headers=args.no_headers)
    return 0


def _services(target: Target, args: argparse.Namespace) -> int:
    """Services with their ClusterIP and backends, as an agent computes them."""
    answers, missing = _from_agents(target, "/v1/service")
    services = answers[0][1] if answers else []
    if args.output == "json":
        dump_json(services)
    else:
        rows = []
        for svc in services:
            ports = [f"{p.get('port')}/{p.get('protocol', 'TCP')}" for p in svc.get("ports", [])]
            backends = [b for p in svc.get("ports", [])
                        for b in p.get("backends", [])]
            rows.append([svc.get("namespace"), svc.get("name"), svc.get("clusterIP") or "-",
                         ports or ["-"], backends or ["-"]])
        table(["NAMESPACE", "NAME", "CLUSTER-IP", "PORTS", "BACKENDS"], rows,
              no_headers=args.no_headers)
    _warn_missing(missing)
    return 0


def _fqdn_cache(target: Target, args: argparse.Namespace) -> int:
    """Like ``cilium-dbg fqdn cache list``: endpoint, name, IPs, TTL left, source."""
    answers, missing = _from_agents(target, "/v1/fqdn/cache")
    rows = [dict(r, node=node) for node, lst in answers for r in lst]
    if args.output == "json":
        dump_json(rows)
    else:
        table(["NODE", "ENDPOINT", "FQDN", "IP", "TTL", "TTL LEFT", "SOURCE"],
              [[r["node"], r["endpoint"], r["name"], r["ip"], r["ttl"], r["ttl_left"],
                r["source"]] for r in rows], no_headers=args.no_headers)
    _warn_missing(missing)
    return 0


def _warn_missing(missing: list[str]) -> None:
    if missing:
        import sys

        print(f"warning: no answer from node(s): {', '.join(missing)}", file=sys.stderr)


def _allocatable(node: dict[str, Any]) -> str:
    """``villi.io/ip``: pod IPs the node can still hand out (placement's figure)."""
    value = node.get("villi.io/ip", node.get("ipam", {}).get("free"))
    return "-" if value is None else str(value)


def _eni_nodes_table(nodes: list[dict[str, Any]], no_headers: bool) -> None:
    """ENI mode: one line per interface (id, device index, IPs) under each node."""
    rows = []
    for n in nodes:
        ifaces = n.get("eni") or []
        ipam = n.get("ipam", {})
        rows.append([n["name"], n.get("ipv4") or "-",
                     [f"{e['id']} (#{e['index']}, {e['subnet']})" for e in ifaces] or ["-"],
                     [str(len(e.get("ips") or [])) for e in ifaces] or ["-"],
                     f"{ipam.get('allocated', 0)}/{ipam.get('capacity', 0)}",
                     _allocatable(n)])
    table(["NAME", "IPv4", "INTERFACES", "IPs", "IPAM", "ALLOCATABLE (villi.io/ip)"], rows,
          no_headers=no_headers)
