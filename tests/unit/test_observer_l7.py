"""L7 flows: the proxy's records as Hubble flows, compact lines as hubble prints them,
the http filters, --explain naming the HTTP rule, and the hubble_http_* metrics."""

from __future__ import annotations

from typing import Any

from villi.observer.context import PodInfo, PolicyRef, StaticContext
from villi.observer.filters import FilterSpec, Predicate
from villi.observer.format import compact
from villi.observer.metrics import HubbleMetrics
from villi.observer.metricsconfig import parse as parse_metrics
from villi.observer.observer import Observer

CTX = StaticContext(
    node="node1",
    pods={"10.64.0.2": PodInfo("default", "tiefighter"),
          "10.64.0.1": PodInfo("default", "deathstar")},
    policies={5: PolicyRef("CiliumNetworkPolicy", "default", "rule1", "ingress", 0)})


def _rec(kind: str, method: str, path: str, verdict: str, code: int = 0,
         latency_ns: int = 0, rule_index: int = -1, t: int = 0) -> dict[str, Any]:
    return {"type": kind, "time_ns": 1_700_000_000_000_000_000 + t, "direction": "ingress",
            "src_ip": "10.64.0.2", "src_port": 40000, "dst_ip": "10.64.0.1", "dst_port": 80,
            "src_identity": 1001, "dst_identity": 1002, "endpoint": 7, "verdict": verdict,
            "method": method, "url": f"http://deathstar{path}", "protocol": "HTTP/1.1",
            "code": code, "latency_ns": latency_ns, "cookie": 5, "rule_index": rule_index,
            "headers": []}


def _observer(metrics: str = "http") -> Observer:
    obs = Observer(CTX, metrics=HubbleMetrics(config=parse_metrics(metrics)))
    obs.ingest_l7([
        _rec("REQUEST", "POST", "/v1/request-landing", "FORWARDED", rule_index=0, t=1),
        _rec("RESPONSE", "POST", "/v1/request-landing", "FORWARDED", 200, 2_000_000, t=2),
        _rec("REQUEST", "PUT", "/v1/exhaust-port", "DROPPED", t=3),
        _rec("RESPONSE", "PUT", "/v1/exhaust-port", "FORWARDED", 403, 10_000, t=4),
    ])
    return obs


def _spec(*preds: tuple[str, str]) -> FilterSpec:
    return FilterSpec([Predicate(f, [v]) for f, v in preds])


def test_hubble_shaped_l7_flows_and_compact_lines() -> None:
    flows = _observer().query(FilterSpec(), last=None)
    req, resp, denied, _ = flows
    assert req["Type"] == "L7" and req["l7"]["type"] == "REQUEST"
    assert req["l7"]["http"] == {"method": "POST", "url": "http://deathstar/v1/request-landing",
                                 "protocol": "HTTP/1.1"}
    assert resp["l7"]["http"]["code"] == 200 and resp["is_reply"]
    assert resp["source"]["pod_name"] == "deathstar"  # responses go server → client
    lines = [compact(f).split(": ", 1)[1] for f in flows]
    assert lines[2] == ("default/tiefighter:40000 (ID:1001) -> default/deathstar:80 (ID:1002) "
                        "http-request DROPPED (HTTP/1.1 PUT http://deathstar/v1/exhaust-port)")
    assert lines[1] == ("default/tiefighter:40000 (ID:1001) <- default/deathstar:80 (ID:1002) "
                        "http-response FORWARDED (HTTP/1.1 200 2ms "
                        "(POST http://deathstar/v1/request-landing))")
    assert denied["verdict"] == "DROPPED"


def test_explain_names_the_http_rule() -> None:
    flows = _observer().query(FilterSpec(), last=None)
    assert flows[0]["villi"]["explain"]["text"] == (
        "allowed by CiliumNetworkPolicy default/rule1 ingress[0] http[0]")
    assert "denied: no HTTP rule of CiliumNetworkPolicy default/rule1 ingress[0]" in \
        flows[2]["villi"]["explain"]["text"]
    assert "↳ denied" in compact(flows[2], explain=True)


def test_http_filters() -> None:
    obs = _observer()

    def summaries(*preds: tuple[str, str]) -> list[str]:
        return [f["Summary"] for f in obs.query(_spec(*preds), last=None)]

    assert len(summaries(("type", "l7"))) == 4
    assert len(summaries(("protocol", "http"))) == 4
    assert summaries(("http-method", "put"), ("verdict", "DROPPED")) == [
        "HTTP/1.1 PUT http://deathstar/v1/exhaust-port"]
    assert len(summaries(("http-status", "4+"))) == 1
    assert len(summaries(("http-status", "200"))) == 1
    assert len(summaries(("http-path", "^/v1/exhaust"))) == 2
    assert len(summaries(("http-url", "deathstar/v1/request"))) == 2
    assert summaries(("type", "trace")) == []
    negated = FilterSpec([Predicate("http-method", ["PUT"], negate=True)])
    assert len(obs.query(negated, last=None)) == 2


def test_http_metrics() -> None:
    obs = _observer()
    reg = obs.metrics.registry
    assert reg.get_sample_value("hubble_http_requests_total", {
        "method": "PUT", "protocol": "HTTP/1.1", "reporter": "server"}) == 1
    assert reg.get_sample_value("hubble_http_responses_total", {
        "method": "PUT", "status": "403", "reporter": "server"}) == 1
    assert reg.get_sample_value("hubble_http_request_duration_seconds_count", {
        "method": "POST", "reporter": "server"}) == 1


def test_l7_flows_count_in_the_flow_metric_with_its_context_labels() -> None:
    """The flow metric with context labels must not break on L7 records (it did)."""
    from prometheus_client import CollectorRegistry

    from villi.observer.metrics import HubbleMetrics
    from villi.observer.metricsconfig import parse

    registry = CollectorRegistry()
    metrics = HubbleMetrics(registry, parse("flow:sourceContext=namespace http"))
    flow = {"verdict": "FORWARDED", "traffic_direction": "INGRESS",
            "source": {"namespace": "default", "pod_name": "tiefighter"},
            "destination": {"namespace": "default", "pod_name": "deathstar"},
            "l7": {"type": "REQUEST", "http": {"method": "GET", "protocol": "HTTP/1.1"}}}
    metrics.count_l7(flow)
    got = registry.get_sample_value("hubble_flows_processed_total",
                                    {"type": "L7", "subtype": "http-request",
                                     "verdict": "FORWARDED", "source": "default"})
    assert got == 1.0
