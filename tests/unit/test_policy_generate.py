"""``villi policy generate``'s pure module: flows in, least-privilege policies out.

The strong check: the generated YAML loads with the real loader, and applied in the
policy simulator (the agents' resolver + the kernel-lookup emulation) it allows every
observed connection and denies the unobserved ones.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from villi.identity.labels import pod_identity_labels
from villi.policy.generate import FlowParseError, generate, parse_flows, to_yaml
from villi.policy.loader import load_text
from villi.policy.simulate import PolicySimulator

PODS = {  # ref: (labels, ip)
    "shop/web-1": ({"app": "web"}, "10.0.0.1"),
    "shop/web-2": ({"app": "web"}, "10.0.0.2"),
    "shop/db": ({"app": "db"}, "10.0.0.3"),
    "shop/job": ({"role": "batch"}, "10.0.0.4"),
    "ops/probe": ({"app": "probe"}, "10.0.1.1"),
}


def _side(ref: str | None, reserved: str | None = None, identity: int = 300) -> dict[str, Any]:
    if reserved is not None:
        return {"identity": identity, "labels": [f"reserved:{reserved}"]}
    assert ref is not None
    ns, name = ref.split("/")
    labels = [str(lbl) for lbl in pod_identity_labels(ns, PODS[ref][0], cluster="lab-x")]
    return {"identity": identity, "labels": labels, "namespace": ns, "pod_name": name}


def flow(src: str, dst: str, port: int, proto: str = "TCP", *, verdict: str = "FORWARDED",
         reply: bool = False, src_reserved: str | None = None,
         dst_reserved: str | None = None, src_ip: str = "", dst_ip: str = "",
         sport: int = 40000) -> dict[str, Any]:
    s = _side(src or None, src_reserved)
    d = _side(dst or None, dst_reserved)
    sip = src_ip or (PODS[src][1] if src else "203.0.113.9")
    dip = dst_ip or (PODS[dst][1] if dst else "198.51.100.7")
    l4 = ({"ICMPv4": {"type": port, "code": 0}} if proto == "ICMP" else
          {proto: {"source_port": sport, "destination_port": port}})
    return {"verdict": verdict, "IP": {"source": sip, "destination": dip}, "l4": l4,
            "source": s, "destination": d, "Type": "L3_L4", "is_reply": reply,
            "traffic_direction": "EGRESS"}


def _simulator(policies_yaml: str) -> PolicySimulator:
    sim = PolicySimulator()
    for ref, (labels, ip) in PODS.items():
        sim.add_pod(ref, labels, ip)
    sim.apply(load_text(policies_yaml, "generated.yaml"))
    return sim


OBSERVED = [
    flow("shop/web-1", "shop/db", 5432),
    flow("shop/web-2", "shop/db", 5432),
    flow("ops/probe", "shop/web-1", 8080),
    flow("shop/job", "shop/db", 5432),
    flow("shop/web-1", "", 443, dst_reserved="world", dst_ip="198.51.100.7"),
    flow("", "shop/web-2", 80, src_reserved="host", src_ip="172.30.0.11"),
    flow("shop/db", "ops/probe", 53, "UDP"),
    flow("ops/probe", "shop/db", 8, "ICMP"),
]


def test_generated_policies_allow_exactly_the_observed_connections() -> None:
    noise = [
        flow("shop/db", "shop/web-1", 40000, reply=True),          # a reply: ignored
        flow("shop/web-1", "shop/db", 6379, verdict="DROPPED"),    # not a connection
        flow("shop/web-1", "shop/job", 22, sport=1),               # egress forwarded …
        flow("shop/web-1", "shop/job", 22, sport=1, verdict="DROPPED"),  # … dropped later
    ]
    result = generate(OBSERVED + noise)
    text = to_yaml(result)
    sim = _simulator(text)
    names = sorted((p["metadata"]["namespace"], p["metadata"]["name"]) for p in result.policies)
    assert names == [("ops", "probe"), ("shop", "db"), ("shop", "job"), ("shop", "web")]
    # every observed connection passes (egress at the source, ingress at the destination)
    assert sim.allowed("shop/web-1", "shop/db", "tcp", 5432)
    assert sim.allowed("shop/web-2", "shop/db", "tcp", 5432)
    assert sim.allowed("ops/probe", "shop/web-1", "tcp", 8080)
    assert sim.allowed("ops/probe", "shop/web-2", "tcp", 8080)   # same workload (app=web)
    assert sim.allowed("shop/job", "shop/db", "tcp", 5432)
    assert sim.allowed("shop/web-1", "198.51.100.7", "tcp", 443)
    assert sim.allowed("host", "shop/web-2", "tcp", 80)
    assert sim.allowed("shop/db", "ops/probe", "udp", 53)
    assert sim.allowed("ops/probe", "shop/db", "icmp", 8)
    # nothing else does
    assert not sim.allowed("shop/web-1", "shop/db", "tcp", 6379)      # dropped flow
    assert not sim.allowed("shop/web-1", "shop/job", "tcp", 22)       # dropped at ingress
    assert not sim.allowed("shop/db", "shop/web-1", "tcp", 40000)     # reply direction
    assert not sim.allowed("shop/web-1", "198.51.100.8", "tcp", 443)  # another address
    assert not sim.allowed("shop/web-1", "198.51.100.7", "tcp", 80)   # another port
    assert not sim.allowed("shop/db", "shop/web-1", "tcp", 5432)      # reverse
    assert not sim.allowed("ops/probe", "shop/db", "tcp", 5432)       # other peer
    assert not sim.allowed("world", "shop/web-1", "tcp", 8080)
    assert not sim.allowed("shop/db", "ops/probe", "tcp", 53)         # other protocol
    assert result.skipped["reply"] == 1
    assert result.skipped["connection dropped elsewhere"] == 1


def test_workload_keys_selectors_entities_and_default_deny() -> None:
    result = generate(OBSERVED)
    by_name = {p["metadata"]["name"]: p for p in result.policies}
    web = by_name["web"]["spec"]
    assert web["endpointSelector"] == {"matchLabels": {"app": "web"}}
    assert {"fromEntities": ["host"], "toPorts": [{"ports": [
        {"port": "80", "protocol": "TCP"}]}]} in web["ingress"]
    assert {"toCIDR": ["198.51.100.7/32"], "toPorts": [{"ports": [
        {"port": "443", "protocol": "TCP"}]}]} in web["egress"]
    # a peer in another namespace is selected with its namespace
    assert {"fromEndpoints": [{"matchLabels": {"app": "probe",
                                               "io.kubernetes.pod.namespace": "ops"}}],
            "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]} in web["ingress"]
    # a pod without an app label is keyed by its name and selected by all its labels
    job = by_name["job"]["spec"]
    assert job["endpointSelector"] == {"matchLabels": {"role": "batch"}}
    assert job["ingress"] == [{}]   # nothing observed in: default deny
    db = by_name["db"]["spec"]
    assert {"fromEndpoints": [{"matchLabels": {"app": "probe",
                                               "io.kubernetes.pod.namespace": "ops"}}],
            "icmps": [{"fields": [{"type": 8, "family": "IPv4"}]}]} in db["ingress"]
    # --world entity
    entity = generate(OBSERVED, world="entity")
    web_e = {p["metadata"]["name"]: p for p in entity.policies}["web"]["spec"]
    assert {"toEntities": ["world"], "toPorts": [{"ports": [
        {"port": "443", "protocol": "TCP"}]}]} in web_e["egress"]
    _simulator(to_yaml(entity))   # loads


def test_namespace_and_verdict_filters() -> None:
    flows = OBSERVED + [flow("shop/web-1", "shop/job", 9000, verdict="AUDIT")]
    only_ops = generate(flows, namespace="ops")
    assert [p["metadata"]["name"] for p in only_ops.policies] == ["probe"]
    audit = generate(flows, verdicts=["AUDIT"])
    assert sorted(p["metadata"]["name"] for p in audit.policies) == ["job", "web"]
    job = {p["metadata"]["name"]: p for p in audit.policies}["job"]["spec"]
    assert job["ingress"][0]["toPorts"] == [{"ports": [{"port": "9000", "protocol": "TCP"}]}]
    with pytest.raises(ValueError, match="unknown verdict"):
        generate(flows, verdicts=["ALLOWED"])


def test_unlabelled_pods_are_reported_not_guessed() -> None:
    PODS["shop/bare"] = ({}, "10.0.0.9")
    try:
        result = generate([flow("shop/bare", "shop/db", 5432)])
    finally:
        del PODS["shop/bare"]
    assert [p["metadata"]["name"] for p in result.policies] == ["db"]
    assert any("shop/bare has no labels" in w for w in result.warnings)
    db = result.policies[0]["spec"]
    assert db["ingress"][0]["fromEndpoints"] == [
        {"matchLabels": {"io.kubernetes.pod.namespace": "shop"}}]


def test_parse_flows_accepts_observe_json_jsonpb_and_arrays() -> None:
    f = flow("shop/web-1", "shop/db", 5432)
    lines = "\n".join([json.dumps({"flow": f, "node_name": "n1"}), "",
                       json.dumps(f), json.dumps({"node_status": {"state_change": "x"}})])
    assert parse_flows(lines) == [f, f]
    assert parse_flows(json.dumps([{"flow": f}, f])) == [f, f]
    with pytest.raises(FlowParseError, match=r"flows.json:2: not JSON"):
        parse_flows(json.dumps(f) + "\n{oops", "flows.json")
    with pytest.raises(FlowParseError, match=r":1: not a flow"):
        parse_flows(json.dumps({"hello": 1}))


def test_flows_as_the_observer_writes_them() -> None:
    """The observer's own flow JSON (``to_flow``) goes through unchanged."""
    import socket
    import struct

    import numpy as np

    from villi.datapath.abi import FLOW_EVENT_DTYPE
    from villi.observer.context import PodInfo, StaticContext
    from villi.observer.flow import to_flow

    def ip(s: str) -> int:
        return int(struct.unpack("<I", socket.inet_aton(s))[0])

    ctx = StaticContext(node="n1", labels={256: ["k8s:app=client"], 257: ["k8s:app=server"]},
                        pods={"10.1.0.1": PodInfo("default", "client", 1),
                              "10.1.0.2": PodInfo("default", "server", 2)})
    r = np.zeros(2, dtype=FLOW_EVENT_DTYPE)
    for i, (s, d, sp, dp, si, di) in enumerate([("10.1.0.1", "10.1.0.2", 40000, 80, 256, 257),
                                                ("10.1.0.2", "10.1.0.1", 80, 40000, 257, 256)]):
        r[i]["src_ip"], r[i]["dst_ip"], r[i]["sport"], r[i]["dport"] = ip(s), ip(d), sp, dp
        r[i]["protocol"], r[i]["event_type"], r[i]["tcp_flags"] = 6, 4, 0x02
        r[i]["src_identity"], r[i]["dst_identity"] = si, di
    r[1]["flags"], r[1]["ct_state"] = 1, 2   # the reply
    lines = "\n".join(json.dumps({"flow": to_flow(rec, 0, ctx)}) for rec in r)
    result = generate(parse_flows(lines))
    by_name = {p["metadata"]["name"]: p["spec"] for p in result.policies}
    assert by_name["client"]["egress"] == [{"toEndpoints": [{"matchLabels": {"app": "server"}}],
                                            "toPorts": [{"ports": [{"port": "80",
                                                                    "protocol": "TCP"}]}]}]
    assert by_name["server"]["ingress"][0]["fromEndpoints"] == [
        {"matchLabels": {"app": "client"}}]
    assert by_name["server"]["egress"] == [{}] and result.skipped == {"reply": 1}
