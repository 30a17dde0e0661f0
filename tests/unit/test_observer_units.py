"""Observer pieces without a kernel: ring, filters, metrics, flow shape, export."""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path

import numpy as np
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from villi.datapath.abi import FLOW_EVENT_DTYPE
from villi.observer.context import PodInfo, PolicyRef, StaticContext
from villi.observer.export import FlowExporter, read_flows
from villi.observer.filters import FilterSpec, Predicate, match
from villi.observer.flow import to_flow
from villi.observer.flowfilter import flow_matches
from villi.observer.format import compact
from villi.observer.metrics import HubbleMetrics
from villi.observer.ring import FlowRing


def ip(s: str) -> int:
    return struct.unpack("<I", socket.inet_aton(s))[0]


def records() -> np.ndarray:
    r = np.zeros(4, dtype=FLOW_EVENT_DTYPE)
    rows = [  # src, dst, sport, dport, proto, flags, reason, dir, src_id, dst_id, cookie
        ("10.1.0.1", "10.1.0.2", 40000, 80, 6, 0x02, 0, 0, 256, 257, 5),
        ("10.1.0.3", "10.1.0.2", 40001, 81, 6, 0x02, 181, 0, 258, 257, 6),
        ("10.1.0.1", "10.1.0.2", 5000, 53, 17, 0, 133, 0, 256, 257, 0),
        ("10.1.0.2", "10.1.0.1", 80, 40000, 6, 0x12, 0, 1, 257, 256, 0),
    ]
    for i, (s, d, sp, dp, pr, fl, rs, di, si, dii, ck) in enumerate(rows):
        r[i]["src_ip"], r[i]["dst_ip"] = ip(s), ip(d)
        r[i]["sport"], r[i]["dport"], r[i]["protocol"] = sp, dp, pr
        r[i]["tcp_flags"], r[i]["drop_reason"], r[i]["direction"] = fl, rs, di
        r[i]["src_identity"], r[i]["dst_identity"], r[i]["cookie"] = si, dii, ck
        r[i]["event_type"] = 1 if rs else 4
        r[i]["ts_ns"] = 1_000 + i
    r[3]["flags"] = 1  # reply
    r[3]["ct_state"] = 2
    return r


def with_policy_verdicts(r: np.ndarray) -> np.ndarray:
    """``r`` plus the datapath's policy-verdict record for each non-reply record."""
    pv = r[(r["flags"] & 1) == 0].copy()
    pv["event_type"] = 5
    pv["ts_ns"] += 100
    return np.concatenate([r, pv])


CTX = StaticContext(
    node="n1",
    labels={256: ["k8s:app=client"], 257: ["k8s:app=server"], 258: ["k8s:app=other"]},
    pods={"10.1.0.1": PodInfo("default", "client", 1), "10.1.0.2": PodInfo("default", "server", 2),
          "10.1.0.3": PodInfo("prod", "other", 3)},
    policies={5: PolicyRef("CiliumNetworkPolicy", "default", "p", "ingress", 0),
              6: PolicyRef("CiliumNetworkPolicy", "default", "p", "ingressDeny", 0)})


def test_ring_keeps_newest_in_order() -> None:
    ring = FlowRing(3)
    r = records()
    ring.append(r[:2])
    ring.append(r[2:])
    assert len(ring) == 3 and ring.seq == 4
    assert list(ring.snapshot()["ts_ns"]) == [1001, 1002, 1003]
    new, seq = ring.since(2)
    assert list(new["ts_ns"]) == [1002, 1003] and seq == 4


def test_filters_or_and_not() -> None:
    r = records()
    spec = FilterSpec([Predicate("from-pod", ["default/client", "prod/other"])])
    assert list(match(spec, r, CTX)) == [True, True, True, False]
    spec = FilterSpec([Predicate("from-pod", ["client"]), Predicate("protocol", ["udp"])])
    assert list(match(spec, r, CTX)) == [False, False, True, False]
    spec = FilterSpec([Predicate("verdict", ["FORWARDED"], negate=True)])
    assert list(match(spec, r, CTX)) == [False, True, True, False]
    spec = FilterSpec([Predicate("to-ip", ["10.1.0.0/24"]), Predicate("to-label", ["app=server"])])
    assert list(match(spec, r, CTX)) == [True, True, True, False]
    spec = FilterSpec([Predicate("namespace", ["prod"])])
    assert list(match(spec, r, CTX)) == [False, True, False, False]
    spec = FilterSpec([Predicate("drop-reason-desc", ["POLICY_DENY"])])
    assert list(match(spec, r, CTX)) == [False, True, False, False]


def test_flow_shape_and_compact_line() -> None:
    r = records()
    f = to_flow(r[1], 0, CTX)
    assert f["verdict"] == "DROPPED" and f["drop_reason_desc"] == "POLICY_DENY"
    assert f["source"]["pod_name"] == "other" and f["source"]["namespace"] == "prod"
    assert f["ingress_denied_by"][0]["name"] == "p"
    assert "deny rule" in f["villi"]["explain"]["text"]
    line = compact(f)
    assert "prod/other:40001 (ID:258) -> default/server:81 (ID:257)" in line
    assert "Policy denied by denylist DROPPED (TCP Flags: SYN)" in line
    reply = compact(to_flow(r[3], 0, CTX))
    assert "default/client:40000 (ID:256) <- default/server:80 (ID:257)" in reply
    assert flow_matches(FilterSpec([Predicate("from-pod", ["prod/other"])]), f)


def test_metrics_count_and_parse() -> None:
    m = HubbleMetrics()
    m.count(records())
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(m.registry).decode())}
    flows = {tuple(sorted(s.labels.items())): s.value
             for s in fams["hubble_flows_processed"].samples if s.name.endswith("_total")}
    assert sum(flows.values()) == 4
    drops = {s.labels["reason"]: s.value for s in fams["hubble_drop"].samples
             if s.name.endswith("_total")}
    assert drops == {"POLICY_DENY": 1.0, "POLICY_DENIED": 1.0}


def test_export_rotates_and_reads_back(tmp_path: Path) -> None:
    ex = FlowExporter(tmp_path / "f.jsonl", max_bytes=500, backups=3)
    flows = [to_flow(r, 0, CTX) for r in records()]
    for _ in range(5):
        ex.write(flows)
    ex.close()
    assert (tmp_path / "f.jsonl.1").exists()
    back = list(read_flows(tmp_path / "f.jsonl", backups=3))
    assert back and all(json.dumps(b) for b in back)


def _icmp_records() -> np.ndarray:
    r = np.zeros(3, dtype=FLOW_EVENT_DTYPE)
    for i, (t, c) in enumerate([(8, 0), (3, 3), (11, 1)]):
        r[i]["src_ip"], r[i]["dst_ip"] = ip("10.1.0.1"), ip("10.1.0.2")
        r[i]["protocol"], r[i]["event_type"] = 1, 4
        r[i]["icmp_type"], r[i]["icmp_code"] = t, c
    r[0]["sport"] = 7
    r[1]["flags"] = 1  # an ICMP error seen as a reply must not turn into an echo reply
    return r


def test_icmp_flows_and_metrics_use_the_real_type_and_code() -> None:
    r = _icmp_records()
    flows = [to_flow(rec, 0, CTX) for rec in r]
    assert [f["l4"]["ICMPv4"] for f in flows] == [
        {"type": 8, "code": 0}, {"type": 3, "code": 3}, {"type": 11, "code": 1}]
    assert flows[1]["Summary"] == "ICMPv4 DestinationUnreachable"
    m = HubbleMetrics()
    m.count(r)
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(m.registry).decode())}
    icmp = {s.labels["type"]: s.value for s in fams["hubble_icmp"].samples
            if s.name.endswith("_total")}
    assert icmp == {"EchoRequest": 1.0, "DestinationUnreachable": 1.0, "TimeExceeded": 1.0}
