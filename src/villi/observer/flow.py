"""One raw flow record → a Hubble-shaped flow dict (``flow.Flow`` JSON field names).

Only records a reader asked for come through here; the ingest path never does. Names
(pods, labels, policies) are looked up at read time from the flow context, which keeps
pods that went away for a while so that recent flows still name them.
"""

from __future__ import annotations

import socket
import struct
import uuid
from datetime import UTC, datetime
from typing import Any

from villi.observer.context import FlowContext, PodInfo, PolicyRef
from villi.observer.vocab import (
    DIRECTIONS,
    EVENT_POLICY_VERDICT,
    EVENT_TYPES,
    ICMP_TYPES,
    OBS_POINTS,
    PROTOCOLS,
    RESERVED_NAMES,
    TCP_FLAGS,
    TRACE_REASONS,
    drop_reason_name,
    drop_reason_text,
)

EVF_IS_REPLY = 0x01
EVF_TO_PROXY = 0x04  # steered to the L7 proxy: verdict REDIRECTED


def ip_str(raw: int) -> str:
    """An address as stored by the datapath (network order in memory) → dotted quad."""
    return socket.inet_ntoa(struct.pack("<I", int(raw) & 0xFFFFFFFF))


def iso_time(wall_ns: int) -> str:
    secs, ns = divmod(int(wall_ns), 1_000_000_000)
    return datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{ns:09d}Z"


def _endpoint(ctx: FlowContext, ip: str, identity: int) -> dict[str, Any]:
    pod: PodInfo | None = ctx.pod_of(ip)
    labels = ctx.identity_labels(identity)
    if not labels and identity in RESERVED_NAMES:
        labels = [f"reserved:{RESERVED_NAMES[identity]}"]
    ep: dict[str, Any] = {"identity": identity, "labels": labels}
    if pod is not None:
        ep.update(ID=pod.endpoint_id, namespace=pod.namespace, pod_name=pod.name)
    return ep


def _policy(ref: PolicyRef | None) -> list[dict[str, Any]]:
    if ref is None:
        return []
    return [{"name": ref.name, "namespace": ref.namespace or "", "kind": ref.kind,
             "labels": [], "revision": 0}]


def _l4(rec: Any) -> tuple[dict[str, Any], str]:
    proto = int(rec["protocol"])
    sport, dport = int(rec["sport"]), int(rec["dport"])
    if proto == 6:
        flags = {name: True for name, bit in TCP_FLAGS if int(rec["tcp_flags"]) & bit}
        summary = "TCP Flags: " + ", ".join(flags) if flags else "TCP"
        return ({"TCP": {"source_port": sport, "destination_port": dport, "flags": flags}},
                summary)
    if proto == 17:
        return {"UDP": {"source_port": sport, "destination_port": dport}}, "UDP"
    if proto == 132:
        return {"SCTP": {"source_port": sport, "destination_port": dport}}, "SCTP"
    if proto == 1:
        icmp_type, code = int(rec["icmp_type"]), int(rec["icmp_code"])
        return ({"ICMPv4": {"type": icmp_type, "code": code}},
                f"ICMPv4 {ICMP_TYPES.get(icmp_type, icmp_type)}")
    return {}, PROTOCOLS.get(proto, f"proto {proto}")


def audit_reason(rec: Any) -> int:
    """The drop reason audit mode waived for this record (0: none)."""
    names = getattr(getattr(rec, "dtype", None), "names", None)
    if names is not None and "audit_reason" not in names:
        return 0
    return int(rec["audit_reason"])


def verdict_of(rec: Any) -> str:
    """Hubble's verdict of a record: DROPPED, AUDIT, REDIRECTED or FORWARDED."""
    if int(rec["drop_reason"]):
        return "DROPPED"
    if audit_reason(rec):
        return "AUDIT"
    return "REDIRECTED" if int(rec["flags"]) & EVF_TO_PROXY else "FORWARDED"


def explain(rec: Any, ctx: FlowContext) -> dict[str, Any]:
    """Which side's policy decided the flow, and which rule (villi extension)."""
    reason = int(rec["drop_reason"])
    audited = audit_reason(rec)
    direction = DIRECTIONS.get(int(rec["direction"]), "UNKNOWN")
    ref = ctx.policy_of(int(rec["cookie"])) if int(rec["cookie"]) else None
    rule = None
    if ref is not None:
        rule = {"kind": ref.kind, "namespace": ref.namespace, "name": ref.name,
                "section": f"{ref.direction}[{ref.rule_index}]"}
    if audited:
        would = (f"the {direction.lower()} deny rule "
                 f"{_ref_text(ref) if ref else '(unknown rule)'}" if audited == 181 else
                 f"{direction.lower()} default deny (no rule allows this identity/port)"
                 if audited == 133 else drop_reason_text(audited))
        return {"direction": direction, "decision": "AUDIT", "rule": rule,
                "text": f"audit mode: forwarded, would be dropped by {would}"}
    if reason == 181:
        text = (f"denied by {direction.lower()} deny rule "
                f"{_ref_text(ref) if ref else '(unknown rule)'}")
    elif reason == 133:
        text = (f"{direction.lower()} policy of the "
                f"{'destination' if direction == 'INGRESS' else 'source'} endpoint is "
                "enforced (default deny) and no rule allows this identity/port")
    elif reason:
        text = f"dropped by the datapath: {drop_reason_text(reason)}"
    elif int(rec["ct_state"]) == 2:
        text = "reply of an allowed connection (connection tracking, no policy lookup)"
    elif ref is not None:
        text = f"allowed by {direction.lower()} rule {_ref_text(ref)}"
    else:
        text = f"allowed: no {direction.lower()} policy selects the endpoint"
    return {"direction": direction, "decision": "DROPPED" if reason else "FORWARDED",
            "rule": rule, "text": text}


def _ref_text(ref: PolicyRef) -> str:
    where = f"{ref.namespace}/" if ref.namespace else ""
    return f"{ref.kind} {where}{ref.name} {ref.direction}[{ref.rule_index}]"


UUID_NAMESPACE = uuid.UUID("6f1c6a4e-3b5e-4c1e-9a57-76696c6c6900")


def _identify(flow: dict[str, Any], rec: Any, ctx: FlowContext) -> None:
    """Hubble's uuid, interface name, cluster name and node labels.

    The uuid is derived from the node and the raw record (which holds the timestamp), so
    every read of the same flow — ring, export, relay — carries the same uuid. Contexts
    that know more (the agent's) provide ``interface_name``, ``cluster_name`` and
    ``node_labels``; other contexts simply leave those fields out.
    """
    raw = rec.tobytes() if hasattr(rec, "tobytes") else repr(rec).encode()
    flow["uuid"] = str(uuid.uuid5(UUID_NAMESPACE, ctx.node_name() + ":" + raw.hex()))
    ifname = getattr(ctx, "interface_name", None)
    if ifname is not None:
        name = ifname(int(rec["ifindex"]))
        if name:
            flow["interface"]["name"] = name
    cluster = getattr(ctx, "cluster_name", None)
    if cluster is not None:
        for side in ("source", "destination"):
            flow[side]["cluster_name"] = cluster(int(flow[side].get("identity", 0)))
    labels = getattr(ctx, "node_labels", None)
    if labels is not None:
        flow["node_labels"] = labels()


def to_flow(rec: Any, boot_offset_ns: int, ctx: FlowContext) -> dict[str, Any]:
    """The Hubble JSON of one record."""
    src, dst = ip_str(rec["src_ip"]), ip_str(rec["dst_ip"])
    src_id, dst_id = int(rec["src_identity"]), int(rec["dst_identity"])
    reason = int(rec["drop_reason"])
    audited = audit_reason(rec)
    ev_type = int(rec["event_type"])
    direction = DIRECTIONS.get(int(rec["direction"]), "TRAFFIC_DIRECTION_UNKNOWN")
    is_reply = bool(int(rec["flags"]) & EVF_IS_REPLY)
    l4, summary = _l4(rec)
    wall = int(rec["ts_ns"]) + boot_offset_ns
    flow: dict[str, Any] = {
        "time": iso_time(wall),
        "verdict": verdict_of(rec),
        "IP": {"source": src, "destination": dst, "ipVersion": "IPv4"},
        "l4": l4,
        "source": _endpoint(ctx, src, src_id),
        "destination": _endpoint(ctx, dst, dst_id),
        "Type": "L3_L4",
        "node_name": ctx.node_name(),
        "event_type": {"type": ev_type,
                       "sub_type": reason if ev_type == 1 else int(rec["obs_point"])},
        "traffic_direction": direction,
        "is_reply": is_reply,
        "policy_match_type": int(rec["match_type"]),
        "interface": {"index": int(rec["ifindex"])},
        "Summary": summary,
    }
    src_pod, dst_pod = ctx.pod_of(src), ctx.pod_of(dst)
    if src_pod is not None and src_pod.mac and direction == "EGRESS":
        flow["ethernet"] = {"source": src_pod.mac, "destination": src_pod.host_mac}
    elif dst_pod is not None and dst_pod.mac:
        flow["ethernet"] = {"source": dst_pod.host_mac, "destination": dst_pod.mac}
    if reason or audited:   # an AUDIT flow keeps the reason policy would have dropped it for
        flow["drop_reason"] = reason or audited
        flow["drop_reason_desc"] = drop_reason_name(reason or audited)
    if ev_type == EVENT_POLICY_VERDICT:
        flow["event_type"]["sub_type"] = 0
    elif not reason:
        flow["trace_observation_point"] = OBS_POINTS.get(int(rec["obs_point"]), "UNKNOWN_POINT")
        flow["trace_reason"] = TRACE_REASONS.get(int(rec["ct_state"]), "TRACE_REASON_UNKNOWN")
    service = ctx.service_of(dst, int(rec["dport"]))
    if service is not None:
        flow["destination_service"] = {"name": service[1], "namespace": service[0]}
    service = ctx.service_of(src, int(rec["sport"]))
    if service is not None:
        flow["source_service"] = {"name": service[1], "namespace": service[0]}
    _identify(flow, rec, ctx)
    names_of = getattr(ctx, "names_of", None)   # DNS names the node's pods resolved
    if names_of is not None:
        for side, ip in (("source_names", src), ("destination_names", dst)):
            if names := names_of(ip):
                flow[side] = names
    cookie = int(rec["cookie"])
    if cookie:
        ref = ctx.policy_of(cookie)
        key = ("ingress" if direction == "INGRESS" else "egress") + \
              ("_denied_by" if reason or audited else "_allowed_by")
        if ref is not None:
            flow[key] = _policy(ref)
    flow["villi"] = {"event": EVENT_TYPES.get(ev_type, str(ev_type)),
                     "explain": explain(rec, ctx)}
    return flow
