"""Rich rendering of the lab commands (the CLI's presentation; logic is elsewhere)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from villi.errors import VilliError

_console: Console | None = None
_console_err: Console | None = None


def console() -> Console:
    global _console
    if _console is None:
        # Pipes and CI logs get wide lines rather than tables wrapped at 80 columns.
        _console = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
    return _console


def console_err() -> Console:
    global _console_err
    if _console_err is None:
        _console_err = Console(stderr=True, highlight=False,
                               width=None if sys.stderr.isatty() else 140)
    return _console_err


class Steps:
    """A live checklist: one row per component with a spinner, then ✓ or ✗."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.rows: dict[str, dict[str, Any]] = {}
        self.t0 = time.monotonic()

    def __call__(self, component: str, status: str, detail: str = "") -> None:
        row = self.rows.setdefault(component, {"t": time.monotonic(), "detail": ""})
        row["status"] = status
        if detail:
            row["detail"] = detail
        if status in ("ok", "fail"):
            row["dt"] = time.monotonic() - row["t"]

    def fail_pending(self) -> None:
        for row in self.rows.values():
            if row["status"] == "start":
                self(next(k for k, v in self.rows.items() if v is row), "fail")

    def __rich__(self) -> Table:
        t = Table.grid(padding=(0, 1))
        t.add_column(width=2)
        t.add_column(style="bold", min_width=12)
        t.add_column()
        t.add_column(style="dim", justify="right")
        for name, row in self.rows.items():
            icon: Any = {"ok": Text("✓", style="green"), "fail": Text("✗", style="red")}.get(
                row["status"]) or Spinner("dots", style="cyan")
            dt = f"{row['dt']:.1f}s" if "dt" in row else \
                f"{time.monotonic() - row['t']:.1f}s"
            t.add_row(icon, name, row["detail"], dt)
        return t


def lab_up(args: argparse.Namespace) -> int:
    from villi.lab import cluster

    c = console()
    state = cluster.running()
    if state is not None:
        raise cluster.already_running(state)
    steps = Steps("lab up")
    c.print(f"[bold]Bringing up a {args.nodes}-node villi lab[/] "
            f"(kvstore: {args.lab_kvstore}, lease TTL {args.lease_ttl}s)")
    t0 = time.monotonic()
    with Live(steps, console=c, refresh_per_second=10, transient=False):
        try:
            state = cluster.up(args.nodes, args.lab_kvstore, lease_ttl=args.lease_ttl,
                               underlay_cidr=args.underlay, cluster_cidr=args.cluster_cidr,
                               timeout=args.timeout, progress=steps,
                               ipam=getattr(args, "ipam", "cluster-pool"),
                               cloud_latency_ms=getattr(args, "cloud_latency", 0.0),
                               cloud_rate_limit=getattr(args, "cloud_rate_limit", 0.0),
                               excess_ip_release_delay=getattr(
                                   args, "excess_ip_release_delay", 180.0),
                               clusters=getattr(args, "clusters", 1),
                               clustermesh_mode=getattr(args, "clustermesh_mode",
                                                        "kvstoremesh"))
        except BaseException:
            steps.fail_pending()
            raise
    dt = time.monotonic() - t0
    c.print(f"\n[bold green]Lab {state['id']} is up[/] in {dt:.1f}s: "
            f"{len(state['nodes'])} nodes, cluster [bold]{state['cluster']}[/], "
            f"kvstore {state['kvstore']}")
    if state.get("ui_url"):
        c.print(f"Flows: [bold]{state['ui_url']}[/] (villi ui) · relay {state['relay']['http']}"
                f" · Hubble gRPC {state['relay']['grpc']}")
    c.print("[dim]Next:[/]  villi lab pod add default/web --serve 80/tcp   ·   "
            "villi lab status   ·   villi connectivity test   ·   villi lab down")
    return 0


def lab_down(args: argparse.Namespace) -> int:
    from villi.lab import cluster

    c = console()
    t0 = time.monotonic()
    steps = Steps("lab down")
    with Live(steps, console=c, refresh_per_second=10, transient=True):
        res = cluster.down(progress=steps)
    if res["lab"] is None and not res["orphans"]:
        c.print("no lab is running")
        return 0
    counts = res["counts"]
    what = (f"{counts.get('processes', 0)} processes, {counts.get('namespaces', 0)} "
            f"namespaces, {counts.get('pins', 0)} pin directories")
    if res["lab"]:
        c.print(f"[bold]lab {res['lab']} removed[/] ({what}) in {time.monotonic() - t0:.1f}s")
    else:
        c.print("no lab is running")
    if res["orphans"]:
        c.print(f"cleaned up leftovers of crashed lab(s) {', '.join(res['orphans'])}"
                + ("" if res["lab"] else f" ({what})"))
    return 0


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def pods_table(state: dict[str, Any], endpoints: dict[str, dict] | None = None) -> Table:
    t = Table(title="Pods", title_justify="left", box=None, header_style="bold")
    for col in ("POD", "NODE", "IPv4", "IDENTITY", "LABELS", "SERVES"):
        t.add_column(col)
    for key, p in sorted(state["pods"].items()):
        ep = (endpoints or {}).get(key, {})
        serves = "\n".join(f"{s['port']}/{s['protocol']} ({s['name']})" for s in p["serve"])
        labels = "\n".join(f"{k}={v}" for k, v in sorted(
            (ep.get("labels") or p["labels"]).items()))
        t.add_row(key, p["node"], p.get("ip") or "-", str(ep.get("identity", "-")),
                  labels or "-", serves or "-")
    return t


def _policy_degraded(state: dict[str, Any], node: str) -> str | None:
    """``DEGRADED since …`` when the node's pinned policy switch is thrown, else None."""
    from villi.datapath.loader import pin_root
    from villi.datapath.policycfg import read_pinned

    sw = read_pinned(pin_root(state["cluster"], node))
    if sw is None or not sw.degraded:
        return None
    parts = []
    if sw.degraded_since:
        parts.append("since " + time.strftime("%H:%M:%S UTC", time.gmtime(sw.degraded_since)))
    if sw.cluster_degraded:
        parts.append("cluster-wide")
    return "DEGRADED " + ", ".join(parts)


def _cluster_line(name: str, sub: dict[str, Any]) -> str:
    """One line per cluster of a multi-cluster lab: agents, processes, remote readiness."""
    ok = sum(1 for n in sub["nodes"] if n["health"] and n["health"]["status"] == "ok")
    procs = ", ".join(f"{p} {'running' if i['alive'] else 'stopped'}"
                      for p, i in sub["processes"].items())
    remotes = []
    for remote, r in sorted((sub.get("remotes") or {}).items()):
        ready = r["ready"] == r["agents"]
        text = f"{remote} {'ready' if ready else 'not-ready'} ({r['ready']}/{r['agents']} agents)"
        if r["errors"]:
            text += f": {r['errors'][0]}"
        remotes.append(f"[green]{text}[/]" if ready else f"[yellow]{text}[/]")
    return (f"[bold]cluster {name}[/]: {ok}/{len(sub['nodes'])} agents ok · {procs} · "
            f"remote clusters: {', '.join(remotes) or '-'}")


def lab_status(args: argparse.Namespace) -> int:
    from villi.lab import cluster
    from villi.lab._api import agent_call

    st = cluster.status()
    state = st["state"]
    if args.output == "json":
        out = {k: v for k, v in st.items() if k != "state"}
        out["lab"] = state
        degraded = {n["name"]: _policy_degraded(state, n["name"]) for n in st["nodes"]}
        out["policyDegraded"] = {k: v for k, v in degraded.items() if v}
        print(json.dumps(out, indent=2, sort_keys=True, default=str))
        return 0 if all(n["health"] and n["health"]["status"] == "ok" for n in st["nodes"]) \
            and not out["policyDegraded"] else 1
    c = console()
    def proc_state(p: dict[str, Any]) -> str:
        if p["alive"]:
            return "[green]running[/]"
        return "[yellow]stopped[/]" if p.get("stopped") else "[red]dead[/]"

    procs = "  ".join(f"{name} {proc_state(p)} (pid {p['pid']})"
                      for name, p in st["processes"].items())
    c.print(Panel.fit(
        f"[bold]lab {state['id']}[/]  cluster {state['cluster']}  ·  up "
        f"{_age(time.time() - state['created'])}  ·  status {state['status']}\n"
        f"kvstore {state['kvstore']}"
        + (f" (from {state['kvstore_netns']})" if state.get("kvstore_netns") else "")
        + f"\nunderlay {state['underlay']['cidr']} in {state['underlay']['netns']}  ·  "
        f"cluster CIDR {state['cluster_cidr']}  ·  lease TTL {state['lease_ttl']}s\n{procs}"
        + (f"\nui {state['ui_url']}  ·  relay {state['relay']['http']}"
           if state.get("ui_url") else ""),
        title="villi lab", border_style="cyan"))
    t = Table(title="Nodes", title_justify="left", box=None, header_style="bold")
    for col in ("NODE", "NETNS", "NODE IP", "POD CIDRS", "AGENT", "ENDPOINTS", "IPAM"):
        t.add_column(col)
    bad = False
    endpoints: dict[str, dict] = {}
    for n in st["nodes"]:
        h = n["health"]
        if h is None:
            if n["alive"]:
                agent = "[yellow]not answering[/]"
            elif n.get("agent") in ("stopped", "killed"):
                agent = f"[yellow]{n['agent']}[/]"   # a drill: `villi lab agent start`
            else:
                agent = "[red]dead[/]"
            bad = True
        else:
            agent = f"[green]{h['status']}[/]" if h["status"] == "ok" else \
                f"[yellow]{h['status']}[/] {h['kvstore']['status']}"
            bad |= h["status"] != "ok"
            try:
                for ep in agent_call(n["socket"], "GET", "/v1/endpoint"):
                    endpoints[f"{ep['namespace']}/{ep['podName']}"] = ep
            except VilliError:
                pass
        entry = st["entries"].get(n["name"], {})
        cidrs = "\n".join(entry.get("podCIDRs") or (h or {}).get("ipam", {}).get("cidrs") or
                          ["-"])
        if entry.get("eni") is not None:  # ENI mode: one line per interface, not per IP
            cidrs = "\n".join(f"{e['id']}: {len(e.get('ips') or [])} IPs"
                              for e in entry["eni"]) or "no ENI yet"
        t.add_row(n["name"], n["netns"], n["ip"], cidrs, agent,
                  str(h["endpoints"]) if h else "-",
                  h["ipam"]["status"].split(" from ")[0] if h else "-")
    c.print(t)
    for n in st["nodes"]:   # read from the pinned maps: shown with the agent down too
        line = _policy_degraded(state, n["name"])
        if line:
            bad = True
            c.print(f"[bold red]!!! POLICY {line} on {n['name']}: what policy would drop is "
                    f"forwarded (reported as AUDIT). Restore: villi datapath policy restore "
                    f"--node {n['name']}[/]")
    if "_error" in st["entries"]:
        c.print(f"[yellow]kvstore: {st['entries']['_error']['error']}[/]")
    for name, sub in (st.get("clusters") or {}).items():
        c.print(_cluster_line(name, sub))
    if state["pods"]:
        c.print(pods_table(state, endpoints))
    else:
        c.print("[dim]no pods yet: villi lab pod add default/web --serve 80/tcp[/]")
    return 1 if bad else 0


def connectivity_test(args: argparse.Namespace) -> int:
    from villi.lab.connectivity import Result, Suite

    # progress goes to stderr when stdout carries JSON
    c = console() if args.output != "json" else console_err()
    c.print("[bold]villi connectivity test[/]: deploying test pods and walking through "
            "the scenarios")
    current = {"step": ""}

    def on_step(step: str) -> None:
        current["step"] = step
        c.print(f"[cyan]▸[/] {step}")

    def on_result(r: Result) -> None:
        mark = "[green]✓[/]" if r.ok else "[red]✗[/]"
        exp = "connects" if r.check.expect else "blocked"
        c.print(f"    {mark} {r.check.describe():48} expected {exp:9} got {r.observed}",
                highlight=False)

    t0 = time.monotonic()
    report = Suite(timeout=args.timeout, settle=args.settle, on_result=on_result,
                   on_step=on_step).run()
    if args.output == "json":
        print(json.dumps({"passed": report.passed, "errors": report.errors, "results": [
            {"scenario": r.scenario, "from": r.check.src, "to": r.check.dst,
             "port": r.check.port, "protocol": r.check.proto, "expect": r.check.expect,
             "ok": r.ok, "observed": r.observed, "seconds": round(r.seconds, 3)}
            for r in report.results]}, indent=2))
        return 0 if report.passed else 1
    c = console()
    t = Table(title="Connectivity test", header_style="bold", title_justify="left")
    for col in ("SCENARIO", "CONNECTION", "EXPECTED", "OBSERVED", "RESULT"):
        t.add_column(col)
    last = None
    for r in report.results:
        t.add_row(r.scenario if r.scenario != last else "", r.check.describe(),
                  "connects" if r.check.expect else "blocked", r.observed,
                  "[green]pass[/]" if r.ok else "[bold red]FAIL[/]")
        last = r.scenario
    c.print(t)
    scen = {r.scenario for r in report.results}
    failed = {r.scenario for r in report.results if not r.ok}
    for e in report.errors:
        c.print(f"[bold red]error:[/] {e}")
    summary = (f"{len(scen) - len(failed)}/{len(scen)} scenarios passed, "
               f"{sum(r.ok for r in report.results)}/{len(report.results)} checks "
               f"in {time.monotonic() - t0:.1f}s")
    if report.passed:
        c.print(Group(Text(f"✓ {summary}", style="bold green")))
        return 0
    c.print(Text(f"✗ {summary}" + (f"; failed: {', '.join(sorted(failed))}" if failed else ""),
                 style="bold red"))
    return 1
