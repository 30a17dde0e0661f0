"""Property tests: resolver → map state → emulated kernel == the reference evaluator.

Random CNP/CCNP/KNP documents (allow and deny, selectors, ports, ranges, named ports,
entities, CIDRs with except, ICMP, default-deny switches) and random labelled pods are
pushed through the real loader, resolver, ``compute_map_state`` and
``datapath_verdict``; every (endpoint, direction, peer, protocol, port) decision must
equal the one :mod:`policy_reference` computes from the raw YAML. A second property
checks that incremental updates (one policy at a time, deletes, relabels) end in exactly
the state a from-scratch resolution gives.
"""

from __future__ import annotations

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from villi.policy.entry import Direction, Protocol
from villi.policy.mapstate import compute_map_state
from villi.policy.simulate import PolicySimulator

from . import policy_reference as ref

NAMESPACES = {"a": {"team": "red"}, "b": {"team": "blue"}}
APPS = ["web", "db", "api"]
EXTERNAL = ["1.1.1.1", "8.8.8.8", "10.1.2.3", "10.2.0.9", "192.168.1.7", "10.64.9.9"]
RESERVED = ["host", "remote-node", "kube-apiserver"]
PACKETS = [("TCP", 80), ("TCP", 8080), ("TCP", 8050), ("UDP", 53), ("UDP", 80), ("SCTP", 80),
           ("TCP", 443), ("ICMP", 8), ("ICMP", 3)]
PORT_SETS = [{}, {"http": (80, "TCP")}, {"http": (8080, "TCP")},
             {"http": (80, "TCP"), "dns": (53, "UDP")}, {"dns": (53, "UDP")}]

SETTINGS = settings(max_examples=200, derandomize=True, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# -- generators ----------------------------------------------------------------------------


@st.composite
def pods(draw: st.DrawFn) -> list[ref.Pod]:
    count = draw(st.integers(2, 5))
    out = []
    for i in range(count):
        labels = {"app": draw(st.sampled_from(APPS)), "pod": f"p{i}"}
        tier = draw(st.sampled_from([None, "front", "back"]))
        if tier:
            labels["tier"] = tier
        out.append(ref.Pod(draw(st.sampled_from(["a", "b"])), f"p{i}", labels,
                           f"10.64.0.{i + 1}", draw(st.sampled_from(PORT_SETS))))
    return out


def _match_labels(cilium: bool) -> st.SearchStrategy[dict]:
    app = st.sampled_from(APPS)
    options = [
        st.builds(lambda a: {"matchLabels": {"app": a}}, app),
        st.builds(lambda a, t: {"matchLabels": {"app": a, "tier": t}}, app,
                  st.sampled_from(["front", "back"])),
        st.builds(lambda op, vs: {"matchExpressions": [{"key": "app", "operator": op,
                                                        "values": vs}]},
                  st.sampled_from(["In", "NotIn"]),
                  st.lists(app, min_size=1, max_size=2, unique=True)),
        st.builds(lambda op: {"matchExpressions": [{"key": "tier", "operator": op}]},
                  st.sampled_from(["Exists", "DoesNotExist"])),
        st.just({}),
    ]
    if cilium:
        options += [
            st.builds(lambda a: {"matchLabels": {"k8s:app": a}}, app),
            st.builds(lambda ns: {"matchLabels": {"io.kubernetes.pod.namespace": ns}},
                      st.sampled_from(["a", "b"])),
            st.builds(lambda ns, a: {"matchLabels": {"k8s:io.kubernetes.pod.namespace": ns,
                                                     "app": a}}, st.sampled_from(["a", "b"]), app),
            st.just({"matchExpressions": [{"key": "io.kubernetes.pod.namespace",
                                           "operator": "Exists"}]}),
            st.builds(lambda t: {"matchLabels": {
                "k8s:io.cilium.k8s.namespace.labels.team": t}}, st.sampled_from(["red", "blue"])),
            st.just({"matchLabels": {"reserved:host": ""}}),
        ]
    return st.one_of(options)


CNP_PORT = st.sampled_from([
    {"port": "80", "protocol": "TCP"}, {"port": "80"}, {"port": "53", "protocol": "UDP"},
    {"port": "0", "protocol": "UDP"}, {"port": "0"}, {"port": "8000", "endPort": 8100},
    {"port": "8000", "endPort": 8100, "protocol": "TCP"}, {"port": "http"},
    {"port": "dns", "protocol": "UDP"}, {"port": "http", "protocol": "UDP"},
    {"port": 443, "protocol": "TCP"}, {"port": "80", "protocol": "SCTP"},
])
CIDR_SETS = st.sampled_from([
    {"cidr": "10.0.0.0/8"}, {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]},
    {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}, {"cidr": "192.168.0.0/16"},
    {"cidr": "10.64.0.0/16", "except": ["10.64.0.0/30"]},
])
CIDRS = st.sampled_from(["1.1.1.1/32", "10.0.0.0/8", "0.0.0.0/0", "10.64.0.0/16"])
ENTITIES = st.sampled_from(["all", "world", "cluster", "host", "remote-node",
                            "kube-apiserver", "none"])


@st.composite
def cnp_item(draw: st.DrawFn, prefix: str) -> dict:
    item: dict = {}
    l3 = draw(st.sampled_from(["none", "endpoints", "cidr", "cidrset", "entities"]))
    if l3 == "endpoints":
        item[f"{prefix}Endpoints"] = draw(st.lists(_match_labels(True), min_size=1, max_size=2))
    elif l3 == "cidr":
        item[f"{prefix}CIDR"] = draw(st.lists(CIDRS, min_size=1, max_size=2, unique=True))
    elif l3 == "cidrset":
        item[f"{prefix}CIDRSet"] = draw(st.lists(CIDR_SETS, min_size=1, max_size=2))
    elif l3 == "entities":
        item[f"{prefix}Entities"] = draw(st.lists(ENTITIES, min_size=1, max_size=2, unique=True))
    l4 = draw(st.sampled_from(["none", "none", "ports", "ports", "icmp"]))
    if l4 == "ports":
        item["toPorts"] = [{"ports": draw(st.lists(CNP_PORT, min_size=1, max_size=2))}]
    elif l4 == "icmp":
        item["icmps"] = [{"fields": [{"type": draw(st.sampled_from([8, 0, 3]))}]}]
    return item


@st.composite
def cnp_rule(draw: st.DrawFn) -> dict:
    rule: dict = {"endpointSelector": draw(_match_labels(True).filter(
        lambda s: "reserved:host" not in s.get("matchLabels", {})))}
    for name, prefix in (("ingress", "from"), ("ingressDeny", "from"), ("egress", "to"),
                         ("egressDeny", "to")):
        weight = 0.2 if name.endswith("Deny") else 0.5
        if draw(st.floats(0, 1)) < weight:
            rule[name] = draw(st.lists(cnp_item(prefix), min_size=0, max_size=2))
    if draw(st.floats(0, 1)) < 0.15:
        rule["enableDefaultDeny"] = {d: draw(st.booleans()) for d in
                                     draw(st.sets(st.sampled_from(["ingress", "egress"])))}
    return rule


@st.composite
def knp_peer(draw: st.DrawFn) -> dict:
    kind = draw(st.sampled_from(["pod", "ns", "both", "ip"]))
    ns_sel = st.sampled_from([{}, {"matchLabels": {"team": "red"}},
                              {"matchLabels": {"kubernetes.io/metadata.name": "b"}},
                              {"matchExpressions": [{"key": "team", "operator": "NotIn",
                                                     "values": ["blue"]}]}])
    if kind == "pod":
        return {"podSelector": draw(_match_labels(False))}
    if kind == "ns":
        return {"namespaceSelector": draw(ns_sel)}
    if kind == "both":
        return {"podSelector": draw(_match_labels(False)), "namespaceSelector": draw(ns_sel)}
    return {"ipBlock": draw(st.sampled_from([
        {"cidr": "10.64.0.0/16", "except": ["10.64.0.2/32"]}, {"cidr": "10.64.0.1/32"},
        {"cidr": "0.0.0.0/0"}, {"cidr": "10.0.0.0/8", "except": ["10.64.0.0/24"]},
        {"cidr": "1.1.1.0/24"}]))}


KNP_PORT = st.sampled_from([
    {"port": 80}, {"protocol": "UDP", "port": 53}, {"protocol": "UDP"}, {"port": "http"},
    {"protocol": "UDP", "port": "dns"}, {"port": 8000, "endPort": 8100}, {"protocol": "SCTP"},
    {"protocol": "TCP", "port": 443},
])


@st.composite
def knp_rule(draw: st.DrawFn, peer_key: str) -> dict:
    rule: dict = {}
    peers = draw(st.sampled_from(["absent", "empty", "list"]))
    if peers == "empty":
        rule[peer_key] = []
    elif peers == "list":
        rule[peer_key] = draw(st.lists(knp_peer(), min_size=1, max_size=2))
    if draw(st.booleans()):
        rule["ports"] = draw(st.lists(KNP_PORT, min_size=1, max_size=2))
    return rule


@st.composite
def policy_doc(draw: st.DrawFn, index: int) -> dict:
    kind = draw(st.sampled_from(["CiliumNetworkPolicy", "CiliumNetworkPolicy",
                                 "CiliumClusterwideNetworkPolicy", "NetworkPolicy",
                                 "NetworkPolicy"]))
    meta: dict = {"name": f"p{index}"}
    if kind != "CiliumClusterwideNetworkPolicy":
        meta["namespace"] = draw(st.sampled_from(["a", "b"]))
    if kind == "NetworkPolicy":
        spec: dict = {"podSelector": draw(_match_labels(False))}
        if draw(st.booleans()):
            spec["policyTypes"] = sorted(draw(st.sets(st.sampled_from(["Ingress", "Egress"]),
                                                      min_size=1)))
        for name, key in (("ingress", "from"), ("egress", "to")):
            if draw(st.booleans()):
                spec[name] = draw(st.lists(knp_rule(key), min_size=0, max_size=2))
        return {"apiVersion": "networking.k8s.io/v1", "kind": kind, "metadata": meta,
                "spec": spec}
    doc = {"apiVersion": "cilium.io/v2", "kind": kind, "metadata": meta}
    rules = draw(st.lists(cnp_rule(), min_size=1, max_size=2))
    if len(rules) == 1 and draw(st.booleans()):
        doc["spec"] = rules[0]
    else:
        doc["specs"] = rules
    return doc


@st.composite
def scenario(draw: st.DrawFn) -> tuple[list[ref.Pod], list[dict]]:
    count = draw(st.integers(1, 4))
    return draw(pods()), [draw(policy_doc(i)) for i in range(count)]


# -- harness -------------------------------------------------------------------------------


def build(pod_list: list[ref.Pod], docs: list[dict]) -> PolicySimulator:
    sim = PolicySimulator()
    for ns, labels in NAMESPACES.items():
        sim.set_namespace_labels(ns, labels)
    for pod in pod_list:
        sim.add_pod(f"{pod.ns}/{pod.name}", pod.labels, pod.ip,
                    {n: (p, Protocol[pr]) for n, (p, pr) in pod.ports.items()})
    if docs:
        sim.apply_yaml(yaml.safe_dump_all(docs), "generated.yaml")
    return sim


def peers_of(pod_list: list[ref.Pod]) -> list[tuple[str, ref.Peer]]:
    out = [(f"{p.ns}/{p.name}", ref.Peer(pod=p)) for p in pod_list]
    out += [(ip, ref.Peer(ip=ip)) for ip in EXTERNAL]
    out += [(name, ref.Peer(reserved=name)) for name in RESERVED]
    return out


def compare(sim: PolicySimulator, pod_list: list[ref.Pod], docs: list[dict]) -> None:
    peers = peers_of(pod_list)
    for pod in pod_list:
        name = f"{pod.ns}/{pod.name}"
        for direction in (Direction.INGRESS, Direction.EGRESS):
            for peer_name, peer in peers:
                for proto, port in PACKETS:
                    got = sim.verdict(name, direction, peer_name, proto, port)
                    want = ref.decide(docs, NAMESPACES, pod, direction.name.lower(), peer,
                                      proto, port)
                    assert (got.allowed, got.drop_reason) == want, (
                        f"{name} {direction.name} peer={peer_name} {proto}/{port}: "
                        f"villi={got} reference={want}\n"
                        f"entries={sorted(sim.resolver.policy(sim.pods[name].endpoint).entries)}"
                        f"\n{yaml.safe_dump_all(docs)}")


@SETTINGS
@given(scenario())
def test_datapath_verdicts_equal_reference(case: tuple[list[ref.Pod], list[dict]]) -> None:
    pod_list, docs = case
    compare(build(pod_list, docs), pod_list, docs)


def _snapshot(sim: PolicySimulator) -> dict:
    out = {}
    for name, pod in sim.pods.items():
        policy = sim.resolver.policy(pod.endpoint)
        # identities differ between resolvers only through insertion order: compare the
        # entries translated back to labels
        entries = frozenset(
            (str(sim.resolver.selectors.labels(e.identity)) if e.identity else "*",
             e.direction, e.protocol, e.port, e.end_port, e.deny,
             sim.resolver.cookie_info(e.cookie)) for e in policy.entries)
        out[name] = (policy.ingress_enforced, policy.egress_enforced, entries)
    return out


@settings(max_examples=60, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenario(), st.data())
def test_incremental_equals_from_scratch(case: tuple[list[ref.Pod], list[dict]],
                                         data: st.DataObject) -> None:
    pod_list, docs = case
    sim = build(pod_list, [])
    for doc in docs:  # one at a time, each its own flush
        sim.apply_yaml(yaml.safe_dump(doc))
    dropped = data.draw(st.lists(st.sampled_from(range(len(docs))), unique=True, max_size=2))
    for i in dropped:
        meta = docs[i]["metadata"]
        sim.delete(docs[i]["kind"], meta.get("namespace"), meta["name"])
    kept = [d for i, d in enumerate(docs) if i not in dropped]
    relabel = data.draw(st.sampled_from(pod_list))
    new_app = data.draw(st.sampled_from(APPS))
    sim.relabel_pod(f"{relabel.ns}/{relabel.name}", {**relabel.labels, "app": new_app})
    final_pods = [p if p is not relabel else ref.Pod(p.ns, p.name, {**p.labels, "app": new_app},
                                                     p.ip, p.ports) for p in pod_list]
    fresh = build(final_pods, kept)
    assert _snapshot(sim) == _snapshot(fresh)
    for pod in sim.pods.values():
        entries = sim.resolver.policy(pod.endpoint).entries
        assert sim.resolver.map_state(pod.endpoint) == compute_map_state(entries)
    compare(sim, final_pods, kept)
