"""Translation of policy resources into one internal rule model.

CNP, CCNP and Kubernetes NetworkPolicy differ in surface and in a few semantics (the
``ingress: [{}]`` trap, policyTypes defaults, namespace scoping of peers, ipBlock vs pod
IPs). All of that is settled here, once, so the resolver only sees:

* a :class:`CompiledRule` — a subject selector plus which directions it isolates;
* its :class:`Section` s — one per element of ``ingress``/``egress``/``ingressDeny``/
  ``egressDeny``, each with peer selectors (or the identity-0 wildcard), port specs and a
  cookie that names the element for flow explanations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from villi.identity.labels import NAMESPACE_LABELS_PREFIX, SOURCE_K8S, SOURCE_RESERVED
from villi.policy.cidr import Net, parse_net, resultant_prefixes
from villi.policy.entry import Direction, Protocol
from villi.policy.fqdn import fqdn_selector
from villi.policy.http import HeaderMatch, HTTPRule
from villi.policy.models import (
    CiliumClusterwideNetworkPolicy,
    CiliumNetworkPolicy,
    CiliumRule,
    NetworkPolicy,
    NetworkPolicyPeer,
    NetworkPolicyPort,
    Policy,
    PortRuleHTTP,
)
from villi.policy.selectors import EXISTS, Requirement, Selector, any_namespace, namespace_is

#: Cookie of the implicit "local host may reach its pods" allow (Cilium's allow-localhost).
LOCALHOST_COOKIE = 1


@dataclass(frozen=True, slots=True)
class CIDRSelector:
    """Peers by address: local CIDR identities inside ``prefixes`` (and world when the
    range is everything). With ``pods`` (Kubernetes ipBlock) it also selects pod
    identities whose every known pod IP is inside — Kubernetes conformance expects
    ipBlock to match pods, Cilium's CIDR rules deliberately do not."""

    prefixes: frozenset[str]
    pods: bool = False
    nets: tuple[Net, ...] = field(default=(), compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "nets", tuple(parse_net(p) for p in sorted(self.prefixes)))

    @property
    def everything(self) -> bool:
        return "0.0.0.0/0" in self.prefixes

    def __str__(self) -> str:
        kind = "ipBlock" if self.pods else "cidr"
        return f"{kind}:{','.join(sorted(self.prefixes))}"


PeerSelector = Selector | CIDRSelector


@dataclass(frozen=True, slots=True)
class PortSpec:
    """A port rule: ``port``..``end_port`` (0..0 = all) or a named port, per protocol;
    ``http`` holds the port rule's L7 HTTP rules (empty: plain L4 allow); ``dns`` says
    the port rule has ``rules.dns`` (its traffic goes to the node's DNS proxy)."""

    protocol: Protocol
    port: int = 0
    end_port: int = 0
    name: str | None = None
    http: tuple[HTTPRule, ...] = ()
    dns: bool = False


@dataclass(frozen=True, slots=True)
class Section:
    """One rule element. ``wildcard`` = any peer (identity 0); ``ports`` None = all ports
    and protocols, an empty tuple = nothing (e.g. only IPv6 ICMP types were listed)."""

    cookie: int
    direction: Direction
    deny: bool
    peers: tuple[PeerSelector, ...]
    wildcard: bool
    ports: tuple[PortSpec, ...] | None
    named_ports: bool = field(default=False, compare=False)
    #: entries depend on the subject (ingress named ports resolve against its own ports)
    per_subject: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        named = any(p.name is not None for p in self.ports or ())
        object.__setattr__(self, "named_ports", named)
        object.__setattr__(self, "per_subject", named and self.direction is Direction.INGRESS)


RuleKey = tuple[str, str | None, str, int]  # (kind, namespace, name, spec index)


@dataclass(frozen=True, slots=True)
class CompiledRule:
    key: RuleKey
    namespace: str | None  # subjects live in this namespace (None: any)
    subject: Selector
    enforce: tuple[bool, bool]  # (ingress, egress) default-deny
    sections: tuple[Section, ...]

    @property
    def prefixes(self) -> frozenset[str]:
        """Every CIDR prefix the rule's peers need in the ipcache."""
        out: set[str] = set()
        for section in self.sections:
            for peer in section.peers:
                if isinstance(peer, CIDRSelector):
                    out |= peer.prefixes
        out.discard("0.0.0.0/0")  # that is the world identity, never an ipcache prefix
        return frozenset(out)


@dataclass(frozen=True, slots=True)
class CookieInfo:
    """What a cookie names: the policy and the rule element that decided a flow."""

    kind: str
    namespace: str | None
    name: str
    direction: str  # ingress | egress | ingressDeny | egressDeny
    rule_index: int
    spec_index: int = 0


class CookieTable:
    """Stable cookies per rule position, so re-applying an unchanged policy yields the
    same entries (an empty diff) and flow logs keep naming the same rule."""

    def __init__(self) -> None:
        self._by_info: dict[CookieInfo, int] = {}
        self._by_cookie: dict[int, CookieInfo] = {
            LOCALHOST_COOKIE: CookieInfo("reserved", None, "allow-localhost", "ingress", 0)}
        self._next = LOCALHOST_COOKIE + 1

    def cookie(self, info: CookieInfo) -> int:
        found = self._by_info.get(info)
        if found is None:
            found = self._next
            self._next += 1
            self._by_info[info] = found
            self._by_cookie[found] = info
        return found

    def info(self, cookie: int) -> CookieInfo | None:
        return self._by_cookie.get(cookie)

    def items(self) -> list[tuple[int, CookieInfo]]:
        """Every cookie handed out so far and what it names (for map dumps)."""
        return sorted(self._by_cookie.items())


def _reserved(name: str) -> Selector:
    return Selector((Requirement(SOURCE_RESERVED, name, EXISTS),))


_WORLD = (_reserved("world"),)
_CLUSTER = tuple(_reserved(n) for n in ("host", "remote-node", "init", "ingress", "health",
                                         "unmanaged", "kube-apiserver")) + (
    Selector((any_namespace(),)),)
_SIMPLE_ENTITIES = ("host", "remote-node", "kube-apiserver", "ingress", "health", "init",
                    "unmanaged")


def _entity_peers(entity: str) -> tuple[PeerSelector, ...] | None:
    """Selectors of an entity; None means the wildcard (``all``)."""
    if entity == "all":
        return None
    if entity in ("world", "world-ipv4"):
        return _WORLD
    if entity == "cluster":
        return _CLUSTER
    if entity in _SIMPLE_ENTITIES:
        return (_reserved(entity),)
    return ()  # none, world-ipv6 (IPv4-only datapath)


def _cnp_peer(selector: Selector, namespace: str | None, init_rule: bool) -> Selector:
    """Cilium's implicit namespace of peer selectors (utils.go getEndpointSelector)."""
    if selector.has_source(SOURCE_RESERVED) or init_rule or selector.names_namespace():
        return selector
    if namespace is not None:
        return selector.with_requirements(namespace_is(namespace))
    return selector.with_requirements(any_namespace())


def _http_rule(rule: PortRuleHTTP) -> HTTPRule:
    return HTTPRule(rule.method, rule.path, rule.host, tuple(rule.headers or ()),
                    tuple(HeaderMatch(m.name, m.value, m.mismatch)
                          for m in rule.header_matches or ()))


def _cnp_ports(rule: Any) -> tuple[PortSpec, ...] | None:
    if rule.icmps:
        return tuple(PortSpec(Protocol.ICMP, number) for icmp in rule.icmps
                     for f in icmp.fields if (number := f.number) is not None)
    if not rule.to_ports:
        return None
    specs = []
    for port_rule in rule.to_ports:
        http = tuple(_http_rule(h) for h in getattr(port_rule, "http", None) or ())
        rules = getattr(port_rule, "rules", None)
        dns = rules is not None and getattr(rules, "dns", None) is not None
        for pp in port_rule.ports:
            # L7 applies to TCP only; ANY narrows to TCP when there are HTTP rules.
            proto = Protocol.TCP if http else Protocol[pp.protocol]
            number = pp.number
            if number is None:
                specs.append(PortSpec(proto, name=pp.port.lower(), http=http, dns=dns))
            else:
                specs.append(PortSpec(proto, number, (pp.end_port or 0) if number else 0,
                                      http=http, dns=dns))
    return tuple(specs)


def _cnp_sections(rule: CiliumRule, namespace: str | None, init_rule: bool,
                  cookie: Any) -> list[Section]:
    sections = []
    groups = (("ingress", Direction.INGRESS, False, rule.ingress),
              ("ingressDeny", Direction.INGRESS, True, rule.ingress_deny),
              ("egress", Direction.EGRESS, False, rule.egress),
              ("egressDeny", Direction.EGRESS, True, rule.egress_deny))
    for name, direction, deny, items in groups:
        for index, item in enumerate(items or ()):
            prefix = "from" if direction is Direction.INGRESS else "to"
            endpoints = getattr(item, f"{prefix}_endpoints") or []
            cidrs = getattr(item, f"{prefix}_cidr") or []
            cidr_sets = getattr(item, f"{prefix}_cidr_set") or []
            entities = getattr(item, f"{prefix}_entities") or []
            fqdns = getattr(item, "to_fqdns", None) or []
            ports = _cnp_ports(item)
            peers: list[PeerSelector] = []
            wildcard = False
            for es in endpoints:
                peers.append(_cnp_peer(es.to_selector(), namespace, init_rule))
            peers.extend(CIDRSelector(resultant_prefixes(c)) for c in cidrs)
            # toFQDNs: the identities the DNS proxy labels fqdn:<pattern> (see fqdn.py)
            peers.extend(fqdn_selector(f.pattern) for f in fqdns)
            peers.extend(CIDRSelector(resultant_prefixes(c.cidr, c.except_ or ()))
                         for c in cidr_sets if c.cidr is not None)
            for entity in entities:
                found = _entity_peers(entity)
                if found is None:
                    wildcard = True
                else:
                    peers.extend(found)
            has_l3 = bool(endpoints or cidrs or cidr_sets or entities or fqdns)
            if not has_l3:
                if ports is None:
                    continue  # `ingress: [{}]`: isolates, selects no peer
                wildcard = True  # only toPorts/icmps: any peer on these ports
            peers = [p for p in peers if not (isinstance(p, CIDRSelector) and not p.prefixes)]
            sections.append(Section(cookie(name, index), direction, deny,
                                    tuple(dict.fromkeys(peers)), wildcard, ports))
    return sections


def compile_cilium(policy: CiliumNetworkPolicy | CiliumClusterwideNetworkPolicy,
                   cookies: CookieTable) -> list[CompiledRule]:
    namespace = policy.namespace
    compiled = []
    for spec_index, (_path, rule) in enumerate(policy.rules):
        assert rule.endpoint_selector is not None  # nodeSelector is rejected at load time
        subject = rule.endpoint_selector.to_selector()
        init_rule = subject.names_key("init", (SOURCE_RESERVED,))
        if namespace is not None and not init_rule:
            subject = subject.without_key("io.kubernetes.pod.namespace").with_requirements(
                namespace_is(namespace))

        def cookie(direction: str, index: int, _spec: int = spec_index) -> int:
            return cookies.cookie(CookieInfo(policy.kind, namespace, policy.metadata.name,
                                             direction, index, _spec))

        dd = rule.enable_default_deny
        enforce = (
            bool(rule.ingress or rule.ingress_deny) and not (dd and dd.ingress is False),
            bool(rule.egress or rule.egress_deny) and not (dd and dd.egress is False),
        )
        compiled.append(CompiledRule(
            (policy.kind, namespace, policy.metadata.name, spec_index),
            None if init_rule else namespace, subject, enforce,
            tuple(_cnp_sections(rule, namespace, init_rule, cookie))))
    return compiled


def _knp_peer(peer: NetworkPolicyPeer, namespace: str) -> PeerSelector:
    if peer.ip_block is not None:
        return CIDRSelector(resultant_prefixes(peer.ip_block.cidr, peer.ip_block.except_ or ()),
                            pods=True)
    reqs: list[Requirement] = []
    if peer.namespace_selector is not None:
        reqs.extend(peer.namespace_selector.to_selector(
            default_source=SOURCE_K8S, key_prefix=NAMESPACE_LABELS_PREFIX).requirements)
        reqs.append(any_namespace())
    else:
        reqs.append(namespace_is(namespace))
    if peer.pod_selector is not None:
        reqs.extend(peer.pod_selector.to_selector(default_source=SOURCE_K8S).requirements)
    return Selector(tuple(reqs))


def compile_k8s(policy: NetworkPolicy, cookies: CookieTable) -> list[CompiledRule]:
    namespace = policy.namespace
    spec = policy.spec
    subject = spec.pod_selector.to_selector(default_source=SOURCE_K8S).with_requirements(
        namespace_is(namespace))
    types = spec.effective_policy_types
    sections = []
    rules: list[tuple[str, Direction, int, list[NetworkPolicyPeer] | None,
                      list[NetworkPolicyPort] | None]] = []
    if "Ingress" in types:  # rules of a direction not in policyTypes are ignored
        rules += [("ingress", Direction.INGRESS, i, r.from_, r.ports)
                  for i, r in enumerate(spec.ingress or ())]
    if "Egress" in types:
        rules += [("egress", Direction.EGRESS, i, r.to, r.ports)
                  for i, r in enumerate(spec.egress or ())]
    for name, direction, index, peers_in, ports_in in rules:
        ports: tuple[PortSpec, ...] | None = None
        if ports_in:
            ports = tuple(
                PortSpec(Protocol[p.protocol], name=p.port) if isinstance(p.port, str)
                else PortSpec(Protocol[p.protocol], p.port or 0, p.end_port or 0)
                for p in ports_in)
        peers = tuple(dict.fromkeys(_knp_peer(p, namespace) for p in peers_in or ()))
        peers = tuple(p for p in peers if not (isinstance(p, CIDRSelector) and not p.prefixes))
        cookie = cookies.cookie(CookieInfo(policy.kind, namespace, policy.metadata.name,
                                           name, index))
        # Absent or empty from/to: every peer, inside and outside the cluster.
        sections.append(Section(cookie, direction, False, peers, not peers_in, ports))
    enforce = ("Ingress" in types, "Egress" in types)
    return [CompiledRule((policy.kind, namespace, policy.metadata.name, 0), namespace,
                         subject, enforce, tuple(sections))]


def compile_policy(policy: Policy, cookies: CookieTable) -> list[CompiledRule]:
    """Every rule of a policy resource, in the shared internal model."""
    if isinstance(policy, NetworkPolicy):
        return compile_k8s(policy, cookies)
    return compile_cilium(policy, cookies)
