"""The same filters evaluated on flow dicts (for flows read back from the export file)."""

from __future__ import annotations

import ipaddress
from typing import Any

from villi.observer import dns
from villi.observer.filters import (
    FilterSpec,
    Predicate,
    _label_matches,
    _split,
    _split_name,
    service_matches,
)
from villi.observer.l7flow import matches_http


def _pred(p: Predicate, flow: dict[str, Any]) -> bool:
    if p.field.startswith("http-"):
        ok = matches_http(p.field, p.values, flow)
        return not ok if p.negate else ok
    side, base = _split(p.field)
    sides = {"": ("source", "destination"), "from": ("source",), "to": ("destination",)}[side]
    ok = False
    for v in p.values:
        for s in sides:
            ep = flow.get(s) or {}
            ip = flow["IP"][s]
            l4: dict[str, Any] = next(iter((flow.get("l4") or {}).values()), {})
            if base == "pod":
                ns, name = _split_name(v)
                ok |= bool(ep.get("pod_name")) and (not ns or ep.get("namespace") == ns) and \
                    str(ep.get("pod_name", "")).startswith(name)
            elif base == "namespace":
                ok |= ep.get("namespace") == v
            elif base == "label":
                ok |= all(_label_matches(ep.get("labels", []), part) for part in v.split(","))
            elif base == "identity":
                ok |= int(ep.get("identity", -1)) == int(v)
            elif base == "ip":
                ok |= ipaddress.IPv4Address(ip) in ipaddress.IPv4Network(v, strict=False)
            elif base == "port":
                ok |= l4.get(f"{s}_port") == int(v)
            elif base == "service":
                svc: dict[str, str] = flow.get(f"{s}_service") or {}
                ok |= bool(svc) and service_matches((svc["namespace"], svc["name"]), [v])
        if base == "verdict":
            ok |= flow.get("verdict") == v.upper()
        elif base == "fqdn":
            ok |= dns.fqdn_matches(flow, v)
        elif base == "protocol" and v.lower() == "dns":
            ok |= dns.is_dns(flow)
        elif base == "protocol":
            if flow.get("Type") == "L7":
                ok |= v.lower() == "http" or v.lower() == "tcp"
            else:
                ok |= v.lower() in (k.lower().replace("v4", "")
                                    for k in (flow.get("l4") or {}))
        elif base == "traffic-direction":
            ok |= flow.get("traffic_direction") == v.upper()
        elif base == "drop-reason-desc":
            ok |= flow.get("drop_reason_desc") == v.upper()
        elif base == "type":
            kind = v.partition(":")[0]
            if flow.get("Type") == "L7":
                ok |= kind == "l7"
            else:
                etype = (flow.get("event_type") or {}).get("type")
                ok |= (kind == "drop" and etype == 1) or (kind == "trace" and etype == 4) or \
                      (kind == "policy-verdict" and etype == 5)
        elif base == "node":
            ok |= flow.get("node_name", "").startswith(v.rstrip("*"))
    return not ok if p.negate else ok


def flow_matches(spec: FilterSpec, flow: dict[str, Any]) -> bool:
    return all(_pred(p, flow) for p in spec.predicates)
