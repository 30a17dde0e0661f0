"""``villi policy trace``: would this connection pass, and which rule says so?

Like ``cilium-dbg policy trace``, the answer comes from the same incremental
:class:`~villi.policy.resolver.PolicyResolver` the agents run, fed with the cluster state
they follow (applied resources, identities, every pod's ipcache entry), and from
:func:`~villi.policy.mapstate.datapath_verdict`, the emulation of the kernel's two
policy-map lookups. A new connection passes when the source endpoint's egress policy and
the destination endpoint's ingress policy both allow it; each side is reported with the
rule that decided (an allow, a deny rule, or default deny and the policies that
enforce it). Replies never meet policy (conntrack), so they are not traced.

This module is pure: the CLI reads the store and hands a :class:`ClusterView` in.

Peers are written:

* ``NAMESPACE/POD`` — a pod (its identity, labels and named ports from its ipcache entry);
* ``k8s:app=web,k8s:io.kubernetes.pod.namespace=prod`` — labels of a hypothetical
  endpoint (unprefixed keys get the ``k8s`` source), traced as if it existed;
* ``world``, ``host``, ``remote-node``, ``kube-apiserver``, … (or ``reserved:world``) —
  a reserved identity (no policy of its own);
* an IPv4 address — the pod that has it, else the CIDR identity of the longest policy
  prefix containing it, else ``world``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from villi.identity.ids import IdentityID
from villi.identity.labels import (
    POD_NAMESPACE_LABEL,
    SOURCE_K8S,
    SOURCE_RESERVED,
    LabelSet,
    parse_label,
)
from villi.identity.reserved import MIN_CLUSTER_IDENTITY, RESERVED_LABELS, ReservedIdentity
from villi.policy.entry import Direction, EndpointID, Protocol
from villi.policy.mapstate import DROP_POLICY_DENIED, DROP_POLICY_DENY, datapath_verdict
from villi.policy.models import Resource
from villi.policy.resolver import Endpoint, PolicyResolver
from villi.policy.rules import CookieInfo

__all__ = ["ClusterView", "PodView", "SideResult", "TraceError", "TraceResult",
           "EndpointMode", "format_trace", "modes_from_endpoints", "parse_dport",
           "selectors_view", "trace"]

ALLOWED, DENIED, AUDITED, NOT_ENFORCED = "ALLOWED", "DENIED", "AUDITED", "NOT ENFORCED"
_PROTOCOLS = {"tcp": Protocol.TCP, "udp": Protocol.UDP, "sctp": Protocol.SCTP,
              "icmp": Protocol.ICMP}


class TraceError(ValueError):
    """A peer or port the trace cannot resolve (the message says which and why)."""


@dataclass(frozen=True, slots=True)
class PodView:
    """One pod as its ipcache entry in the store describes it."""

    namespace: str
    name: str
    ip: str
    identity: int
    node: str = ""
    endpoint_id: int = 0
    named_ports: Mapping[str, tuple[int, str]] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class EndpointMode:
    """What the endpoint's node enforces: ``enforcement`` default|always|never (Cilium's
    ``--enable-policy``), audit mode per direction (ingress, egress), the node's
    degradation switch (forwards what policy would drop, reported as AUDIT)."""

    enforcement: str = "default"
    audit: tuple[bool, bool] = (False, False)
    degraded: bool = False


@dataclass
class ClusterView:
    """What every agent follows: resources, identities and pods (plus each endpoint's
    enforcement mode as its agent reports it)."""

    resources: list[Resource]
    identities: dict[int, LabelSet]
    pods: list[PodView]
    #: namespace/pod → its endpoint's mode (absent: default enforcement, no audit)
    modes: dict[str, EndpointMode] = field(default_factory=dict)
    #: node IP → node name: a node's address is ``host`` to its own pods and
    #: ``remote-node`` to the others'
    node_ips: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Peer:
    """A resolved ``--src``/``--dst``: its identity and, for endpoints, their labels."""

    text: str
    identity: int
    labels: LabelSet
    pod: PodView | None = None
    endpoint: bool = False   # has a policy of its own (a pod or a labels spec)

    @property
    def namespace(self) -> str:
        if self.pod is not None:
            return self.pod.namespace
        return self.labels.get(POD_NAMESPACE_LABEL) or ""

    def describe(self) -> str:
        where = f" on {self.pod.node}" if self.pod is not None and self.pod.node else ""
        return f"{self.text} (ID {self.identity}{where})"


@dataclass(frozen=True, slots=True)
class SideResult:
    """One side's policy decision (egress at the source, ingress at the destination)."""

    direction: str
    endpoint: str
    enforced: bool
    decision: str
    drop_reason: int = 0
    rule: CookieInfo | None = None
    enforced_by: tuple[str, ...] = ()
    audit: bool = False
    mode: str = "default"
    degraded: bool = False

    @property
    def reason(self) -> str:
        d = self.direction.lower()
        if self.decision == NOT_ENFORCED:
            if self.mode == "never":
                return "policy enforcement is 'never' on its node"
            return f"no policy selects {self.endpoint} for {d}"
        if self.drop_reason == DROP_POLICY_DENIED and not self.enforced_by:
            return ("default deny: policy enforcement is 'always' on its node and no rule "
                    "allows this peer and port")
        if self.drop_reason == DROP_POLICY_DENY:
            return f"denied by {rule_text(self.rule)}"
        if self.drop_reason == DROP_POLICY_DENIED:
            return (f"default deny: {d} is enforced by {', '.join(self.enforced_by)} and no "
                    "rule allows this peer and port")
        if self.rule is not None:
            return f"allowed by {rule_text(self.rule)}"
        return "allowed"

    def to_json(self) -> dict[str, Any]:
        return {"direction": self.direction, "endpoint": self.endpoint,
                "enforced": self.enforced, "decision": self.decision,
                "dropReason": self.drop_reason, "audit": self.audit,
                "enforcement": self.mode, "degraded": self.degraded,
                "rule": rule_json(self.rule), "enforcedBy": list(self.enforced_by),
                "reason": self.reason}


@dataclass(frozen=True, slots=True)
class TraceResult:
    src: Peer
    dst: Peer
    protocol: str
    port: int
    egress: SideResult | None
    ingress: SideResult | None

    @property
    def verdict(self) -> str:
        sides = [s for s in (self.egress, self.ingress) if s is not None]
        if any(s.decision == DENIED for s in sides):
            return DENIED
        if any(s.decision == AUDITED for s in sides):
            return AUDITED
        return ALLOWED

    @property
    def allowed(self) -> bool:
        """The packet reaches the destination (audited packets do)."""
        return self.verdict != DENIED

    def to_json(self) -> dict[str, Any]:
        def peer(p: Peer) -> dict[str, Any]:
            return {"peer": p.text, "identity": p.identity,
                    "labels": [str(lbl) for lbl in p.labels],
                    **({"pod": p.pod.ref, "ip": p.pod.ip, "node": p.pod.node}
                       if p.pod is not None else {})}
        return {"verdict": self.verdict, "src": peer(self.src), "dst": peer(self.dst),
                "protocol": self.protocol, "port": self.port,
                "egress": self.egress.to_json() if self.egress else None,
                "ingress": self.ingress.to_json() if self.ingress else None}


def rule_text(info: CookieInfo | None) -> str:
    if info is None:
        return "(an unknown rule)"
    if info.kind == "reserved":
        return f"the implicit {info.name} rule (the node may reach its pods)"
    where = f"{info.namespace}/" if info.namespace else ""
    spec = f"specs[{info.spec_index}]." if info.spec_index else ""
    return f"{info.kind} {where}{info.name} {spec}{info.direction}[{info.rule_index}]"


def rule_json(info: CookieInfo | None) -> dict[str, Any] | None:
    if info is None:
        return None
    return {"kind": info.kind, "namespace": info.namespace, "name": info.name,
            "section": f"{info.direction}[{info.rule_index}]", "spec": info.spec_index}


def parse_dport(text: str) -> tuple[str | int, str]:
    """``80/tcp``, ``80`` (TCP), ``53/udp``, ``web/tcp`` (a named port), ``8/icmp``
    (ICMP type) → (port or port name, protocol name)."""
    port, _, proto = text.partition("/")
    proto = (proto or "tcp").lower()
    if proto not in _PROTOCOLS:
        raise TraceError(f"--dport {text!r}: protocol must be one of "
                         f"{', '.join(_PROTOCOLS)}")
    if port.isdigit():
        number = int(port)
        if not 0 <= number <= (255 if proto == "icmp" else 65535):
            raise TraceError(f"--dport {text!r}: port out of range")
        return number, proto
    if not port or proto == "icmp":
        raise TraceError(f"--dport {text!r}: give a port number or a port name, e.g. 80/tcp")
    return port.lower(), proto


def _labels_spec(text: str) -> LabelSet:
    try:
        return LabelSet(tuple(parse_label(part.strip(), SOURCE_K8S)
                              for part in text.split(",") if part.strip()))
    except ValueError as exc:
        raise TraceError(f"{text!r}: {exc}") from None


class _Tracer:
    def __init__(self, view: ClusterView) -> None:
        self.view = view
        self.resolver = PolicyResolver()
        self.identities = dict(view.identities)
        self.by_labels = {labels: i for i, labels in self.identities.items()}
        self.pods = {p.ref: p for p in view.pods}
        self.by_ip = {p.ip: p for p in view.pods}
        self._next_endpoint = 1
        with self.resolver.batch():
            self.resolver.update_identities(
                {IdentityID(i): labels for i, labels in self.identities.items()})
            self.resolver.apply(view.resources)
            for pod in view.pods:   # the agent feeds every ipcache entry the same way
                self.resolver.upsert_pod(f"ip:{pod.ip}", pod.identity, [pod.ip],
                                         _named_ports(pod.named_ports))

    # -- peers --------------------------------------------------------------------------

    def peer(self, text: str) -> Peer:
        text = text.strip()
        if not text:
            raise TraceError("an empty peer: give NAMESPACE/POD, labels, an entity or an IP")
        if "/" in text and "=" not in text:
            pod = self.pods.get(text)
            if pod is None:
                known = ", ".join(sorted(self.pods)) or "none"
                raise TraceError(f"unknown pod {text} (pods with an ipcache entry: {known})")
            return self._pod_peer(text, pod)
        reserved = text.removeprefix(f"{SOURCE_RESERVED}:").upper().replace("-", "_")
        if reserved in ReservedIdentity.__members__ and reserved != "UNKNOWN":
            rid = ReservedIdentity[reserved]
            return Peer(text, int(rid), RESERVED_LABELS[rid])
        try:
            address = ipaddress.IPv4Address(text)
        except ValueError:
            pass
        else:
            pod = self.by_ip.get(text)
            if pod is not None:
                return self._pod_peer(text, pod)
            if text in self.view.node_ips:
                rid = ReservedIdentity.REMOTE_NODE   # (host to its own pods: see trace())
                return Peer(text, int(rid), RESERVED_LABELS[rid])
            identity = self._cidr_identity(int(address))
            return Peer(text, identity, self.identities.get(
                identity, RESERVED_LABELS[ReservedIdentity.WORLD]))
        if "=" not in text and ":" not in text:
            raise TraceError(f"cannot read peer {text!r}: give NAMESPACE/POD, labels "
                             "(k8s:app=web,k8s:io.kubernetes.pod.namespace=prod), an "
                             "entity (world, host, remote-node, …) or an IPv4 address")
        labels = _labels_spec(text)
        existing = self.by_labels.get(labels)
        if existing is not None:
            identity = existing
        else:
            identity = max([MIN_CLUSTER_IDENTITY - 1, *(i for i in self.identities
                                                        if i < 1 << 24)]) + 1
            self.identities[identity] = labels
            self.by_labels[labels] = identity
            self.resolver.update_identities({IdentityID(identity): labels})
        return Peer(text, identity, labels, endpoint=True)

    def _pod_peer(self, text: str, pod: PodView) -> Peer:
        labels = self.identities.get(pod.identity)
        if labels is None:
            raise TraceError(f"pod {pod.ref} has identity {pod.identity}, which the store "
                             "does not know (yet); try again in a moment")
        return Peer(text, pod.identity, labels, pod, endpoint=True)

    def _cidr_identity(self, address: int) -> int:
        best: tuple[int, int] | None = None
        for prefix, identity in self.resolver.cidr_identities().items():
            net = ipaddress.IPv4Network(prefix)
            if address & int(net.netmask) == int(net.network_address) and (
                    best is None or net.prefixlen > best[0]):
                best = (net.prefixlen, int(identity))
                self.identities.setdefault(int(identity), self.resolver.selectors.labels(
                    int(identity)) or RESERVED_LABELS[ReservedIdentity.WORLD])
        return best[1] if best else int(ReservedIdentity.WORLD)

    # -- decisions ----------------------------------------------------------------------

    def side(self, me: Peer, other: Peer, direction: Direction, protocol: int,
             port: int) -> SideResult:
        eid = EndpointID(self._next_endpoint)
        self._next_endpoint += 1
        ports = ({n: (int(p), Protocol[str(pr).upper()]) for n, (p, pr) in
                  me.pod.named_ports.items() if str(pr).upper() in Protocol.__members__}
                 if me.pod is not None else {})
        self.resolver.upsert_endpoint(Endpoint(eid, IdentityID(me.identity), me.labels,
                                               me.namespace, ports,
                                               me.pod.ip if me.pod else None))
        policy = self.resolver.policy(eid)
        mode = self.view.modes.get(me.pod.ref if me.pod else "", EndpointMode())
        enforced = (policy.ingress_enforced if direction is Direction.INGRESS
                    else policy.egress_enforced) or mode.enforcement == "always"
        verdict = datapath_verdict(self.resolver.map_state(eid),
                                   ingress_or_egress_enforced=enforced,
                                   identity=other.identity, direction=int(direction),
                                   protocol=protocol, port=port)
        rules = self.resolver.enforcing_rules(eid)[0 if direction is Direction.INGRESS else 1]
        enforced_by = tuple(dict.fromkeys(
            f"{kind} {ns + '/' if ns else ''}{name}" for kind, ns, name, _spec in rules))
        audit = mode.audit[0 if direction is Direction.INGRESS else 1]
        self.resolver.delete_endpoint(eid)
        if mode.enforcement == "never":   # the datapath skips policy altogether
            return SideResult(direction.name, me.text, False, NOT_ENFORCED, mode="never",
                              audit=audit, degraded=mode.degraded)
        if verdict.allowed:
            decision = ALLOWED if enforced or verdict.cookie else NOT_ENFORCED
        else:
            decision = AUDITED if audit or mode.degraded else DENIED
        return SideResult(direction.name, me.text, enforced, decision, verdict.drop_reason,
                          self.resolver.cookie_info(verdict.cookie) if verdict.cookie else None,
                          enforced_by, audit, mode.enforcement, mode.degraded)


def _named_ports(ports: Mapping[str, tuple[int, str]]) -> dict[str, tuple[int, int]]:
    out = {}
    for name, (port, proto) in ports.items():
        p = str(proto).upper()
        if p in Protocol.__members__:
            out[name] = (int(port), int(Protocol[p]))
    return out


def trace(view: ClusterView, src: str, dst: str, dport: str) -> TraceResult:
    """The decision of both sides for a new connection ``src`` → ``dst``:``dport``."""
    port_or_name, proto = parse_dport(dport)
    tracer = _Tracer(view)
    s, d = tracer.peer(src), tracer.peer(dst)
    s, d = _node_address(view, s, d), _node_address(view, d, s)
    if isinstance(port_or_name, str):
        found = None
        if d.pod is not None:
            found = d.pod.named_ports.get(port_or_name)
        if found is None or str(found[1]).lower() != proto:
            raise TraceError(f"--dport {dport}: {d.text} declares no port named "
                             f"{port_or_name!r} for {proto.upper()}")
        port = int(found[0])
    else:
        port = port_or_name
    protocol = int(_PROTOCOLS[proto])
    egress = tracer.side(s, d, Direction.EGRESS, protocol, port) if s.endpoint else None
    ingress = tracer.side(d, s, Direction.INGRESS, protocol, port) if d.endpoint else None
    return TraceResult(s, d, proto.upper(), port, egress, ingress)


def _node_address(view: ClusterView, peer: Peer, other: Peer) -> Peer:
    """A node's own address is ``host`` to the pods of that node (the ipcache says so)."""
    node = view.node_ips.get(peer.text)
    if node is not None and other.pod is not None and other.pod.node == node:
        rid = ReservedIdentity.HOST
        return Peer(peer.text, int(rid), RESERVED_LABELS[rid])
    return peer


def format_trace(result: TraceResult) -> str:
    """Human output, one line per side and the final verdict (greppable)."""
    lines = [f"Tracing {result.src.describe()} -> {result.dst.describe()} "
             f"{result.port}/{result.protocol}"]
    for side, peer, d in ((result.egress, result.src, "egress"),
                          (result.ingress, result.dst, "ingress")):
        if side is None:
            lines.append(f"  {d:<7} of {peer.text}: not an endpoint, no {d} policy applies")
            continue
        audit = ""
        if side.decision == AUDITED:
            why = "node degraded" if side.degraded and not side.audit else "audit mode"
            audit = f" ({why}: would be dropped, forwarded and reported as AUDIT)"
        lines.append(f"  {d:<7} of {side.endpoint}: {side.decision}: {side.reason}{audit}")
    lines.append(f"Final verdict: {result.verdict}")
    return "\n".join(lines)


def selectors_view(view: ClusterView) -> list[dict[str, Any]]:
    """Every selector the applied policies use, its users and the identities it
    selects (``cilium-dbg policy selectors``), computed by the agents' resolver."""
    tracer = _Tracer(view)
    resolver = tracer.resolver
    out = []
    users = resolver.selector_users()
    for sel in sorted(resolver.selectors.in_use(), key=str):
        cookies = users.get(str(sel), [])
        names = sorted({rule_text(info).rsplit(" ", 1)[0] for c in cookies
                        if (info := resolver.cookie_info(c)) is not None})
        ids = sorted(resolver.selectors.selections(sel))
        out.append({"selector": str(sel), "users": names,
                    "identities": [{"id": i, "labels": [str(lbl) for lbl in (
                        resolver.selectors.labels(i) or ())]} for i in ids]})
    return out


def modes_from_endpoints(endpoints: Iterable[Mapping[str, Any]]) -> dict[str, EndpointMode]:
    """Each pod's endpoint mode from agents' endpoint JSON (``policy.enforcement``,
    ``policy.auditMode``, ``policy.degraded``; absent: default enforcement, no audit)."""
    out = {}
    for ep in endpoints:
        pol = ep.get("policy") or {}
        flag = pol.get("auditMode", pol.get("audit", ep.get("policyAuditMode", False)))
        if isinstance(flag, str):
            flag = flag.lower() in ("enabled", "true", "on")
        if isinstance(flag, Mapping):
            audit = (bool(flag.get("ingress")), bool(flag.get("egress")))
        else:
            audit = (bool(flag), bool(flag))
        enforcement = str(pol.get("enforcement") or "default").lower()
        mode = EndpointMode(enforcement, audit, bool(pol.get("degraded", False)))
        if mode != EndpointMode() and ep.get("namespace") and ep.get("podName"):
            out[f"{ep['namespace']}/{ep['podName']}"] = mode
    return out
