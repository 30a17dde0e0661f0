"""``villi connectivity test``: a built-in suite of scenarios against the running lab.

Like ``cilium connectivity test``, the suite deploys its own pods (namespaces
``villi-test`` and ``villi-test-ext``) spread over two nodes, plus an echo server on
the underlay standing in for the world, then walks through scenarios. Each scenario
applies policies (plain CiliumNetworkPolicy / NetworkPolicy / Namespace YAML, as a
user would write them), waits until every agent has them, and checks a list of
connections with their expected outcome. Everything it created — pods, policies,
the Namespace resource, the world server — is removed at the end, also on failure
or Ctrl-C.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from villi.lab import _procs, _state, cluster, pods
from villi.lab._api import agent_call, apply_text, store_run
from villi.lab.probe import probe_detail

NS = "villi-test"
NS_EXT = "villi-test-ext"
WORLD_PORT = 8080
SERVER_PORTS = "80/tcp,81/udp,8005/tcp,8020/tcp"


@dataclass(frozen=True)
class Check:
    src: str                 # pod key, or "world" (the underlay namespace)
    dst: str                 # pod key, "world" (underlay gateway) or "world2" (2nd address)
    port: int
    proto: str = "tcp"
    expect: bool = True

    def describe(self) -> str:
        return f"{self.src} → {self.dst}:{self.port}/{self.proto}"


@dataclass
class Scenario:
    name: str
    checks: list[Check]
    yaml: str = ""
    description: str = ""


@dataclass
class Result:
    scenario: str
    check: Check
    ok: bool
    observed: str
    seconds: float


@dataclass
class Report:
    results: list[Result] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.errors and all(r.ok for r in self.results)


def _c(src: str, dst: str, port: int, proto: str = "tcp", expect: bool = True) -> Check:
    full = {"client-1": f"{NS}/client-1", "client-2": f"{NS}/client-2",
            "server-1": f"{NS}/server-1", "server-2": f"{NS}/server-2",
            "other-2": f"{NS}/other-2", "client-ext": f"{NS_EXT}/client-ext"}
    return Check(full.get(src, src), full.get(dst, dst), port, proto, expect)


def _cnp(name: str, spec: str) -> str:
    return (f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n"
            f"  name: {name}\n  namespace: {NS}\nspec:\n{spec}")


def scenarios(underlay_cidr: str, world_ip: str) -> list[Scenario]:
    server = "  endpointSelector:\n    matchLabels:\n      app: server\n"
    client = "  endpointSelector:\n    matchLabels:\n      app: client\n"
    return [
        Scenario("no policy: same node", [_c("client-1", "server-1", 80)]),
        Scenario("no policy: other node", [_c("client-1", "server-2", 80),
                                           _c("client-2", "server-1", 80)]),
        Scenario("no policy: UDP across nodes", [_c("client-1", "server-2", 81, "udp"),
                                                 _c("client-2", "server-1", 81, "udp")]),
        Scenario("no policy: pods ↔ world", [_c("client-1", "world", WORLD_PORT),
                                             _c("world", "server-1", 80)]),
        Scenario("default deny ingress", [
            _c("client-1", "server-1", 80, expect=False),
            _c("client-2", "server-1", 80, expect=False),
            _c("client-1", "server-2", 81, "udp", expect=False),
            _c("server-1", "client-2", 80)],
            f"apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n"
            f"  name: default-deny\n  namespace: {NS}\nspec:\n  podSelector:\n"
            f"    matchLabels:\n      app: server\n  policyTypes: [Ingress]\n"),
        Scenario("allow by label", [
            _c("client-2", "server-1", 80), _c("client-1", "server-2", 80),
            _c("other-2", "server-1", 80, expect=False),
            _c("client-2", "server-1", 8005, expect=False)],
            _cnp("allow-client", server + "  ingress:\n  - fromEndpoints:\n"
                 "    - matchLabels:\n        app: client\n    toPorts:\n"
                 "    - ports:\n      - port: \"80\"\n        protocol: TCP\n")),
        Scenario("allow by namespace", [
            _c("client-ext", "server-1", 80),
            _c("client-1", "server-1", 80, expect=False)],
            f"apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n"
            f"  name: from-team-blue\n  namespace: {NS}\nspec:\n  podSelector:\n"
            f"    matchLabels:\n      app: server\n  policyTypes: [Ingress]\n  ingress:\n"
            f"  - from:\n    - namespaceSelector:\n        matchLabels:\n"
            f"          team: blue\n"),
        Scenario("deny beats allow", [
            _c("client-2", "server-1", 80),
            _c("other-2", "server-1", 80, expect=False),
            _c("other-2", "server-2", 80, expect=False)],
            _cnp("deny-other", server + "  ingress:\n  - fromEntities: [cluster]\n"
                 "  ingressDeny:\n  - fromEndpoints:\n    - matchLabels:\n"
                 "        app: other\n")),
        Scenario("port range (endPort)", [
            _c("client-1", "server-2", 8005),
            _c("client-1", "server-2", 8020, expect=False),
            _c("client-1", "server-2", 80, expect=False)],
            _cnp("port-range", server + "  ingress:\n  - fromEndpoints:\n    - {}\n"
                 "    toPorts:\n    - ports:\n      - port: \"8000\"\n        endPort: 8010\n"
                 "        protocol: TCP\n")),
        Scenario("named port", [
            _c("client-2", "server-1", 80),
            _c("client-2", "server-1", 8005, expect=False)],
            _cnp("named-port", server + "  ingress:\n  - fromEndpoints:\n    - {}\n"
                 "    toPorts:\n    - ports:\n      - port: serve-80-tcp\n")),
        Scenario("entity cluster (ingress)", [
            _c("client-2", "server-1", 80),
            _c("world", "server-1", 80, expect=False)],
            _cnp("from-cluster", server + "  ingress:\n  - fromEntities: [cluster]\n")),
        Scenario("entity world (egress)", [
            _c("client-1", "world", WORLD_PORT),
            _c("client-1", "server-2", 80, expect=False)],
            _cnp("to-world", client + "  egress:\n  - toEntities: [world]\n")),
        Scenario("CIDR with except (egress)", [
            _c("client-1", "world", WORLD_PORT),
            _c("client-1", "world2", WORLD_PORT, expect=False),
            _c("client-1", "server-1", 80, expect=False)],
            _cnp("to-cidr", client + f"  egress:\n  - toCIDRSet:\n    - cidr: {underlay_cidr}\n"
                 f"      except:\n      - {world_ip}/32\n")),
        Scenario("UDP only", [
            _c("client-2", "server-1", 81, "udp"),
            _c("client-2", "server-1", 80, expect=False)],
            _cnp("udp-only", server + "  ingress:\n  - fromEndpoints:\n"
                 "    - matchLabels:\n        app: client\n    toPorts:\n"
                 "    - ports:\n      - port: \"81\"\n        protocol: UDP\n")),
        Scenario("egress-only policy", [
            _c("client-1", "server-2", 80),
            _c("client-1", "server-2", 8005, expect=False),
            _c("client-1", "world", WORLD_PORT, expect=False),
            _c("other-2", "client-1", 80)],
            _cnp("egress-only", client + "  egress:\n  - toEndpoints:\n"
                 "    - matchLabels:\n        app: server\n    toPorts:\n"
                 "    - ports:\n      - port: \"80\"\n        protocol: TCP\n")),
        Scenario("policies deleted again", [
            _c("other-2", "server-1", 80), _c("client-1", "server-2", 8005),
            _c("client-1", "world", WORLD_PORT), _c("world", "server-2", 80)]),
    ]


POD_SPECS: list[tuple[str, int, str, str]] = [
    # (key, node slot 0/1, labels, serve)
    (f"{NS}/server-1", 0, "app=server", SERVER_PORTS),
    (f"{NS}/server-2", 1, "app=server", SERVER_PORTS),
    (f"{NS}/client-1", 0, "app=client", "80/tcp"),
    (f"{NS}/client-2", 1, "app=client", "80/tcp"),
    (f"{NS}/other-2", 1, "app=other", ""),
    (f"{NS_EXT}/client-ext", 1, "app=client", ""),
]

NAMESPACES_YAML = (f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NS_EXT}\n"
                   f"  labels:\n    team: blue\n---\n"
                   f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NS}\n"
                   f"  labels:\n    team: red\n")


class Suite:
    """Runs the scenarios; ``on_result`` is called after each check."""

    def __init__(self, timeout: float = 1.0, settle: float = 8.0,
                 on_result: Callable[[Result], None] | None = None,
                 on_step: Callable[[str], None] | None = None) -> None:
        self.state = _state.require()
        self.timeout = timeout       # per connection attempt
        self.settle = settle         # how long an outcome may take to become true
        self.on_result = on_result or (lambda r: None)
        self.on_step = on_step or (lambda s: None)
        self.world_pid: int | None = None
        self.applied: list[str] = []   # YAML texts applied (deleted at the end)

    # --- setup / teardown ----------------------------------------------------------------
    def setup(self) -> None:
        self.cleanup(quiet=True)      # leftovers of an interrupted run
        self.on_step("namespace labels")
        apply_text(self.state, NAMESPACES_YAML, filename="connectivity-namespaces")
        self.applied.append(NAMESPACES_YAML)
        self.on_step("world server on the underlay")
        u = self.state["underlay"]
        self.world_pid = _procs.spawn(
            [sys.executable, "-m", "villi.lab.echo", "--netns", u["netns"],
             f"{WORLD_PORT}/tcp"],
            Path(self.state["dir"]) / "connectivity-world.log", ready_line="ready")
        marker = f"{_state.PREFIX}{self.state['id']}"
        nodes = [n for n in self.state["nodes"] if _procs.alive(n.get("pid"), marker)]
        if not nodes:
            raise _state.LabError("no node of this lab has a running agent")
        self.on_step(f"{len(POD_SPECS)} test pods on {min(2, len(nodes))} node(s)")

        def add(spec: tuple[str, int, str, str]) -> None:
            key, slot, labels, serve = spec
            node = nodes[slot % len(nodes)]["name"]
            pods.add(key, node=node, labels=pods.parse_labels(labels),
                     serve=pods.parse_serve(serve))

        with ThreadPoolExecutor(len(POD_SPECS)) as pool:
            for f in [pool.submit(add, s) for s in POD_SPECS]:
                f.result()
        self.state = _state.require()
        cluster.sync_underlay_routes(self.state)

    def cleanup(self, quiet: bool = False) -> list[str]:
        errors = []
        for text in reversed(self.applied):
            try:
                apply_text(self.state, text, delete=True)
            except Exception as e:
                errors.append(f"deleting policies: {e}")
        self.applied.clear()
        # resources of earlier, interrupted runs in the test namespaces
        try:
            store_run(self.state, _delete_test_resources)
        except Exception as e:
            errors.append(f"deleting leftover resources: {e}")
        state = _state.load() or self.state
        for key in [k for k in state.get("pods", {}) if k.split("/")[0] in (NS, NS_EXT)]:
            try:
                pods.delete(key)
            except Exception as e:
                errors.append(f"deleting pod {key}: {e}")
        if self.world_pid:
            _procs.kill([self.world_pid], self.state["underlay"]["netns"], grace=1.0)
            self.world_pid = None
        for pid in _procs.find(f"{self.state['underlay']['netns']} {WORLD_PORT}/tcp"):
            _procs.kill([pid], self.state["underlay"]["netns"], grace=1.0)
        return [] if quiet else errors

    # --- running -------------------------------------------------------------------------
    def _endpoint(self, name: str) -> tuple[str | None, str]:
        """(netns to probe from, IP to probe)."""
        u = self.state["underlay"]
        if name == "world":
            return u["netns"], u["gateway"]
        if name == "world2":
            return u["netns"], u["world_ip"]
        rec = self.state["pods"][name]
        return rec["netns"], rec["ip"]

    def check(self, scenario: str, check: Check) -> Result:
        src_ns, _ = self._endpoint(check.src)
        _, ip = self._endpoint(check.dst)
        start = time.monotonic()
        deadline = start + self.settle
        while True:
            ok, why = probe_detail(src_ns, ip, check.port, check.proto, self.timeout)
            if ok == check.expect or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        observed = why if ok else f"blocked ({why})"
        return Result(scenario, check, ok == check.expect, observed,
                      time.monotonic() - start)

    def wait_policies(self, text: str, present: bool) -> None:
        """Wait until every live agent has (or no longer has) the resources of ``text``."""
        from villi import resources
        from villi.policy.loader import load_text

        wanted = {(r.kind, r.namespace, r.metadata.name)
                  for r in load_text(text, kinds=resources.all_kinds())
                  if r.kind != "Namespace"}
        deadline = time.monotonic() + self.settle
        for node in self.state["nodes"]:
            while time.monotonic() < deadline:
                try:
                    view = agent_call(node["socket"], "GET", "/v1/policy", timeout=2)
                except Exception:
                    break   # a dead node: the probes will tell
                have = {(r["kind"], r["namespace"], r["name"]) for r in view["resources"]}
                if (wanted <= have) if present else not (wanted & have):
                    break
                time.sleep(0.05)

    def run(self) -> Report:
        report = Report()
        try:
            self.setup()
            u = self.state["underlay"]
            for sc in scenarios(u["cidr"], u["world_ip"]):
                self.on_step(sc.name)
                if sc.yaml:
                    apply_text(self.state, sc.yaml, filename=sc.name)
                    self.applied.append(sc.yaml)
                    self.wait_policies(sc.yaml, True)
                # the checks of a scenario are independent: run them side by side
                with ThreadPoolExecutor(len(sc.checks)) as pool:
                    futures = [pool.submit(self.check, sc.name, c) for c in sc.checks]
                    for f in futures:
                        r = f.result()
                        report.results.append(r)
                        self.on_result(r)
                if sc.yaml:
                    apply_text(self.state, sc.yaml, delete=True)
                    self.applied.remove(sc.yaml)
                    self.wait_policies(sc.yaml, False)
        except Exception as e:
            report.errors.append(f"{type(e).__name__}: {e}")
        finally:
            report.errors.extend(self.cleanup())
        return report


async def _delete_test_resources(store: Any) -> None:
    from villi.kvstore.schema import RESOURCES

    res = await store.list(RESOURCES)
    for kv in res.items:
        parts = kv.key.split("/")
        if len(parts) == 5 and (parts[3] in (NS, NS_EXT)
                                or (parts[2] == "Namespace" and parts[4] in (NS, NS_EXT))):
            await store.delete(kv.key)
