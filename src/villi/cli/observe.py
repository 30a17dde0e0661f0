"""``villi observe``: Hubble's ``observe`` for villi, across every node of a lab.

Filters follow hubble's rules: a repeated flag is OR, different flags are AND, and
``--not`` negates the filter right after it. Flags are hubble's: ``-n/--namespace``
(also the namespace of ``--pod``/``--service`` values that name none), ``-A`` (those
values match in any namespace), ``-l/--label``, ``-t/--type``, ``--node-name``,
``-o jsonpb``; ``--numeric`` has no short form (``-n`` is the namespace, as in hubble).
The filter is evaluated by each agent (server-side, on raw records); this command
merges the nodes' answers in time order, as Hubble Relay does, and says which nodes
did not answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from datetime import datetime
from typing import Any

#: (flag, help[, short flag]); each flag's field is its name (``--node-name`` → ``node``).
FILTER_FLAGS: list[tuple[str, ...]] = [
    ("pod", "[NAMESPACE/]POD-PREFIX: flows from or to the pod (namespace: -n, else "
            "default; any with -A)"),
    ("from-pod", "flows from the pod"), ("to-pod", "flows to the pod"),
    ("namespace", "flows from or to the namespace", "-n"),
    ("from-namespace", "flows from the namespace"), ("to-namespace", "flows to the namespace"),
    ("service", "[NAMESPACE/]SERVICE-PREFIX: flows from or to the service's address or "
                "backends"),
    ("from-service", "flows from the service"), ("to-service", "flows to the service"),
    ("label", "KEY=VALUE[,K2=V2] or reserved:world: from or to matching identities", "-l"),
    ("from-label", "from matching identities"), ("to-label", "to matching identities"),
    ("identity", "numeric identity (either side)"), ("from-identity", ""), ("to-identity", ""),
    ("ip", "address or CIDR (either side)"), ("from-ip", ""), ("to-ip", ""),
    ("port", "L4 port (either side)"), ("from-port", ""), ("to-port", ""),
    ("verdict", "FORWARDED, DROPPED, AUDIT (policy would drop: audit mode), REDIRECTED (to "
                "the L7 proxy) or ERROR"),
    ("protocol", "tcp, udp, icmp, sctp, http, dns"),
    ("type", "trace[:to-endpoint|to-proxy|to-stack|from-endpoint], drop, policy-verdict, "
     "l7", "-t"),
    ("fqdn", "DNS name or pattern (*): DNS flows for it, flows to IPs it resolved to"),
    ("traffic-direction", "ingress or egress"),
    ("drop-reason-desc", "e.g. POLICY_DENIED"), ("tcp-flags", "e.g. syn or syn,ack"),
    ("node-name", "node name (or prefix*)"),
    ("http-method", "HTTP method of L7 flows, e.g. GET"),
    ("http-path", "regex on the HTTP path of L7 flows"),
    ("http-status", "HTTP status of L7 responses: 404, or 4+ for every 4xx"),
    ("http-url", "regex on the full HTTP URL of L7 flows"),
]
#: Flags whose values name an object in a namespace (``-n``/``-A`` apply to them).
NAMESPACED = ("pod", "from-pod", "to-pod", "service", "from-service", "to-service")


class _FilterAction(argparse.Action):
    """Record (flag, value, negated) in command-line order."""

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        preds = getattr(ns, "predicates", None) or []
        negate = bool(getattr(ns, "_negate_next", False))
        ns._negate_next = False
        field = self.dest.replace("_", "-")
        for p in preds:
            if p["field"] == field and p["negate"] == negate:
                p["values"].append(values)
                break
        else:
            preds.append({"field": field, "values": [values], "negate": negate})
        ns.predicates = preds


class _NotAction(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        ns._negate_next = True


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("observe", help="show flows (Hubble-compatible)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", choices=["flows", "status"], default="flows",
                   help="flows (default) or status (per-node observer status)")
    p.add_argument("-f", "--follow", action="store_true", help="keep streaming new flows")
    p.add_argument("--last", type=int, help="the last N flows per node (default 20)")
    p.add_argument("--first", type=int, help="the first N flows still in the ring")
    p.add_argument("--since", help="e.g. 30s, 5m, 1h30m or 2026-11-25T09:00:00Z")
    p.add_argument("--until", help="same forms as --since")
    p.add_argument("--not", nargs=0, action=_NotAction, dest="_negate_next",
                   help="negate the next filter")
    for flag, helptext, *short in FILTER_FLAGS:
        field = "node" if flag == "node-name" else flag
        p.add_argument(*short, f"--{flag}", action=_FilterAction, dest=field.replace("-", "_"),
                       metavar="VALUE", help=helptext or argparse.SUPPRESS)
    p.add_argument("--node", action=_FilterAction, dest="node", metavar="VALUE",
                   help=argparse.SUPPRESS)  # villi's older spelling of --node-name
    p.add_argument("-A", "--all-namespaces", action="store_true",
                   help="--pod/--service values without a namespace match in any namespace")
    p.add_argument("-o", "--output", choices=["compact", "json", "jsonpb", "table", "dict"],
                   default="compact", help="jsonpb is the same as json (one GetFlowsResponse "
                   "per line)")
    p.add_argument("--explain", action="store_true",
                   help="say which policy rule (or default deny) decided each flow")
    p.add_argument("--print-node-name", action="store_true")
    p.add_argument("--numeric", action="store_true", help="IPs instead of pod names")
    p.add_argument("--server", metavar="ADDR",
                   help="read through a villi relay: unix:///PATH or http://HOST:PORT "
                   "(default: the agents of the lab or --agent-socket directly)")
    p.add_argument("--server-token-file", help="token for a relay on TCP")
    p.set_defaults(predicates=[])


def resolve_namespaces(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The predicates with hubble's namespace rules applied.

    A ``--pod``/``--service`` value without ``NAMESPACE/`` means the namespace given by
    ``-n`` (when there is exactly one), else ``default``; with ``-A`` it matches in
    every namespace. ``-n`` itself stays a filter (flows from or to the namespace).
    """
    from villi.errors import VilliError

    namespaces = [v for p in args.predicates if p["field"] == "namespace" and not p["negate"]
                  for v in p["values"]]
    if args.all_namespaces and namespaces:
        raise VilliError("-A/--all-namespaces and -n/--namespace cannot be combined")
    if args.all_namespaces:
        default = ""
    elif len(namespaces) == 1:
        default = namespaces[0]
    else:
        default = "default"
    out = []
    for p in args.predicates:
        if p["field"] in NAMESPACED:
            p = {**p, "values": [v if "/" in v else f"{default}/{v}" for v in p["values"]]}
        out.append(p)
    return out


def parse_time(value: str | None) -> int | None:
    """Relative (``30s``, ``1h43m``) or absolute (RFC3339, date) time → epoch ns."""
    if not value:
        return None
    m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", value)
    if m and any(m.groups()):
        h, mi, s = (float(g) if g else 0.0 for g in m.groups())
        return time.time_ns() - int((h * 3600 + mi * 60 + s) * 1e9)
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        from villi.errors import VilliError

        raise VilliError(f"cannot read time {value!r}: use 30s, 5m, 1h30m or RFC3339") from None
    if dt.tzinfo is None:
        dt = dt.astimezone()
    return int(dt.timestamp() * 1e9)


def _params(args: argparse.Namespace) -> dict[str, str]:
    q = {"filter": json.dumps(resolve_namespaces(args))}
    for name in ("last", "first"):
        if getattr(args, name) is not None:
            q[name] = str(getattr(args, name))
    since, until = parse_time(args.since), parse_time(args.until)
    if since is not None:
        q["since"] = str(since)
    if until is not None:
        q["until"] = str(until)
    if args.follow:
        q["follow"] = "1"
    return q


def _agents(args: argparse.Namespace) -> dict[str, str]:
    from villi.cli.context import resolve

    agents = resolve(args.kvstore, args.agent_socket).agents
    nodes = [p["values"] for p in args.predicates if p["field"] == "node" and not p["negate"]]
    if nodes and len(agents) > 1:
        wanted = {v for vals in nodes for v in vals}
        agents = {n: s for n, s in agents.items()
                  if any(n == w or n.startswith(w.rstrip("*")) for w in wanted)}
    return agents


def _print(flow: dict[str, Any], args: argparse.Namespace) -> None:
    from villi.observer import format as fmt

    if args.output in ("json", "jsonpb"):
        print(json.dumps({"flow": flow, "node_name": flow.get("node_name"),
                          "time": flow.get("time")}), flush=True)
    elif args.output == "table":
        print("  ".join(fmt.table_row(flow)), flush=True)
    elif args.output == "dict":
        row = fmt.table_row(flow)
        for title, value in zip(["  TIMESTAMP", "       NODE", "     SOURCE", "DESTINATION",
                                 "       TYPE", "    VERDICT", "    SUMMARY"], row, strict=True):
            print(f"{title}: {value}")
        print("------------", flush=True)
    else:
        print(fmt.compact(flow, node=args.print_node_name, explain=args.explain,
                          numeric=args.numeric), flush=True)


async def _fetch(node: str, sock: str, params: dict[str, str]) -> list[dict[str, Any]]:
    from villi.agentclient import stream_lines

    async with asyncio.timeout(10):
        return [json.loads(line) async for line in stream_lines(sock, "/v1/flows", params)
                if line.strip()]


async def _query(args: argparse.Namespace) -> int:
    agents = _agents(args)
    params = _params(args)
    results = await asyncio.gather(*(_fetch(n, s, params) for n, s in agents.items()),
                                   return_exceptions=True)
    flows: list[dict[str, Any]] = []
    missing = []
    for (node, _sock), res in zip(agents.items(), results, strict=True):
        if isinstance(res, BaseException):
            missing.append(f"{node} ({res})")
        else:
            flows.extend(res)
    flows.sort(key=lambda f: f.get("time", ""))
    if args.output == "table":
        from villi.observer.format import TABLE_HEADERS

        print("  ".join(TABLE_HEADERS))
    for flow in flows:
        _print(flow, args)
    if missing:
        print(f"{len(missing)} node(s) did not answer: {', '.join(missing)}", file=sys.stderr)
    return 1 if missing and not flows and len(missing) == len(agents) else 0


async def _follow_one(node: str, sock: str, params: dict[str, str],
                      out: asyncio.Queue[dict[str, Any]]) -> None:
    from villi.agentclient import stream_lines

    async for line in stream_lines(sock, "/v1/flows", params):
        if line.strip():
            await out.put(json.loads(line))


async def _follow(args: argparse.Namespace) -> int:
    agents = _agents(args)
    params = _params(args)
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    tasks = {asyncio.ensure_future(_follow_one(n, s, params, queue)): n
             for n, s in agents.items()}
    print(f"Receiving flows from {len(agents)} node(s): {', '.join(agents)}", file=sys.stderr)
    try:
        while True:
            flow = await queue.get()
            _print(flow, args)
            for t in [t for t in tasks if t.done()]:
                node = tasks.pop(t)
                if t.exception() is not None:
                    print(f"node {node} is unavailable: {t.exception()}", file=sys.stderr)
    finally:
        for t in tasks:
            t.cancel()


def _status(args: argparse.Namespace) -> int:
    from villi.agentclient import AgentClient
    from villi.cli.output import dump_json, table
    from villi.errors import VilliError

    rows = []
    for node, sock in _agents(args).items():
        try:
            with AgentClient(sock) as c:
                rows.append(c.get("/v1/flows/status"))
        except VilliError as e:
            rows.append({"node": node, "error": str(e)})
    if args.output in ("json", "jsonpb"):
        dump_json(rows)
        return 0
    table(["NODE", "STATUS", "CURRENT/MAX FLOWS", "FLOWS/S", "PROCESSED", "LOST"],
          [[r["node"], "Unavailable" if "error" in r else "Connected",
            "-" if "error" in r else
            f"{r['current_flows']}/{r['max_flows']} "
            f"({100 * r['current_flows'] / max(1, r['max_flows']):.2f}%)",
            r.get("flows_per_second", "-"), r.get("processed", "-"), r.get("lost", "-")]
           for r in rows])
    return 0


def _relay_client(args: argparse.Namespace) -> Any:
    import httpx

    headers = {}
    if args.server_token_file:
        from pathlib import Path

        headers["Authorization"] = "Bearer " + Path(args.server_token_file).read_text().strip()
    addr = args.server
    if addr.startswith("unix://") or addr.startswith("/"):
        return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(
            uds=addr.removeprefix("unix://")), base_url="http://relay", timeout=None,
            headers=headers)
    return httpx.AsyncClient(base_url=addr if "://" in addr else f"http://{addr}",
                             timeout=None, headers=headers)


async def _via_relay(args: argparse.Namespace) -> int:
    """Flows (or status) from a relay: it merges the nodes and names those that are down."""
    params = _params(args)
    missing = []
    async with _relay_client(args) as c:
        if args.what == "status":
            resp = await c.get("/v1/flows/status")
            if resp.status_code != 200:
                print(f"error: relay: {resp.text}", file=sys.stderr)
                return 1
            print(json.dumps(resp.json(), indent=2))
            return 0
        if args.output == "table":
            from villi.observer.format import TABLE_HEADERS

            print("  ".join(TABLE_HEADERS))
        async with c.stream("GET", "/v1/flows", params=params) as resp:
            if resp.status_code != 200:
                await resp.aread()
                print(f"error: relay answered {resp.status_code}: {resp.text}", file=sys.stderr)
                return 1
            async for line in resp.aiter_lines():
                if not line.strip():
                    continue
                item = json.loads(line)
                if "node_status" in item:
                    st = item["node_status"]
                    print(f"node {', '.join(st['node_names'])}: {st['state_change']} "
                          f"{st.get('message', '')}".rstrip(), file=sys.stderr, flush=True)
                    if st["state_change"] != "NODE_CONNECTED":
                        missing.extend(st["node_names"])
                    continue
                _print(item, args)
    if missing:
        print(f"{len(missing)} node(s) did not answer: {', '.join(missing)}", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.follow or args.server:
        # Ctrl-C (SIGINT) ends a follow cleanly even when the shell that started us
        # ignores SIGINT (background jobs inherit SIG_IGN, which Python keeps).
        import signal

        signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.server:
        try:
            return asyncio.run(_via_relay(args))
        except KeyboardInterrupt:
            return 0
    if args.what == "status":
        return _status(args)
    try:
        return asyncio.run(_follow(args) if args.follow else _query(args))
    except KeyboardInterrupt:
        return 0
