"""Label selectors (Kubernetes operators, Cilium key sources) and the selector cache."""

from __future__ import annotations

import random

import pytest

from villi.identity.labels import LabelSet, cidr_labels, pod_identity_labels
from villi.identity.reserved import reserved_identities
from villi.policy.rules import CIDRSelector
from villi.policy.selectorcache import SelectorCache
from villi.policy.selectors import (
    LabelIndex,
    Requirement,
    Selector,
    any_namespace,
    namespace_is,
    parse_selector_key,
)

WEB = pod_identity_labels("prod", {"app": "web", "tier": "front"}, {"team": "red"})
DB = pod_identity_labels("prod", {"app": "db"})
DEV = pod_identity_labels("dev", {"app": "web"})
HOST = LabelSet.of("reserved:host")
MIXED = LabelSet.of("container:app=web", "k8s:tier=back")


def sel(match_labels: dict | None = None, *exprs: tuple[str, str, list[str]]) -> Selector:
    return Selector.from_k8s(match_labels, exprs)


def test_parse_selector_key() -> None:
    assert parse_selector_key("app") == ("any", "app")
    assert parse_selector_key("k8s:app") == ("k8s", "app")
    assert parse_selector_key("any:app") == ("any", "app")
    assert parse_selector_key("reserved:host") == ("reserved", "host")
    assert parse_selector_key("app", "k8s") == ("k8s", "app")
    with pytest.raises(ValueError, match="unknown label source"):
        parse_selector_key("foo:app")


@pytest.mark.parametrize(("selector", "labels", "expected"), [
    (sel(), WEB, True),
    (sel(), HOST, True),
    (sel({"app": "web"}), WEB, True),
    (sel({"app": "web"}), DB, False),
    (sel({"k8s:app": "web"}), WEB, True),
    (sel({"k8s:app": "web"}), MIXED, False),  # container label, k8s source wanted
    (sel({"app": "web"}), MIXED, True),  # any source
    (sel({"any:app": "web"}), MIXED, True),
    (sel({"io.kubernetes.pod.namespace": "prod"}), WEB, True),
    (sel({"io.kubernetes.pod.namespace": "prod"}), DEV, False),
    (sel({"k8s:io.cilium.k8s.namespace.labels.team": "red"}), WEB, True),
    (sel({"reserved:host": ""}), HOST, True),
    (sel({"reserved:host": ""}), WEB, False),
    (sel(None, ("app", "In", ["web", "db"])), DB, True),
    (sel(None, ("app", "NotIn", ["web"])), DB, True),
    (sel(None, ("app", "NotIn", ["web"])), WEB, False),
    (sel(None, ("app", "NotIn", ["web"])), HOST, True),  # absent key satisfies NotIn
    (sel(None, ("tier", "Exists", [])), WEB, True),
    (sel(None, ("tier", "Exists", [])), DB, False),
    (sel(None, ("tier", "DoesNotExist", [])), DB, True),
    (sel({"app": "web"}, ("tier", "In", ["back"])), WEB, False),  # AND
])
def test_selector_matching(selector: Selector, labels: LabelSet, expected: bool) -> None:
    assert selector.matches(labels) is expected


def test_selectors_are_canonical_and_hashable() -> None:
    a = sel({"app": "web", "tier": "front"})
    b = Selector.from_k8s(None, [("tier", "In", ["front"]), ("app", "In", ["web"])])
    assert a == b and hash(a) == hash(b) and str(a) == str(b)
    assert str(a) == "{any:app=web, any:tier=front}"
    assert a.with_requirements(namespace_is("x")).names_namespace()
    assert not a.names_namespace()
    assert sel({"k8s:io.kubernetes.pod.namespace": "x"}).without_key(
        "io.kubernetes.pod.namespace") == Selector()
    with pytest.raises(ValueError, match="needs at least one value"):
        Requirement("any", "app", "In", ())


def test_namespace_selector_prefix() -> None:
    ns = Selector.from_k8s({"team": "red"}, default_source="k8s",
                           key_prefix="io.cilium.k8s.namespace.labels.")
    assert ns.with_requirements(any_namespace()).matches(WEB)
    assert not ns.matches(DB)


def test_label_index_agrees_with_matching() -> None:
    rng = random.Random(3)
    pool = [pod_identity_labels(rng.choice(["a", "b"]),
                                {k: rng.choice(["x", "y"]) for k in ("app", "tier")
                                 if rng.random() < 0.7}) for _ in range(60)]
    pool += list(reserved_identities().values()) + [MIXED]
    index = LabelIndex()
    for i, labels in enumerate(pool):
        index.add(i, labels)
    selectors = [sel(), sel({"app": "x"}), sel({"k8s:app": "y", "tier": "x"}),
                 sel(None, ("app", "NotIn", ["x"])), sel(None, ("tier", "DoesNotExist", [])),
                 sel({"io.kubernetes.pod.namespace": "a"}, ("app", "Exists", [])),
                 sel({"reserved:world": ""})]
    for selector in selectors:
        assert index.select(selector) == {i for i, lbl in enumerate(pool)
                                          if selector.matches(lbl)}
    for i in range(0, len(pool), 2):
        index.remove(i, pool[i])
    for selector in selectors:
        assert index.select(selector) == {i for i, lbl in enumerate(pool)
                                          if i % 2 and selector.matches(lbl)}


def test_selector_cache_incremental_equals_full() -> None:
    rng = random.Random(5)
    cache = SelectorCache()
    selectors = [sel({"app": "web"}), sel(None, ("app", "NotIn", ["web"])), sel(),
                 sel({"io.kubernetes.pod.namespace": "dev"}), sel({"reserved:world": ""}),
                 CIDRSelector(frozenset({"10.0.0.0/8"})),
                 CIDRSelector(frozenset({"0.0.0.0/0"})),
                 CIDRSelector(frozenset({"10.64.0.0/16"}), pods=True)]
    for s in selectors[:4]:
        cache.add(s)
    live: dict[int, LabelSet] = {}
    for step in range(300):
        if step == 150:
            for s in selectors[4:]:
                cache.add(s)
        if live and rng.random() < 0.4:
            gone = rng.choice(sorted(live))
            del live[gone]
            cache.update_identities({}, [gone])
            continue
        identity = rng.randint(1, 40)
        if rng.random() < 0.2:
            labels = cidr_labels(rng.choice(["10.1.0.0/16", "1.1.1.1/32", "10.64.0.0/24"]))
        else:
            labels = pod_identity_labels(rng.choice(["prod", "dev"]),
                                         {"app": rng.choice(["web", "db"])})
        live[identity] = labels
        cache.update_identities({identity: labels})
        cache.set_ips(identity, [0x0A400000 + identity] if rng.random() < 0.5 else [])
    for s in selectors:
        fresh = SelectorCache()
        fresh.update_identities(dict(live))
        for identity in live:
            fresh.set_ips(identity, cache._ips.get(identity, ()))
        assert cache.selections(s) == fresh.add(s), s


def test_selector_cache_reports_changes_and_refcounts() -> None:
    cache = SelectorCache()
    web = sel({"app": "web"})
    assert cache.add(web) == set()
    cache.add(web)
    changes = cache.update_identities({300: WEB, 301: DB})
    assert changes == {web: ({300}, set())}
    changes = cache.update_identities({300: DB})  # relabel
    assert changes == {web: (set(), {300})}
    cache.release(web)
    assert cache.selections(web) == set()  # still tracked: one reference left
    cache.update_identities({302: DEV})
    assert cache.selections(web) == {302}
    cache.release(web)
    assert web not in cache._selections


def test_cidr_selector_selects_contained_prefixes_world_and_pod_ips() -> None:
    cache = SelectorCache()
    cache.update_identities(reserved_identities())
    cache.update_identities({(1 << 24) | 1: cidr_labels("10.1.0.0/16"),
                             (1 << 24) | 2: cidr_labels("11.0.0.0/8"), 300: WEB})
    ten = CIDRSelector(frozenset({"10.0.0.0/8"}))
    everything = CIDRSelector(frozenset({"0.0.0.0/0"}))
    block = CIDRSelector(frozenset({"10.64.0.0/16"}), pods=True)
    assert cache.add(ten) == {(1 << 24) | 1}
    assert cache.add(everything) == {2, (1 << 24) | 1, (1 << 24) | 2}
    assert cache.add(block) == set()
    changes = cache.set_ips(300, [0x0A400005])
    assert changes == {block: ({300}, set())}
    assert cache.set_ips(300, [0x0A400005, 0x0B000001]) == {block: (set(), {300})}
