"""Changes produce per-endpoint diffs for affected endpoints only, never a rebuild, and
the diffs compose: applying every map diff to the previous rows gives the new rows."""

from __future__ import annotations

from villi.identity.cache import IdentityCache
from villi.identity.ids import IdentityID
from villi.identity.labels import pod_identity_labels
from villi.policy.entry import Direction, EndpointID, Protocol
from villi.policy.loader import load_text
from villi.policy.mapstate import compute_map_state
from villi.policy.resolver import Endpoint, EndpointPolicyDiff, PolicyResolver
from villi.policy.simulate import PolicySimulator

WEB_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "PORT", protocol: TCP}]}]
"""


def cluster(map_writer=None) -> PolicySimulator:
    sim = PolicySimulator(PolicyResolver(map_writer=map_writer))
    sim.add_pod("prod/web-1", {"app": "web"}, "10.64.0.1")
    sim.add_pod("prod/web-2", {"app": "web"}, "10.64.0.2")
    sim.add_pod("prod/db", {"app": "db"}, "10.64.0.3")
    sim.add_pod("prod/client", {"app": "client"}, "10.64.0.4")
    return sim


def ep(sim: PolicySimulator, pod: str) -> EndpointID:
    return sim.pods[pod].endpoint


def test_policy_change_touches_only_selected_endpoints() -> None:
    sim = cluster()
    update = sim.apply_yaml(WEB_POLICY.replace("PORT", "80"))
    assert set(update.endpoints) == {ep(sim, "prod/web-1"), ep(sim, "prod/web-2")}
    diff = update.endpoints[ep(sim, "prod/web-1")]
    assert diff.ingress_enforced and diff.enforcement_changed and not diff.removed
    client = sim.pods["prod/client"].identity
    assert {(e.identity, e.port) for e in diff.added} == {(client, 80), (1, 0)}  # + localhost


def test_reapplying_an_unchanged_policy_is_a_no_op() -> None:
    sim = cluster()
    sim.apply_yaml(WEB_POLICY.replace("PORT", "80"))
    assert not sim.apply_yaml(WEB_POLICY.replace("PORT", "80"))


def test_changing_one_port_is_a_one_entry_diff() -> None:
    sim = cluster()
    sim.apply_yaml(WEB_POLICY.replace("PORT", "80"))
    before = sim.resolver.map_state(ep(sim, "prod/web-1"))
    update = sim.apply_yaml(WEB_POLICY.replace("PORT", "8080"))
    diff = update.endpoints[ep(sim, "prod/web-1")]
    assert [e.port for e in diff.added] == [8080] and [e.port for e in diff.removed] == [80]
    assert not diff.enforcement_changed
    assert len(diff.map_upserts) == 1 and len(diff.map_deletes) == 1
    after = {k: v for k, v in before.items() if k not in diff.map_deletes}
    after.update(diff.map_upserts)
    assert after == sim.resolver.map_state(ep(sim, "prod/web-1"))


def test_cookies_are_stable_across_updates() -> None:
    sim = cluster()
    sim.apply_yaml(WEB_POLICY.replace("PORT", "80"))
    cookies = {e.cookie for e in sim.resolver.policy(ep(sim, "prod/web-1")).entries}
    longer = WEB_POLICY.replace("PORT", "80") + """  - fromEndpoints: [{matchLabels: {app: db}}]
"""
    update = sim.apply_yaml(longer)
    diff = update.endpoints[ep(sim, "prod/web-1")]
    assert not diff.removed
    assert cookies < {e.cookie for e in sim.resolver.policy(ep(sim, "prod/web-1")).entries}


def test_batched_add_then_delete_cancels_out() -> None:
    sim = cluster()
    (policy,) = load_text(WEB_POLICY.replace("PORT", "80"))
    with sim.resolver.batch() as batch:
        sim.resolver.upsert_resource(policy)
        sim.resolver.delete_resource("CiliumNetworkPolicy", "prod", "web")
    assert not batch.update


def test_new_identity_only_updates_policies_that_select_it() -> None:
    sim = cluster()
    sim.apply_yaml(WEB_POLICY.replace("PORT", "80"))
    sim.apply_yaml("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
""")
    update = sim.add_pod("prod/client-2", {"app": "client", "v": "2"}, "10.64.0.5")
    new = ep(sim, "prod/client-2")
    assert set(update.endpoints) == {ep(sim, "prod/web-1"), ep(sim, "prod/web-2"), new}
    diff = update.endpoints[ep(sim, "prod/web-1")]
    assert {e.identity for e in diff.added} == {sim.pods["prod/client-2"].identity}
    assert not diff.removed
    update = sim.remove_pod("prod/client-2")
    assert update.endpoints[new].deleted
    assert {e.identity for e in update.endpoints[ep(sim, "prod/web-2")].removed} == {
        IdentityID(sim._next_identity - 1)}


def test_endpoints_with_same_labels_share_one_computation() -> None:
    sim = cluster()
    sim.apply_yaml(WEB_POLICY.replace("PORT", "80"))
    subjects = sim.resolver._subjects
    assert len(subjects) == 3  # web-1 and web-2 share
    a = sim.resolver.policy(ep(sim, "prod/web-1"))
    b = sim.resolver.policy(ep(sim, "prod/web-2"))
    assert a == b


def test_endpoint_delete_and_relabel_diffs() -> None:
    sim = cluster()
    sim.apply_yaml(WEB_POLICY.replace("PORT", "80"))
    web1 = ep(sim, "prod/web-1")
    old_state = sim.resolver.map_state(web1)
    update = sim.relabel_pod("prod/web-1", {"app": "db"})
    diff = update.endpoints[web1]
    assert diff.enforcement_changed and not diff.ingress_enforced
    assert diff.map_deletes == frozenset(old_state) and not diff.map_upserts
    web2 = ep(sim, "prod/web-2")
    update = sim.remove_pod("prod/web-2")
    diff = update.endpoints[web2]
    assert diff.deleted and diff.map_deletes and not diff.added


def test_map_writer_hook_gets_every_diff_and_they_compose() -> None:
    rows: dict[EndpointID, dict] = {}

    def writer(diff: EndpointPolicyDiff) -> None:
        table = rows.setdefault(diff.endpoint, {})
        for key in diff.map_deletes:
            del table[key]
        table.update(diff.map_upserts)
        if diff.deleted:
            assert not table
            del rows[diff.endpoint]

    sim = cluster(writer)
    sim.apply_yaml(WEB_POLICY.replace("PORT", "80"))
    sim.apply_yaml(WEB_POLICY.replace("PORT", "81"))
    sim.add_pod("prod/client-2", {"app": "client", "v": "2"}, "10.64.0.5")
    sim.relabel_pod("prod/db", {"app": "web"})
    sim.remove_pod("prod/web-2")
    sim.delete("CiliumNetworkPolicy", "prod", "web")
    for pod in sim.pods.values():
        assert rows.get(pod.endpoint, {}) == sim.resolver.map_state(pod.endpoint)
        entries = sim.resolver.policy(pod.endpoint).entries
        assert sim.resolver.map_state(pod.endpoint) == compute_map_state(entries)


def test_cidr_prefixes_are_refcounted_across_policies() -> None:
    sim = cluster()
    cidr = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: NAME, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.128.0.0/9]}]
"""
    first = sim.apply_yaml(cidr.replace("NAME", "a"))
    assert set(first.cidr_upserts) == {"10.0.0.0/9"}
    assert not sim.apply_yaml(cidr.replace("NAME", "b")).cidr_upserts
    assert not sim.delete("CiliumNetworkPolicy", "prod", "a").cidr_deletes
    last = sim.delete("CiliumNetworkPolicy", "prod", "b")
    assert last.cidr_deletes == first.cidr_upserts
    assert sim.resolver.cidr_identities() == {}
    again = sim.apply_yaml(cidr.replace("NAME", "c"))
    assert again.cidr_upserts == first.cidr_upserts  # same id for the same prefix


def test_new_cidr_prefix_widens_existing_world_selections() -> None:
    sim = cluster()
    sim.apply_yaml("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: world, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: db}}
  egress:
  - toEntities: [world]
""")
    update = sim.apply_yaml("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: cidr, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egressDeny:
  - toCIDR: [1.1.1.1/32]
""")
    (identity,) = update.cidr_upserts.values()
    db = update.endpoints[ep(sim, "prod/db")]
    assert {e.identity for e in db.added} == {identity}
    assert sim.egress("prod/db", "1.1.1.1", "TCP", 443).allowed


def test_identity_cache_listener_feeds_the_resolver() -> None:
    seen: list[EndpointPolicyDiff] = []
    resolver = PolicyResolver(map_writer=seen.append)
    cache = IdentityCache()
    cache.add_listener(resolver.identity_listener)
    web = pod_identity_labels("prod", {"app": "web"})
    client = pod_identity_labels("prod", {"app": "client"})
    cache.upsert(300, web)
    resolver.upsert_endpoint(Endpoint(EndpointID(1), IdentityID(300), web, "prod",
                                      {"http": (80, Protocol.TCP)}))
    resolver.apply(load_text(WEB_POLICY.replace("PORT", "http")))
    seen.clear()
    cache.upsert(301, client)
    (diff,) = seen
    assert [(e.identity, e.port, e.direction) for e in diff.added] == [
        (301, 80, Direction.INGRESS)]
    cache.delete(301)
    assert [e.identity for e in seen[-1].removed] == [301]


def test_namespace_resources_are_recorded() -> None:
    resolver = PolicyResolver()
    resolver.apply(load_text("apiVersion: v1\nkind: Namespace\n"
                             "metadata: {name: prod, labels: {team: red}}\n"))
    assert resolver.namespace_labels("prod") == {"team": "red",
                                                 "kubernetes.io/metadata.name": "prod"}
    assert resolver.namespace_labels("other") == {"kubernetes.io/metadata.name": "other"}
    resolver.delete_resource("Namespace", None, "prod")
    assert resolver.namespace_labels("prod") == {"kubernetes.io/metadata.name": "prod"}


def test_section_without_subjects_does_not_keep_stale_selections() -> None:
    sim = cluster()
    sim.apply_yaml(WEB_POLICY.replace("PORT", "80"))
    sim.remove_pod("prod/web-1")
    sim.remove_pod("prod/web-2")  # the rule now selects no local endpoint
    sim.add_pod("prod/client-2", {"app": "client", "v": "2"}, "10.64.0.5")
    sim.remove_pod("prod/client")
    sim.add_pod("prod/web-3", {"app": "web"}, "10.64.0.6")
    assert sim.ingress("prod/web-3", "prod/client-2", "TCP", 80).allowed
    peers = {e.identity for e in sim.resolver.policy(ep(sim, "prod/web-3")).entries}
    assert peers == {sim.pods["prod/client-2"].identity, 1}
