"""Issue 14 (operations, part B) end to end: "why?" from the live state, and policies
from flows — in one 2-node lab (real kernel, real packets, real etcd).

* ``villi policy trace`` agrees with ``villi lab probe`` on a table of cases (allow,
  default deny, explicit deny, ports, a named port, cross-node and same-node, egress);
* ``villi bpf …`` / ``villi endpoint get`` / ``villi identity get`` read the pinned maps
  and match the agents' view (``villi get …`` and the agents' API);
* ``villi policy generate`` from the lab's flows (no policy in force) gives policies
  that, applied, keep every observed connection working and drop an unobserved one.

Tests share the lab and run in file order (the generate test deletes the trace
policies first).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.e2e._lab import VILLI, Lab, running_lab
from villi.agentclient import AgentClient

pytestmark = [pytest.mark.e2e, pytest.mark.etcd]

NS = "pops"

POLICIES = f"""\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: b-in, namespace: {NS}}}
spec:
  endpointSelector: {{matchLabels: {{app: b}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: a}}}}]
    toPorts: [{{ports: [{{port: "80", protocol: TCP}}, {{port: web, protocol: TCP}}]}}]
  ingressDeny:
  - fromEndpoints: [{{matchLabels: {{app: c}}}}]
    toPorts: [{{ports: [{{port: "8080", protocol: TCP}}]}}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: d-out, namespace: {NS}}}
spec:
  endpointSelector: {{matchLabels: {{app: d}}}}
  egress:
  - toEndpoints: [{{matchLabels: {{app: c}}}}]
    toPorts: [{{ports: [{{port: "80", protocol: TCP}}]}}]
"""
SERVICE = f"""\
apiVersion: v1
kind: Service
metadata: {{name: bsvc, namespace: {NS}}}
spec:
  selector: {{app: b}}
  ports:
  - {{name: http, port: 80, targetPort: 80, protocol: TCP}}
"""


class OpsLab(Lab):
    """The shared lab driver plus JSON output, expected failures, stdin and agent calls."""

    def run(self, *args: str, timeout: float = 120,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*VILLI, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, input=stdin)

    def ok(self, *args: str, timeout: float = 120, stdin: str | None = None) -> str:
        res = self.run(*args, timeout=timeout, stdin=stdin)
        assert res.returncode == 0, f"villi {' '.join(args)} → {res.returncode}\n" \
            f"{res.stdout}\n{res.stderr}"
        return res.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "-o", "json"))

    def fails(self, *args: str) -> str:
        res = self.run(*args)
        assert res.returncode == 1, f"villi {' '.join(args)} → {res.returncode}\n" \
            f"{res.stdout}\n{res.stderr}"
        assert "Traceback" not in res.stderr
        return res.stderr

    def agent(self, node: str) -> AgentClient:
        sock = next(n["socket"] for n in self.state["nodes"] if n["name"] == node)
        return AgentClient(sock)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpsLab]:
    with running_lab(tmp_path_factory, "opslab", "--nodes", "2", "--lease-ttl", "30",
                     lab_class=OpsLab) as lab:
        assert isinstance(lab, OpsLab)
        for pod, node, labels, serve in (
                ("a", "1", "app=a", "80/tcp,81/udp"),
                ("b", "2", "app=b", "80/tcp,web=8080/tcp,81/udp"),
                ("c", "1", "app=c", "80/tcp,81/udp"),
                ("d", "2", "app=d", "80/tcp")):
            lab.ok("lab", "pod", "add", f"{NS}/{pod}", "--node", node, "--labels", labels,
                   "--serve", serve)
        yield lab


# (src, dst, trace --dport, probe port, expected verdict, what it shows)
CASES = [
    ("a", "b", "80/tcp", "80", "ALLOWED", "allow, cross-node"),
    ("a", "b", "web/tcp", "8080", "ALLOWED", "named port, cross-node"),
    ("a", "b", "81/udp", "81/udp", "DENIED", "port not allowed (default deny)"),
    ("c", "b", "8080/tcp", "8080", "DENIED", "explicit deny rule"),
    ("c", "b", "80/tcp", "80", "DENIED", "default deny (peer not selected)"),
    ("b", "a", "80/tcp", "80", "ALLOWED", "no policy selects a"),
    ("c", "a", "81/udp", "81/udp", "ALLOWED", "same node, no policy"),
    ("d", "c", "80/tcp", "80", "ALLOWED", "egress allow, cross-node"),
    ("d", "c", "81/udp", "81/udp", "DENIED", "egress port not allowed"),
    ("d", "b", "80/tcp", "80", "DENIED", "egress default deny, same node"),
    ("d", "a", "80/tcp", "80", "DENIED", "egress default deny, cross-node"),
]


def test_policy_trace_agrees_with_real_probes(lab: OpsLab) -> None:
    lab.apply(POLICIES, "trace-policies")
    assert lab.eventually(f"{NS}/c", f"{NS}/b", "80", False)   # policies are in force
    assert lab.eventually(f"{NS}/d", f"{NS}/a", "80", False)
    mismatches = []
    for src, dst, dport, port, expected, what in CASES:
        result = lab.json("policy", "trace", "--src", f"{NS}/{src}", "--dst", f"{NS}/{dst}",
                          "--dport", dport)
        probe = lab.probe(f"{NS}/{src}", f"{NS}/{dst}", port)
        if result["verdict"] != expected or probe != (expected == "ALLOWED"):
            mismatches.append((src, dst, dport, what, result["verdict"], probe))
    assert not mismatches, mismatches
    # the deciding rule is named (or default deny and the enforcing policy)
    deny = lab.json("policy", "trace", "--src", f"{NS}/c", "--dst", f"{NS}/b",
                    "--dport", "8080/tcp")
    assert deny["ingress"]["rule"]["section"] == "ingressDeny[0]"
    assert deny["ingress"]["dropReason"] == 181
    text = lab.ok("policy", "trace", "--src", f"{NS}/c", "--dst", f"{NS}/b", "--dport", "80")
    assert "default deny: ingress is enforced by CiliumNetworkPolicy pops/b-in" in text
    assert text.rstrip().endswith("Final verdict: DENIED")
    allow = lab.ok("policy", "trace", "-s", f"{NS}/a", "-d", f"{NS}/b", "--dport", "web/tcp")
    assert "allowed by CiliumNetworkPolicy pops/b-in ingress[0]" in allow
    # labels and entities as peers; precise errors
    by_labels = lab.json("policy", "trace", "--src", f"k8s:app=a,k8s:io.kubernetes.pod."
                         f"namespace={NS}", "--dst", f"{NS}/b", "--dport", "80")
    assert by_labels["verdict"] == "ALLOWED"
    assert lab.json("policy", "trace", "--src", "world", "--dst", f"{NS}/b",
                    "--dport", "80")["verdict"] == "DENIED"
    assert "unknown pod pops/zz" in lab.fails("policy", "trace", "--src", f"{NS}/zz",
                                              "--dst", f"{NS}/b", "--dport", "80")
    assert "declares no port named 'http'" in lab.fails(
        "policy", "trace", "--src", f"{NS}/a", "--dst", f"{NS}/b", "--dport", "http/tcp")
    # selectors: the app=a selector selects a's identity
    eps = {e["podName"]: e for e in lab.json("get", "endpoints")}
    sels = lab.json("policy", "selectors")
    sel_a = next(s for s in sels if "app=a" in s["selector"])
    assert [i["id"] for i in sel_a["identities"]] == [eps["a"]["identity"]]
    assert sel_a["users"] == ["CiliumNetworkPolicy pops/b-in"]


def test_map_dumps_match_the_agents_view(lab: OpsLab) -> None:
    eps = lab.json("get", "endpoints")
    bpf_eps = lab.json("bpf", "endpoint", "list")
    assert sorted((e["node"], e["id"], e["ipv4"], e["identity"],
                   e["policy"]["ingress"] == "enabled", e["policy"]["egress"] == "enabled")
                  for e in eps) == \
        sorted((r["node"], r["endpointID"], r["ip"], r["identity"], r["ingressEnforced"],
                r["egressEnforced"]) for r in bpf_eps)
    # (`villi get identities` keeps the canonical form's trailing empty label)
    identities = {i["id"]: [lbl for lbl in i["labels"] if lbl]
                  for i in lab.json("get", "identities")}
    # ipcache: every pod on every node, with its identity and the identity's labels
    ipcache = lab.json("bpf", "ipcache", "list")
    for node in ("node1", "node2"):
        rows = {r["prefix"]: r for r in ipcache if r["node"] == node}
        for e in eps:
            row = rows[f"{e['ipv4']}/32"]
            assert row["identity"] == e["identity"], (node, e["podName"])
            assert row["labels"] == identities[e["identity"]]
            assert row["pod"] == f"{NS}/{e['podName']}"
            assert bool(row["nodeIP"]) == (e["node"] != node)   # remote pods carry a node IP
    # trace sees node addresses as the ipcache does: host to its own pods, else remote-node
    b_node = next(e["node"] for e in eps if e["podName"] == "b")
    for row in ipcache:
        if row["node"] == b_node and row["identity"] in (1, 6):
            t = lab.json("policy", "trace", "--src", row["prefix"].split("/")[0], "--dst",
                         f"{NS}/b", "--dport", "80")
            assert t["src"]["identity"] == row["identity"], (row, t["src"])
    one = lab.json("bpf", "ipcache", "list", "--node", "node1")
    assert {r["node"] for r in one} == {"node1"}
    # identity get = villi get identities, plus the pods that have it
    b = next(e for e in eps if e["podName"] == "b")
    ident = lab.json("identity", "get", str(b["identity"]))
    assert ident["labels"] == identities[b["identity"]]
    assert ident["pods"] == [{"pod": f"{NS}/b", "ip": b["ipv4"], "node": b["node"]}]
    assert lab.json("identity", "get", "2")["labels"] == ["reserved:world"]
    # endpoint get = the agent's endpoint + its datapath row
    got = lab.json("endpoint", "get", f"{NS}/b")
    assert got["agent"] == b and got["datapath"]["identity"] == b["identity"]
    assert got["policyEntries"] > 0 and got["node"] == b["node"]
    # bpf policy get = the agent's resolved entries for that endpoint, rules named
    with lab.agent(b["node"]) as c:
        view = c.get("/v1/policy")["endpoints"][str(b["id"])]
    expect = {(e["identity"], e["direction"].lower(), e["protocol"], e["port"], e["deny"])
              for e in view["entries"]}
    pol = lab.json("bpf", "policy", "get", f"{NS}/b")
    got_rows = {(r["identity"], r["direction"], r["protocol"], r["port"], r["deny"])
                for r in pol["entries"]}
    assert got_rows == expect, (got_rows, expect)
    named = {r["rule"] for r in pol["entries"] if r["rule"]}
    assert "CiliumNetworkPolicy pops/b-in ingressDeny[0]" in named
    assert "CiliumNetworkPolicy pops/b-in ingress[0]" in named
    assert any(r["deny"] and r["labels"] == identities[next(
        e["identity"] for e in eps if e["podName"] == "c")] for r in pol["entries"])
    table = lab.ok("bpf", "policy", "get", f"{NS}/b")
    assert "Ingress     Deny" in table and "8080/TCP" in table
    # conntrack: a connection just made is in its nodes' ct maps
    assert lab.probe(f"{NS}/a", f"{NS}/b", "80")
    a = next(e for e in eps if e["podName"] == "a")
    ct = lab.json("bpf", "ct", "list", b["node"])
    assert any(r["source"] == a["ipv4"] and r["destination"] == b["ipv4"]
               and r["destinationPort"] == 80 and r["protocol"] == "TCP" for r in ct), ct
    assert {r["node"] for r in ct} == {b["node"]}
    # lb: the service's frontend and backends on every node = villi get services
    lab.apply(SERVICE, "svc")
    deadline = time.monotonic() + 10
    while True:
        services = lab.json("get", "services")
        lb = lab.json("bpf", "lb", "list")
        svc = next((s for s in services if s["name"] == "bsvc"), None)
        if svc and svc["clusterIP"] and {r["node"] for r in lb if r["service"] ==
                                         f"{NS}/bsvc"} == {"node1", "node2"}:
            break
        assert time.monotonic() < deadline, (services, lb)
        time.sleep(0.3)
    for row in (r for r in lb if r["service"] == f"{NS}/bsvc"):
        assert row["frontend"] == f"{svc['clusterIP']}:80"
        assert [x["address"] for x in row["backends"]] == svc["ports"][0]["backends"]
    lab.apply(SERVICE, "svc", delete=True)
    # the agent down: the pinned maps still answer (rules as cookie numbers), the same rows
    lab.ok("lab", "agent", "kill", b["node"])
    try:
        res = lab.run("bpf", "policy", "get", f"{NS}/b")
        assert res.returncode == 0, res.stderr
        assert "did not name the rules" in res.stderr and "cookie " in res.stdout
        down = lab.json("bpf", "policy", "get", f"{NS}/b")
        assert {(r["identity"], r["direction"], r["protocol"], r["port"], r["deny"])
                for r in down["entries"]} == expect
        assert all(r["rule"] is None for r in down["entries"])
    finally:
        lab.ok("lab", "agent", "start", b["node"])
    # errors are precise
    assert "unknown endpoint 99" in lab.fails("bpf", "policy", "get", "99")
    assert "pass --node" in lab.fails("bpf", "policy", "get", "1")
    assert "unknown node 'node9'" in lab.fails("bpf", "ct", "list", "node9")
    assert "is not pinned at /nonexistent" in lab.fails("bpf", "ipcache", "list",
                                                        "--pin-dir", "/nonexistent")
    assert "unknown identity 4242" in lab.fails("identity", "get", "4242")


OBSERVED = [("a", "b", "80"), ("c", "b", "8080"), ("b", "a", "81/udp"), ("d", "c", "80")]
UNOBSERVED = [("a", "b", "8080"), ("c", "b", "80"), ("b", "a", "80"), ("a", "c", "80"),
              ("d", "b", "80")]


def test_generated_policies_enforce_exactly_the_observed_traffic(lab: OpsLab) -> None:
    lab.apply(POLICIES, "trace-policies", delete=True)
    assert lab.eventually(f"{NS}/c", f"{NS}/b", "80", True)   # nothing enforced any more
    assert lab.eventually(f"{NS}/d", f"{NS}/a", "80", True)
    start = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    time.sleep(0.05)
    for src, dst, port in OBSERVED:
        assert lab.probe(f"{NS}/{src}", f"{NS}/{dst}", port), (src, dst, port)
    time.sleep(0.5)   # the last flows reach the rings
    res = lab.run("policy", "generate", "--since", start, "--namespace", NS)
    assert res.returncode == 0, res.stderr
    yaml_text = res.stdout
    assert "4 policies" in res.stderr, res.stderr
    # the same flows through a file (villi observe -o json) give the same policies
    flows = lab.ok("observe", "--since", start, "-o", "json")
    path = lab.tmp / "flows.json"
    path.write_text(flows)
    assert lab.ok("policy", "generate", "--from-flows", str(path), "-n", NS) == yaml_text
    assert lab.ok("policy", "generate", "--from-flows", "-", "-n", NS,
                  stdin=flows) == yaml_text
    out = lab.tmp / "generated.yaml"
    out.write_text(yaml_text)
    lab.ok("apply", "-f", str(out))
    try:
        assert lab.eventually(f"{NS}/a", f"{NS}/b", "8080", False)   # in force
        for src, dst, port in OBSERVED:
            assert lab.eventually(f"{NS}/{src}", f"{NS}/{dst}", port, True), \
                (src, dst, port, yaml_text)
        for src, dst, port in UNOBSERVED:
            assert not lab.probe(f"{NS}/{src}", f"{NS}/{dst}", port), \
                (src, dst, port, yaml_text)
        # and trace explains the new state
        t = lab.json("policy", "trace", "--src", f"{NS}/a", "--dst", f"{NS}/b",
                     "--dport", "8080/tcp")
        assert t["verdict"] == "DENIED"
        assert t["egress"]["enforcedBy"] == ["CiliumNetworkPolicy pops/a"]
    finally:
        lab.ok("delete", "-f", str(out))
    bad = lab.tmp / "bad.json"
    bad.write_text('{"flow": {"verdict": "FORWARDED", "IP": {}}}\nnot json\n')
    assert f"{bad}:2: not JSON" in lab.fails("policy", "generate", "--from-flows", str(bad))


DEFAULT_DENY_B = f"""\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: b-default-deny, namespace: {NS}}}
spec:
  endpointSelector: {{matchLabels: {{app: b}}}}
  ingress: [{{}}]
"""


def test_audit_generate_enforce_workflow(lab: OpsLab) -> None:
    """docs/policy.md's workflow with audit mode (villi config, from the audit-mode
    work): trace says AUDITED while audit forwards, `generate --verdict AUDIT` learns
    what audit flagged, and the result enforces it. Skipped where `villi config` is
    not part of this build."""
    if lab.run("config", "--help").returncode != 0:
        pytest.skip("villi config (policy audit mode) is not in this build")
    lab.apply(DEFAULT_DENY_B, "default-deny-b")
    assert lab.eventually(f"{NS}/a", f"{NS}/b", "80", False)
    lab.ok("config", "set", "PolicyAuditMode=enabled")
    generated = lab.tmp / "audit-generated.yaml"
    try:
        assert lab.eventually(f"{NS}/a", f"{NS}/b", "80", True)    # audit: forwarded
        deadline = time.monotonic() + 10
        while lab.json("policy", "trace", "--src", f"{NS}/a", "--dst", f"{NS}/b",
                       "--dport", "80/tcp")["verdict"] != "AUDITED":
            assert time.monotonic() < deadline, "trace never said AUDITED"
            time.sleep(0.5)
        start = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        time.sleep(0.05)
        assert lab.probe(f"{NS}/a", f"{NS}/b", "80")
        time.sleep(0.5)
        res = lab.run("policy", "generate", "--since", start, "-n", NS, "--verdict", "AUDIT")
        assert res.returncode == 0, res.stderr
        assert "app: b" in res.stdout and "port: '80'" in res.stdout, res.stdout
        generated.write_text(res.stdout)
        lab.apply(DEFAULT_DENY_B, "default-deny-b", delete=True)
        lab.ok("apply", "-f", str(generated))
    finally:
        lab.ok("config", "set", "PolicyAuditMode=disabled")
    try:
        assert lab.eventually(f"{NS}/c", f"{NS}/b", "80", False)   # enforced, not audited
        assert lab.probe(f"{NS}/a", f"{NS}/b", "80")
        assert lab.json("policy", "trace", "--src", f"{NS}/a", "--dst", f"{NS}/b",
                        "--dport", "80/tcp")["verdict"] == "ALLOWED"
    finally:
        if generated.exists():
            lab.ok("delete", "-f", str(generated))
