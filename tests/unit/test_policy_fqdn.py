"""toFQDNs and rules.dns: Cilium's matchName/matchPattern semantics, validation errors that
name file, line and field, and FQDN selectors selecting learned CIDR identities
incrementally through the selector cache."""

from __future__ import annotations

import pytest

from villi.errors import ResourceError
from villi.identity.labels import LabelSet
from villi.policy.fqdn import (
    DNSRuleSet,
    check_pattern,
    fqdn_identity_labels,
    fqdn_selector,
    matches,
    to_fqdn,
)
from villi.policy.loader import load_text
from villi.policy.models import CiliumNetworkPolicy
from villi.policy.rules import CookieTable, compile_policy
from villi.policy.selectorcache import SelectorCache

HEAD = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: p
  namespace: prod
spec:
  endpointSelector: {}
"""


@pytest.mark.parametrize(("pattern", "name", "expected"), [
    ("api.example.com", "api.example.com", True),
    ("api.example.com", "API.Example.COM.", True),
    ("api.example.com.", "api.example.com", True),
    ("api.example.com", "xapi.example.com", False),
    ("*.example.com", "api.example.com", True),
    ("*.example.com", "a.b.example.com", False),       # '*' never crosses a dot
    ("*.example.com", "example.com", False),
    ("api-*.example.com", "api-v2.example.com", True),
    ("api-*.example.com", "api-.example.com", True),   # '*' matches the empty run
    ("*", "anything.at.all", True),
    ("*", "x", True),
    ("sub.*.com", "sub.example.com", True),
    ("sub.*.com", "sub.a.b.com", False),
])
def test_match_semantics(pattern: str, name: str, expected: bool) -> None:
    assert matches(check_pattern(pattern), name) is expected


def test_to_fqdn_and_rule_set() -> None:
    assert to_fqdn("Api.Example.com") == "api.example.com."
    rules = DNSRuleSet(("*.example.com.", "cilium.io."))
    assert rules.allows("api.example.com.")
    assert rules.allows("cilium.io")
    assert not rules.allows("evil.com.")


def test_egress_fqdn_and_dns_rules_load() -> None:
    (pol,) = load_text(HEAD + """  egress:
  - toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchPattern: "*.example.com"}, {matchName: cilium.io}]
  - toFQDNs: [{matchName: api.example.com}, {matchPattern: "*.partner.org"}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
""", "ok.yaml")
    assert isinstance(pol, CiliumNetworkPolicy)
    assert pol.spec is not None and pol.spec.egress is not None
    dns = pol.spec.egress[0].to_ports[0].rules.dns  # type: ignore[index,union-attr]
    assert [s.pattern for s in dns] == ["*.example.com.", "cilium.io."]
    fq = pol.spec.egress[1].to_fqdns or []
    assert [s.pattern for s in fq] == ["api.example.com.", "*.partner.org."]


BAD = [
    ("bad-pattern", """  egress:
  - toFQDNs: [{matchPattern: "api.exa mple.com"}]
""", "spec.egress[0].toFQDNs[0].matchPattern", "is not a DNS pattern", 9),
    ("bad-name-star", """  egress:
  - toFQDNs: [{matchName: "*.example.com"}]
""", "spec.egress[0].toFQDNs[0].matchName", "is not a DNS name", 9),
    ("both", """  egress:
  - toFQDNs:
    - matchName: a.com
      matchPattern: "*.a.com"
""", "spec.egress[0].toFQDNs[0].matchPattern", "exactly one of", 11),
    ("fqdn-in-ingress", """  ingress:
  - toFQDNs: [{matchName: a.com}]
""", "spec.ingress[0].toFQDNs", "egress only", 9),
    ("dns-in-ingress", """  ingress:
  - toPorts:
    - ports: [{port: "53", protocol: UDP}]
      rules:
        dns: [{matchPattern: "*"}]
""", "spec.ingress[0].toPorts[0].rules.dns", "egress only", 12),
    ("dns-on-port-80", """  egress:
  - toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        dns: [{matchPattern: "*"}]
""", "spec.egress[0].toPorts[0].ports[0].port", "DNS rules apply to port 53", 10),
    ("fqdn-with-endpoints", """  egress:
  - toFQDNs: [{matchName: a.com}]
    toEndpoints: [{}]
""", "spec.egress[0].toEndpoints", "combining toFQDNs and toEndpoints", 10),
]


@pytest.mark.parametrize(("text", "field", "reason", "line"),
                         [pytest.param(*c[1:], id=c[0]) for c in BAD])
def test_bad_dns_policy_is_one_clear_error(text: str, field: str, reason: str,
                                           line: int) -> None:
    with pytest.raises(ResourceError) as info:
        load_text(HEAD + text, "bad.yaml")
    err = info.value
    assert (err.file, err.field) == ("bad.yaml", field)
    assert reason in err.reason
    assert err.line == line


def test_fqdn_selector_selects_learned_identities_incrementally() -> None:
    (pol,) = load_text(HEAD + """  egress:
  - toFQDNs: [{matchPattern: "*.example.com"}]
""", "ok.yaml")
    rules = compile_policy(pol, CookieTable())  # type: ignore[arg-type]
    (section,) = rules[0].sections
    assert not section.wildcard
    (peer,) = section.peers
    assert peer == fqdn_selector("*.example.com.")
    cache = SelectorCache()
    cache.add(peer)
    ident = (1 << 24) | 7
    changes = cache.update_identities(
        {ident: fqdn_identity_labels("198.51.100.10", {"*.example.com."})}, ())
    assert changes.get(peer) == ({ident}, set())
    assert cache.selections(peer) == {ident}
    other = (1 << 24) | 8   # an IP learned for a name no selector matched
    changes = cache.update_identities({other: LabelSet.from_mapping({}, "cidr")}, ())
    assert peer not in changes or not changes[peer][0]
    labels = fqdn_identity_labels("198.51.100.10", {"*.example.com."})
    assert {str(lbl).rstrip("=") for lbl in labels} >= {"cidr:198.51.100.10/32", "reserved:world",
                                            "fqdn:*.example.com."}


def test_learned_ips_become_incremental_map_diffs_and_ipcache_prefixes() -> None:
    from villi.policy.entry import Direction
    from villi.policy.simulate import PolicySimulator

    sim = PolicySimulator()
    sim.add_pod("prod/client", {"app": "client"}, "10.64.0.4")
    sim.add_pod("prod/other", {"app": "other"}, "10.64.0.5")
    sim.apply_yaml("""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: fq, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toFQDNs: [{matchPattern: "*.example.com"}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
  - toCIDR: [198.51.100.77/32]
""")
    r = sim.resolver
    assert r.fqdn_patterns() == ["*.example.com."]
    client = sim.pods["prod/client"].endpoint
    labels = fqdn_identity_labels("198.51.100.10", {"*.example.com."})
    update = r.learn_fqdn({"198.51.100.10": labels})
    ident = update.cidr_upserts["198.51.100.10/32"]
    assert ident >= 1 << 24
    assert set(update.endpoints) == {client}          # only the client's map changes
    diff = update.endpoints[client]
    assert {(e.identity, e.direction, e.port) for e in diff.added} == \
        {(ident, Direction.EGRESS, 80)}
    assert len(diff.map_upserts) == 1 and not diff.map_deletes
    assert not r.learn_fqdn({"198.51.100.10": labels})  # same labels again: nothing
    # an IP a toCIDR rule also names keeps its identity when the fqdn labels go
    both = r.learn_fqdn({"198.51.100.77": fqdn_identity_labels("198.51.100.77",
                                                                {"*.example.com."})})
    assert "198.51.100.77/32" not in both.cidr_upserts   # already live for the CIDR rule
    back = r.learn_fqdn({}, ["198.51.100.77"])
    assert not back.cidr_deletes
    gone = r.learn_fqdn({}, ["198.51.100.10"])
    assert gone.cidr_deletes == {"198.51.100.10/32": ident}
    assert {e.identity for e in gone.endpoints[client].removed} == {ident}


def test_dns_patterns_per_endpoint() -> None:
    from villi.policy.dnsrules import dns_patterns
    from villi.policy.simulate import PolicySimulator

    sim = PolicySimulator()
    sim.add_pod("prod/client", {"app": "client"}, "10.64.0.4")
    sim.add_pod("prod/other", {"app": "other"}, "10.64.0.5")
    sim.add_pod("dev/client", {"app": "client"}, "10.64.0.6")
    sim.apply_yaml(HEAD.replace("endpointSelector: {}",
                                "endpointSelector: {matchLabels: {app: client}}") + """  egress:
  - toEntities: [world]
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchPattern: "*.example.com"}, {matchName: cilium.io}]
""")
    r = sim.resolver
    assert dns_patterns(r.resources(), r.endpoints()) == {
        "10.64.0.4": ["*.example.com.", "cilium.io."]}


def test_example_fqdn_policy_loads() -> None:
    from pathlib import Path

    from villi.policy.loader import load_file

    path = Path(__file__).parents[2] / "examples" / "fqdn_policy.yaml"
    (pol,) = load_file(path)
    assert isinstance(pol, CiliumNetworkPolicy)
    rules = compile_policy(pol, CookieTable())
    assert fqdn_selector("api.example.com.") in rules[0].sections[1].peers


def test_dns_rules_redirect_port_53_udp_and_tcp_to_the_dns_proxy() -> None:
    """Port-53 entries of a rule with rules.dns redirect to the DNS proxy's port (UDP and
    TCP keys alike); a plain port-53 allow of the same peer wins (no redirect); the HTTP
    proxy's table never sees DNS entries."""
    from villi.datapath import abi
    from villi.endpoint.policymap import kernel_value
    from villi.policy.entry import Protocol
    from villi.policy.simulate import PolicySimulator

    sim = PolicySimulator()
    sim.add_pod("prod/client", {"app": "client"}, "10.64.0.4")
    sim.apply_yaml(HEAD.replace("endpointSelector: {}",
                                "endpointSelector: {matchLabels: {app: client}}") + """  egress:
  - toCIDR: [192.0.2.53/32]
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchPattern: "*"}]
  - toFQDNs: [{matchName: api.example.com}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http: [{method: GET}]
""")
    r = sim.resolver
    client = sim.pods["prod/client"].endpoint
    state = r.map_state(client)
    dns_keys = {k.protocol: v for k, v in state.items() if k.port == 53}
    assert set(dns_keys) == {Protocol.TCP, Protocol.UDP, Protocol.SCTP}
    for key, value in state.items():
        if key.port == 53:
            assert value.redirect and value.dns
            assert kernel_value(key, value).proxy_port == abi.PROXY_DNS_PORT
    assert r.l7_table(client) == []    # the HTTP rule's peer is not learned yet
    ident = r.learn_fqdn({"198.51.100.10": fqdn_identity_labels(
        "198.51.100.10", {"api.example.com."})}).cidr_upserts["198.51.100.10/32"]
    table = r.l7_table(client)
    assert [(e.identity, e.port) for e in table] == [(ident, 80)]   # HTTP only
    http_key = next(k for k, v in r.map_state(client).items() if k.port == 80)
    assert kernel_value(http_key, r.map_state(client)[http_key]).proxy_port == \
        abi.PROXY_EGRESS_PORT
    # a plain allow of the same peer and port wins: no redirect
    sim.apply_yaml(HEAD.replace("name: p", "name: plain").replace(
        "endpointSelector: {}", "endpointSelector: {matchLabels: {app: client}}") + """  egress:
  - toCIDR: [192.0.2.53/32]
    toPorts:
    - ports: [{port: "53", protocol: UDP}]
""")
    state = r.map_state(client)
    udp = [v for k, v in state.items() if k.port == 53 and k.protocol == Protocol.UDP]
    tcp = [v for k, v in state.items() if k.port == 53 and k.protocol == Protocol.TCP]
    assert [v.redirect for v in udp] == [False] and [v.dns for v in tcp] == [True]
