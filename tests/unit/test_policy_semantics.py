"""Semantics of CNP, CCNP and Kubernetes NetworkPolicy, one behaviour per test.

Each test applies real YAML from ``tests/unit/policies/`` to a small cluster and checks
what the emulated datapath does with packets (through resolver → map state →
``datapath_verdict``), including the drop reason: 133 = default deny, 181 = deny rule.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from villi.identity.reserved import ReservedIdentity
from villi.policy.entry import Direction, Protocol
from villi.policy.loader import load_files
from villi.policy.resolver import PolicyResolver
from villi.policy.simulate import PolicySimulator

POLICIES = Path(__file__).parent / "policies"
DENIED, DENY = 133, 181

PODS = {
    "prod/web": ({"app": "web", "tier": "front"}, "10.64.0.10", {"http": (8080, Protocol.TCP)}),
    "prod/db": ({"app": "db", "tier": "back"}, "10.64.0.11", {}),
    "prod/client": ({"app": "client"}, "10.64.0.12", {}),
    "dev/client": ({"app": "client"}, "10.64.1.12", {}),
    "dev/web": ({"app": "web"}, "10.64.1.10", {"http": (80, Protocol.TCP)}),
    "dev/dns": ({"app": "dns"}, "10.64.1.53", {"dns": (53, Protocol.UDP)}),
}


def make_cluster(resolver: PolicyResolver | None = None) -> PolicySimulator:
    sim = PolicySimulator(resolver)
    sim.apply(load_files([POLICIES / "namespaces.yaml"]))
    for ref, (labels, ip, ports) in PODS.items():
        sim.add_pod(ref, labels, ip, ports)
    return sim


@pytest.fixture
def sim() -> PolicySimulator:
    return make_cluster()


def apply(sim: PolicySimulator, *names: str) -> None:
    sim.apply(load_files([POLICIES / name for name in names]))


def reason(sim: PolicySimulator, pod: str, direction: str, peer: str, proto: str,
           port: int) -> int:
    """0 when the packet passes, else the drop reason."""
    d = Direction.INGRESS if direction == "in" else Direction.EGRESS
    verdict = sim.verdict(pod, d, peer, proto, port)
    return 0 if verdict.allowed else verdict.drop_reason


# -- `ingress: [{}]` and `ingress: []` in both languages -----------------------------------


def test_without_policy_everything_passes(sim: PolicySimulator) -> None:
    assert sim.allowed("dev/client", "prod/db", "TCP", 5432)
    assert sim.allowed("prod/web", "8.8.8.8", "UDP", 53)
    policy = sim.resolver.policy(sim.pods["prod/web"].endpoint)
    assert not policy.ingress_enforced and not policy.egress_enforced and not policy.entries


def test_cnp_empty_ingress_rule_only_isolates(sim: PolicySimulator) -> None:
    apply(sim, "cnp-deny-all-ingress.yaml")
    for pod in ("prod/web", "prod/db", "prod/client"):
        assert reason(sim, pod, "in", "prod/client", "TCP", 80) == DENIED
        assert reason(sim, pod, "in", "8.8.8.8", "UDP", 53) == DENIED
        assert reason(sim, pod, "out", "8.8.8.8", "TCP", 443) == 0  # egress untouched
    assert reason(sim, "dev/web", "in", "prod/client", "TCP", 80) == 0  # other namespace


def test_cnp_empty_ingress_list_does_not_isolate(sim: PolicySimulator) -> None:
    apply(sim, "cnp-empty-ingress-list.yaml")
    policy = sim.resolver.policy(sim.pods["prod/web"].endpoint)
    assert (policy.ingress_enforced, policy.egress_enforced) == (False, True)
    assert reason(sim, "prod/web", "in", "dev/client", "TCP", 8080) == 0
    assert reason(sim, "prod/web", "out", "prod/db", "TCP", 5432) == 0
    assert reason(sim, "prod/web", "out", "prod/client", "TCP", 80) == DENIED


def test_knp_empty_ingress_rule_allows_everything(sim: PolicySimulator) -> None:
    apply(sim, "knp-allow-all-ingress.yaml")
    policy = sim.resolver.policy(sim.pods["prod/db"].endpoint)
    assert policy.ingress_enforced
    for peer in ("dev/client", "8.8.8.8", "remote-node", "kube-apiserver"):
        assert reason(sim, "prod/db", "in", peer, "TCP", 5432) == 0
        assert reason(sim, "prod/db", "in", peer, "ICMP", 8) == 0


def test_knp_empty_ingress_list_denies_everything(sim: PolicySimulator) -> None:
    apply(sim, "knp-deny-all-ingress.yaml")
    for peer in ("prod/client", "dev/client", "8.8.8.8", "remote-node"):
        assert reason(sim, "prod/db", "in", peer, "TCP", 5432) == DENIED
    assert reason(sim, "prod/db", "out", "8.8.8.8", "TCP", 443) == 0


def test_knp_without_policy_types_isolates_ingress_too(sim: PolicySimulator) -> None:
    apply(sim, "knp-egress-only-no-types.yaml")
    policy = sim.resolver.policy(sim.pods["prod/client"].endpoint)
    assert policy.ingress_enforced and policy.egress_enforced
    assert reason(sim, "prod/client", "in", "prod/web", "TCP", 80) == DENIED
    assert reason(sim, "prod/client", "out", "prod/web", "TCP", 8080) == 0
    assert reason(sim, "prod/client", "out", "prod/web", "TCP", 80) == DENIED
    assert reason(sim, "prod/client", "out", "dev/web", "TCP", 8080) == DENIED  # own ns only
    assert reason(sim, "prod/client", "out", "prod/db", "TCP", 8080) == DENIED


# -- selection and namespaces ---------------------------------------------------------------


def test_cnp_peers_stay_in_policy_namespace(sim: PolicySimulator) -> None:
    apply(sim, "cnp-namespace-scoping.yaml")
    assert reason(sim, "prod/web", "in", "prod/client", "TCP", 8080) == 0
    assert reason(sim, "prod/web", "in", "dev/client", "TCP", 8080) == DENIED


def test_cnp_peer_naming_namespace_key_crosses_namespaces(sim: PolicySimulator) -> None:
    apply(sim, "cnp-namespace-scoping.yaml")
    assert reason(sim, "prod/db", "in", "dev/web", "TCP", 5432) == 0
    assert reason(sim, "prod/db", "in", "prod/web", "TCP", 5432) == 0
    assert reason(sim, "prod/db", "in", "prod/client", "TCP", 5432) == DENIED


def test_cnp_endpoint_selector_is_forced_into_policy_namespace(sim: PolicySimulator) -> None:
    apply(sim, "cnp-selector-other-namespace.yaml")
    assert sim.resolver.policy(sim.pods["dev/web"].endpoint).ingress_enforced
    assert not sim.resolver.policy(sim.pods["prod/web"].endpoint).ingress_enforced


def test_ccnp_empty_peer_selector_is_all_pods_but_no_reserved(sim: PolicySimulator) -> None:
    apply(sim, "ccnp-all-pods.yaml")
    for peer in ("prod/client", "dev/web", "prod/db"):
        assert reason(sim, "dev/dns", "in", peer, "UDP", 53) == 0
        assert reason(sim, "dev/dns", "in", peer, "TCP", 53) == DENIED
    for peer in ("8.8.8.8", "remote-node", "kube-apiserver"):
        assert reason(sim, "dev/dns", "in", peer, "UDP", 53) == DENIED


def test_knp_namespace_and_pod_selector_in_one_peer_is_and(sim: PolicySimulator) -> None:
    apply(sim, "knp-namespace-and-pod.yaml")
    assert reason(sim, "prod/web", "in", "dev/client", "TCP", 80) == 0
    assert reason(sim, "prod/web", "in", "dev/dns", "TCP", 80) == DENIED
    assert reason(sim, "prod/web", "in", "prod/client", "TCP", 80) == DENIED


def test_knp_namespace_and_pod_selector_in_two_peers_is_or(sim: PolicySimulator) -> None:
    apply(sim, "knp-namespace-or-pod.yaml")
    assert reason(sim, "prod/web", "in", "dev/dns", "TCP", 80) == 0
    assert reason(sim, "prod/web", "in", "prod/client", "TCP", 80) == 0
    assert reason(sim, "prod/web", "in", "prod/db", "TCP", 80) == DENIED
    assert reason(sim, "prod/web", "in", "8.8.8.8", "TCP", 80) == DENIED


def test_namespace_relabel_takes_effect(sim: PolicySimulator) -> None:
    apply(sim, "knp-namespace-or-pod.yaml")
    sim.set_namespace_labels("dev", {"env": "staging"})
    assert reason(sim, "prod/web", "in", "dev/dns", "TCP", 80) == DENIED
    sim.set_namespace_labels("dev", {"env": "development"})
    assert reason(sim, "prod/web", "in", "dev/dns", "TCP", 80) == 0


def test_namespace_selector_by_metadata_name(sim: PolicySimulator) -> None:
    sim.apply_yaml("""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: by-name, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: dev}}
""")
    assert reason(sim, "prod/db", "in", "dev/dns", "TCP", 5432) == 0
    assert reason(sim, "prod/db", "in", "prod/web", "TCP", 5432) == DENIED


def test_pod_relabel_changes_its_policy_and_its_peers(sim: PolicySimulator) -> None:
    apply(sim, "cnp-namespace-scoping.yaml")
    sim.relabel_pod("prod/client", {"app": "intruder"})
    assert reason(sim, "prod/web", "in", "prod/client", "TCP", 8080) == DENIED
    sim.relabel_pod("prod/db", {"app": "web"})  # now selected by web-from-clients
    assert sim.resolver.policy(sim.pods["prod/db"].endpoint).ingress_enforced
    sim.relabel_pod("prod/client", {"app": "client"})
    assert reason(sim, "prod/db", "in", "prod/client", "TCP", 1) == 0


# -- entities -----------------------------------------------------------------------------


def test_entities(sim: PolicySimulator) -> None:
    apply(sim, "cnp-entities.yaml")
    for peer in ("dev/client", "prod/db", "host", "remote-node", "health", "kube-apiserver"):
        assert reason(sim, "prod/web", "in", peer, "TCP", 8080) == 0, peer
    assert reason(sim, "prod/web", "in", "8.8.8.8", "TCP", 8080) == DENIED
    assert reason(sim, "prod/web", "out", "8.8.8.8", "TCP", 443) == 0
    assert reason(sim, "prod/web", "out", "prod/db", "TCP", 5432) == DENIED
    assert reason(sim, "prod/web", "out", "host", "TCP", 22) == DENIED
    assert reason(sim, "prod/db", "in", "remote-node", "TCP", 1) == 0
    assert reason(sim, "prod/db", "in", "health", "TCP", 1) == 0
    assert reason(sim, "prod/db", "in", "dev/client", "TCP", 1) == DENIED
    assert reason(sim, "prod/db", "out", "kube-apiserver", "TCP", 6443) == 0
    assert reason(sim, "prod/db", "out", "remote-node", "TCP", 6443) == DENIED


def test_entity_all_with_ports(sim: PolicySimulator) -> None:
    apply(sim, "cnp-entity-all.yaml")
    for peer in ("8.8.8.8", "prod/web", "host", "remote-node"):
        assert reason(sim, "prod/client", "out", peer, "TCP", 443) == 0
        assert reason(sim, "prod/client", "out", peer, "TCP", 80) == DENIED
    entries = sim.resolver.policy(sim.pods["prod/client"].endpoint).entries
    assert {e.identity for e in entries if e.direction is Direction.EGRESS} == {0}


def test_local_host_reaches_isolated_pods_remote_node_does_not(sim: PolicySimulator) -> None:
    apply(sim, "knp-deny-all-ingress.yaml")
    assert reason(sim, "prod/db", "in", "host", "TCP", 8080) == 0
    assert reason(sim, "prod/db", "in", "remote-node", "TCP", 8080) == DENIED
    strict = make_cluster(PolicyResolver(allow_localhost=False))
    apply(strict, "knp-deny-all-ingress.yaml")
    assert reason(strict, "prod/db", "in", "host", "TCP", 8080) == DENIED


# -- CIDR -----------------------------------------------------------------------------------


def test_cnp_cidr_and_except(sim: PolicySimulator) -> None:
    apply(sim, "cnp-cidr.yaml")
    assert reason(sim, "prod/client", "out", "1.1.1.1", "UDP", 53) == 0
    assert reason(sim, "prod/client", "out", "1.1.1.2", "UDP", 53) == DENIED
    assert reason(sim, "prod/client", "out", "10.2.3.4", "TCP", 443) == 0
    assert reason(sim, "prod/client", "out", "10.2.3.4", "TCP", 80) == DENIED
    assert reason(sim, "prod/client", "out", "10.1.2.3", "TCP", 443) == DENIED
    prefixes = set(sim.resolver.cidr_identities())
    assert "1.1.1.1/32" in prefixes and "10.0.0.0/16" in prefixes
    assert not any(p.startswith("10.1.") for p in prefixes)


def test_cnp_cidr_never_matches_pods(sim: PolicySimulator) -> None:
    apply(sim, "cnp-cidr.yaml")
    assert reason(sim, "prod/client", "out", "prod/web", "TCP", 443) == DENIED
    assert reason(sim, "prod/client", "in", "10.64.9.9", "TCP", 1) == 0  # unmanaged address
    assert reason(sim, "prod/client", "in", "prod/web", "TCP", 1) == DENIED  # a pod in range


def test_cidr_except_only_subtracts_from_its_entry(sim: PolicySimulator) -> None:
    apply(sim, "cnp-cidr-union.yaml")
    assert reason(sim, "prod/client", "out", "10.1.2.3", "TCP", 1) == 0
    assert reason(sim, "prod/client", "out", "10.1.3.3", "TCP", 1) == DENIED
    assert reason(sim, "prod/client", "out", "10.200.0.1", "TCP", 1) == 0


def test_knp_ipblock_matches_pod_ips_too(sim: PolicySimulator) -> None:
    apply(sim, "knp-ipblock.yaml")
    assert reason(sim, "prod/web", "in", "prod/db", "TCP", 8080) == 0
    assert reason(sim, "prod/web", "in", "dev/dns", "TCP", 8080) == 0
    assert reason(sim, "prod/web", "in", "prod/client", "TCP", 8080) == DENIED  # excepted
    assert reason(sim, "prod/web", "in", "8.8.8.8", "TCP", 8080) == 0
    assert reason(sim, "prod/web", "in", "9.9.9.9", "TCP", 8080) == DENIED
    assert reason(sim, "prod/web", "in", "10.64.9.9", "TCP", 8080) == 0
    assert reason(sim, "prod/web", "in", "remote-node", "TCP", 8080) == DENIED


def test_knp_ipblock_follows_pod_ip_changes(sim: PolicySimulator) -> None:
    apply(sim, "knp-ipblock.yaml")
    sim.remove_pod("prod/db")
    sim.add_pod("prod/db", {"app": "db", "tier": "back"}, "10.99.0.11")
    assert reason(sim, "prod/web", "in", "prod/db", "TCP", 8080) == DENIED


def test_world_entity_equals_all_of_ipv4(sim: PolicySimulator) -> None:
    sim.apply_yaml("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: w, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toCIDR: [0.0.0.0/0]
""")
    assert reason(sim, "prod/client", "out", "8.8.8.8", "TCP", 1) == 0
    assert reason(sim, "prod/client", "out", "prod/web", "TCP", 1) == DENIED
    assert sim.resolver.cidr_identities() == {}  # 0.0.0.0/0 is the world identity


# -- ports ----------------------------------------------------------------------------------


def test_cnp_protocols_and_ranges(sim: PolicySimulator) -> None:
    apply(sim, "cnp-ports.yaml")
    ok = [("TCP", 5432), ("UDP", 9000), ("UDP", 9005), ("UDP", 9010), ("SCTP", 7000),
          ("TCP", 6000), ("UDP", 6000), ("SCTP", 6000)]
    bad = [("UDP", 5432), ("UDP", 9011), ("UDP", 8999), ("TCP", 9005), ("TCP", 7000),
           ("ICMP", 8), ("TCP", 5433)]
    for proto, port in ok:
        assert reason(sim, "prod/db", "in", "prod/web", proto, port) == 0, (proto, port)
    for proto, port in bad:
        assert reason(sim, "prod/db", "in", "prod/web", proto, port) == DENIED, (proto, port)


def test_knp_protocols_and_ranges(sim: PolicySimulator) -> None:
    apply(sim, "knp-ports.yaml")
    for proto, port in [("TCP", 5432), ("UDP", 32000), ("UDP", 32768), ("SCTP", 1),
                        ("SCTP", 65535)]:
        assert reason(sim, "prod/db", "in", "prod/web", proto, port) == 0, (proto, port)
    for proto, port in [("UDP", 5432), ("UDP", 32769), ("TCP", 32000), ("ICMP", 8)]:
        assert reason(sim, "prod/db", "in", "prod/web", proto, port) == DENIED, (proto, port)


def test_named_ports_resolve_against_the_destination(sim: PolicySimulator) -> None:
    apply(sim, "named-ports.yaml")
    # ingress: prod/web's own http = 8080
    assert reason(sim, "prod/web", "in", "dev/client", "TCP", 8080) == 0
    assert reason(sim, "prod/web", "in", "dev/client", "TCP", 80) == DENIED
    # egress: http is 8080 on prod/web and 80 on dev/web → per-identity entries
    assert reason(sim, "prod/client", "out", "prod/web", "TCP", 8080) == 0
    assert reason(sim, "prod/client", "out", "prod/web", "TCP", 80) == DENIED
    assert reason(sim, "prod/client", "out", "dev/web", "TCP", 80) == 0
    assert reason(sim, "prod/client", "out", "dev/web", "TCP", 8080) == DENIED
    entries = sim.resolver.policy(sim.pods["prod/client"].endpoint).entries
    egress = {(e.identity, e.port) for e in entries if e.direction is Direction.EGRESS}
    assert egress == {(sim.pods["prod/web"].identity, 8080), (sim.pods["dev/web"].identity, 80)}


def test_named_port_change_on_a_peer_updates_entries(sim: PolicySimulator) -> None:
    apply(sim, "named-ports.yaml")
    sim.remove_pod("dev/web")
    update = sim.add_pod("dev/web", {"app": "web"}, "10.64.1.10", {"http": (8081, Protocol.TCP)})
    client = sim.pods["prod/client"].endpoint
    assert client in update.endpoints
    assert reason(sim, "prod/client", "out", "dev/web", "TCP", 8081) == 0
    assert reason(sim, "prod/client", "out", "dev/web", "TCP", 80) == DENIED


def test_icmp_rules(sim: PolicySimulator) -> None:
    apply(sim, "icmp.yaml")
    assert reason(sim, "prod/web", "in", "prod/client", "ICMP", 8) == 0
    assert reason(sim, "prod/web", "in", "prod/client", "ICMP", 3) == DENIED
    assert reason(sim, "prod/web", "in", "prod/client", "TCP", 8080) == 0
    assert reason(sim, "prod/web", "in", "prod/client", "TCP", 8) == DENIED


# -- deny and default deny ------------------------------------------------------------------


def test_deny_beats_allow_from_other_policies(sim: PolicySimulator) -> None:
    apply(sim, "deny.yaml")
    assert reason(sim, "prod/web", "in", "prod/client", "TCP", 8080) == DENY
    assert reason(sim, "prod/web", "in", "prod/client", "TCP", 80) == 0
    assert reason(sim, "prod/web", "in", "dev/client", "TCP", 8080) == 0
    assert reason(sim, "prod/web", "in", "8.8.8.8", "TCP", 80) == DENY


def test_l3_deny_beats_narrower_l4_allow(sim: PolicySimulator) -> None:
    apply(sim, "deny-l3.yaml")
    for port in (80, 81, 82):
        assert reason(sim, "prod/web", "in", "prod/client", "TCP", port) == DENY
    state = sim.resolver.map_state(sim.pods["prod/web"].endpoint)
    client = int(sim.pods["prod/client"].identity)
    assert all(v.deny for k, v in state.items() if k.identity == client)
    sim.delete("CiliumNetworkPolicy", "prod", "deny-client")
    assert reason(sim, "prod/web", "in", "prod/client", "TCP", 80) == 0


def test_deny_only_policy_isolates(sim: PolicySimulator) -> None:
    apply(sim, "deny-only.yaml")
    assert reason(sim, "prod/client", "out", "1.1.1.1", "TCP", 443) == DENY
    assert reason(sim, "prod/client", "out", "8.8.8.8", "TCP", 443) == DENIED


def test_enable_default_deny_false_only_adds_denies(sim: PolicySimulator) -> None:
    apply(sim, "default-deny-false.yaml")
    assert not sim.resolver.policy(sim.pods["prod/client"].endpoint).egress_enforced
    assert reason(sim, "prod/client", "out", "1.1.1.1", "TCP", 443) == DENY
    assert reason(sim, "prod/client", "out", "8.8.8.8", "TCP", 443) == 0
    apply(sim, "deny-only.yaml")  # another policy's true wins over false
    assert reason(sim, "prod/client", "out", "8.8.8.8", "TCP", 443) == DENIED


def test_union_across_files_and_languages(sim: PolicySimulator) -> None:
    apply(sim, "union-a.yaml", "union-b.yaml")
    assert reason(sim, "prod/db", "in", "prod/web", "TCP", 5432) == 0
    assert reason(sim, "prod/db", "in", "prod/client", "TCP", 5432) == 0
    assert reason(sim, "prod/db", "in", "prod/client", "TCP", 5433) == DENIED
    assert reason(sim, "prod/db", "in", "dev/web", "UDP", 9) == 0
    assert reason(sim, "prod/db", "in", "dev/client", "TCP", 5432) == DENIED


def test_cookie_names_the_deciding_rule(sim: PolicySimulator) -> None:
    apply(sim, "deny.yaml")
    denied = sim.ingress("prod/web", "prod/client", "TCP", 8080)
    info = sim.resolver.cookie_info(denied.cookie)
    assert info is not None
    assert (info.kind, info.namespace, info.name, info.direction, info.rule_index) == (
        "CiliumNetworkPolicy", "prod", "deny", "ingressDeny", 0)
    allowed = sim.ingress("prod/web", "dev/client", "TCP", 8080)
    info = sim.resolver.cookie_info(allowed.cookie)
    assert info is not None and (info.kind, info.name, info.direction) == (
        "NetworkPolicy", "allow-web-from-all", "ingress")
    host = sim.ingress("prod/web", "host", "TCP", 1)
    assert sim.resolver.cookie_info(host.cookie).name == "allow-localhost"  # type: ignore[union-attr]


def test_reserved_peer_selector_has_no_namespace(sim: PolicySimulator) -> None:
    sim.apply_yaml("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: from-host-only, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: db}}
  egress:
  - toEndpoints: [{matchLabels: {"reserved:host": ""}}]
""")
    assert reason(sim, "prod/db", "out", "host", "TCP", 10250) == 0
    assert reason(sim, "prod/db", "out", "prod/web", "TCP", 10250) == DENIED
    assert sim.identity_of("host") == ReservedIdentity.HOST
