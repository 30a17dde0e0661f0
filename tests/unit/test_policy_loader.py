"""Loading resource YAML: valid files load, every malformed file fails with ONE error
that names the file, the document, the field path, the line and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from villi.errors import PolicyError, ResourceError
from villi.policy.loader import format_loc, load_files, load_text
from villi.policy.models import (
    CiliumClusterwideNetworkPolicy,
    CiliumNetworkPolicy,
    Namespace,
    NetworkPolicy,
)

POLICIES = Path(__file__).parent / "policies"

CNP_HEAD = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: p
  namespace: prod
spec:
  endpointSelector: {}
"""
KNP_HEAD = """apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: p
spec:
  podSelector: {}
"""

# (id, yaml, field path, reason fragment, line)
MALFORMED = [
    ("cnp-port-range", CNP_HEAD + """  ingress:
  - toPorts:
    - ports:
      - port: "70000"
""", "spec.ingress[0].toPorts[0].ports[0].port", "70000 is out of range (0..65535)", 11),
    ("knp-port-zero", KNP_HEAD + """  ingress:
  - ports:
    - port: 0
""", "spec.ingress[0].ports[0].port", "0 is out of range (1..65535)", 9),
    ("endport-below-port", CNP_HEAD + """  egress:
  - toPorts:
    - ports: [{port: "90", endPort: 80, protocol: TCP}]
""", "spec.egress[0].toPorts[0].ports[0].endPort", "endPort 80 is less than port 90", 10),
    ("cnp-bad-protocol", CNP_HEAD + """  ingress:
  - toPorts:
    - ports: [{port: "80", protocol: HTTP}]
""", "spec.ingress[0].toPorts[0].ports[0].protocol", "unknown protocol 'HTTP'", 10),
    ("cnp-icmp-in-toports", CNP_HEAD + """  ingress:
  - toPorts:
    - ports: [{port: "8", protocol: ICMP}]
""", "spec.ingress[0].toPorts[0].ports[0].protocol", "use an 'icmps' rule", 10),
    ("knp-lowercase-protocol", KNP_HEAD + """  ingress:
  - ports:
    - protocol: tcp
""", "spec.ingress[0].ports[0].protocol", "expected 'TCP', 'UDP' or 'SCTP', got 'tcp'", 9),
    ("unknown-field", CNP_HEAD + """  ingress:
  - fromEndpoint: [{}]
""", "spec.ingress[0].fromEndpoint",
     "unknown field 'fromEndpoint' (did you mean 'fromEndpoints'?)", 9),
    ("label-value-type", CNP_HEAD.replace("endpointSelector: {}",
                                          "endpointSelector: {matchLabels: {version: 2}}"),
     "spec.endpointSelector.matchLabels.version", "expected a string, got 2", 7),
    ("bad-cidr", CNP_HEAD + """  egress:
  - toCIDR: [10.0.0.0/33]
""", "spec.egress[0].toCIDR[0]", "'10.0.0.0/33' is not a valid CIDR", 9),
    ("cidr-host-bits", CNP_HEAD + """  egress:
  - toCIDR: [10.0.0.1/8]
""", "spec.egress[0].toCIDR[0]", "has host bits set (did you mean 10.0.0.0/8?)", 9),
    ("except-outside", KNP_HEAD + """  ingress:
  - from:
    - ipBlock: {cidr: 10.0.0.0/16, except: [10.1.0.0/24]}
""", "spec.ingress[0].from[0].ipBlock.except[0]", "10.1.0.0/24 is not inside 10.0.0.0/16",
     9),
    ("bad-operator", CNP_HEAD.replace(
        "endpointSelector: {}",
        "endpointSelector:\n    matchExpressions: [{key: app, operator: Equals, values: [a]}]"),
     "spec.endpointSelector.matchExpressions[0].operator", "unknown operator 'Equals'", 8),
    ("in-without-values", KNP_HEAD.replace(
        "podSelector: {}",
        "podSelector:\n    matchExpressions: [{key: app, operator: In}]"),
     "spec.podSelector.matchExpressions[0].values", "operator In needs at least one value", 7),
    ("missing-name", """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  namespace: prod
spec:
  endpointSelector: {}
""", "metadata.name", "required field is missing", 3),
    ("ccnp-namespace", """apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata:
  name: p
  namespace: prod
spec:
  endpointSelector: {}
""", "metadata.namespace", "a clusterwide policy has no namespace", 5),
    ("unknown-kind", """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicyy
metadata: {name: p}
""", "kind", "unknown kind 'CiliumNetworkPolicyy' for apiVersion 'cilium.io/v2'", 2),
    ("wrong-api-version", """apiVersion: networking.k8s.io/v1beta1
kind: NetworkPolicy
metadata: {name: p}
""", "kind", "unknown kind 'NetworkPolicy' for apiVersion 'networking.k8s.io/v1beta1'", 2),
    ("l7-kafka-rules", CNP_HEAD + """  ingress:
  - toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        kafka: [{topic: t}]
""", "spec.ingress[0].toPorts[0].rules.kafka", "Kafka L7 rules are not supported yet", 12),
    ("from-requires", CNP_HEAD + """  ingress:
  - fromRequires: [{matchLabels: {env: prod}}]
""", "spec.ingress[0].fromRequires", "fromRequires is not supported", 9),
    ("to-fqdns-ingress", CNP_HEAD + """  ingress:
  - toFQDNs: [{matchName: example.com}]
""", "spec.ingress[0].toFQDNs", "toFQDNs is egress only", 9),
    ("node-selector-in-cnp", CNP_HEAD.replace("endpointSelector: {}", "nodeSelector: {}"),
     "spec.nodeSelector", "nodeSelector is only allowed in a CiliumClusterwideNetworkPolicy",
     7),
    ("no-endpoint-selector", CNP_HEAD.replace("  endpointSelector: {}\n",
                                              "  ingress: [{}]\n"),
     "spec.endpointSelector", "a rule needs an endpointSelector", 6),
    ("no-spec", """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
""", "spec", "a policy needs 'spec' or a non-empty 'specs'", 1),
    ("ipblock-with-selector", KNP_HEAD + """  egress:
  - to:
    - ipBlock: {cidr: 10.0.0.0/8}
      podSelector: {}
""", "spec.egress[0].to[0].ipBlock", "ipBlock cannot be combined with podSelector", 9),
    ("bad-entity", CNP_HEAD + """  egress:
  - toEntities: [internet]
""", "spec.egress[0].toEntities[0]", "got 'internet'", 9),
    ("icmps-and-toports", CNP_HEAD + """  ingress:
  - icmps: [{fields: [{type: 8}]}]
    toPorts: [{ports: [{port: "80"}]}]
""", "spec.ingress[0].icmps", "icmps may only be used without toPorts", 9),
    ("combined-l3", CNP_HEAD + """  egress:
  - toEndpoints: [{}]
    toCIDR: [10.0.0.0/8]
""", "spec.egress[0].toCIDR", "combining toEndpoints and toCIDR in one rule is not supported",
     10),
    ("bad-port-name", KNP_HEAD + """  ingress:
  - ports:
    - port: HTTP_PORT
""", "spec.ingress[0].ports[0].port", "neither a port number nor a valid port name", 9),
    ("knp-endport-named", KNP_HEAD + """  ingress:
  - ports:
    - {port: http, endPort: 90}
""", "spec.ingress[0].ports[0].endPort", "endPort needs a numeric port", 9),
    ("bad-label-key", CNP_HEAD.replace("endpointSelector: {}",
                                       "endpointSelector: {matchLabels: {'bad key': x}}"),
     "spec.endpointSelector.matchLabels['bad key']", "is not a valid label key", 7),
    ("unknown-source", CNP_HEAD.replace("endpointSelector: {}",
                                        "endpointSelector: {matchLabels: {'k9s:app': x}}"),
     "spec.endpointSelector.matchLabels['k9s:app']", "unknown label source 'k9s'", 7),
    ("icmp-type-range", CNP_HEAD + """  ingress:
  - icmps: [{fields: [{type: 300}]}]
""", "spec.ingress[0].icmps[0].fields[0].type", "300 is out of range (0..255)", 9),
    ("duplicate-key", CNP_HEAD + """  ingress: [{}]
  ingress: []
""", "spec.ingress", "duplicate key 'ingress'", 9),
    ("not-a-mapping", "- a\n- b\n", None, "a resource must be a mapping, got a list", 1),
    ("empty-ports", CNP_HEAD + """  ingress:
  - toPorts: [{ports: []}]
""", "spec.ingress[0].toPorts[0].ports", "must have at least 1 item(s)", 9),
]


@pytest.mark.parametrize(("text", "field", "reason", "line"),
                         [pytest.param(*case[1:], id=case[0]) for case in MALFORMED])
def test_malformed_resource_is_one_clear_error(text: str, field: str | None, reason: str,
                                               line: int) -> None:
    with pytest.raises(ResourceError) as info:
        load_text(text, "bad.yaml")
    err = info.value
    assert err.file == "bad.yaml"
    assert err.document == 1
    assert err.field == field
    assert reason in err.reason
    assert err.line == line
    message = str(err)
    assert message.startswith(f"bad.yaml:{line}: document 1: ")
    assert reason in message and (field is None or field in message)


def test_policy_errors_are_policy_errors_and_others_resource_errors() -> None:
    with pytest.raises(PolicyError):
        load_text(CNP_HEAD + "  ingress: 5\n")
    with pytest.raises(ResourceError) as info:
        load_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: Bad_Name}\n")
    assert not isinstance(info.value, PolicyError)
    assert info.value.field == "metadata.name"


def test_yaml_syntax_error_names_line_and_document() -> None:
    text = CNP_HEAD + "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: [x\n"
    with pytest.raises(ResourceError) as info:
        load_text(text, "broken.yaml")
    assert info.value.document == 2
    assert info.value.line == 12
    assert "invalid YAML" in info.value.reason


def test_second_document_error_names_document_two_and_yields_nothing() -> None:
    text = CNP_HEAD + "---\n" + KNP_HEAD + "  policyTypes: [Ingres]\n"
    with pytest.raises(PolicyError) as info:
        load_text(text, "two.yaml")
    err = info.value
    assert (err.document, err.field, err.line) == (2, "spec.policyTypes[0]", 15)
    assert "got 'Ingres'" in err.reason


def test_bad_file_among_many_fails_the_whole_call(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(CNP_HEAD)
    bad = tmp_path / "bad.yaml"
    bad.write_text(KNP_HEAD + "  ingress:\n  - ports: [{port: 99999}]\n")
    with pytest.raises(PolicyError) as info:
        load_files([good, bad])
    assert info.value.file == str(bad)
    assert load_files([good])  # the good one alone loads


def test_duplicate_resource_is_rejected(tmp_path: Path) -> None:
    one = tmp_path / "one.yaml"
    one.write_text(CNP_HEAD)
    two = tmp_path / "two.yaml"
    two.write_text(CNP_HEAD)
    with pytest.raises(PolicyError, match="defined twice"):
        load_files([one, two])


def test_more_errors_are_counted() -> None:
    text = CNP_HEAD + "  ingress:\n  - fromEndpointz: []\n  - toPortz: []\n"
    with pytest.raises(PolicyError, match=r"\(and 1 more error\)"):
        load_text(text)


def test_every_fixture_loads() -> None:
    files = sorted(POLICIES.glob("*.yaml"))
    assert len(files) >= 20
    resources = load_files(files)
    kinds = {type(r) for r in resources}
    assert kinds == {CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, NetworkPolicy,
                     Namespace}


def test_models_keep_what_was_written() -> None:
    (policy,) = load_text(CNP_HEAD + """  ingress:
  - fromCIDRSet: [{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}]
    toPorts:
    - ports: [{port: 80, endPort: 90}, {port: HTTP}]
  enableDefaultDeny: {ingress: false}
""")
    assert isinstance(policy, CiliumNetworkPolicy)
    assert policy.namespace == "prod"
    rule = policy.spec.ingress[0]  # type: ignore[union-attr,index]
    assert rule.from_cidr_set[0].except_ == ["10.1.0.0/16"]  # type: ignore[index]
    ports = rule.to_ports[0].ports  # type: ignore[index]
    assert (ports[0].number, ports[0].end_port, ports[0].protocol) == (80, 90, "ANY")
    assert ports[1].number is None


def test_knp_defaults() -> None:
    (policy,) = load_text(KNP_HEAD + "  egress: [{}]\n")
    assert isinstance(policy, NetworkPolicy)
    assert policy.namespace == "default"
    assert policy.spec.effective_policy_types == {"Ingress", "Egress"}
    (policy,) = load_text(KNP_HEAD + "  egress: []\n")
    assert policy.spec.effective_policy_types == {"Ingress"}  # type: ignore[union-attr]


def test_empty_documents_are_skipped() -> None:
    assert load_text("---\n---\n# nothing\n") == []


def test_format_loc() -> None:
    assert format_loc(("spec", "ingress", 0, "toPorts", 1, "ports")) == (
        "spec.ingress[0].toPorts[1].ports")
    assert format_loc(("matchLabels", "app.kubernetes.io/name")) == (
        "matchLabels['app.kubernetes.io/name']")
