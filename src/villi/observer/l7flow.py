"""L7 flows: the proxy's HTTP records as Hubble flows, their filters and metrics.

The proxy reports one record per request (verdict FORWARDED or DROPPED) and one per
response (status, latency). They become Hubble-shaped flows with ``Type: L7`` and an
``l7`` block (``type`` REQUEST/RESPONSE, ``latency_ns``, ``http {code, method, url,
protocol, headers}``); a response flow runs from the server back to the client
(``is_reply``), as in Hubble. They are few (one per request, not per packet), so they
are plain dicts, filtered with :func:`matches_http` and the dict filters.
"""

from __future__ import annotations

import re
from typing import Any

from villi.observer.context import FlowContext
from villi.observer.flow import _endpoint, _policy, _ref_text, iso_time

#: Cilium's monitor message type of access-log (L7) records.
MESSAGE_TYPE_ACCESSLOG = 129
HTTP_FIELDS = ("http-method", "http-path", "http-status", "http-url")


def l7_flow(rec: dict[str, Any], ctx: FlowContext) -> dict[str, Any]:
    """The Hubble JSON of one proxy record (the wire dict of ``L7Record``)."""
    response = rec["type"] == "RESPONSE"
    client = (rec["src_ip"], int(rec["src_port"]), int(rec["src_identity"]))
    server = (rec["dst_ip"], int(rec["dst_port"]), int(rec["dst_identity"]))
    src, dst = (server, client) if response else (client, server)
    direction = "INGRESS" if rec["direction"] == "ingress" else "EGRESS"
    http: dict[str, Any] = {"method": rec["method"], "url": rec["url"],
                            "protocol": rec["protocol"]}
    if response:
        http["code"] = int(rec["code"])
    if rec.get("headers"):
        http["headers"] = [{"key": k, "value": v} for k, v in rec["headers"]]
    latency_ns = int(rec.get("latency_ns", 0))
    if response:
        summary = (f"{rec['protocol']} {rec['code']} {latency_ns // 1_000_000}ms "
                   f"({rec['method']} {rec['url']})")
    else:
        summary = f"{rec['protocol']} {rec['method']} {rec['url']}"
    flow: dict[str, Any] = {
        "time": iso_time(int(rec["time_ns"])),
        "verdict": rec["verdict"],
        "IP": {"source": src[0], "destination": dst[0], "ipVersion": "IPv4"},
        "l4": {"TCP": {"source_port": src[1], "destination_port": dst[1]}},
        "source": _endpoint(ctx, src[0], src[2]),
        "destination": _endpoint(ctx, dst[0], dst[2]),
        "Type": "L7",
        "node_name": ctx.node_name(),
        "event_type": {"type": MESSAGE_TYPE_ACCESSLOG},
        "traffic_direction": direction,
        "is_reply": response,
        "l7": {"type": rec["type"], "latency_ns": latency_ns, "http": http},
        "Summary": summary,
    }
    explain = _explain(rec, ctx, direction)
    if explain is not None:
        flow["villi"] = {"event": "l7", "explain": explain}
    return flow


def _explain(rec: dict[str, Any], ctx: FlowContext, direction: str) -> dict[str, Any] | None:
    if rec["type"] != "REQUEST":
        return None
    ref = ctx.policy_of(int(rec.get("cookie", 0))) if rec.get("cookie") else None
    allowed = rec["verdict"] == "FORWARDED"
    where = _ref_text(ref) if ref is not None else "no L7 rule"
    index = int(rec.get("rule_index", -1))
    if allowed and ref is not None:
        rule = f"{where} http[{index}]" if index >= 0 else where
        text = f"allowed by {rule}"
    elif allowed:
        text = "allowed: no HTTP rule restricts this connection"
        rule = None
    else:
        rule = where
        text = f"denied: no HTTP rule of {where} matches {rec['method']} {rec['url']}"
    out: dict[str, Any] = {"direction": direction,
                           "decision": "FORWARDED" if allowed else "DROPPED",
                           "rule": rule, "text": text}
    if ref is not None:
        out["policy"] = _policy(ref)
    return out


def _status_matches(code: int, value: str) -> bool:
    """Hubble's ``--http-status``: ``404``, or ``4+`` for every 4xx."""
    if value.endswith("+"):
        return str(code).startswith(value[:-1])
    return str(code) == value


def matches_http(field: str, values: list[str], flow: dict[str, Any]) -> bool:
    """Whether an L7 flow passes an ``http-*`` predicate (any value)."""
    http = (flow.get("l7") or {}).get("http")
    if http is None:
        return False
    url = str(http.get("url", ""))
    path = "/" + url.split("://", 1)[-1].partition("/")[2] if "://" in url else url
    for v in values:
        if field == "http-method" and str(http.get("method", "")).upper() == v.upper():
            return True
        if field == "http-status" and "code" in http and _status_matches(int(http["code"]), v):
            return True
        if field == "http-path" and re.search(v, path):
            return True
        if field == "http-url" and re.search(v, url):
            return True
    return False
