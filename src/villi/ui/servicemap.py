"""Flows → a service map: a card per workload, an arrow per (source, destination,
port, protocol) with its verdict counts and, for L7 flows, methods and status classes.

A workload is named by its ``app`` label (``k8s:app=…``) and namespace, or by its pod
when it has none; when the flows come from several clusters (a relay over a
ClusterMesh), also by its cluster, so ``app=x`` of c1 and of c2 are two cards.
Addresses outside the cluster become the reserved cards ``world`` and ``host``
(Hubble UI's vocabulary). An arrow is "forwarded", "dropped", "audit" or
"mixed" (both forwarded and dropped flows seen), which the page draws green, red,
orange and dashed. Replies are left out: they belong to the arrow of their request.
A packet that crosses nodes is seen twice (leaving its node "to-stack", then arriving
"to-endpoint" or dropped); only the second decides the arrow's verdict, so a connection
dropped by the destination's policy is drawn dropped, not mixed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from villi.identity.labels import CLUSTER_LABEL

RESERVED = ("world", "host", "remote-node", "health", "kube-apiserver", "ingress",
            "unmanaged", "init")


@dataclass
class Card:
    id: str
    name: str
    namespace: str
    kind: str                       # "workload" or "reserved"
    cluster: str = ""               # set on workload cards of a multi-cluster map
    pods: set[str] = field(default_factory=set)
    labels: set[str] = field(default_factory=set)
    http: set[str] = field(default_factory=set)   # "METHOD path" received

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "namespace": self.namespace,
                "kind": self.kind, "cluster": self.cluster, "pods": sorted(self.pods),
                "labels": sorted(self.labels), "http": sorted(self.http)}


@dataclass
class Arrow:
    source: str
    destination: str
    port: int
    protocol: str
    verdicts: dict[str, int] = field(default_factory=dict)
    hops: dict[str, int] = field(default_factory=dict)
    methods: set[str] = field(default_factory=set)
    status_classes: set[str] = field(default_factory=set)
    policies: set[str] = field(default_factory=set)
    last_flow: dict[str, Any] = field(default_factory=dict)

    def counted(self) -> dict[str, int]:
        """Verdicts of the flows that decide (see build); hops only when nothing else."""
        return self.verdicts or self.hops

    @property
    def verdict(self) -> str:
        seen = {v for v, n in self.counted().items() if n}
        if seen == {"FORWARDED"}:
            return "forwarded"
        if seen == {"DROPPED"}:
            return "dropped"
        if seen == {"AUDIT"}:
            return "audit"
        return "mixed"

    def view(self) -> dict[str, Any]:
        return {"id": f"{self.source}->{self.destination}:{self.port}/{self.protocol}",
                "source": self.source, "destination": self.destination, "port": self.port,
                "protocol": self.protocol, "verdict": self.verdict,
                "verdicts": dict(self.counted()), "count": sum(self.counted().values()),
                "methods": sorted(self.methods), "status_classes": sorted(self.status_classes),
                "policies": sorted(self.policies), "flow": self.last_flow}


def _label(labels: list[str], key: str) -> str | None:
    for lbl in labels:
        src, _, rest = lbl.partition(":")
        k, _, v = (rest if rest else src).partition("=")
        if k == key:
            return v
    return None


def cluster_of(ep: dict[str, Any]) -> str:
    """The cluster of a flow's endpoint: Hubble's ``cluster_name``, else its label."""
    return str(ep.get("cluster_name") or
               _label([str(x) for x in ep.get("labels") or []], CLUSTER_LABEL) or "")


def card_of(ep: dict[str, Any], by_cluster: bool = False) -> Card:
    """The card an endpoint (a flow's ``source``/``destination``) belongs to; with
    ``by_cluster``, a workload's card is its cluster's (``c2/ns/app``)."""
    labels = [str(x) for x in ep.get("labels") or []]
    for lbl in labels:
        if lbl.startswith("reserved:"):
            name = lbl.split(":", 1)[1]
            if name in RESERVED and not ep.get("pod_name"):
                return Card(f"reserved:{name}", name, "", "reserved")
    ns = ep.get("namespace") or ""
    app = _label(labels, "app")
    pod = ep.get("pod_name") or ""
    if not ns and not pod:
        return Card("reserved:world", "world", "", "reserved")
    name = app or pod or f"identity {ep.get('identity', '?')}"
    cluster = cluster_of(ep) if by_cluster else ""
    card = Card(f"{cluster}/{ns}/{name}" if cluster else f"{ns}/{name}", name, ns,
                "workload", cluster)
    if pod:
        card.pods.add(pod)
    card.labels.update(x for x in labels if not x.startswith("reserved:"))
    return card


def _port_proto(flow: dict[str, Any]) -> tuple[int, str]:
    l4 = flow.get("l4") or {}
    for proto, body in l4.items():
        if isinstance(body, dict):
            return int(body.get("destination_port", 0) or 0), proto
    return 0, "IP"


def _policy_names(flow: dict[str, Any]) -> list[str]:
    out = []
    for key in ("ingress_allowed_by", "egress_allowed_by", "ingress_denied_by",
                "egress_denied_by"):
        for p in flow.get(key) or []:
            ns = p.get("namespace") or ""
            out.append(f"{p.get('kind', '')} {ns + '/' if ns else ''}{p.get('name', '')}")
    return out


def _is_hop(flow: dict[str, Any]) -> bool:
    """A forwarded flow leaving the source's node toward the stack: an intermediate
    observation, not the decision (the destination's node may still drop the packet)."""
    return flow.get("verdict") == "FORWARDED" and \
        flow.get("trace_observation_point") == "TO_STACK"


def _rank(flow: dict[str, Any]) -> int:
    """Which flow of an arrow best explains it: a drop, then a decision naming a rule,
    then any decision, then a hop."""
    if not flow:
        return -1
    if flow.get("verdict") == "DROPPED":
        return 3
    if _is_hop(flow):
        return 0
    return 2 if ((flow.get("villi") or {}).get("explain") or {}).get("rule") else 1


def build(flows: list[dict[str, Any]], namespace: str | None = None) -> dict[str, Any]:
    """The map of ``flows``; with ``namespace``, only arrows touching that namespace."""
    cards: dict[str, Card] = {}
    arrows: dict[tuple[str, str, int, str], Arrow] = {}
    clusters = {cluster_of(ep) for flow in flows
                for ep in (flow.get("source") or {}, flow.get("destination") or {})
                if ep.get("pod_name")}
    by_cluster = len(clusters - {""}) > 1
    for flow in flows:
        if flow.get("is_reply"):
            continue
        src = card_of(flow.get("source") or {}, by_cluster)
        dst = card_of(flow.get("destination") or {}, by_cluster)
        if namespace and namespace not in (src.namespace, dst.namespace):
            continue
        for c in (src, dst):
            have = cards.setdefault(c.id, c)
            if have is not c:
                have.pods |= c.pods
                have.labels |= c.labels
        port, proto = _port_proto(flow)
        key = (src.id, dst.id, port, proto)
        arrow = arrows.setdefault(key, Arrow(*key))
        verdict = str(flow.get("verdict", "VERDICT_UNKNOWN"))
        counts = arrow.hops if _is_hop(flow) else arrow.verdicts
        counts[verdict] = counts.get(verdict, 0) + 1
        arrow.policies.update(_policy_names(flow))
        http = ((flow.get("l7") or {}).get("http")) or {}
        if http.get("method"):
            arrow.methods.add(http["method"])
            path = str(http.get("url", "")).split("://", 1)[-1]
            path = "/" + path.split("/", 1)[1] if "/" in path else path
            cards[dst.id].http.add(f"{http['method']} {path}")
        if http.get("code"):
            arrow.status_classes.add(f"{str(http['code'])[0]}xx")
        if _rank(flow) > _rank(arrow.last_flow):
            arrow.last_flow = flow
    namespaces = sorted({c.namespace for c in cards.values() if c.namespace})
    return {"namespaces": namespaces, "cards": [c.view() for c in cards.values()],
            "arrows": [a.view() for a in arrows.values()]}
