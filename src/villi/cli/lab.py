"""``villi lab …`` and ``villi connectivity test``: the command line of ``villi.lab``.

Exit codes: 0 success; 1 failure (a clear message on stderr, never a traceback);
``lab probe`` exits 0 when connected and 1 when blocked; ``lab exec`` passes the
command's code through; ``lab down`` with nothing up says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from villi.errors import VilliError
from villi.lab import _state


def add_parsers(sub: argparse._SubParsersAction) -> None:
    lab = sub.add_parser("lab", help="local multi-node lab in network namespaces",
                         description="A cluster of villi nodes on this machine: an underlay "
                         "namespace with a bridge and etcd, one namespace per node with its "
                         "agent, one per pod. Nothing is added to the root namespace.")
    ls = lab.add_subparsers(dest="lab_cmd", metavar="COMMAND")

    p = ls.add_parser("up", help="create the lab and wait until every agent is healthy")
    p.add_argument("--nodes", type=int, default=2, help="number of nodes (2)")
    p.add_argument("--kvstore", dest="lab_kvstore", choices=["etcd", "embedded"],
                   default="etcd", help="etcd on the underlay (default) or one embedded "
                   "store file shared by the agents")
    p.add_argument("--lease-ttl", type=int, default=int(os.environ.get("VILLI_LAB_LEASE_TTL",
                   "900")), help="agents' lease TTL in seconds (900, as the agent's; env "
                   "VILLI_LAB_LEASE_TTL): how long other nodes keep routing to a node whose "
                   "agent is down")
    p.add_argument("--underlay", default="172.30.0.0/24", help="underlay subnet (inside the "
                   "lab's namespaces only)")
    p.add_argument("--cluster-cidr", default="10.64.0.0/10")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for agents")
    p.add_argument("--ipam", choices=["cluster-pool", "eni"], default="cluster-pool",
                   help="eni: pod IPs from interfaces of a simulated cloud (villi cloud-sim)")
    p.add_argument("--cloud-latency", type=float, default=0.0, metavar="MS",
                   help="eni: latency of every cloud API call")
    p.add_argument("--cloud-rate-limit", type=float, default=0.0, metavar="N",
                   help="eni: cloud API calls per second before throttling (0: none)")
    p.add_argument("--excess-ip-release-delay", type=float, default=180.0, metavar="S",
                   help="eni: seconds a node holds excess IPs before they are released")
    p.add_argument("--clusters", type=int, default=1, help="ClusterMesh: clusters c1..cN "
                   "(ids 1..N), each with its own etcd, operator and kvstoremesh, --nodes "
                   "nodes each (1; see docs/clustermesh.md)")
    p.add_argument("--clustermesh-mode", choices=["kvstoremesh", "direct"],
                   default="kvstoremesh", help="with --clusters: kvstoremesh (default) or "
                   "direct (every agent connects to every remote etcd; for comparison)")

    ls.add_parser("down", help="remove the lab: processes, namespaces, pins, files")
    p = ls.add_parser("status", help="nodes, agents, health and pods")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")

    pod = ls.add_parser("pod", help="add, delete or relabel pods")
    ps = pod.add_subparsers(dest="pod_cmd", metavar="COMMAND")
    p = ps.add_parser("add", help="create a pod through villi-cni")
    p.add_argument("pod", metavar="NS/NAME")
    p.add_argument("--node", help="node index (1..N) or name (default: the least loaded)")
    p.add_argument("--labels", help="k=v,k2=v2")
    p.add_argument("--serve", help="echo server ports: 80/tcp,81/udp,web=8080/tcp "
                   "(declared as named ports serve-<port>-<proto> or the given name)")
    p.add_argument("--http-reply", metavar="TEXT", help="what the server answers to HTTP "
                   "requests (default: villi echo: METHOD PATH)")
    p.add_argument("--http-route", action="append", metavar="'METHOD /path=TEXT'",
                   help="the answer for one method and path (repeatable), e.g. "
                   "'PUT /v1/exhaust-port=Panic: deathstar exploded'")
    p = ps.add_parser("del", aliases=["delete"], help="delete a pod through villi-cni")
    p.add_argument("pod", metavar="NS/NAME")
    p = ps.add_parser("label", help="change a running pod's labels (its identity follows)")
    p.add_argument("pod", metavar="NS/NAME")
    p.add_argument("labels", nargs="?", default="", metavar="k=v[,k2=v2]")
    p.add_argument("--remove", default="", metavar="k,...", help="label keys to remove")
    p = ps.add_parser("list", help="pods of the lab")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")

    agent = ls.add_parser("agent", help="failure drills: stop, start, restart or kill a "
                          "node's agent")
    p_agent = agent.add_subparsers(dest="agent_cmd", metavar="COMMAND")
    for verb, text in (("stop", "SIGTERM the agent (its datapath keeps enforcing)"),
                       ("kill", "SIGKILL the agent (a crash)"),
                       ("start", "start it again; it restores its endpoints from the "
                        "pinned state"),
                       ("restart", "stop, then start")):
        p = p_agent.add_parser(verb, help=text)
        p.add_argument("node", metavar="NODE", help="node name (node2) or index (2)")
        p.add_argument("--timeout", type=float, default=60.0,
                       help="seconds to wait for a started agent to be healthy")
    etcd = ls.add_parser("etcd", help="failure drills: stop or start the lab's etcd")
    p_etcd = etcd.add_subparsers(dest="etcd_cmd", metavar="COMMAND")
    p = p_etcd.add_parser("stop", help="stop etcd (the process exits; data kept)")
    p.add_argument("--cluster", dest="lab_cluster", metavar="NAME",
                   help="the etcd of this cluster (multi-cluster labs; default: the first)")
    p = p_etcd.add_parser("start", help="start etcd again on the same data directory")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--cluster", dest="lab_cluster", metavar="NAME")
    mesh = ls.add_parser("kvstoremesh", help="drills: stop or start a cluster's kvstoremesh")
    p_mesh = mesh.add_subparsers(dest="mesh_cmd", metavar="COMMAND")
    for verb in ("stop", "start", "restart"):
        p = p_mesh.add_parser(verb, help=f"{verb} the kvstoremesh of a cluster")
        p.add_argument("--cluster", dest="lab_cluster", metavar="NAME")
    node = ls.add_parser("node", help="add a node, or delete one on purpose")
    p_node = node.add_subparsers(dest="node_cmd", metavar="COMMAND")
    p = p_node.add_parser("add", help="add a node with its agent; wait until it is healthy")
    p.add_argument("--timeout", type=float, default=60.0)
    p = p_node.add_parser("del", aliases=["delete"], help="delete a node: its pods, agent, "
                          "store entries (withdrawn at once), pod CIDR and namespace")
    p.add_argument("node", metavar="NODE")

    p = ls.add_parser("exec", help="run a command in a pod's network namespace")
    p.add_argument("pod", metavar="NS/NAME")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...")

    _add_world_parsers(ls)

    p = ls.add_parser("probe", help="connect from one pod to another; exit 0 connected, "
                      "1 blocked")
    p.add_argument("src", metavar="NS/FROM")
    p.add_argument("dst", metavar="NS/TO", help="a pod, an IP address, or a DNS name "
                   "(resolved from inside the source pod through the lab DNS)")
    p.add_argument("port", metavar="PORT[/tcp|/udp]")
    p.add_argument("--timeout", type=float, default=2.0)

    conn = sub.add_parser("connectivity", help="built-in connectivity test suite against "
                          "the lab")
    cs = conn.add_subparsers(dest="conn_cmd", metavar="COMMAND")
    p = cs.add_parser("test", help="run the scenarios; exit 1 on any failure")
    p.add_argument("--timeout", type=float, default=1.0, help="seconds per connection "
                   "attempt (1)")
    p.add_argument("--settle", type=float, default=8.0, help="seconds an expected outcome "
                   "may take to appear (policy propagation; 8)")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")


def _add_world_parsers(ls: argparse._SubParsersAction) -> None:
    dns = ls.add_parser("dns", help="the lab DNS server's records (dnsmasq)")
    ds = dns.add_subparsers(dest="dns_cmd", metavar="COMMAND")
    p = ds.add_parser("add", help="add or replace an A, AAAA or CNAME record")
    p.add_argument("name")
    p.add_argument("ip", nargs="?", help="IPv4 (A) or IPv6 (AAAA) address")
    p.add_argument("--cname", metavar="TARGET", help="an alias of TARGET (a lab name)")
    p.add_argument("--ttl", type=int, default=30, help="seconds (30)")
    p = ds.add_parser("del", aliases=["delete"], help="remove an A record")
    p.add_argument("name")
    p = ds.add_parser("list", help="the records")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")

    ext = ls.add_parser("external", help="hosts outside the cluster (an 'internet' in the "
                        "lab's namespaces), registered in the lab DNS")
    es = ext.add_subparsers(dest="ext_cmd", metavar="COMMAND")
    p = es.add_parser("add", help="create an outside host serving ports")
    p.add_argument("name")
    p.add_argument("--serve", required=True, help="echo server ports: 80/tcp,53/udp,...")
    p.add_argument("--ip", help="its address (default: the next free one in "
                   "198.51.100.0/24; allowed: 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24)")
    p.add_argument("--http-reply", metavar="TEXT", help="what it answers to HTTP requests")
    p.add_argument("--ttl", type=int, default=30, help="TTL of its DNS record (30)")
    p = es.add_parser("del", aliases=["delete"], help="remove an outside host")
    p.add_argument("name")
    p = es.add_parser("list", help="the outside hosts")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")


def run(args: argparse.Namespace) -> int:
    try:
        if args.command == "connectivity":
            if args.conn_cmd != "test":
                print("usage: villi connectivity test [--timeout S]", file=sys.stderr)
                return 2
            from villi.lab._view import connectivity_test
            return connectivity_test(args)
        cmd = getattr(args, "lab_cmd", None)
        if cmd is None:
            print("usage: villi lab {up,down,status,pod,agent,etcd,node,exec,probe} ... "
                  "(see villi lab -h)",
                  file=sys.stderr)
            return 2
        return _COMMANDS[cmd](args)
    except VilliError as e:
        from villi.lab._view import console_err

        console_err().print(f"[bold red]error:[/] {e}", highlight=False)
        return 1


def _up(args: argparse.Namespace) -> int:
    from villi.lab._view import lab_up

    return lab_up(args)


def _down(args: argparse.Namespace) -> int:
    from villi.lab._view import lab_down

    return lab_down(args)


def _status(args: argparse.Namespace) -> int:
    from villi.lab._view import lab_status

    return lab_status(args)


def _pod(args: argparse.Namespace) -> int:
    from villi.lab import pods
    from villi.lab._view import console

    c = console()
    if args.pod_cmd == "add":
        t0 = time.monotonic()
        rec = pods.add(args.pod, node=args.node, labels=pods.parse_labels(args.labels),
                       serve=pods.parse_serve(args.serve), http_reply=args.http_reply,
                       http_routes=args.http_route)
        serving = ", ".join(f"{p['port']}/{p['protocol']} ({p['name']})" for p in rec["serve"])
        c.print(f"pod [bold]{rec['namespace']}/{rec['name']}[/] created on {rec['node']}: "
                f"IP [cyan]{rec['ip']}[/]" + (f", serving {serving}" if serving else "")
                + f"  [dim]({time.monotonic() - t0:.2f}s)[/]", highlight=False)
        return 0
    if args.pod_cmd in ("del", "delete"):
        rec = pods.delete(args.pod)
        c.print(f"pod {rec['namespace']}/{rec['name']} deleted", highlight=False)
        return 0
    if args.pod_cmd == "label":
        labels = pods.parse_labels(args.labels)
        remove = [k.strip() for k in args.remove.split(",") if k.strip()]
        if not labels and not remove:
            c.print("nothing to change: give k=v[,k2=v2] and/or --remove k,...")
            return 2
        view = pods.relabel(args.pod, labels, remove)
        lbl = ", ".join(f"{k}={v}" for k, v in sorted(view.get("labels", {}).items()))
        c.print(f"pod {args.pod}: labels {lbl or '(none)'} → identity "
                f"[bold]{view.get('identity')}[/]", highlight=False)
        return 0
    if args.pod_cmd == "list":
        from villi.lab import _state
        from villi.lab._view import pods_table

        state = _state.require()
        if args.output == "json":
            print(json.dumps(list(state["pods"].values()), indent=2, sort_keys=True))
        else:
            c.print(pods_table(state))
        return 0
    print("usage: villi lab pod {add,del,label,list} NS/NAME ...", file=sys.stderr)
    return 2


def _exec(args: argparse.Namespace) -> int:
    from villi.lab import pods

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    argv = pods.exec_argv(args.pod, cmd)
    sys.stdout.flush()
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        raise VilliError(f"cannot run {argv[0]}: {e}") from e
    return 127  # not reached


def _probe(args: argparse.Namespace) -> int:
    from villi.lab import _state, pods
    from villi.lab.probe import probe_detail

    port_s, _, proto = args.port.partition("/")
    proto = (proto or "tcp").lower()
    try:
        port = int(port_s)
    except ValueError:
        raise VilliError(f"bad port {args.port!r}: PORT, PORT/tcp or PORT/udp") from None
    if proto not in ("tcp", "udp") or not 1 <= port <= 65535:
        raise VilliError(f"bad port {args.port!r}: 1-65535, protocol tcp or udp")
    state = _state.require()
    src = pods.get(args.src, state)
    pods.enter_cgroup(src)   # as the pod's own processes: services apply
    ip, key = _probe_target(state, src, args.dst)
    if ip is None:
        print(f"{src['namespace']}/{src['name']} → {args.dst}:{port}/{proto}: blocked "
              f"(cannot resolve: {key})")
        return 1
    ok, why = probe_detail(src["netns"], ip, port, proto, args.timeout)
    target = f"{key} ({ip})" if key else ip
    verdict = why if ok else f"blocked ({why})"
    print(f"{src['namespace']}/{src['name']} → {target}:{port}/{proto}: {verdict}")
    return 0 if ok else 1


def _agent(args: argparse.Namespace) -> int:
    from villi.lab._view import console

    cmd = getattr(args, "agent_cmd", None)
    if cmd is None:
        print("usage: villi lab agent {stop,kill,start,restart} NODE", file=sys.stderr)
        return 2
    c = console()
    t0 = time.monotonic()
    cluster, args.node = _state.split_ref(args.node)
    if cluster is None:   # node names are unique across a multi-cluster lab
        cluster = _cluster_of_node(args.node)
    with _state.using(cluster):
        return _agent_cmd(args, cmd, c, t0)


def _cluster_of_node(ref: str) -> str | None:
    root = _state.load()
    if root is None:
        return None
    for name, sub in (root.get("clusters") or {}).items():
        if any(ref == n["name"] for n in sub.get("nodes", [])):
            return str(name)
    return None


def _agent_cmd(args: argparse.Namespace, cmd: str, c: Any, t0: float) -> int:
    from villi.lab import drills

    if cmd in ("stop", "kill"):
        node = drills.agent_stop(args.node, kill=cmd == "kill")
        what = "killed (SIGKILL)" if cmd == "kill" else "stopped"
        c.print(f"agent of [bold]{node['name']}[/] {what}; its datapath keeps enforcing  "
                f"[dim]({time.monotonic() - t0:.2f}s)[/]", highlight=False)
        return 0
    fn = drills.agent_start if cmd == "start" else drills.agent_restart
    node = fn(args.node, timeout=args.timeout)
    c.print(f"agent of [bold]{node['name']}[/] running (pid {node['pid']}), healthy, pods "
            f"{', '.join(node.get('pod_cidrs') or [])}  [dim]({time.monotonic() - t0:.2f}s)[/]",
            highlight=False)
    return 0


def _etcd(args: argparse.Namespace) -> int:
    from villi.lab import drills
    from villi.lab._view import console

    cmd = getattr(args, "etcd_cmd", None)
    if cmd is None:
        print("usage: villi lab etcd {stop,start}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    _state.select_cluster(getattr(args, "lab_cluster", None))
    if cmd == "stop":
        drills.etcd_stop()
        console().print(f"etcd stopped (data kept)  [dim]({time.monotonic() - t0:.2f}s)[/]",
                        highlight=False)
        return 0
    info = drills.etcd_start(timeout=args.timeout)
    console().print(f"etcd running (pid {info['pid']}), healthy  "
                    f"[dim]({time.monotonic() - t0:.2f}s)[/]", highlight=False)
    return 0


def _kvstoremesh(args: argparse.Namespace) -> int:
    from villi.lab import _mesh
    from villi.lab._view import console

    cmd = getattr(args, "mesh_cmd", None)
    if cmd is None:
        print("usage: villi lab kvstoremesh {stop,start,restart} [--cluster NAME]",
              file=sys.stderr)
        return 2
    _state.select_cluster(getattr(args, "lab_cluster", None))
    if cmd in ("stop", "restart"):
        _mesh.kvstoremesh_stop()
    if cmd in ("start", "restart"):
        pid = _mesh.kvstoremesh_start()
        console().print(f"kvstoremesh running (pid {pid})", highlight=False)
    else:
        console().print("kvstoremesh stopped (the cache stays in etcd)", highlight=False)
    return 0


def _node(args: argparse.Namespace) -> int:
    from villi.lab import drills
    from villi.lab._view import console

    cmd = getattr(args, "node_cmd", None)
    t0 = time.monotonic()
    if cmd == "add":
        node = drills.node_add(timeout=args.timeout)
        console().print(f"node [bold]{node['name']}[/] added: {node['ip']} · pods "
                        f"{', '.join(node.get('pod_cidrs') or [])}  "
                        f"[dim]({time.monotonic() - t0:.2f}s)[/]", highlight=False)
        return 0
    if cmd in ("del", "delete"):
        node = drills.node_del(args.node)
        w = node["withdrawn"]
        console().print(f"node [bold]{node['name']}[/] deleted: agent stopped, entry and "
                        f"{w['ipcache']} ipcache entries withdrawn, pod CIDR released  "
                        f"[dim]({time.monotonic() - t0:.2f}s)[/]", highlight=False)
        return 0
    print("usage: villi lab node {add,del NODE}", file=sys.stderr)
    return 2


def _probe_target(state: dict[str, Any], src: dict[str, Any], dst: str
                  ) -> tuple[str | None, str | None]:
    """(IP, label) of a probe target; a name that is no pod is resolved from inside the
    source pod through the lab DNS (so DNS policy applies): (None, why) when it fails."""
    from villi.lab import pods, world
    from villi.lab._state import LabError

    try:
        return pods.target_ip(state, dst)
    except LabError:
        if "/" in dst or not state.get("dns"):
            raise
    ip, why = world.resolve_from(src["netns"], dst)
    return (ip, dst) if ip else (None, why)


def _rdata(rec: dict[str, object]) -> str:
    kind = str(rec.get("type", "A"))
    return f"{kind} {rec['target'] if kind == 'CNAME' else rec['ip']}"


def _dns(args: argparse.Namespace) -> int:
    from villi.lab import world
    from villi.lab._view import console

    c = console()
    if args.dns_cmd == "add":
        rec = world.dns_add(args.name, args.ip, args.ttl, args.cname)
        c.print(f"DNS {rec['name']} {_rdata(rec)} (TTL {rec['ttl']}s)", highlight=False)
        return 0
    if args.dns_cmd in ("del", "delete"):
        rec = world.dns_del(args.name)
        c.print(f"DNS {rec['name']} removed", highlight=False)
        return 0
    if args.dns_cmd == "list":
        records = world.dns_records()
        if args.output == "json":
            print(json.dumps(list(records.values()), indent=2, sort_keys=True))
        else:
            print(f"server {world.DNS_IP}:53")
            for name, rec in sorted(records.items()):
                print(f"{name:40} {_rdata(rec):22} TTL {rec['ttl']}")
        return 0
    print("usage: villi lab dns {add,del,list} ...", file=sys.stderr)
    return 2


def _external(args: argparse.Namespace) -> int:
    from villi.lab import _state, pods, world
    from villi.lab._view import console

    c = console()
    if args.ext_cmd == "add":
        rec = world.external_add(args.name, pods.parse_serve(args.serve), args.ip,
                                 args.http_reply, args.ttl)
        serving = ", ".join(f"{p['port']}/{p['protocol']}" for p in rec["serve"])
        c.print(f"external host [bold]{rec['name']}[/] at [cyan]{rec['ip']}[/], serving "
                f"{serving}, in the lab DNS", highlight=False)
        return 0
    if args.ext_cmd in ("del", "delete"):
        rec = world.external_del(args.name)
        c.print(f"external host {rec['name']} ({rec['ip']}) removed", highlight=False)
        return 0
    if args.ext_cmd == "list":
        externals = _state.require().get("externals", {})
        if args.output == "json":
            print(json.dumps(list(externals.values()), indent=2, sort_keys=True))
        else:
            for name, rec in sorted(externals.items()):
                ports = ",".join(f"{p['port']}/{p['protocol']}" for p in rec["serve"])
                print(f"{name:40} {rec['ip']:16} {ports}")
        return 0
    print("usage: villi lab external {add,del,list} ...", file=sys.stderr)
    return 2


_COMMANDS: dict[str, Any] = {"up": _up, "down": _down, "status": _status, "pod": _pod,
                             "agent": _agent, "etcd": _etcd, "node": _node,
                             "kvstoremesh": _kvstoremesh,
                             "exec": _exec, "probe": _probe, "dns": _dns,
                             "external": _external}
