"""Text forms of flows, as ``hubble observe`` prints them (compact, table, dict)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from villi.observer import dns
from villi.observer.vocab import (
    EVENT_POLICY_VERDICT,
    MATCH_TYPE_NAMES,
    POLICY_VERDICT_WORDS,
    RESERVED_NAMES,
)


def _port(flow: dict[str, Any], side: str) -> int | None:
    l4 = flow.get("l4") or {}
    for proto in ("TCP", "UDP", "SCTP"):
        if proto in l4:
            return l4[proto].get(f"{side}_port")
    return None


def _endpoint(flow: dict[str, Any], side: str, numeric: bool = False) -> str:
    ep = flow.get(side) or {}
    ip = flow["IP"]["source" if side == "source" else "destination"]
    port = _port(flow, "source" if side == "source" else "destination")
    if ep.get("pod_name") and not numeric:
        name = f"{ep.get('namespace', '')}/{ep['pod_name']}"
    else:
        name = ip
    if side == "destination" and flow.get("destination_service") and not numeric:
        svc = flow["destination_service"]
        name = f"{svc['namespace']}/{svc['name']}" if not ep.get("pod_name") else name
    return f"{name}:{port}" if port else name


def _identity(flow: dict[str, Any], side: str) -> str:
    ident = int((flow.get(side) or {}).get("identity", 0))
    if ident in RESERVED_NAMES:
        return f"({RESERVED_NAMES[ident]})"
    return f"(ID:{ident})"


def timestamp(flow: dict[str, Any]) -> str:
    t = flow["time"]
    dt = datetime.strptime(t[:26], "%Y-%m-%dT%H:%M:%S.%f")
    return dt.strftime("%b %e %H:%M:%S.") + f"{dt.microsecond // 1000:03d}"


def _type(flow: dict[str, Any]) -> str:
    if dns.is_dns(flow):
        return dns.type_text(flow)   # dns-request / dns-response, even when DROPPED
    if flow.get("Type") == "L7":
        return "http-" + str(flow["l7"]["type"]).lower()
    if (flow.get("event_type") or {}).get("type") == EVENT_POLICY_VERDICT:
        match = MATCH_TYPE_NAMES.get(int(flow.get("policy_match_type", 0)), "none")
        return f"policy-verdict:{match} {flow.get('traffic_direction', '')}"
    if flow["verdict"] == "DROPPED":
        from villi.observer.vocab import drop_reason_text

        return drop_reason_text(int(flow.get("drop_reason", 0)))
    return flow.get("trace_observation_point", "").lower().replace("_", "-")


def _verdict(flow: dict[str, Any]) -> str:
    """The verdict word: hubble prints ALLOWED/DENIED/AUDITED for policy verdicts."""
    if (flow.get("event_type") or {}).get("type") == EVENT_POLICY_VERDICT:
        return POLICY_VERDICT_WORDS.get(flow["verdict"], flow["verdict"])
    return str(flow["verdict"])


def compact(flow: dict[str, Any], *, node: bool = False, explain: bool = False,
            numeric: bool = False) -> str:
    """One line, as ``hubble observe`` prints it::

        Nov 25 09:00:01.123: default/a:40000 (ID:256) -> default/b:80 (ID:257)
            to-endpoint FORWARDED (TCP Flags: SYN)        (on one line)
    """
    src = f"{_endpoint(flow, 'source', numeric)} {_identity(flow, 'source')}"
    dst = f"{_endpoint(flow, 'destination', numeric)} {_identity(flow, 'destination')}"
    if flow.get("is_reply"):
        left, arrow, right = dst, "<-", src
    else:
        left, arrow, right = src, "->", dst
    where = f" [{flow.get('node_name', '')}]" if node else ""
    dns.with_summary(flow)
    line = (f"{timestamp(flow)}{where}: {left} {arrow} {right} {_type(flow)} "
            f"{_verdict(flow)} ({flow.get('Summary', '')})")
    if explain:
        ex = (flow.get("villi") or {}).get("explain")
        if ex:
            line += f"\n    ↳ {ex['text']}"
    return line


TABLE_HEADERS = ["TIMESTAMP", "NODE", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"]


def table_row(flow: dict[str, Any]) -> list[str]:
    return [timestamp(flow), flow.get("node_name", ""), _endpoint(flow, "source"),
            _endpoint(flow, "destination"), _type(flow), _verdict(flow),
            flow.get("Summary", "")]
