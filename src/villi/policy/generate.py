"""From observed flows to least-privilege CiliumNetworkPolicies (``villi policy generate``).

Input: Hubble-shaped flows (``villi observe -o json``/``jsonpb`` lines, bare flow
objects, or a JSON array of either). Output: one CiliumNetworkPolicy per workload — a
workload is the pods of one namespace sharing an ``app`` label, else one pod — with an
ingress and an egress section. Applied to the same workloads, the policies allow every
connection that was observed and nothing else:

* each observed connection (a non-reply L3/L4 flow with an accepted verdict) becomes an
  egress rule of its source workload and an ingress rule of its destination workload,
  on the observed destination port and protocol (ICMP: an ``icmps`` rule of the type);
* a workload with no observed connection in a direction gets ``ingress: [{}]`` /
  ``egress: [{}]`` — default deny in that direction, as Cilium documents it;
* reply flows are ignored (conntrack lets replies through); so are L7 records (their
  connection has its own L3/L4 flow);
* peers are selected by their ``app`` label, else by all their pod labels, plus the
  namespace when it differs from the policy's; reserved identities become entities
  (``host``, ``remote-node``, ``kube-apiserver``, ``health``, ``ingress``, ``init``,
  ``unmanaged``);
* ``world`` peers become ``toCIDR``/``fromCIDR`` with the observed addresses as /32s
  (least privilege: an unobserved external address stays blocked) — or ``toEntities:
  [world]`` with ``world="entity"``, for workloads that talk to changing addresses.

Anything that cannot be expressed exactly is reported in :attr:`Generated.warnings`
(a pod with no labels cannot be selected; a peer without labels is selected by its
namespace only). The module is pure: parsing and generation, no I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

__all__ = ["DEFAULT_VERDICTS", "FlowParseError", "Generated", "generate", "parse_flows",
           "to_yaml"]

#: Verdicts whose flows are connections that happened (AUDIT: would have been dropped
#: by a policy in audit mode, but passed).
DEFAULT_VERDICTS = ("FORWARDED", "REDIRECTED", "AUDIT")
VERDICTS = ("FORWARDED", "REDIRECTED", "AUDIT", "DROPPED", "ERROR")
#: Reserved identity label → Cilium entity, in the order a label set is classified.
ENTITIES = (("kube-apiserver", "kube-apiserver"), ("host", "host"),
            ("remote-node", "remote-node"), ("health", "health"), ("ingress", "ingress"),
            ("init", "init"), ("unmanaged", "unmanaged"), ("world", "world"))
_NAMESPACE_KEY = "io.kubernetes.pod.namespace"
#: Labels the agent derives (namespace, namespace labels, cluster): never selectors.
_DERIVED = ("io.kubernetes.pod.namespace", "io.cilium.k8s.namespace.labels.",
            "io.cilium.k8s.policy.cluster")
_L4 = (("TCP", "TCP"), ("UDP", "UDP"), ("SCTP", "SCTP"))


class FlowParseError(ValueError):
    """Input that is not flows; the message names the line."""


def parse_flows(text: str, source: str = "<flows>") -> list[dict[str, Any]]:
    """Flows from JSON lines (``{"flow": {...}}`` or bare flows) or a JSON array."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(stripped)
        except ValueError as exc:
            raise FlowParseError(f"{source}: not a JSON array of flows: {exc}") from None
        if not isinstance(items, list):
            raise FlowParseError(f"{source}: expected a JSON array of flows")
        unwrapped = (_unwrap(item, source, i + 1) for i, item in enumerate(items))
        return [flow for flow in unwrapped if flow is not None]
    flows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise FlowParseError(f"{source}:{lineno}: not JSON ({exc}); expected one flow "
                                 "per line, as `villi observe -o json` prints") from None
        flow = _unwrap(item, source, lineno)
        if flow is not None:
            flows.append(flow)
    return flows


def _unwrap(item: Any, source: str, where: int) -> dict[str, Any] | None:
    if not isinstance(item, dict):
        raise FlowParseError(f"{source}:{where}: a flow must be a JSON object")
    if "flow" in item:
        item = item["flow"]
    elif "node_status" in item or "lost_events" in item:
        return None   # relay/hubble stream records that are not flows
    if not isinstance(item, dict) or not ("source" in item or "destination" in item
                                          or "IP" in item):
        raise FlowParseError(f"{source}:{where}: not a flow (no source/destination/IP)")
    return item


@dataclass(frozen=True, slots=True, order=True)
class _Peer:
    """A connection's other side, as a policy names it."""

    kind: str                                   # endpoint | entity | cidr
    value: str                                  # selector JSON, entity name or prefix


@dataclass(frozen=True, slots=True, order=True)
class _Port:
    protocol: str                               # TCP | UDP | SCTP | ICMP
    port: int


@dataclass
class _Workload:
    namespace: str
    key: str
    selector: dict[str, str]
    pods: set[str] = field(default_factory=set)
    ingress: dict[_Peer, set[_Port]] = field(default_factory=dict)
    egress: dict[_Peer, set[_Port]] = field(default_factory=dict)


@dataclass
class Generated:
    policies: list[dict[str, Any]]
    warnings: list[str]
    connections: int          # distinct observed connections used
    skipped: dict[str, int]   # reason → flows skipped


def _k8s_labels(side: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for label in side.get("labels") or []:
        source, _, rest = str(label).partition(":")
        if source != "k8s" or "=" not in rest:
            continue
        key, _, value = rest.partition("=")
        out[key] = value
    return out


def _reserved(side: Mapping[str, Any]) -> set[str]:
    return {str(lbl)[len("reserved:"):].split("=")[0] for lbl in side.get("labels") or []
            if str(lbl).startswith("reserved:")}


def _selectable(labels: Mapping[str, str]) -> dict[str, str]:
    """The labels that select a workload: ``app`` alone, else every pod label."""
    if "app" in labels:
        return {"app": labels["app"]}
    return {k: v for k, v in sorted(labels.items()) if not k.startswith(_DERIVED)}


def _is_pod(side: Mapping[str, Any]) -> bool:
    return bool(side.get("pod_name")) and bool(side.get("namespace"))


def _workload_key(side: Mapping[str, Any]) -> str:
    labels = _k8s_labels(side)
    return labels.get("app") or str(side["pod_name"])


def _port(flow: Mapping[str, Any]) -> _Port | None:
    l4 = flow.get("l4") or {}
    for name, proto in _L4:
        if name in l4:
            return _Port(proto, int(l4[name].get("destination_port", 0)))
    if "ICMPv4" in l4:
        return _Port("ICMP", int(l4["ICMPv4"].get("type", 0)))
    return None


def _five_tuple(flow: Mapping[str, Any]) -> tuple[Any, ...]:
    ips = flow.get("IP") or {}
    l4 = flow.get("l4") or {}
    ports: Mapping[str, Any] = next(iter(l4.values()), {}) if l4 else {}
    return (ips.get("source"), ips.get("destination"), next(iter(l4), None),
            ports.get("source_port"), ports.get("destination_port"), ports.get("type"))


def _dns_name(text: str) -> str:
    name = re.sub(r"[^a-z0-9.-]+", "-", text.lower()).strip("-.")
    return name[:253] or "workload"


class _Builder:
    def __init__(self, namespace: str | None, world: str) -> None:
        self.namespace = namespace
        self.world = world
        self.workloads: dict[tuple[str, str], _Workload] = {}
        self.warnings: dict[str, None] = {}
        self.skipped: dict[str, int] = {}
        self.connections: set[tuple[Any, ...]] = set()

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def warn(self, text: str) -> None:
        self.warnings[text] = None

    def workload(self, side: Mapping[str, Any]) -> _Workload | None:
        ns = str(side["namespace"])
        if self.namespace is not None and ns != self.namespace:
            return None
        key = _workload_key(side)
        wl = self.workloads.get((ns, key))
        if wl is None:
            selector = _selectable(_k8s_labels(side))
            if not selector:
                self.warn(f"pod {ns}/{side['pod_name']} has no labels: no policy can "
                          "select it alone, none was generated for it (give it an app "
                          "label)")
                return None
            wl = self.workloads[(ns, key)] = _Workload(ns, key, selector)
        wl.pods.add(str(side["pod_name"]))
        return wl

    def peer(self, side: Mapping[str, Any], ip: str, policy_ns: str) -> _Peer | None:
        reserved = _reserved(side)
        if _is_pod(side) and not reserved:
            labels = _k8s_labels(side)
            selector = _selectable(labels)
            ns = str(side["namespace"])
            if not selector:
                self.warn(f"peer pod {ns}/{side['pod_name']} has no labels: it is selected "
                          f"by its namespace {ns}, which allows every pod there")
            if ns != policy_ns or not selector:
                selector = {**selector, _NAMESPACE_KEY: ns}
            return _Peer("endpoint", json.dumps(selector, sort_keys=True))
        for label, entity in ENTITIES:
            if label in reserved:
                if entity == "world" and self.world == "cidr" and ip:
                    return _Peer("cidr", f"{ip}/32")
                return _Peer("entity", entity)
        if _k8s_labels(side):   # a pod of another cluster or one the reader did not know
            labels = _k8s_labels(side)
            ns = labels.get(_NAMESPACE_KEY, "")
            selector = _selectable(labels)
            if ns and ns != policy_ns:
                selector[_NAMESPACE_KEY] = ns
            if selector:
                return _Peer("endpoint", json.dumps(selector, sort_keys=True))
        self.warn(f"a peer at {ip or 'an unknown address'} has no identity labels "
                  f"(identity {side.get('identity', 0)}): its flows were skipped")
        return None

    def add(self, flow: Mapping[str, Any]) -> None:
        src, dst = flow.get("source") or {}, flow.get("destination") or {}
        ips = flow.get("IP") or {}
        port = _port(flow)
        if port is None:
            self.skip("not TCP, UDP, SCTP or ICMPv4")
            return
        if port.protocol == "ICMP" and port.port != 8:
            self.skip("ICMP other than echo request")
            return
        conn = (json.dumps(src.get("labels")), src.get("pod_name"), ips.get("source"),
                json.dumps(dst.get("labels")), dst.get("pod_name"), ips.get("destination"),
                port)
        if conn in self.connections:
            return
        self.connections.add(conn)
        if _is_pod(src) and not _reserved(src):
            wl = self.workload(src)
            if wl is not None:
                peer = self.peer(dst, str(ips.get("destination", "")), wl.namespace)
                if peer is not None:
                    wl.egress.setdefault(peer, set()).add(port)
        if _is_pod(dst) and not _reserved(dst):
            wl = self.workload(dst)
            if wl is not None:
                peer = self.peer(src, str(ips.get("source", "")), wl.namespace)
                if peer is not None:
                    wl.ingress.setdefault(peer, set()).add(port)


def _rules(peers: Mapping[_Peer, set[_Port]], direction: str) -> list[dict[str, Any]]:
    prefix = "from" if direction == "ingress" else "to"
    rules: list[dict[str, Any]] = []
    for peer in sorted(peers):
        if peer.kind == "endpoint":
            l3: dict[str, Any] = {f"{prefix}Endpoints": [{"matchLabels": json.loads(peer.value)}]}
        elif peer.kind == "entity":
            l3 = {f"{prefix}Entities": [peer.value]}
        else:
            l3 = {f"{prefix}CIDR": [peer.value]}
        ports = sorted(peers[peer])
        l4 = [p for p in ports if p.protocol != "ICMP"]
        icmp = [p for p in ports if p.protocol == "ICMP"]
        if l4:
            rules.append({**l3, "toPorts": [{"ports": [
                {"port": str(p.port), "protocol": p.protocol} for p in l4]}]})
        if icmp:
            rules.append({**l3, "icmps": [{"fields": [{"type": p.port, "family": "IPv4"}
                                                      for p in icmp]}]})
    return rules or [{}]


def generate(flows: Iterable[Mapping[str, Any]], *, namespace: str | None = None,
             verdicts: Sequence[str] = DEFAULT_VERDICTS, world: str = "cidr") -> Generated:
    """Least-privilege CiliumNetworkPolicies (as dicts) from ``flows``."""
    wanted = {v.upper() for v in verdicts}
    unknown = wanted - set(VERDICTS)
    if unknown:
        raise ValueError(f"unknown verdict(s) {', '.join(sorted(unknown))} (valid: "
                         f"{', '.join(VERDICTS)})")
    if world not in ("cidr", "entity"):
        raise ValueError(f"world must be cidr or entity, not {world!r}")
    builder = _Builder(namespace, world)
    flows = list(flows)
    # A connection forwarded at the source's egress but dropped at the destination's
    # ingress did not happen: one dropped packet disqualifies its whole 5-tuple.
    dropped = set() if "DROPPED" in wanted else {
        _five_tuple(f) for f in flows
        if str(f.get("verdict", "")).upper() == "DROPPED" and not f.get("is_reply")}
    for flow in flows:
        if flow.get("is_reply"):
            builder.skip("reply")
            continue
        if str(flow.get("verdict", "")).upper() not in wanted:
            builder.skip(f"verdict {flow.get('verdict', '?')}")
            continue
        if flow.get("Type", "L3_L4") != "L3_L4":
            builder.skip(f"type {flow.get('Type')}")
            continue
        if dropped and _five_tuple(flow) in dropped:
            builder.skip("connection dropped elsewhere")
            continue
        builder.add(flow)
    policies = []
    for (ns, key), wl in sorted(builder.workloads.items()):
        policies.append({
            "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": _dns_name(key), "namespace": ns,
                         "labels": {"app.kubernetes.io/managed-by": "villi-policy-generate"}},
            "spec": {"endpointSelector": {"matchLabels": dict(wl.selector)},
                     "ingress": _rules(wl.ingress, "ingress"),
                     "egress": _rules(wl.egress, "egress")},
        })
    return Generated(policies, list(builder.warnings), len(builder.connections),
                     dict(builder.skipped))


def to_yaml(generated: Generated) -> str:
    """The policies as one multi-document YAML stream (keys in a readable order)."""
    docs = []
    for policy in generated.policies:
        docs.append(yaml.safe_dump(policy, sort_keys=False, default_flow_style=False))
    return "---\n".join(docs)
