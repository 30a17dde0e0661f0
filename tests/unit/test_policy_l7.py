"""L7 HTTP policy: the language (strict validation), the resolution (which entries
redirect to the proxy, where a plain L4 allow wins) and the per-request verdict."""

from __future__ import annotations

from pathlib import Path

import pytest

from villi.errors import ResourceError
from villi.policy.entry import Direction
from villi.policy.http import HeaderMatch, HTTPRule, Request, evaluate
from villi.policy.l7table import L7Entry, decide, select
from villi.policy.loader import load_files, load_text
from villi.policy.simulate import PolicySimulator

EXAMPLES = Path(__file__).parents[2] / "examples"

HEAD = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p, namespace: default}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
"""


def _error(text: str) -> ResourceError:
    with pytest.raises(ResourceError) as info:
        load_text(text, "bad.yaml")
    return info.value


@pytest.mark.parametrize(("rules", "field", "reason", "line"), [
    pytest.param("      rules:\n        http: [{path: 'v1/x'}]\n",
                 "spec.ingress[0].toPorts[0].rules.http[0].path", "must start with '/'", 11,
                 id="path-without-slash"),
    pytest.param("      rules:\n        http: [{method: 'GET(', path: /}]\n",
                 "spec.ingress[0].toPorts[0].rules.http[0].method",
                 "invalid regular expression", 11, id="invalid-regex"),
    pytest.param("      rules:\n        http: [{path: '/[a-'}]\n",
                 "spec.ingress[0].toPorts[0].rules.http[0].path",
                 "invalid regular expression", 11, id="invalid-path-regex"),
    pytest.param("      rules:\n        http: [{path: /}]\n        kafka: [{topic: t}]\n",
                 "spec.ingress[0].toPorts[0].rules.kafka", "only one L7 type", 12,
                 id="two-l7-types"),
    pytest.param("      rules:\n        dns: [{matchName: x.com}]\n",
                 "spec.ingress[0].toPorts[0].ports[0].port", "DNS rules apply to port 53",
                 9, id="dns-on-http-port"),
    pytest.param("      rules:\n        http: [{path: /, headerMatches: [{name: X, "
                 "mismatch: BOOM}]}]\n",
                 "spec.ingress[0].toPorts[0].rules.http[0].headerMatches[0].mismatch",
                 "", 11, id="bad-mismatch-action"),
    pytest.param("      rules:\n        http: [{path: /, verb: GET}]\n",
                 "spec.ingress[0].toPorts[0].rules.http[0].verb", "", 11,
                 id="unknown-http-field"),
])
def test_bad_http_rules_name_file_line_field(rules: str, field: str, reason: str,
                                             line: int) -> None:
    err = _error(HEAD + rules)
    assert err.file == "bad.yaml"
    assert err.field == field
    assert reason in err.reason
    assert err.line == line


def test_l7_on_udp_only_port_is_an_error() -> None:
    text = HEAD.replace("protocol: TCP", "protocol: UDP") + (
        "      rules:\n        http: [{path: /}]\n")
    err = _error(text)
    assert err.field == "spec.ingress[0].toPorts[0].ports[0].protocol"
    assert "only apply to TCP (not UDP)" in err.reason


def test_deny_rules_cannot_carry_l7() -> None:
    text = HEAD.replace("  ingress:\n", "  ingressDeny:\n") + (
        "      rules:\n        http: [{path: /}]\n")
    assert "deny rules cannot have L7 rules" in _error(text).reason


def test_cilium_star_wars_l7_policy_loads_unchanged() -> None:
    (policy,) = load_files([EXAMPLES / "sw_l3_l4_l7_policy.yaml"])
    (rule,) = policy.spec.ingress[0].to_ports[0].http  # type: ignore[index,union-attr]
    assert (rule.method, rule.path) == ("POST", "/v1/request-landing")


# -- resolution ----------------------------------------------------------------------------

def _sim() -> PolicySimulator:
    sim = PolicySimulator()
    sim.add_pod("default/deathstar", {"org": "empire", "class": "deathstar"}, "10.0.0.1", {})
    sim.add_pod("default/tiefighter", {"org": "empire", "class": "tiefighter"}, "10.0.0.2",
                {})
    sim.add_pod("default/xwing", {"org": "alliance", "class": "xwing"}, "10.0.0.3", {})
    return sim


def test_l7_entries_redirect_and_the_proxy_gets_their_rules() -> None:
    sim = _sim()
    sim.apply(load_files([EXAMPLES / "sw_l3_l4_l7_policy.yaml"]))
    tie = sim.ingress("default/deathstar", "default/tiefighter", "TCP", 80)
    assert tie.allowed and tie.redirect
    assert not sim.ingress("default/deathstar", "default/xwing", "TCP", 80).allowed
    assert not sim.ingress("default/deathstar", "default/tiefighter", "TCP", 81).allowed
    endpoint = sim.pods["default/deathstar"].endpoint
    table = sim.resolver.l7_table(endpoint)
    tie_id = sim.identity_of("default/tiefighter")
    assert {e.identity for e in table} == {tie_id, sim.identity_of("default/deathstar")}
    (entry,) = select(table, Direction.INGRESS, tie_id, 80)
    assert entry.direction is Direction.INGRESS and entry.port == 80
    assert entry.rules == (HTTPRule("POST", "/v1/request-landing"),)
    info = sim.resolver.cookie_info(entry.cookie)
    assert info is not None and info.name == "rule1" and info.direction == "ingress"


def test_plain_l4_allow_of_same_peer_and_port_wins() -> None:
    # both examples are named rule1: apply the L4 one under another name
    sim = _sim()
    l4 = (EXAMPLES / "sw_l3_l4_policy.yaml").read_text().replace('name: "rule1"',
                                                                   'name: "l4"')
    sim.apply(load_files([EXAMPLES / "sw_l3_l4_l7_policy.yaml"]))
    sim.apply_yaml(l4)
    verdict = sim.ingress("default/deathstar", "default/tiefighter", "TCP", 80)
    assert verdict.allowed and not verdict.redirect
    table = sim.resolver.l7_table(sim.pods["default/deathstar"].endpoint)
    assert table and all(e.rules == () for e in table)  # proxied connections: allow all
    sim.delete("CiliumNetworkPolicy", "default", "l4")
    assert sim.ingress("default/deathstar", "default/tiefighter", "TCP", 80).redirect


def test_wildcard_peer_l4_allow_of_the_port_allows_every_request() -> None:
    sim = _sim()
    sim.apply(load_files([EXAMPLES / "sw_l3_l4_l7_policy.yaml"]))
    sim.apply_yaml("""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: any80, namespace: default}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - toPorts: [{ports: [{port: "80", protocol: TCP}]}]
""")
    tie = sim.identity_of("default/tiefighter")
    table = sim.resolver.l7_table(sim.pods["default/deathstar"].endpoint)
    applicable = select(table, Direction.INGRESS, tie, 80)
    put = decide(applicable, Request("PUT", "/v1/exhaust-port"))
    assert put.verdict.allowed  # the L4 allow of any peer on port 80 wins
    assert sim.ingress("default/deathstar", "default/xwing", "TCP", 80).allowed


def test_any_protocol_port_with_l7_redirects_tcp_only() -> None:
    sim = _sim()
    sim.apply_yaml(HEAD.replace("protocol: TCP", "protocol: ANY") +
                   "      rules:\n        http: [{method: GET}]\n")
    assert sim.ingress("default/deathstar", "default/tiefighter", "TCP", 80).redirect
    assert not sim.ingress("default/deathstar", "default/tiefighter", "UDP", 80).allowed


def test_egress_l7_rules_resolve_too() -> None:
    sim = _sim()
    sim.apply_yaml("""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: e, namespace: default}
spec:
  endpointSelector: {matchLabels: {class: tiefighter}}
  egress:
  - toEndpoints: [{matchLabels: {class: deathstar}}]
    toPorts:
    - ports: [{port: "80"}]
      rules: {http: [{method: GET, path: /v1/.*}]}
""")
    verdict = sim.egress("default/tiefighter", "default/deathstar", "TCP", 80)
    assert verdict.allowed and verdict.redirect
    (entry,) = sim.resolver.l7_table(sim.pods["default/tiefighter"].endpoint)
    assert entry.direction is Direction.EGRESS


# -- per-request verdicts ----------------------------------------------------------------

def _req(method: str, target: str, **headers: str) -> Request:
    return Request(method, target, tuple((k.lower().replace("_", "-"), v)
                                         for k, v in headers.items()))


def test_rules_are_anchored_regexes() -> None:
    rules = (HTTPRule("POST", "/v1/request-landing"),)
    assert evaluate(rules, _req("POST", "/v1/request-landing")).allowed
    assert not evaluate(rules, _req("PUT", "/v1/exhaust-port")).allowed
    assert not evaluate(rules, _req("POST", "/v1/request-landing/x")).allowed
    assert not evaluate(rules, _req("XPOST", "/v1/request-landing")).allowed
    assert evaluate((HTTPRule("GET|HEAD", "/public/.*"),), _req("HEAD", "/public/a")).allowed


def test_any_rule_allows_and_empty_rules_mean_no_restriction() -> None:
    rules = (HTTPRule("GET"), HTTPRule(path="/admin"))
    assert evaluate(rules, _req("GET", "/x")).rule == 0
    assert evaluate(rules, _req("POST", "/admin")).rule == 1
    assert not evaluate(rules, _req("POST", "/x")).allowed
    assert evaluate((), _req("DELETE", "/")).allowed


def test_host_and_required_headers() -> None:
    rule = HTTPRule(host="api\\.example\\.com", headers=("X-Token", "X-Env: prod"))
    ok = _req("GET", "/", host="API.example.com", x_token="1", x_env="prod")
    assert evaluate((rule,), ok).allowed
    assert not evaluate((rule,), _req("GET", "/", host="api.example.com", x_token="1")).allowed
    assert not evaluate((rule,), _req("GET", "/", host="evil.com", x_token="1",
                                      x_env="prod")).allowed


@pytest.mark.parametrize(("action", "allowed", "edits", "logs"), [
    ("", False, (), ()),
    ("LOG", True, (), ("x-env",)),
    ("ADD", True, (("add", "x-env", "prod"),), ()),
    ("DELETE", True, (("delete", "x-env", "dev"),), ()),
    ("REPLACE", True, (("replace", "x-env", "prod"),), ()),
])
def test_header_match_mismatch_actions(action: str, allowed: bool, edits: tuple,
                                       logs: tuple) -> None:
    rule = HTTPRule(header_matches=(HeaderMatch("x-env", "prod", action),))
    verdict = evaluate((rule,), _req("GET", "/", x_env="dev"))
    assert (verdict.allowed, verdict.edits, verdict.logs) == (allowed, edits, logs)
    assert evaluate((rule,), _req("GET", "/", x_env="prod")).allowed


def test_decide_names_the_rule_and_wire_round_trip() -> None:
    table = [L7Entry(Direction.INGRESS, 0, 80, 0, 7, (HTTPRule("GET"),)),
             L7Entry(Direction.INGRESS, 42, 80, 0, 9, (HTTPRule("PUT", "/v1/.*"),))]
    assert [L7Entry.from_wire(e.to_wire()) for e in table] == table
    applicable = select(table, Direction.INGRESS, 42, 80)
    assert len(applicable) == 2 and select(table, Direction.INGRESS, 41, 80) == table[:1]
    put = decide(applicable, _req("PUT", "/v1/exhaust-port"))
    assert put.verdict.allowed and (put.cookie, put.rule_index) == (9, 0)
    denied = decide(applicable, _req("POST", "/"))
    assert not denied.verdict.allowed and denied.cookie == 7
