"""Labels, label sets, pod identity labels, reserved and node-local identities, and the
identity cache fed directly."""

from __future__ import annotations

import pytest

from villi.errors import IdentityError
from villi.identity.cache import IdentityCache
from villi.identity.labels import (
    Label,
    LabelSet,
    cidr_labels,
    namespace_labels,
    parse_label,
    pod_identity_labels,
)
from villi.identity.local import LocalIdentityAllocator
from villi.identity.reserved import (
    RESERVED_LABELS,
    ReservedIdentity,
    is_local,
    is_reserved,
    reserved_identities,
    reserved_identity_for,
)


def test_parse_and_format_labels() -> None:
    assert parse_label("k8s:app=web") == Label("k8s", "app", "web")
    assert parse_label("reserved:host") == Label("reserved", "host", "")
    assert parse_label("app=web") == Label("unspec", "app", "web")
    assert parse_label("app.kubernetes.io/name=x", "k8s") == Label(
        "k8s", "app.kubernetes.io/name", "x")
    assert str(Label("k8s", "app", "web")) == "k8s:app=web"
    with pytest.raises(ValueError, match="unknown label source"):
        parse_label("nope:app=web")


def test_label_set_is_sorted_canonical_and_hashable() -> None:
    a = LabelSet.of("k8s:tier=front", "k8s:app=web", "reserved:host")
    b = LabelSet.of("reserved:host", "k8s:app=web", "k8s:tier=front", "k8s:app=web")
    assert a == b and hash(a) == hash(b) and len(a) == 3
    assert a.canonical == "k8s:app=web;k8s:tier=front;reserved:host=;"
    assert LabelSet.parse(a.canonical) == a
    assert "k8s:app=web" in a and "k8s:app=db" not in a
    assert a.get("app") == "web" and a.get("app", "container") is None
    assert {a: 1}[b] == 1
    with pytest.raises(ValueError, match="two values"):
        LabelSet.of("k8s:app=web", "k8s:app=db")
    # the same key from two sources is fine
    assert len(LabelSet.of("k8s:app=web", "container:app=db").with_key("app")) == 2


def test_pod_identity_labels_follow_cilium() -> None:
    labels = pod_identity_labels(
        "prod", {"app": "web", "pod-template-hash": "abc123",
                 "app.kubernetes.io/name": "shop", "statefulset.kubernetes.io/pod-name": "w-0"},
        {"team": "red"}, service_account="web-sa")
    assert set(map(str, labels)) == {
        "k8s:app=web", "k8s:app.kubernetes.io/name=shop",
        "k8s:io.kubernetes.pod.namespace=prod",
        "k8s:io.cilium.k8s.namespace.labels.team=red",
        "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=prod",
        "k8s:io.cilium.k8s.policy.serviceaccount=web-sa",
    }
    assert labels.namespace == "prod"
    # per-pod noise is filtered, so replicas share one identity
    assert labels == pod_identity_labels(
        "prod", {"app": "web", "pod-template-hash": "zzz", "app.kubernetes.io/name": "shop",
                 "statefulset.kubernetes.io/pod-name": "w-1"}, {"team": "red"},
        service_account="web-sa")
    assert namespace_labels("x") == {"kubernetes.io/metadata.name": "x"}


def test_reserved_identities_keep_cilium_numbers() -> None:
    expected = {"host": 1, "world": 2, "unmanaged": 3, "health": 4, "init": 5,
                "remote-node": 6, "kube-apiserver": 7, "ingress": 8}
    for name, number in expected.items():
        labels = LabelSet.of(f"reserved:{name}")
        assert reserved_identity_for(labels) == number
        assert RESERVED_LABELS[ReservedIdentity(number)] == labels
        assert ReservedIdentity(number).label_name == name
    assert set(reserved_identities()) == set(range(1, 9))
    assert reserved_identity_for(LabelSet.of("k8s:app=web")) is None
    assert is_reserved(2) and not is_reserved(256) and not is_reserved(0)


def test_local_cidr_identities_are_deterministic_and_refcounted() -> None:
    alloc = LocalIdentityAllocator()
    a, fresh = alloc.acquire("10.0.0.0/8")
    assert fresh and a == (1 << 24) | 1 and is_local(a)
    b, fresh = alloc.acquire("1.1.1.1/32")
    assert fresh and b == a + 1
    assert alloc.acquire("10.0.0.0/8") == (a, False)
    assert alloc.release("10.0.0.0/8") == (a, False)
    assert alloc.release("10.0.0.0/8") == (a, True)
    assert alloc.lookup("10.0.0.0/8") is None and alloc.live() == {"1.1.1.1/32": b}
    assert alloc.acquire("10.0.0.0/8") == (a, True)  # same number again
    assert alloc.labels_of(a) == cidr_labels("10.0.0.0/8")
    assert alloc.prefix_of(b) == "1.1.1.1/32"
    with pytest.raises(IdentityError):
        alloc.release("2.2.2.2/32")
    assert set(map(str, cidr_labels("10.0.0.0/8"))) == {"cidr:10.0.0.0/8=",
                                                        "reserved:world="}


def test_identity_cache_maps_both_ways_and_notifies() -> None:
    cache = IdentityCache()
    assert cache.get(2) == LabelSet.of("reserved:world") and len(cache) == 8
    events = []
    cache.add_listener(lambda added, removed: events.append((dict(added), dict(removed))),
                       replay=False)
    web = LabelSet.of("k8s:app=web")
    cache.upsert(300, web)
    assert cache.get(300) == web and cache.lookup(web) == 300 and 300 in cache
    cache.upsert(300, web)  # no change, no event
    db = LabelSet.of("k8s:app=db")
    cache.upsert(300, db)
    cache.delete(300)
    cache.delete(300)
    assert events == [({300: web}, {}), ({300: db}, {}), ({}, {300: db})]
    assert cache.lookup(web) is None and cache.lookup(db) is None
    replayed = []
    cache.add_listener(lambda added, removed: replayed.append(len(added)))
    assert replayed == [8]
