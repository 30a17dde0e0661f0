"""``villi policy trace`` and ``villi policy selectors`` on a cluster view (no kernel).

The e2e module (tests/e2e/test_policy_debug.py) checks the same answers against real
probes in a lab; here: each decision kind, its wording, the JSON shape and the errors.
"""

from __future__ import annotations

import pytest

from villi.identity.labels import pod_identity_labels
from villi.policy.loader import load_text
from villi.policy.trace import (
    ClusterView,
    EndpointMode,
    PodView,
    TraceError,
    format_trace,
    modes_from_endpoints,
    parse_dport,
    selectors_view,
    trace,
)

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: b-in, namespace: t}
spec:
  endpointSelector: {matchLabels: {app: b}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: a}}]
    toPorts: [{ports: [{port: web, protocol: TCP}]}]
  - fromEntities: [world]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: c}}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: c-out, namespace: t}
spec:
  endpointSelector: {matchLabels: {app: c}}
  egress:
  - toCIDR: [192.0.2.0/24]
"""


def _view(modes: dict[str, EndpointMode] | None = None) -> ClusterView:
    ids = {256: pod_identity_labels("t", {"app": "a"}),
           257: pod_identity_labels("t", {"app": "b"}),
           258: pod_identity_labels("t", {"app": "c"})}
    pods = [PodView("t", "a", "10.64.0.1", 256, "node1", 1),
            PodView("t", "b", "10.64.1.1", 257, "node2", 1, {"web": (8080, "TCP")}),
            PodView("t", "c", "10.64.0.2", 258, "node1", 2)]
    return ClusterView(list(load_text(POLICY, "p.yaml")), ids, pods, modes or {},
                       {"172.30.0.11": "node1", "172.30.0.12": "node2"})


@pytest.mark.parametrize("src,dst,dport,verdict,ingress,egress", [
    ("t/a", "t/b", "8080/tcp", "ALLOWED", "ALLOWED", "NOT ENFORCED"),
    ("t/a", "t/b", "web/tcp", "ALLOWED", "ALLOWED", "NOT ENFORCED"),
    ("t/a", "t/b", "80/tcp", "DENIED", "DENIED", "NOT ENFORCED"),
    ("t/c", "t/b", "8080", "DENIED", "DENIED", "DENIED"),
    ("t/b", "t/a", "80/tcp", "ALLOWED", "NOT ENFORCED", "NOT ENFORCED"),
    ("world", "t/b", "443/tcp", "ALLOWED", "ALLOWED", None),
    ("198.51.100.1", "t/b", "443/tcp", "ALLOWED", "ALLOWED", None),
    ("host", "t/b", "22/tcp", "ALLOWED", "ALLOWED", None),
    ("172.30.0.12", "t/b", "22/tcp", "ALLOWED", "ALLOWED", None),   # b's node: host
    ("172.30.0.11", "t/b", "22/tcp", "DENIED", "DENIED", None),     # remote-node
    ("t/c", "192.0.2.7", "53/udp", "ALLOWED", None, "ALLOWED"),
    ("t/c", "198.51.100.1", "53/udp", "DENIED", None, "DENIED"),
    ("k8s:app=a,k8s:io.kubernetes.pod.namespace=t", "t/b", "8080", "ALLOWED", "ALLOWED",
     "NOT ENFORCED"),
    ("10.64.0.1", "10.64.1.1", "8080/tcp", "ALLOWED", "ALLOWED", "NOT ENFORCED"),
])
def test_trace_decisions(src: str, dst: str, dport: str, verdict: str, ingress: str | None,
                         egress: str | None) -> None:
    result = trace(_view(), src, dst, dport)
    assert result.verdict == verdict
    assert (result.ingress.decision if result.ingress else None) == ingress
    assert (result.egress.decision if result.egress else None) == egress


def test_trace_names_the_deciding_rule_or_default_deny() -> None:
    view = _view()
    text = format_trace(trace(view, "t/a", "t/b", "web/tcp"))
    assert text.splitlines() == [
        "Tracing t/a (ID 256 on node1) -> t/b (ID 257 on node2) 8080/TCP",
        "  egress  of t/a: NOT ENFORCED: no policy selects t/a for egress",
        "  ingress of t/b: ALLOWED: allowed by CiliumNetworkPolicy t/b-in ingress[0]",
        "Final verdict: ALLOWED"]
    text = format_trace(trace(view, "t/a", "t/b", "80/tcp"))
    assert ("ingress of t/b: DENIED: default deny: ingress is enforced by CiliumNetworkPolicy "
            "t/b-in and no rule allows this peer and port") in text
    deny = trace(view, "t/c", "t/b", "8080/tcp")
    assert deny.ingress is not None and deny.ingress.drop_reason == 181
    assert "denied by CiliumNetworkPolicy t/b-in ingressDeny[0]" in format_trace(deny)
    host = format_trace(trace(view, "host", "t/b", "22"))
    assert "egress  of host: not an endpoint, no egress policy applies" in host
    assert "implicit allow-localhost rule" in host
    data = deny.to_json()
    assert data["verdict"] == "DENIED"
    assert data["ingress"]["rule"] == {"kind": "CiliumNetworkPolicy", "namespace": "t",
                                       "name": "b-in", "section": "ingressDeny[0]", "spec": 0}
    assert data["src"]["pod"] == "t/c" and data["dst"]["node"] == "node2"
    assert data["ingress"]["enforcedBy"] == ["CiliumNetworkPolicy t/b-in"]


def test_audit_mode_reports_audited_not_denied() -> None:
    view = _view(modes={"t/b": EndpointMode(audit=(True, False))})
    result = trace(view, "t/a", "t/b", "80/tcp")
    assert result.verdict == "AUDITED" and result.allowed
    text = format_trace(result)
    assert "AUDITED" in text and "(audit mode: would be dropped, forwarded" in text
    # a deny rule is audited too; an allowed packet stays allowed
    assert trace(view, "t/c", "t/b", "80/tcp").ingress.decision == "AUDITED"  # type: ignore[union-attr]
    assert trace(view, "t/a", "t/b", "8080/tcp").verdict == "ALLOWED"
    degraded = trace(_view(modes={"t/b": EndpointMode(degraded=True)}), "t/a", "t/b", "80")
    assert degraded.verdict == "AUDITED" and "node degraded" in format_trace(degraded)


def test_enforcement_modes_always_and_never() -> None:
    always = _view(modes={"t/a": EndpointMode("always"), "t/b": EndpointMode("always")})
    # a is selected by no policy: with 'always' it is default deny anyway
    res = trace(always, "t/b", "t/a", "80/tcp")
    assert res.verdict == "DENIED" and res.egress is not None
    assert "enforcement is 'always'" in res.egress.reason
    never = _view(modes={"t/b": EndpointMode("never"), "t/c": EndpointMode("never")})
    res = trace(never, "t/c", "t/b", "8080/tcp")   # deny rules are ignored too
    assert res.verdict == "ALLOWED" and res.ingress is not None
    assert res.ingress.decision == "NOT ENFORCED" and "'never'" in res.ingress.reason


def test_modes_from_agents_endpoint_json() -> None:
    modes = modes_from_endpoints([
        {"namespace": "t", "podName": "b", "policy": {"ingress": "disabled (audit)",
                                                      "auditMode": True,
                                                      "enforcement": "default"}},
        {"namespace": "t", "podName": "a", "policyAuditMode": "Enabled"},
        {"namespace": "t", "podName": "c", "policy": {"enforcement": "always",
                                                      "degraded": True}},
        {"namespace": "t", "podName": "d", "policy": {"ingress": "enabled"}}])
    assert modes == {"t/b": EndpointMode("default", (True, True)),
                     "t/a": EndpointMode("default", (True, True)),
                     "t/c": EndpointMode("always", (False, False), True)}


@pytest.mark.parametrize("src,dst,dport,message", [
    ("t/zz", "t/b", "80", "unknown pod t/zz (pods with an ipcache entry: t/a, t/b, t/c)"),
    ("t/a", "t/b", "80/icmpv6", "protocol must be one of"),
    ("t/a", "t/b", "70000/tcp", "port out of range"),
    ("t/a", "t/b", "http/tcp", "t/b declares no port named 'http' for TCP"),
    ("t/a", "t/b", "web/udp", "t/b declares no port named 'web' for UDP"),
    ("mars", "t/b", "80", "cannot read peer 'mars'"),
    ("k8s:app=a=b;", "t/b", "80", "'k8s:app=a=b;'"),
])
def test_trace_errors_are_precise(src: str, dst: str, dport: str, message: str) -> None:
    with pytest.raises(TraceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        trace(_view(), src, dst, dport)


def test_node_addresses_are_host_to_their_pods_and_remote_node_to_others() -> None:
    view = _view()
    assert trace(view, "172.30.0.12", "t/b", "80").src.identity == 1
    assert trace(view, "172.30.0.11", "t/b", "80").src.identity == 6
    assert trace(view, "t/a", "172.30.0.11", "80").dst.identity == 1


def test_parse_dport() -> None:
    assert parse_dport("80") == (80, "tcp")
    assert parse_dport("53/UDP") == (53, "udp")
    assert parse_dport("Web/tcp") == ("web", "tcp")
    assert parse_dport("8/icmp") == (8, "icmp")


def test_selectors_list_users_and_selected_identities() -> None:
    rows = {r["selector"]: r for r in selectors_view(_view())}
    a = next(r for s, r in rows.items() if "app=a" in s)
    assert a["users"] == ["CiliumNetworkPolicy t/b-in"]
    assert [i["id"] for i in a["identities"]] == [256]
    world = next(r for s, r in rows.items() if "reserved:world" in s)
    assert 2 in [i["id"] for i in world["identities"]]
    cidr = next(r for s, r in rows.items() if s.startswith("cidr:"))
    assert cidr["users"] == ["CiliumNetworkPolicy t/c-out"]
    assert cidr["identities"] and cidr["identities"][0]["id"] >= 1 << 24
