"""Service YAML: what is accepted, and the exact message for what is not.

Bad files go through the resource loader (with ``SERVICE_KINDS`` added to its dispatch
table), so the messages checked are the ones ``villi apply`` prints: file, document,
field path and reason.
"""

from __future__ import annotations

import textwrap

import pytest

from villi import resources
from villi.errors import ResourceError
from villi.policy import loader
from villi.service.models import (
    DEFAULT_AFFINITY_TIMEOUT,
    SERVICE_KINDS,
    Service,
    check_cluster_ip,
    check_service_cidr,
)

KINDS = {**loader.KINDS, **SERVICE_KINDS}


def svc(spec: str, *, meta: str = "{name: web, namespace: shop}") -> str:
    return (f"apiVersion: v1\nkind: Service\nmetadata: {meta}\nspec:\n"
            + textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ") + "\n")


def load(text: str) -> Service:
    (res,) = loader.load_text(text, "svc.yaml", KINDS)
    assert isinstance(res, Service)
    return res


def error(text: str) -> str:
    with pytest.raises(ResourceError) as exc:
        loader.load_text(text, "svc.yaml", KINDS)
    return str(exc.value)


GOOD = svc("""
    selector: {app: web}
    ports:
    - {name: http, port: 80, targetPort: http}
    - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
    - {name: dns-tcp, port: 53, protocol: TCP, targetPort: "5353"}
    sessionAffinity: ClientIP
    sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
""")


def test_accepts_a_full_clusterip_service() -> None:
    s = load(GOOD)
    assert (s.kind, s.namespace, s.metadata.name, s.name) == ("Service", "shop", "web", "web")
    assert [(p.name, p.port, p.protocol, p.target) for p in s.ports] == [
        ("http", 80, "TCP", "http"), ("dns", 53, "UDP", 5353), ("dns-tcp", 53, "TCP", 5353)]
    assert s.selector == {"app": "web"}
    assert s.affinity_timeout == 60
    assert s.requested_cluster_ip is None


def test_defaults() -> None:
    s = load(svc("ports: [{port: 80}]", meta="{name: web}"))
    assert s.namespace == "default"
    assert s.ports[0].protocol == "TCP" and s.ports[0].target == 80
    assert s.affinity_timeout == 0
    s = load(svc("ports: [{port: 80}]\nsessionAffinity: ClientIP"))
    assert s.affinity_timeout == DEFAULT_AFFINITY_TIMEOUT


def test_real_world_fields_that_are_harmless_are_accepted() -> None:
    s = load(svc("""
        type: ClusterIP
        clusterIP: 10.32.0.10
        clusterIPs: [10.32.0.10]
        ipFamilies: [IPv4]
        ipFamilyPolicy: SingleStack
        internalTrafficPolicy: Cluster
        sessionAffinity: None
        ports: [{name: http, port: 80, targetPort: 8080, appProtocol: http}]
    """))
    assert s.requested_cluster_ip == "10.32.0.10"


def test_roundtrip_through_the_store_encoding() -> None:
    s = load(GOOD)
    assert resources.decode(resources.encode(s), "k") == s
    assert resources.key_of(s) == "villi/resources/Service/shop/web"


@pytest.mark.parametrize(("spec", "message"), [
    ("ports: [{port: 70000}]",
     "svc.yaml:5: document 1: spec.ports[0].port: 70000 is out of range (1..65535)"),
    ("ports: [{port: 0}]",
     "spec.ports[0].port: 0 is out of range (1..65535)"),
    ("ports: [{port: 80, targetPort: 65536}]",
     "spec.ports[0].targetPort: 65536 is out of range (1..65535)"),
    ("ports:\n- {name: a, port: 80}\n- {name: a, port: 81}",
     "svc.yaml:7: document 1: spec.ports[1].name: duplicate port name 'a' (also ports[0])"),
    ("ports:\n- {name: a, port: 80}\n- {port: 81}",
     "spec.ports[1].name: every port needs a name when a service has more than one"),
    ("ports:\n- {name: a, port: 80}\n- {name: b, port: 80}",
     "spec.ports[1].port: duplicate port 80/TCP (also ports[0])"),
    ("ports: [{port: 80, tragetPort: 8080}]",
     "spec.ports[0].tragetPort: unknown field 'tragetPort' (did you mean 'targetPort'?)"),
    ("selectr: {app: web}\nports: [{port: 80}]",
     "spec.selectr: unknown field 'selectr' (did you mean 'selector'?)"),
    ("ports: [{port: 80, protocol: ICMP}]",
     "spec.ports[0].protocol: unknown protocol 'ICMP' (valid: TCP, UDP)"),
    ("ports: [{port: 80, protocol: SCTP}]",
     "spec.ports[0].protocol: protocol SCTP is not supported (TCP or UDP)"),
    ("ports: [{port: 80}]\nclusterIP: 10.99.0.1",
     "svc.yaml:6: document 1: spec.clusterIP: 10.99.0.1 is outside the service CIDR "
     "10.32.0.0/16"),
    ("ports: [{port: 80}]\nclusterIP: 10.32.0.0",
     "spec.clusterIP: 10.32.0.0 is the network address of the service CIDR 10.32.0.0/16"),
    ("ports: [{port: 80}]\nclusterIP: banana",
     "spec.clusterIP: 'banana' is not a valid IP address"),
    ("ports: [{port: 80}]\nclusterIP: None",
     "spec.clusterIP: headless services (clusterIP: None) are not supported"),
    ("ports: [{port: 80}]\ntype: NodePort",
     "spec.type: type NodePort is not supported (villi implements ClusterIP services only)"),
    ("ports: [{port: 80}]\ntype: LoadBalancer",
     "spec.type: type LoadBalancer is not supported"),
    ("ports: [{port: 80}]\nexternalIPs: [192.0.2.1]",
     "spec.externalIPs: externalIPs is not supported (villi implements ClusterIP services "
     "only)"),
    ("ports: [{port: 80, nodePort: 30080}]",
     "spec.ports[0].nodePort: nodePort is not supported"),
    ("ports: [{port: 80}]\nexternalName: example.com",
     "spec.externalName: externalName is not supported"),
    ("ports: [{port: 80}]\nipFamilies: [IPv6]",
     "spec.ipFamilies: only IPv4 is supported"),
    ("ports: [{port: 80}]\nclusterIPs: [10.32.0.5, fd00::5]",
     "spec.clusterIPs: dual-stack services are not supported"),
    ("selector: {app: web}",
     "spec.ports: a ClusterIP service needs at least one port"),
    ("ports: [{port: 80, targetPort: Web_Port}]",
     "spec.ports[0].targetPort: 'Web_Port' is neither a port number nor a valid port name"),
    ("ports: [{name: HTTP, port: 80}]",
     "spec.ports[0].name: 'HTTP' is not a valid port name"),
    ("ports: [{port: '80'}]",
     "spec.ports[0].port: expected an integer, got '80'"),
    ("selector: {'app/': web}\nports: [{port: 80}]",
     "spec.selector['app/']: 'app/' is not a valid label key"),
    ("ports: [{port: 80}]\nsessionAffinity: Cookie",
     "spec.sessionAffinity: unknown session affinity 'Cookie' (valid: None, ClientIP)"),
    ("ports: [{port: 80}]\nsessionAffinityConfig: {clientIP: {timeoutSeconds: 5}}",
     "spec.sessionAffinityConfig: must not be set when sessionAffinity is None"),
    ("ports: [{port: 80}]\nsessionAffinity: ClientIP\n"
     "sessionAffinityConfig: {clientIP: {timeoutSeconds: 90000}}",
     "spec.sessionAffinityConfig.clientIP.timeoutSeconds: 90000 is out of range (1..86400)"),
    ("ports: [{port: 80}]\ninternalTrafficPolicy: Local",
     "spec.internalTrafficPolicy: internalTrafficPolicy Local is not supported"),
])
def test_bad_service_yaml_is_rejected_precisely(spec: str, message: str) -> None:
    assert message in error(svc(spec))


def test_unknown_top_level_and_metadata_fields() -> None:
    text = svc("ports: [{port: 80}]") + "spek: {}\n"
    assert "spek: unknown field 'spek' (did you mean 'spec'?)" in error(text)
    assert "metadata.nmae: unknown field 'nmae'" in error(svc("ports: [{port: 80}]",
                                                              meta="{name: web, nmae: x}"))


def test_wrong_api_version() -> None:
    text = svc("ports: [{port: 80}]").replace("apiVersion: v1", "apiVersion: v2")
    assert "kind: unknown kind 'Service' for apiVersion 'v2'" in error(text)


def test_cluster_ip_checks_against_a_configured_cidr() -> None:
    assert check_cluster_ip("10.40.1.2", "10.40.0.0/16") == "10.40.1.2"
    with pytest.raises(ValueError, match="broadcast address"):
        check_cluster_ip("10.40.255.255", "10.40.0.0/16")
    with pytest.raises(ValueError, match="not an IPv4 address"):
        check_cluster_ip("fd00::1")


@pytest.mark.parametrize(("cidr", "message"), [
    ("10.255.0.0/16", "overlaps 10.255.0.0/16"),
    ("10.0.0.0/8", "overlaps 10.255.0.0/16"),
    ("10.64.0.0/16", "overlaps 10.64.0.0/10"),
    ("10.32.0.1/16", "not a valid network"),
    ("10.32.0.0/30", "between /8 and /28"),
    ("fd00::/64", "not IPv4"),
])
def test_bad_service_cidrs(cidr: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        check_service_cidr(cidr)
