"""DNS flows as Hubble shows them: compact text, filters and the ``dns`` metrics.

The DNS proxy reports one L7 record per query and per answer as a flow dict
(``Type: L7``, ``l7 {type, latency_ns, dns {query, ips, ttl, cnames, rcode, qtypes,
rrtypes}}``; see ``villi.dnsproxy.records``). This module is everything the observer
does with them, kept apart from the numpy path of datapath records:

* :func:`summary` and :func:`type_text` give hubble's compact line, e.g.
  ``dns-request FORWARDED (DNS Query api.example.com. A)`` and
  ``dns-response FORWARDED (DNS Answer "198.51.100.10" TTL: 30 (Proxy api.example.com. A))``;
* :func:`matches` evaluates ``--fqdn`` and ``--protocol dns`` on a flow dict;
* :func:`dns_flow` completes a record from the proxy (endpoints, node, summary);
* :class:`DNSMetrics` counts ``hubble_dns_queries_total``, ``hubble_dns_responses_total``
  and ``hubble_dns_response_types_total`` with Hubble's labels.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from villi.observer.flow import _endpoint
from villi.observer.l7flow import MESSAGE_TYPE_ACCESSLOG

#: Hubble's rcode label values (pkg/hubble/metrics/dns).
RCODE_LABELS = {0: "No Error", 1: "Format Error", 2: "Server Failure",
                3: "Non-Existent Domain", 4: "Not Implemented", 5: "Query Refused"}


def is_dns(flow: dict[str, Any]) -> bool:
    return flow.get("Type") == "L7" and "dns" in (flow.get("l7") or {})


def type_text(flow: dict[str, Any]) -> str:
    """``dns-request`` / ``dns-response`` (the compact line's event type)."""
    kind = (flow.get("l7") or {}).get("type", "REQUEST")
    return "dns-response" if kind == "RESPONSE" else "dns-request"


def summary(flow: dict[str, Any]) -> str:
    l7 = flow.get("l7") or {}
    dns = l7.get("dns") or {}
    query, qtypes = dns.get("query", ""), ",".join(dns.get("qtypes") or [])
    if l7.get("type") != "RESPONSE":
        return f"DNS Query {query} {qtypes}".rstrip()
    ips = dns.get("ips") or []
    if ips or dns.get("cnames"):
        answers = ",".join(f'"{a}"' for a in [*dns.get("cnames", []), *ips])
        return f"DNS Answer {answers} TTL: {dns.get('ttl', 0)} (Proxy {query} {qtypes})"
    rcode = int(dns.get("rcode", 0))
    return f"DNS Answer RCode: {RCODE_LABELS.get(rcode, rcode)} (Proxy {query} {qtypes})"


def with_summary(flow: dict[str, Any]) -> dict[str, Any]:
    """The flow with its ``Summary`` (what the compact and table forms print)."""
    if is_dns(flow) and not flow.get("Summary"):
        flow["Summary"] = summary(flow)
    return flow


def fqdn_matches(flow: dict[str, Any], pattern: str) -> bool:
    """Hubble's ``--fqdn``: the DNS query, or a source/destination name, matches
    (``*`` wildcards; trailing dot optional)."""
    want = pattern.lower().rstrip(".")
    names = [n.lower().rstrip(".") for n in
             [*(flow.get("source_names") or []), *(flow.get("destination_names") or [])]]
    if is_dns(flow):
        names.append(str(flow["l7"]["dns"].get("query", "")).lower().rstrip("."))
    return any(fnmatch.fnmatchcase(n, want) for n in names)


def dns_flow(rec: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """The Hubble flow of one DNS record from villi-proxy (``{"kind": "dns", "flow":
    {...}}``; the proxy filled the flow and each side's identity): pod names, labels,
    node and the compact summary are the observer's to add."""
    flow = dict(rec["flow"])
    for side in ("source", "destination"):
        ip = flow["IP"][side]
        identity = int((flow.get(side) or {}).get("identity", 0))
        flow[side] = _endpoint(ctx, ip, identity)
    flow["node_name"] = ctx.node_name()
    flow["event_type"] = {"type": MESSAGE_TYPE_ACCESSLOG}
    return with_summary(flow)


def add_destination_names(flow: dict[str, Any],
                          names_of: Callable[[str], list[str]] | None) -> dict[str, Any]:
    """Flows to an IP some pod resolved carry ``destination_names`` (from the DNS cache)."""
    if names_of is not None and not flow.get("destination_names"):
        names = names_of(flow.get("IP", {}).get("destination", ""))
        if names:
            flow["destination_names"] = names
    return flow


class DNSMetrics:
    """Hubble's ``dns`` metrics (labels rcode, qtypes, ips_returned; type, qtypes)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.queries = Counter("hubble_dns_queries_total", "Number of DNS queries observed",
                               ["rcode", "qtypes", "ips_returned"], registry=r)
        self.responses = Counter("hubble_dns_responses_total",
                                 "Number of DNS responses observed",
                                 ["rcode", "qtypes", "ips_returned"], registry=r)
        self.response_types = Counter("hubble_dns_response_types_total",
                                      "Number of DNS response types",
                                      ["type", "qtypes"], registry=r)

    def observe(self, flow: dict[str, Any]) -> None:
        if not is_dns(flow):
            return
        l7 = flow["l7"]
        dns = l7["dns"]
        qtypes = ",".join(dns.get("qtypes") or [])
        if l7.get("type") != "RESPONSE":
            self.queries.labels("", qtypes, "0").inc()
            return
        rcode = RCODE_LABELS.get(int(dns.get("rcode", 0)), str(dns.get("rcode", 0)))
        self.responses.labels(rcode, qtypes, str(len(dns.get("ips") or []))).inc()
        for rrtype in dns.get("rrtypes") or []:
            self.response_types.labels(rrtype, qtypes).inc()
