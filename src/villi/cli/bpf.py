"""``villi bpf …``, ``villi endpoint get``, ``villi identity get``: the live datapath state.

The ``bpf`` commands read each node's pinned maps in bpffs (the kernel's truth, with
or without a running agent; :mod:`villi.datapath.pinned`) and name what they decode:
identities → labels and IPs → pods from the kvstore, policy cookies → rules from the
node's agent. A part that cannot be named is printed as its number, never guessed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from villi.cli._groups import group
from villi.errors import VilliError


class EndpointUnknown(VilliError):
    """No node's datapath has the endpoint the command names."""


def _common(p: argparse.ArgumentParser, node_flag: bool = True) -> None:
    if node_flag:
        p.add_argument("--node", help="the node (default: every node of the lab / the agent)")
    p.add_argument("--pin-dir", help="read this pin directory (when no agent or lab says "
                   "where: /sys/fs/bpf/villi/<cluster>/<node>)")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.add_argument("--no-headers", action="store_true")
    p.add_argument("-n", "--numeric", action="store_true", help="identities and addresses "
                   "only (do not read the kvstore or the agents to name them)")


def _sub(parent: argparse._SubParsersAction, name: str,
         helptext: str) -> argparse._SubParsersAction:
    """``villi bpf NAME COMMAND``; ``villi bpf NAME`` alone prints its usage."""
    parser = parent.add_parser(name, help=helptext)

    def usage(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(handler=usage)
    return parser.add_subparsers(dest=f"bpf_{name}_cmd", metavar="COMMAND")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    bs = group(sub, "bpf", "dump the datapath's pinned BPF maps (policy, ct, ipcache, lb)")
    pol = _sub(bs, "policy", "policy map")
    p = pol.add_parser("get", help="an endpoint's policy map entries")
    p.add_argument("endpoint", metavar="ENDPOINT", help="endpoint id or NAMESPACE/POD")
    _common(p)
    p.set_defaults(handler=policy_get_command)
    ct = _sub(bs, "ct", "connection tracking map")
    p = ct.add_parser("list", help="live conntrack entries of a node (or every node)")
    p.add_argument("node", nargs="?", metavar="NODE")
    _common(p, node_flag=False)
    p.set_defaults(handler=ct_list_command)
    for name, helptext, handler in (
            ("ipcache", "prefix → identity (and node) map", ipcache_list_command),
            ("lb", "socket load-balancer frontends and backends", lb_list_command),
            ("endpoint", "endpoints map: pod IP → endpoint id, identity, flags",
             endpoint_list_command)):
        g = _sub(bs, name, helptext)
        p = g.add_parser("list", help=f"dump the {name} map")
        _common(p)
        p.set_defaults(handler=handler)

    es = group(sub, "endpoint", "endpoint details")
    p = es.add_parser("get", help="one endpoint: the agent's record and its datapath entry")
    p.add_argument("endpoint", metavar="ID", help="endpoint id or NAMESPACE/POD")
    p.add_argument("--node", help="the node (needed when several nodes have that id)")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(handler=endpoint_get_command)

    ids = group(sub, "identity", "identity details")
    p = ids.add_parser("get", help="one identity: its labels and the pods that have it")
    p.add_argument("identity", metavar="ID", type=int)
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(handler=identity_get_command)


# --- shared ------------------------------------------------------------------------------

class _Names:
    """Identity labels and pod names from the kvstore (empty with --numeric or when the
    store does not answer: then numbers are printed, and a warning says why)."""

    def __init__(self, target: Any, numeric: bool) -> None:
        from villi.cli.clusterstate import StoreState, read_state

        self.state = StoreState()
        if numeric:
            return
        try:
            self.state = read_state(target)
        except VilliError as exc:
            print(f"warning: names unavailable ({exc}); printing numbers", file=sys.stderr)

    def labels(self, identity: int, fallback: str = "") -> list[str]:
        if identity == 0:
            return ["ANY"]
        return self.state.labels_of(identity) or ([fallback] if fallback else ["-"])

    def addr(self, ip: str, port: int | None = None) -> str:
        text = f"{ip}:{port}" if port is not None else ip
        pod = self.state.pod_of(ip)
        return f"{text} ({pod})" if pod else text


def _short(labels: list[str]) -> list[str]:
    return [lbl for lbl in labels if not lbl.startswith(
        ("k8s:io.cilium.k8s.namespace.labels.", "k8s:io.cilium.k8s.policy.cluster"))] or labels


def _target(args: argparse.Namespace) -> Any:
    from villi.cli.context import resolve

    return resolve(args.kvstore, args.agent_socket)


def _emit(args: argparse.Namespace, headers: list[str], rows: list[list[Any]],
          data: Any) -> None:
    from villi.cli.output import dump_json, table

    if args.output == "json":
        dump_json(data)
    else:
        table(headers, rows, no_headers=args.no_headers)


def _find_endpoint(target: Any, ref: str, node: str | None,
                   pin_dir: str | None = None) -> tuple[str, Path, dict[str, Any]]:
    """(node, pin dir, endpoints-map row) of ``ref`` (an id or NAMESPACE/POD)."""
    from villi.cli.clusterstate import pin_dirs, read_state
    from villi.datapath import pinned

    dirs = pin_dirs(target, node, pin_dir)
    want_ip: str | None = None
    if "/" in ref:
        try:
            state = read_state(target)
            for ip, entry in state.pods.items():
                if f"{entry.get('namespace')}/{entry.get('podName')}" == ref:
                    want_ip = ip
        except VilliError:
            state = None
        if want_ip is None:
            raise EndpointUnknown(f"unknown endpoint {ref}: no pod of that name has an "
                                  "ipcache entry (see `villi get endpoints`)")
    elif not ref.isdigit():
        raise EndpointUnknown(f"bad endpoint {ref!r}: an endpoint id or NAMESPACE/POD")
    found = []
    seen = {}
    for name, path in dirs.items():
        rows = pinned.endpoints(path)
        seen[name] = [r["endpointID"] for r in rows]
        for row in rows:
            if (want_ip is not None and row["ip"] == want_ip) or (
                    want_ip is None and row["endpointID"] == int(ref)):
                found.append((name, path, row))
    if not found:
        where = "; ".join(f"{n}: {', '.join(map(str, ids)) or 'none'}"
                          for n, ids in seen.items())
        raise EndpointUnknown(f"unknown endpoint {ref} (endpoints in the datapath: {where})")
    if len(found) > 1:
        raise EndpointUnknown(f"endpoint {ref} exists on {', '.join(f[0] for f in found)}: "
                              "pass --node")
    return found[0]


def _port_text(row: dict[str, Any]) -> str:
    if row["protocol"] == "ANY":
        return "ANY"
    if row["port"] == 0 and row["endPort"] == 0:
        return f"ANY/{row['protocol']}"
    if row["endPort"]:
        return f"{row['port']}-{row['endPort']}/{row['protocol']}"
    return f"{row['port']}/{row['protocol']}"


# --- villi bpf policy get ----------------------------------------------------------------

def policy_get_command(args: argparse.Namespace) -> int:
    from villi.cli.clusterstate import cookie_names
    from villi.datapath import pinned

    target = _target(args)
    node, path, ep = _find_endpoint(target, args.endpoint, args.node, args.pin_dir)
    names = _Names(target, args.numeric)
    rules = None if args.numeric else cookie_names(target, node)
    rows = pinned.policy(path, ep["endpointID"])
    for row in rows:
        row["labels"] = names.labels(row["identity"])
        row["rule"] = (rules or {}).get(row["cookie"]) if row["cookie"] else None
    data = {"node": node, "endpoint": ep, "pod": names.state.pod_of(ep["ip"]),
            "entries": rows}
    if args.output != "json":
        pod = f" ({data['pod']})" if data["pod"] else ""
        print(f"Endpoint {ep['endpointID']}{pod} on {node}, identity {ep['identity']}: "
              f"ingress {'enforced' if ep['ingressEnforced'] else 'not enforced'}, "
              f"egress {'enforced' if ep['egressEnforced'] else 'not enforced'}; "
              f"{len(rows)} entries")
        if rules is None and not args.numeric and any(r["cookie"] for r in rows):
            print(f"(the agent of {node} did not name the rules: cookie numbers shown)",
                  file=sys.stderr)
    _emit(args, ["DIRECTION", "VERDICT", "IDENTITY", "LABELS", "PORT/PROTO", "PROXY PORT",
                 "RULE", "PACKETS", "BYTES"],
          [[r["direction"].capitalize(), "Deny" if r["deny"] else "Allow",
            r["identity"] or "ANY", _short(r["labels"]), _port_text(r),
            r["proxyPort"] or "-",
            r["rule"] or (f"cookie {r['cookie']}" if r["cookie"] else "-"),
            r["packets"], r["bytes"]] for r in rows], data)
    return 0


# --- villi bpf ct/ipcache/lb/endpoint list ------------------------------------------------

def _per_node(args: argparse.Namespace, node: str | None) -> tuple[Any, dict[str, Path]]:
    from villi.cli.clusterstate import pin_dirs

    target = _target(args)
    return target, pin_dirs(target, node, args.pin_dir)


def ct_list_command(args: argparse.Namespace) -> int:
    from villi.datapath import pinned

    target, dirs = _per_node(args, args.node)
    names = _Names(target, args.numeric)
    data = []
    for node, path in dirs.items():
        for row in pinned.conntrack(path):
            data.append({"node": node, **row,
                         "peerLabels": names.labels(row["peerIdentity"])})
    _emit(args, ["NODE", "PROTO", "SOURCE", "DESTINATION", "DIRECTION", "EXPIRES",
                 "ENDPOINT", "PEER IDENTITY", "PACKETS", "BYTES"],
          [[r["node"], r["protocol"], names.addr(r["source"], r["sourcePort"]),
            names.addr(r["destination"], r["destinationPort"]), r["direction"],
            f"{r['expiresIn']}s" + (" closing" if r["closing"] else ""), r["endpointID"],
            f"{r['peerIdentity']} {','.join(_short(r['peerLabels']))}", r["packets"],
            r["bytes"]] for r in data], data)
    return 0


def ipcache_list_command(args: argparse.Namespace) -> int:
    from villi.datapath import pinned

    target, dirs = _per_node(args, args.node)
    names = _Names(target, args.numeric)
    data = []
    for node, path in dirs.items():
        for row in pinned.ipcache(path):
            ip, _, plen = row["prefix"].partition("/")
            fallback = f"cidr:{row['prefix']}" if row["identity"] >= 1 << 24 else ""
            data.append({"node": node, **row,
                         "labels": names.labels(row["identity"], fallback),
                         "pod": names.state.pod_of(ip) if plen == "32" else None})
    _emit(args, ["NODE", "PREFIX", "IDENTITY", "LABELS", "NODE IP", "POD"],
          [[r["node"], r["prefix"], r["identity"], _short(r["labels"]), r["nodeIP"] or "-",
            r["pod"] or "-"] for r in data], data)
    return 0


def lb_list_command(args: argparse.Namespace) -> int:
    from villi.cli.clusterstate import agents_get
    from villi.datapath import pinned

    target, dirs = _per_node(args, args.node)
    svc_names: dict[str, str] = {}
    if not args.numeric:
        answers, _missing = agents_get(target, "/v1/service")
        for _node, services in answers[:1]:
            for svc in services:
                for port in svc.get("ports", []):
                    svc_names[f"{svc.get('clusterIP')}:{port.get('port')}"] = (
                        f"{svc.get('namespace')}/{svc.get('name')}")
    data = []
    for node, path in dirs.items():
        for row in pinned.services(path):
            data.append({"node": node, **row, "service": svc_names.get(row["frontend"])})
    _emit(args, ["NODE", "FRONTEND", "PROTO", "SERVICE", "BACKENDS"],
          [[r["node"], r["frontend"], r["protocol"], r["service"] or f"id {r['serviceID']}",
            [f"{b['slot']}: {b['address']}" for b in r["backends"]] or ["-"]]
           for r in data], data)
    return 0


def endpoint_list_command(args: argparse.Namespace) -> int:
    from villi.datapath import pinned

    target, dirs = _per_node(args, args.node)
    names = _Names(target, args.numeric)
    data = [{"node": node, **row, "pod": names.state.pod_of(row["ip"])}
            for node, path in dirs.items() for row in pinned.endpoints(path)]
    _emit(args, ["NODE", "ENDPOINT", "IPv4", "POD", "IDENTITY", "IFINDEX",
                 "POLICY (ingress)", "POLICY (egress)"],
          [[r["node"], r["endpointID"], r["ip"], r["pod"] or "-", r["identity"], r["ifindex"],
            "Enabled" if r["ingressEnforced"] else "Disabled",
            "Enabled" if r["egressEnforced"] else "Disabled"] for r in data], data)
    return 0


# --- villi endpoint get / villi identity get -------------------------------------------

def endpoint_get_command(args: argparse.Namespace) -> int:
    from villi.agentclient import AgentClient
    from villi.cli.output import dump_json
    from villi.datapath import pinned

    target = _target(args)
    node, path, row = _find_endpoint(target, args.endpoint, args.node)
    agent_view: dict[str, Any] | None = None
    sock = target.agents.get(node) or (next(iter(target.agents.values()))
                                       if len(target.agents) == 1 else None)
    agent_error = None
    if sock is not None:
        try:
            with AgentClient(sock) as c:
                agent_view = c.get(f"/v1/endpoint/{row['endpointID']}")
        except VilliError as exc:
            agent_error = str(exc)
    entries = pinned.policy(path, row["endpointID"])
    data = {"node": node, "agent": agent_view, "datapath": row,
            "policyEntries": len(entries), **({"agentError": agent_error}
                                              if agent_error else {})}
    if args.output == "json":
        dump_json(data)
        return 0
    ep = agent_view or {}
    lines = [("Endpoint", row["endpointID"]), ("Node", node),
             ("Pod", f"{ep.get('namespace')}/{ep.get('podName')}" if ep else "-"),
             ("IPv4", row["ip"]), ("Identity", row["identity"]),
             ("Labels", ", ".join(f"{k}={v}" for k, v in sorted((ep.get("labels") or
                                                                 {}).items())) or "-"),
             ("Policy (ingress)", "Enabled" if row["ingressEnforced"] else "Disabled"),
             ("Policy (egress)", "Enabled" if row["egressEnforced"] else "Disabled"),
             ("Policy map entries", len(entries)),
             ("Host interface", f"{ep.get('hostIfname', '-')} (ifindex {row['ifindex']})"),
             ("MAC", row["mac"]), ("Named ports", ", ".join(
                 f"{n}={p[0]}/{p[1]}" for n, p in sorted((ep.get("namedPorts") or {}).items()))
                 or "-"),
             ("State", ep.get("state", f"unknown ({agent_error or 'no agent'})"))]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key + ':':<{width + 1}} {value}")
    return 0


def identity_get_command(args: argparse.Namespace) -> int:
    from villi.cli.clusterstate import read_state
    from villi.cli.output import dump_json

    target = _target(args)
    state = read_state(target)
    labels = state.labels_of(args.identity)
    if not labels:
        raise VilliError(f"unknown identity {args.identity} (not reserved, not in the "
                         "kvstore; node-local CIDR identities: see `villi bpf ipcache list`)")
    pods = sorted((f"{e.get('namespace')}/{e.get('podName')}", ip, e.get("node", ""))
                  for ip, e in state.pods.items() if int(e.get("identity", -1)) == args.identity)
    data = {"id": args.identity, "labels": labels,
            "reserved": 0 < args.identity < 256,
            "pods": [{"pod": p, "ip": ip, "node": n} for p, ip, n in pods]}
    if args.output == "json":
        dump_json(data)
        return 0
    print(f"ID:     {args.identity}{' (reserved)' if data['reserved'] else ''}")
    print("LABELS: " + "\n        ".join(labels))
    print("PODS:   " + ("\n        ".join(f"{p} {ip} on {n}" for p, ip, n in pods) or "-"))
    return 0
