"""Backends of service ports: selectors, named target ports, incremental diffs, and the
service table's lookups (no datapath)."""

from __future__ import annotations

import random

from villi.service.backends import (
    Backend,
    BackendIndex,
    PodInfo,
    PortKey,
    PortSpec,
    ServiceInfo,
)
from villi.service.models import Service
from villi.service.table import ServiceTable


def service(name: str = "web", ns: str = "shop", selector: dict[str, str] | None = None,
            ports: list[dict] | None = None, **spec: object) -> Service:
    return Service.model_validate({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
        "spec": {"selector": {"app": "web"} if selector is None else selector,
                 "ports": ports or [{"name": "http", "port": 80, "targetPort": "http"},
                                    {"name": "dns", "port": 53, "protocol": "UDP",
                                     "targetPort": 5353}],
                 **spec},
    })


def pod(ip: str, ns: str = "shop", app: str = "web", ports: dict | None = None,
        **labels: str) -> PodInfo:
    named = {"http": (8080, "TCP")} if ports is None else ports
    return PodInfo.of(ip, ns, {"app": app, **labels}, named)


HTTP = PortKey("shop", "web", 80, "TCP")
DNS = PortKey("shop", "web", 53, "UDP")


def test_selector_and_namespace_decide_membership() -> None:
    idx = BackendIndex()
    idx.upsert_service(service())
    idx.upsert_pod(pod("10.64.0.1"))
    idx.upsert_pod(pod("10.64.0.2", app="db"))            # other labels
    idx.upsert_pod(pod("10.64.0.3", ns="other"))          # other namespace
    idx.upsert_pod(pod("10.64.0.4", tier="front"))        # extra labels are fine
    assert idx.backends[HTTP] == {Backend("10.64.0.1", 8080), Backend("10.64.0.4", 8080)}
    assert idx.backends[DNS] == {Backend("10.64.0.1", 5353), Backend("10.64.0.4", 5353)}


def test_named_target_port_resolves_per_pod_and_excludes_pods_without_it() -> None:
    idx = BackendIndex()
    idx.upsert_service(service())
    idx.upsert_pod(pod("10.64.0.1", ports={"http": (8080, "TCP")}))
    idx.upsert_pod(pod("10.64.0.2", ports={"http": (9090, "TCP")}))
    idx.upsert_pod(pod("10.64.0.3", ports={}))                    # no such name
    idx.upsert_pod(pod("10.64.0.4", ports={"http": (8080, "UDP")}))  # wrong protocol
    assert idx.backends[HTTP] == {Backend("10.64.0.1", 8080), Backend("10.64.0.2", 9090)}
    # the numeric port still selects every pod
    assert len(idx.backends[DNS]) == 4


def test_named_ports_as_ipcache_lists() -> None:
    p = PodInfo.of("10.64.0.9", "shop", {"app": "web"}, {"http": [8080, "tcp"]})
    assert p.named_ports == {"http": (8080, "TCP")}


def test_service_without_selector_has_no_backends() -> None:
    idx = BackendIndex()
    idx.upsert_pod(pod("10.64.0.1"))
    changes = idx.upsert_service(service(selector={}))
    assert idx.backends[HTTP] == frozenset()
    assert [(c.key, c.old, c.new) for c in changes] == [
        (HTTP, None, frozenset()), (DNS, None, frozenset())]


def test_incremental_pod_changes_report_only_what_changed() -> None:
    idx = BackendIndex()
    idx.upsert_service(service())
    (c1, c2) = idx.upsert_pod(pod("10.64.0.1"))
    assert {c1.key, c2.key} == {HTTP, DNS}
    assert c1.added and not c1.removed
    assert idx.upsert_pod(pod("10.64.0.1")) == []                   # same pod again
    (c,) = idx.upsert_pod(pod("10.64.0.1", ports={"http": (9000, "TCP")}))  # port moved
    assert c.key == HTTP
    assert c.removed == {Backend("10.64.0.1", 8080)} and c.added == {Backend("10.64.0.1", 9000)}
    changes = idx.upsert_pod(pod("10.64.0.1", app="other"))          # relabelled away
    assert {ch.key for ch in changes} == {HTTP, DNS}
    assert all(ch.new == frozenset() for ch in changes)
    assert idx.upsert_pod(pod("10.64.0.2", ns="other")) == []        # nothing selects it
    idx.upsert_pod(pod("10.64.0.3"))
    changes = idx.delete_pod("10.64.0.3")
    assert {ch.key for ch in changes} == {HTTP, DNS}
    assert all(ch.removed and ch.new == frozenset() for ch in changes)
    assert idx.delete_pod("10.64.0.3") == []


def test_service_updates_and_deletes() -> None:
    idx = BackendIndex()
    idx.upsert_pod(pod("10.64.0.1"))
    idx.upsert_service(service())
    changes = idx.upsert_service(service(ports=[{"port": 80, "targetPort": 8081}]))
    by_key = {c.key: c for c in changes}
    assert by_key[HTTP].new == {Backend("10.64.0.1", 8081)}
    assert by_key[DNS].new is None                      # the UDP port was removed
    assert idx.upsert_service(service(ports=[{"port": 80, "targetPort": 8081}])) == []
    (gone,) = idx.delete_service("shop", "web")
    assert gone.key == HTTP and gone.new is None and gone.removed
    assert idx.delete_service("shop", "web") == []
    assert idx.backends == {}


def test_incremental_equals_from_scratch() -> None:
    rnd = random.Random(7)
    idx = BackendIndex()
    services = [ServiceInfo("ns", f"s{i}", {"app": f"a{i % 3}"},
                            (PortSpec("p", 80, "TCP", rnd.choice([8080, "web"])),))
                for i in range(6)]
    for s in services:
        idx.upsert_service(s)
    for _ in range(300):
        ip = f"10.64.0.{rnd.randint(1, 20)}"
        if rnd.random() < 0.3:
            idx.delete_pod(ip)
        else:
            ports = {"web": (rnd.choice([81, 82]), "TCP")} if rnd.random() < 0.7 else {}
            idx.upsert_pod(PodInfo.of(ip, "ns", {"app": f"a{rnd.randint(0, 3)}"}, ports))
    fresh = BackendIndex()
    for p in idx.pods.values():
        fresh.upsert_pod(p)
    for s in services:
        fresh.upsert_service(s)
    assert fresh.backends == idx.backends


def test_slice_view() -> None:
    idx = BackendIndex()
    idx.upsert_service(service())
    idx.upsert_pod(pod("10.64.0.2"))
    idx.upsert_pod(pod("10.64.0.10", ports={}))
    (entry,) = idx.slice_view({("shop", "web"): "10.32.0.5"})
    assert entry["clusterIP"] == "10.32.0.5"
    assert entry["ports"][0] == {"name": "http", "port": 80, "protocol": "TCP",
                                 "targetPort": "http", "backends": ["10.64.0.2:8080"]}
    assert entry["ports"][1]["backends"] == ["10.64.0.2:5353", "10.64.0.10:5353"]
    assert [e["addresses"] for e in entry["endpoints"]] == [["10.64.0.2"], ["10.64.0.10"]]
    assert entry["endpoints"][0]["ports"] == [
        {"name": "http", "port": 8080, "protocol": "TCP"},
        {"name": "dns", "port": 5353, "protocol": "UDP"}]


def test_table_service_of_and_view_without_datapath() -> None:
    t = ServiceTable(None)
    t.upsert_service(service(sessionAffinity="ClientIP"), "10.32.0.5")
    t.upsert_pod("10.64.0.1", "shop", {"app": "web"}, {"http": [8080, "TCP"]})
    assert t.service_of("10.32.0.5", 80) == ("shop", "web")
    assert t.service_of("10.32.0.5", 53) == ("shop", "web")
    assert t.service_of("10.64.0.1", 8080) == ("shop", "web")
    assert t.service_of("10.64.0.1", 22) is None
    (view,) = t.view()
    assert view["sessionAffinity"] == "ClientIP"
    assert view["sessionAffinityTimeoutSeconds"] == 10800
    # the VIP moves: the old one is no service any more
    t.upsert_service(service(), "10.32.0.6")
    assert t.service_of("10.32.0.5", 80) is None
    assert t.service_of("10.32.0.6", 80) == ("shop", "web")
    t.delete_pod("10.64.0.1")
    assert t.service_of("10.64.0.1", 8080) is None
    t.delete_service("shop", "web")
    assert t.service_of("10.32.0.6", 80) is None and t.view() == []
