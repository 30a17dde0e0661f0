"""Accepted policy fields that select nothing on villi are reported, never silent;
``icmps`` of ``family: IPv6`` never touch ICMPv4 traffic."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from villi.policy.loader import load_files, load_text
from villi.policy.simulate import PolicySimulator

WARNED = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: odd, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEntities: [cluster, health, kube-apiserver]
  - fromCIDR: [10.0.0.0/8, "2001:db8::/32"]
  - fromCIDRSet:
    - cidr: "fd00::/8"
  egress:
  - toEntities: [init, ingress, unmanaged, world-ipv6, world]
  - icmps:
    - fields:
      - {type: 8}
      - {family: IPv6, type: EchoRequest}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: v6, namespace: prod}
spec:
  podSelector: {}
  ingress:
  - from:
    - ipBlock: {cidr: "2001:db8::/48"}
    - ipBlock: {cidr: 192.168.0.0/16}
"""


def test_each_field_that_selects_nothing_is_named_with_file_line_and_path() -> None:
    loaded = load_text(WARNED, "odd.yaml")
    assert len(loaded) == 2
    got = [(w.document, w.field, w.line) for w in loaded.warnings]
    assert got == [
        (1, "spec.ingress[0].fromEntities[1]", 7),
        (1, "spec.ingress[0].fromEntities[2]", 7),
        (1, "spec.ingress[1].fromCIDR[1]", 8),
        (1, "spec.ingress[2].fromCIDRSet[0].cidr", 10),
        (1, "spec.egress[0].toEntities[0]", 12),
        (1, "spec.egress[0].toEntities[1]", 12),
        (1, "spec.egress[0].toEntities[2]", 12),
        (1, "spec.egress[0].toEntities[3]", 12),
        (1, "spec.egress[1].icmps[0].fields[1].family", 16),
        (2, "spec.ingress[0].from[0].ipBlock.cidr", 25),
    ]
    text = [str(w) for w in loaded.warnings]
    assert text[0].startswith("odd.yaml:7: document 1, spec.ingress[0].fromEntities[1]: ")
    assert "'health' selects nothing here" in text[0]
    assert "IPv6 CIDR 2001:db8::/32 selects nothing here" in text[2]
    assert "ICMPv6 type 'EchoRequest' selects nothing here" in text[8]


def test_only_fields_that_select_nothing_are_warned() -> None:
    policies = Path(__file__).parent / "policies"
    loaded = load_files(sorted(policies.glob("*.yaml")))
    assert [(Path(w.file).name, w.field) for w in loaded.warnings] == [
        ("cnp-entities.yaml", "specs[1].ingress[0].fromEntities[1]"),      # health
        ("cnp-entities.yaml", "specs[1].egress[0].toEntities[0]"),         # kube-apiserver
        ("icmp.yaml", "spec.ingress[0].icmps[0].fields[2].family")]        # ICMPv6 128


ICMP6 = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: icmp6, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - icmps: [{fields: [{family: IPv6, type: 0}]}]
  - fromEndpoints: [{matchLabels: {app: client}}]
  ingressDeny:
  - icmps: [{fields: [{family: IPv6, type: 8}, {family: IPv6, type: 128}]}]
"""


def test_icmpv6_types_never_become_icmpv4_rules() -> None:
    sim = PolicySimulator()
    sim.add_pod("prod/web", {"app": "web"}, "10.64.0.10")
    sim.add_pod("prod/client", {"app": "client"}, "10.64.0.12")
    sim.add_pod("prod/other", {"app": "other"}, "10.64.0.13")
    sim.apply_yaml(ICMP6)
    # `{family: IPv6, type: 0}` used to allow every ICMPv4 type from anyone …
    assert not sim.ingress("prod/web", "prod/other", "icmp", 8).allowed
    assert not sim.ingress("prod/web", "prod/other", "icmp", 0).allowed
    # … and `{family: IPv6, type: 8}` in a deny used to deny ICMPv4 echo requests.
    assert sim.ingress("prod/web", "prod/client", "icmp", 8).allowed


def test_apply_prints_the_warnings_on_stderr(tmp_path: Path) -> None:
    path = tmp_path / "odd.yaml"
    path.write_text(WARNED)
    res = subprocess.run([sys.executable, "-m", "villi.cli.main", "--kvstore",
                          f"embedded://{tmp_path}/kv.db", "apply", "-f", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("warning: ")]
    assert len(lines) == 10
    assert lines[0].startswith(f"warning: {path}:7: document 1, spec.ingress[0].fromEntities[1]")
    assert "ciliumnetworkpolicy/odd" in res.stdout


@pytest.mark.parametrize("entity", ["world", "cluster", "host", "remote-node", "all"])
def test_real_entities_are_not_warned(entity: str) -> None:
    text = WARNED.split("---")[0].replace("[cluster, health, kube-apiserver]", f"[{entity}]")
    warned = {w.field for w in load_text(text, "x.yaml").warnings}
    assert not any(f.startswith("spec.ingress[0]") for f in warned)
