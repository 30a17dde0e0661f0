"""``villi policy trace|selectors|generate``: why a packet passes, and policies from flows.

``trace`` and ``selectors`` rebuild what every agent follows (applied resources,
identities, pods' ipcache entries) from the kvstore and run the agents' own resolver
(:mod:`villi.policy.trace`); ``generate`` turns observed flows into least-privilege
CiliumNetworkPolicies (:mod:`villi.policy.generate`), from a file, stdin or the agents'
flow rings (``--since``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from villi.cli._groups import group
from villi.errors import VilliError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    ps = group(sub, "policy", "policy operations: trace a decision, list selectors, "
               "generate policies from flows")
    p = ps.add_parser("trace", help="would SRC reach DST on a port, and which rule decides",
                      description="Allowed, denied or audited, and by which rule (or default "
                      "deny), from the agents' resolver on the live cluster state. Peers: "
                      "NAMESPACE/POD, labels (k8s:app=web,k8s:io.kubernetes.pod.namespace=ns), "
                      "an entity (world, host, remote-node, kube-apiserver, …) or an IPv4 "
                      "address.")
    p.add_argument("--src", "-s", required=True, metavar="POD|LABELS|ENTITY|IP")
    p.add_argument("--dst", "-d", required=True, metavar="POD|LABELS|ENTITY|IP")
    p.add_argument("--dport", default="0/tcp", metavar="PORT[/PROTO]",
                   help="80/tcp, 53/udp, web/tcp (a named port of --dst), 8/icmp (type)")
    p.add_argument("-o", "--output", choices=["text", "json"], default="text")
    p.set_defaults(handler=trace_command)

    p = ps.add_parser("selectors", help="every selector in use and the identities it selects")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.add_argument("--no-headers", action="store_true")
    p.set_defaults(handler=selectors_command)

    p = ps.add_parser("generate", help="least-privilege CiliumNetworkPolicies from flows",
                      description="One CiliumNetworkPolicy per workload (app label, else pod "
                      "name), ingress and egress, ports as observed; replies ignored; reserved "
                      "identities become entities; world peers become /32 CIDRs (--world "
                      "entity: toEntities world). See docs/policy.md.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-flows", metavar="FILE|-",
                     help="flows as `villi observe -o json` (or jsonpb) prints them")
    src.add_argument("--since", metavar="DURATION",
                     help="read the agents' flow rings, e.g. 10m (as villi observe --since)")
    p.add_argument("--namespace", "-n", help="only workloads of this namespace")
    p.add_argument("--verdict", action="append", metavar="VERDICT",
                   help="flows to learn from (repeatable): FORWARDED, REDIRECTED, AUDIT, "
                   "DROPPED (default: FORWARDED, REDIRECTED, AUDIT)")
    p.add_argument("--world", choices=["cidr", "entity"], default="cidr",
                   help="world peers as observed /32 CIDRs (default) or toEntities world")
    p.add_argument("-o", "--output", metavar="FILE", help="write the YAML here (default stdout)")
    p.set_defaults(handler=generate_command)


def trace_command(args: argparse.Namespace) -> int:
    from villi.cli.clusterstate import cluster_view
    from villi.cli.context import resolve
    from villi.cli.output import dump_json
    from villi.policy.trace import TraceError, format_trace, trace

    view = cluster_view(resolve(args.kvstore, args.agent_socket))
    try:
        result = trace(view, args.src, args.dst, args.dport)
    except TraceError as exc:
        raise VilliError(str(exc)) from None
    if args.output == "json":
        dump_json(result.to_json())
    else:
        print(format_trace(result))
    return 0


def selectors_command(args: argparse.Namespace) -> int:
    from villi.cli.clusterstate import cluster_view
    from villi.cli.context import resolve
    from villi.cli.output import dump_json, table
    from villi.policy.trace import selectors_view

    rows = selectors_view(cluster_view(resolve(args.kvstore, args.agent_socket)))
    if args.output == "json":
        dump_json(rows)
        return 0
    table(["SELECTOR", "USERS", "IDENTITIES"],
          [[r["selector"], r["users"] or ["-"],
            [f"{i['id']} {_short(i['labels'])}" for i in r["identities"]] or ["-"]]
           for r in rows], no_headers=args.no_headers)
    return 0


def _short(labels: list[str]) -> str:
    """The labels that tell identities apart (not the derived namespace ones)."""
    keep = [lbl for lbl in labels if not lbl.startswith(
        ("k8s:io.cilium.k8s.namespace.labels.", "k8s:io.cilium.k8s.policy.cluster"))]
    return ",".join(keep)


def _flows_since(args: argparse.Namespace) -> list[dict[str, Any]]:
    import asyncio
    import json

    from villi.cli import observe
    from villi.cli.context import resolve

    since = observe.parse_time(args.since)
    agents = resolve(args.kvstore, args.agent_socket).agents
    params = {"filter": json.dumps([]), "since": str(since)}

    async def fetch_all() -> list[Any]:
        return await asyncio.gather(*(observe._fetch(n, s, params) for n, s in agents.items()),
                                    return_exceptions=True)

    flows: list[dict[str, Any]] = []
    missing = []
    for node, res in zip(agents, asyncio.run(fetch_all()), strict=True):
        if isinstance(res, BaseException):
            missing.append(f"{node} ({res})")
        else:
            flows.extend(res)
    if missing:
        print(f"warning: no flows from {', '.join(missing)}: policies may miss their "
              "connections", file=sys.stderr)
        if not flows:
            raise VilliError("no agent answered; nothing to generate from")
    return flows


def generate_command(args: argparse.Namespace) -> int:
    from villi.policy.generate import (
        DEFAULT_VERDICTS,
        FlowParseError,
        generate,
        parse_flows,
        to_yaml,
    )

    try:
        if args.since:
            flows = _flows_since(args)
        elif args.from_flows == "-":
            flows = parse_flows(sys.stdin.read(), "<stdin>")
        else:
            try:
                with open(args.from_flows) as f:
                    text = f.read()
            except OSError as exc:
                raise VilliError(f"cannot read flows from {args.from_flows}: "
                                 f"{exc.strerror}") from None
            flows = parse_flows(text, args.from_flows)
        result = generate(flows, namespace=args.namespace,
                          verdicts=args.verdict or DEFAULT_VERDICTS, world=args.world)
    except (FlowParseError, ValueError) as exc:
        raise VilliError(str(exc)) from None
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(result.skipped.items()))
    print(f"{len(result.policies)} policies from {result.connections} connections in "
          f"{len(flows)} flows" + (f" (skipped: {skipped})" if skipped else ""),
          file=sys.stderr)
    text = to_yaml(result)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0
