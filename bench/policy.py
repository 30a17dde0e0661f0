#!/usr/bin/env python3
"""Policy engine benchmark (issue 3): full resolution and change-to-diff latency.

Workload (deterministic, seeded): 100 namespaces x 10 apps = 1,000 pod identities, 10
replicas each = 10,000 pods with IPs and named ports, and 3,000 policies: per namespace
about 14 CiliumNetworkPolicies (L3/L4 allows within and across namespaces, ranges,
named ports, entities, CIDRs with except, some denies) and 15 Kubernetes NetworkPolicies
(pod/namespace selectors, ipBlock, ports), plus 30 clusterwide policies.

1. Full computation: every pod is a local endpoint (10,000 endpoints over 1,000
   identities); time to resolve all 3,000 policies to entries and kernel map states.
2. Changes: a node with 1,000 local endpoints (random pods) and the same 3,000
   policies; then 100 single-policy changes (edit ports or peers, add a new policy,
   delete one) and 100 identity arrivals. For each: the time from the call until the
   per-endpoint map-state diffs are computed and handed to the map writer hook (a
   callable, here a counter; the kernel map writer plugs in there). Goal: p99 <= 50 ms.

GC: by default (``--gc tuned``) the benchmark does what the agent should do (see
docs/policy.md): collector off during the initial sync, then ``gc.freeze()`` and a
gen-0 threshold of 50,000; ``--gc default`` keeps CPython's defaults (only
``gc.freeze()`` after the initial sync), which costs about 2x on the initial computation
and 2-3x at p99.

Prints a summary and writes JSON to ``bench/results/policy.json``.

    .venv/bin/python bench/policy.py            # about a minute
    .venv/bin/python bench/policy.py --quick    # smaller workload, seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from villi.identity.ids import IdentityID  # noqa: E402
from villi.identity.labels import pod_identity_labels  # noqa: E402
from villi.policy.entry import EndpointID, Protocol  # noqa: E402
from villi.policy.loader import load_text  # noqa: E402
from villi.policy.models import Resource  # noqa: E402
from villi.policy.resolver import Endpoint, EndpointPolicyDiff, PolicyResolver  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "policy.json"
TEAMS = [f"team{i}" for i in range(10)]
ENVS = ["prod", "dev", "staging"]


class Workload:
    def __init__(self, namespaces: int, apps: int, replicas: int, policies: int,
                 seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.namespaces = [f"ns{i}" for i in range(namespaces)]
        self.ns_labels = {ns: {"team": TEAMS[i % len(TEAMS)], "env": ENVS[i % len(ENVS)]}
                          for i, ns in enumerate(self.namespaces)}
        self.apps = [f"app{i}" for i in range(apps)]
        self.identities: dict[IdentityID, Any] = {}
        self.pods: list[tuple[str, IdentityID, Any, str, dict]] = []
        next_id = 256
        for ns in self.namespaces:
            for a, app in enumerate(self.apps):
                labels = pod_identity_labels(ns, {"app": app, "tier": ("fe", "be")[a % 2]},
                                             self.ns_labels[ns])
                identity = IdentityID(next_id)
                next_id += 1
                self.identities[identity] = labels
                ports = {"http": (8000 + a, Protocol.TCP), "metrics": (9090, Protocol.TCP)}
                for r in range(replicas):
                    index = len(self.pods)
                    ip = f"10.{64 + index // 65536}.{index // 256 % 256}.{index % 256}"
                    self.pods.append((f"{ns}/{app}-{r}", identity, labels, ip, ports))
        self.policy_count = policies
        self.serial = 0

    def _ns(self) -> str:
        return self.rng.choice(self.namespaces)

    def _app(self) -> str:
        return self.rng.choice(self.apps)

    def cnp(self, ns: str) -> str:
        self.serial += 1
        rng = self.rng
        kind = rng.random()
        head = (f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: "
                f"{{name: cnp-{self.serial}, namespace: {ns}}}\nspec:\n"
                f"  endpointSelector: {{matchLabels: {{app: {self._app()}}}}}\n")
        port = rng.choice(["80", "443", "8080", "http", "5432"])
        if kind < 0.45:
            peers = ", ".join(self._app() for _ in range(rng.randint(1, 3)))
            return head + (f"  ingress:\n  - fromEndpoints:\n"
                           f"    - matchExpressions: [{{key: app, operator: In, "
                           f"values: [{peers}]}}]\n"
                           f"    toPorts: [{{ports: [{{port: \"{port}\", protocol: TCP}}, "
                           f"{{port: \"9000\", endPort: 9100}}]}}]\n")
        if kind < 0.65:
            return head + (f"  ingress:\n  - fromEndpoints:\n    - matchLabels:\n"
                           f"        k8s:io.cilium.k8s.namespace.labels.team: "
                           f"{rng.choice(TEAMS)}\n        app: {self._app()}\n"
                           f"    toPorts: [{{ports: [{{port: \"{port}\"}}]}}]\n")
        if kind < 0.8:
            return head + (f"  egress:\n  - toEndpoints:\n    - matchLabels: "
                           f"{{app: {self._app()}, io.kubernetes.pod.namespace: {self._ns()}}}\n"
                           f"    toPorts: [{{ports: [{{port: http}}]}}]\n"
                           f"  - toEntities: [kube-apiserver]\n")
        if kind < 0.92:
            a, b = rng.randint(11, 200), rng.randint(0, 255)
            return head + (f"  egress:\n  - toCIDRSet:\n    - cidr: {a}.0.0.0/8\n"
                           f"      except: [{a}.{b}.0.0/16]\n"
                           f"    toPorts: [{{ports: [{{port: \"443\", protocol: TCP}}]}}]\n"
                           f"  - toEntities: [world]\n    toPorts: [{{ports: [{{port: \"53\", "
                           f"protocol: UDP}}]}}]\n")
        return head + (f"  ingressDeny:\n  - fromEndpoints: [{{matchLabels: "
                       f"{{app: {self._app()}}}}}]\n"
                       f"    toPorts: [{{ports: [{{port: \"{rng.choice(['22', '23', '0'])}\""
                       f"}}]}}]\n")

    def knp(self, ns: str) -> str:
        self.serial += 1
        rng = self.rng
        head = (f"apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: "
                f"{{name: knp-{self.serial}, namespace: {ns}}}\nspec:\n"
                f"  podSelector: {{matchLabels: {{app: {self._app()}}}}}\n")
        kind = rng.random()
        if kind < 0.5:
            return head + (f"  ingress:\n  - from:\n    - podSelector: {{matchLabels: "
                           f"{{app: {self._app()}}}}}\n    - namespaceSelector: {{matchLabels: "
                           f"{{env: {rng.choice(ENVS)}}}}}\n      podSelector: {{matchLabels: "
                           f"{{tier: fe}}}}\n    ports: [{{port: {rng.choice([80, 443, 8080])}}},"
                           f" {{port: http}}]\n")
        if kind < 0.8:
            return head + (f"  policyTypes: [Ingress, Egress]\n  ingress:\n  - from:\n"
                           f"    - namespaceSelector: {{matchLabels: "
                           f"{{team: {rng.choice(TEAMS)}}}}}\n"
                           f"  egress:\n  - to:\n    - podSelector: {{}}\n  - ports: "
                           f"[{{protocol: UDP, port: 53}}]\n")
        return head + ("  ingress:\n  - from:\n    - ipBlock: {cidr: 10.64.0.0/16, "
                       f"except: [10.64.{rng.randint(0, 39)}.0/24]}}\n"
                       "    ports: [{port: 30000, endPort: 32767}]\n")

    def ccnp(self) -> str:
        self.serial += 1
        return (f"apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\n"
                f"metadata: {{name: ccnp-{self.serial}}}\nspec:\n"
                f"  endpointSelector: {{matchLabels: {{app: {self._app()}}}}}\n"
                f"  ingress:\n  - fromEndpoints: [{{matchLabels: {{tier: fe}}}}]\n"
                f"    toPorts: [{{ports: [{{port: metrics, protocol: TCP}}]}}]\n"
                f"  egressDeny:\n  - toCIDR: [{self.rng.randint(11, 200)}.1.2.3/32]\n")

    def policies(self) -> list[Resource]:
        docs = [self.ccnp() for _ in range(min(30, self.policy_count // 100))]
        while len(docs) < self.policy_count:
            ns = self._ns()
            docs.append(self.cnp(ns) if self.rng.random() < 0.5 else self.knp(ns))
        return load_text("---\n".join(docs), "bench.yaml")

    def change(self, existing: list[Resource]) -> tuple[str, Any]:
        """One random single-policy change: edit (60%), add (20%) or delete (20%)."""
        roll = self.rng.random()
        if roll < 0.2:
            victim = self.rng.choice(existing)
            return "delete", (victim.kind, victim.namespace, victim.metadata.name)
        ns = self._ns()
        (doc,) = load_text(self.cnp(ns) if self.rng.random() < 0.5 else self.knp(ns))
        if roll < 0.8:  # edit: same name as an existing policy of that kind
            victim = self.rng.choice([r for r in existing if r.kind == doc.kind])
            doc = doc.model_copy(update={"metadata": victim.metadata})
            return "edit", doc
        return "add", doc


def setup(work: Workload, local: list[int], writer: Any = None) -> PolicyResolver:
    resolver = PolicyResolver(map_writer=writer)
    with resolver.batch():
        resolver.update_identities(work.identities)
        for name, identity, _labels, ip, ports in work.pods:
            resolver.upsert_pod(name, identity, [ip], ports)
        for index in local:
            name, identity, labels, ip, ports = work.pods[index]
            resolver.upsert_endpoint(Endpoint(EndpointID(index + 1), identity, labels,
                                              labels.namespace, ports, ip))
    return resolver


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small workload (smoke run)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--gc", choices=["tuned", "default"], default="tuned",
                        help="GC thresholds after the initial sync (gc.freeze() either way)")
    args = parser.parse_args()
    size = dict(namespaces=20, apps=10, replicas=5, policies=600) if args.quick else dict(
        namespaces=100, apps=10, replicas=10, policies=3000)
    local_count = 200 if args.quick else 1000
    work = Workload(**size)
    policies = work.policies()
    result: dict[str, Any] = {"workload": {**size, "identities": len(work.identities),
                                           "pods": len(work.pods), "local_endpoints_changes":
                                           local_count},
                              "python": platform.python_version(), "machine": platform.node(),
                              "gc": args.gc}

    # 1. full computation over every pod as a local endpoint
    gc.collect()
    if args.gc == "tuned":
        gc.disable()  # the agent's initial sync: millions of long-lived objects, no cycles
    t0 = time.perf_counter()
    resolver = setup(work, list(range(len(work.pods))))
    t1 = time.perf_counter()
    update = resolver.apply(policies)
    t2 = time.perf_counter()
    gc.enable()
    entries = sum(len(s.contrib and s.entries()) for s in resolver._subjects.values())
    keys = sum(len(s.mapstate.state) for s in resolver._subjects.values())
    result["full"] = {"setup_s": t1 - t0, "resolve_s": t2 - t1,
                      "endpoints_updated": len(update.endpoints),
                      "subjects": len(resolver._subjects), "entries": entries,
                      "map_keys_per_subject_total": keys,
                      "cidr_identities": len(resolver.cidr_identities())}
    print(f"full: {len(policies)} policies, {len(work.pods)} endpoints, "
          f"{len(work.identities)} identities -> {t2 - t1:.2f} s "
          f"({entries} entries, {keys} map rows over {len(resolver._subjects)} subjects; "
          f"setup {t1 - t0:.2f} s)")
    del resolver, update
    gc.collect()

    # 2. single changes on a node with local_count endpoints
    writes = {"diffs": 0, "rows": 0}

    def writer(diff: EndpointPolicyDiff) -> None:
        writes["diffs"] += 1
        writes["rows"] += len(diff.map_upserts) + len(diff.map_deletes)

    local = sorted(work.rng.sample(range(len(work.pods)), local_count))
    if args.gc == "tuned":
        gc.disable()
    resolver = setup(work, local, writer)
    t0 = time.perf_counter()
    resolver.apply(policies)
    initial = time.perf_counter() - t0
    gc.enable()
    # What the agent does after its initial sync (docs/policy.md): move the long-lived
    # policy state out of the collector's view and collect young objects less often, so
    # a collection never walks millions of entries in the middle of a change.
    gc.collect()
    gc.freeze()
    if args.gc == "tuned":
        gc.set_threshold(50_000, 50, 100)
    current = {(r.kind, r.namespace, r.metadata.name): r for r in policies}
    latencies: dict[str, list[float]] = {"edit": [], "add": [], "delete": []}
    all_ms: list[float] = []
    cpu_ms: list[float] = []
    affected: list[int] = []
    for _ in range(100):
        kind, change = work.change(list(current.values()))
        writes["diffs"] = 0
        c0, t0 = time.thread_time(), time.perf_counter()
        if kind == "delete":
            upd = resolver.delete_resource(*change)
        else:
            upd = resolver.upsert_resource(change)
        elapsed = (time.perf_counter() - t0) * 1000
        cpu_ms.append((time.thread_time() - c0) * 1000)
        if kind == "delete":
            current.pop(change)
        else:
            current[(change.kind, change.namespace, change.metadata.name)] = change
        latencies[kind].append(elapsed)
        all_ms.append(elapsed)
        affected.append(len(upd.endpoints))
    ident_ms: list[float] = []
    ident_cpu: list[float] = []
    for i in range(100):
        ns, app = work._ns(), work._app()
        labels = pod_identity_labels(ns, {"app": app, "tier": "fe", "version": f"v{i}"},
                                     work.ns_labels[ns])
        c0, t0 = time.thread_time(), time.perf_counter()
        resolver.update_identities({IdentityID(50_000 + i): labels})
        ident_ms.append((time.perf_counter() - t0) * 1000)
        ident_cpu.append((time.thread_time() - c0) * 1000)
    result["changes"] = {
        "initial_resolve_s": initial,
        "policy_change_ms": {"p50": pct(all_ms, 0.5), "p99": pct(all_ms, 0.99),
                             "max": max(all_ms), "mean": statistics.mean(all_ms)},
        "policy_change_cpu_ms": {"p50": pct(cpu_ms, 0.5), "p99": pct(cpu_ms, 0.99),
                                 "max": max(cpu_ms)},
        "by_kind_p50_ms": {k: pct(v, 0.5) for k, v in latencies.items() if v},
        "affected_endpoints": {"mean": statistics.mean(affected), "max": max(affected)},
        "identity_arrival_ms": {"p50": pct(ident_ms, 0.5), "p99": pct(ident_ms, 0.99),
                                "max": max(ident_ms)},
        "identity_arrival_cpu_ms": {"p50": pct(ident_cpu, 0.5), "p99": pct(ident_cpu, 0.99)},
        "load_average": list(os.getloadavg()),
        "goal_p99_ms": 50.0,
    }
    ch = result["changes"]
    print(f"changes ({local_count} local endpoints, initial {initial:.2f} s): policy change -> "
          f"map diff p50 {ch['policy_change_ms']['p50']:.2f} ms, "
          f"p99 {ch['policy_change_ms']['p99']:.2f} ms, max {ch['policy_change_ms']['max']:.2f}"
          f" ms (goal p99 <= 50 ms); CPU p50 {ch['policy_change_cpu_ms']['p50']:.2f} ms, p99 "
          f"{ch['policy_change_cpu_ms']['p99']:.2f} ms; affected endpoints mean "
          f"{ch['affected_endpoints']['mean']:.1f}, max {ch['affected_endpoints']['max']}")
    print(f"identity arrival -> map diff p50 {ch['identity_arrival_ms']['p50']:.2f} ms, "
          f"p99 {ch['identity_arrival_ms']['p99']:.2f} ms (CPU p50 "
          f"{ch['identity_arrival_cpu_ms']['p50']:.2f} ms, p99 "
          f"{ch['identity_arrival_cpu_ms']['p99']:.2f} ms); load average "
          f"{ch['load_average'][0]:.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
