"""``villi status``: health of every agent this CLI talks to."""

from __future__ import annotations

import argparse

from villi.agentclient import AgentClient
from villi.cli.context import resolve
from villi.cli.output import dump_json
from villi.errors import AgentUnavailable, VilliError
from villi.netns import neigh


def neighbour_warning(results: dict[str, dict]) -> str | None:
    """The neighbour-table warning for the agents this CLI sees, or None.

    The IPv4 neighbour table is one per machine, shared by every namespace: the agents'
    demands add up (each node namespace holds its own entries) and are compared with
    the machine's gc_thresh values, read here on the host."""
    demand = sum(int((r.get("neigh") or {}).get("demand", 0)) for r in results.values()
                 if "error" not in r)
    if not demand:
        return None
    current = neigh.read_thresholds()
    if current is None:  # this CLI runs in a namespace without them: ask an agent's view
        for r in results.values():
            cur = (r.get("neigh") or {}).get("current")
            if cur:
                current = neigh.NeighThresholds(**cur)
                break
    return neigh.check(demand, current)


def _pinned_policy(node: str) -> dict | None:
    """A lab node's policy switches straight from its pinned maps (agent or not)."""
    from villi.cli.policyops import pin_dir_of
    from villi.datapath.policycfg import read_pinned

    try:
        sw = read_pinned(pin_dir_of(node, None))
    except (VilliError, OSError):
        return None
    return None if sw is None else {"datapath": sw.as_dict(), "degraded": sw.degraded}


def clustermesh_lines(mesh: dict | None) -> list[str]:
    """``ClusterMesh: 1/2 remote clusters ready`` and one line per remote (as Cilium)."""
    if not mesh:
        return []
    remotes = mesh.get("remotes") or []
    ready = sum(1 for r in remotes if r.get("ready"))
    out = [f"  ClusterMesh: {ready}/{len(remotes)} remote clusters ready   "
           f"(cluster {mesh.get('cluster')} id {mesh.get('id')}, {mesh.get('mode')} mode)"]
    for r in remotes:
        state = "ready" if r.get("ready") else "not-ready"
        detail = f"{r.get('identities', 0)} identities, {r.get('pods', 0)} pods, " \
                 f"{r.get('nodes', 0)} nodes, {r.get('services', 0)} services"
        if r.get("rejected"):
            detail += f", {r['rejected']} rejected"
        why = f": {r['error']}" if r.get("error") and not r.get("ready") else ""
        out.append(f"    {r['name']}: {state} ({detail}){why}")
    return out


def status_command(args: argparse.Namespace) -> int:
    from villi.cli.policyops import degraded_line

    target = resolve(args.kvstore, args.agent_socket)
    results = {}
    for node, sock in target.agents.items():
        try:
            with AgentClient(sock) as c:
                results[node] = c.get("/v1/healthz")
        except (AgentUnavailable, VilliError) as e:
            results[node] = {"status": "error", "error": str(e)}
            if target.lab:   # a degraded node must show even when its agent is down
                pinned = _pinned_policy(node)
                if pinned is not None:
                    results[node]["policy"] = pinned
    degraded = {node: degraded_line((r.get("policy") or {}).get("datapath") or {})
                for node, r in results.items() if (r.get("policy") or {}).get("degraded")}
    warning = neighbour_warning(results)
    if args.output == "json":
        dump_json(results)
        return 0 if all(r.get("status") == "ok" for r in results.values()) and not degraded \
            else 1
    if args.brief:
        for node, line in degraded.items():
            print(f"error in policy ({node}): {line}")
            return 1
        for node, r in results.items():
            if r.get("status") != "ok":
                part = "agent" if "error" in r else next(
                    (k for k in ("kvstore", "datapath") if r[k]["status"] != "ok"), "agent")
                msg = r.get("error") or r.get(part, {}).get("status")
                print(f"error in {part} ({node}): {msg}")
                return 1
        print("OK")
        return 0
    bad = False
    for node, r in results.items():
        if "error" in r:
            print(f"Node {node}:\n  Agent:       error: {r['error']}")
            if node in degraded:
                print(f"  Policy:      !!! {degraded[node]}: policy drops are forwarded "
                      f"(villi datapath policy restore --node {node})")
            bad = True
            continue
        bad |= r["status"] != "ok"
        print(f"Node {node} ({r.get('nodeIP') or 'no node IP'}):")
        print(f"  KVStore:     {r['kvstore']['status']}   {r['kvstore'].get('url', '')}")
        print(f"  Datapath:    {r['datapath']['status']}   maps pinned at "
              f"{r['datapath'].get('pinned')}")
        print(f"  IPAM:        {r['ipam']['status']}")
        print(f"  Endpoints:   {r['endpoints']}")
        pol = r.get("policy")
        if pol:
            print(f"  Policy:      enforcement {pol.get('enablePolicy')} · audit mode "
                  f"{'enabled' if pol.get('auditMode') else 'disabled'}"
                  f" ({pol.get('auditModeSource')})")
        if node in degraded:
            print(f"  Policy:      !!! {degraded[node]}: policy drops are forwarded and "
                  "reported as AUDIT; restore with `villi datapath policy restore --node "
                  f"{node}`" + (" / `villi policy restore --all`"
                                if "cluster" in (degraded[node] or "") else ""))
            bad = True
        for line in clustermesh_lines(r.get("clustermesh")):
            print(line)
        print(f"  Status:      {r['status'].upper()}")
    if warning:
        print(f"Warning: {warning}")
    return 1 if bad else 0
