"""Issue 14 (enforcement modes, audit mode, policy-verdict events, the degradation switch)
end-to-end on one shared 2-node lab: real pods, real packets, real etcd, the CLI.

    node1: ops/a (app=a)                node2: ops/b (app=b, serves 80, 81)
                                               ops/c (app=c, serves 80)

Policy: b's ingress allows a on 80 and 82/tcp (so c → b and a → b:81 are default-denied
on node2);
a's egress allows b and denies b:82 (a drop on node1). The tests run in order; each puts
back the settings it changed, even when it fails.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.e2e._lab import Lab, running_lab
from villi._nsenter import in_netns

pytestmark = [pytest.mark.e2e, pytest.mark.etcd]

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: b-from-a, namespace: ops}
spec:
  endpointSelector: {matchLabels: {app: b}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: a}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}, {port: "82", protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: a-to-b, namespace: ops}
spec:
  endpointSelector: {matchLabels: {app: a}}
  egress:
  - toEndpoints: [{matchLabels: {app: b}}]
  egressDeny:
  - toEndpoints: [{matchLabels: {app: b}}]
    toPorts: [{ports: [{port: "82", protocol: TCP}]}]
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(tmp_path_factory, "policyops", "--nodes", "2") as lab:
        lab.ok("lab", "pod", "add", "ops/a", "--node", "1", "--labels", "app=a")
        lab.ok("lab", "pod", "add", "ops/b", "--node", "2", "--labels", "app=b",
               "--serve", "80/tcp,81/tcp,82/tcp")
        lab.ok("lab", "pod", "add", "ops/c", "--node", "2", "--labels", "app=c",
               "--serve", "80/tcp")
        lab.apply(POLICY, "policy")
        assert lab.eventually("ops/c", "ops/b", "80", False)
        assert lab.eventually("ops/a", "ops/b", "80", True)
        yield lab


# --- helpers -----------------------------------------------------------------------------

def _flows(lab: Lab, *filters: str) -> list[dict[str, Any]]:
    out = lab.ok("observe", "--last", "2000", *filters, "-o", "json")
    return [json.loads(line)["flow"] for line in out.splitlines() if line.strip()]


def _port(flow: dict[str, Any], side: str) -> int | None:
    l4 = next(iter(flow["l4"].values()), {})
    return l4.get(f"{side}_port")


@contextmanager
def _setting(lab: Lab, *args: str) -> Iterator[None]:
    """``villi config set ARGS`` for the block, then the key unset again."""
    lab.ok("config", "set", *args)
    time.sleep(1.0)   # agents follow the kvstore: a watch event away
    try:
        yield
    finally:
        node = list(args[args.index("--node"):args.index("--node") + 2]) \
            if "--node" in args else []
        keys = [a.split("=")[0] for a in args if "=" in a]
        lab.ok("config", "unset", *node, *keys)
        time.sleep(1.0)


def _pod(lab: Lab, ref: str) -> dict[str, Any]:
    return lab.state["pods"][ref]


def _connect(lab: Lab, src: str, dst: str, port: int) -> socket.socket:
    with in_netns(_pod(lab, src)["netns"]):
        s = socket.create_connection((_pod(lab, dst)["ip"], port), timeout=3)
    s.settimeout(1.5)
    return s


def _echo(s: socket.socket, text: str) -> str | None:
    try:
        s.sendall(text.encode() + b"\n")
        return s.recv(4096).decode().strip()
    except OSError:
        return None


def _metrics(lab: Lab, node: str) -> str:
    n = next(x for x in lab.state["nodes"] if x["name"] == node)
    with in_netns(n["netns"]):
        with urllib.request.urlopen(f"http://{n['ip']}:9962/metrics", timeout=5) as r:
            return str(r.read().decode())


def _since() -> str:
    """A ``--since`` value after every flow so far (waits for the next full second)."""
    now = time.time()
    nxt = int(now) + 1
    time.sleep(nxt - now + 0.01)
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(nxt))


# --- policy-verdict events ---------------------------------------------------------------

def test_policy_verdicts_for_first_packets_in_each_direction_never_replies(lab: Lab) -> None:
    since = _since()
    for _ in range(2):
        assert lab.probe("ops/a", "ops/b", "80")
    assert not lab.probe("ops/c", "ops/b", "80", timeout=0.5)
    time.sleep(0.5)
    verdicts = _flows(lab, "--type", "policy-verdict", "--since", since)
    assert verdicts and all(f["event_type"]["type"] == 5 for f in verdicts)
    # Replies never produce one: every verdict is of a packet towards the server port.
    assert all(_port(f, "destination") == 80 and not f["is_reply"] for f in verdicts), verdicts
    allowed = [f for f in verdicts if f["source"].get("pod_name") == "a"]
    by_conn: dict[int | None, list[str]] = {}
    for f in allowed:
        by_conn.setdefault(_port(f, "source"), []).append(f["traffic_direction"])
    # two connections, each decided once on a's egress (node1) and once on b's ingress
    assert len(by_conn) == 2 and all(sorted(d) == ["EGRESS", "INGRESS"]
                                     for d in by_conn.values()), by_conn
    ing = next(f for f in allowed if f["traffic_direction"] == "INGRESS")
    assert ing["verdict"] == "FORWARDED" and ing["Type"] == "L3_L4"
    assert ing["policy_match_type"] == 2 and ing["node_name"] == "node2"
    assert (ing["source"]["namespace"], ing["source"]["pod_name"]) == ("ops", "a")
    assert (ing["destination"]["namespace"], ing["destination"]["pod_name"]) == ("ops", "b")
    assert "k8s:app=a" in ing["source"]["labels"] and "k8s:app=b" in ing["destination"]["labels"]
    assert ing["source"]["identity"] >= 256 and ing["destination"]["identity"] >= 256
    assert ing["l4"]["TCP"]["destination_port"] == 80
    assert ing["ingress_allowed_by"][0]["name"] == "b-from-a"
    denied = [f for f in verdicts if f["source"].get("pod_name") == "c"]
    assert denied and all(f["verdict"] == "DROPPED" and f["drop_reason_desc"] == "POLICY_DENIED"
                          for f in denied)
    # The compact lines, as hubble prints them.
    text = lab.ok("observe", "--type", "policy-verdict", "--since", since, "--last", "2000")
    assert "policy-verdict:L3-L4 INGRESS ALLOWED (TCP Flags: SYN)" in text
    assert "policy-verdict:L3-Only EGRESS ALLOWED (TCP Flags: SYN)" in text
    assert "policy-verdict:none INGRESS DENIED (TCP Flags: SYN)" in text
    # Every other flow type is still there; --type policy-verdict chose only the real events.
    traces = _flows(lab, "--type", "trace", "--since", since)
    assert traces and all(f["event_type"]["type"] == 4 for f in traces)


# --- audit mode --------------------------------------------------------------------------

def test_cluster_audit_mode_drops_nothing_and_reports_audit(lab: Lab) -> None:
    with _setting(lab, "PolicyAuditMode=enabled"):
        since = _since()
        assert lab.probe("ops/c", "ops/b", "80")           # default deny, audited
        assert lab.probe("ops/a", "ops/b", "81")           # default deny, audited
        assert lab.probe("ops/a", "ops/b", "82")           # a's egress deny rule, audited
        time.sleep(0.5)
        assert _flows(lab, "--verdict", "DROPPED", "--since", since) == []
        audits = _flows(lab, "--verdict", "AUDIT", "--since", since)
        reasons = {(f["source"]["pod_name"], _port(f, "destination"), f["traffic_direction"]):
                   f["drop_reason_desc"] for f in audits}
        assert reasons[("c", 80, "INGRESS")] == "POLICY_DENIED"
        assert reasons[("a", 81, "INGRESS")] == "POLICY_DENIED"
        assert reasons[("a", 82, "EGRESS")] == "POLICY_DENY"
        deny = next(f for f in audits if _port(f, "destination") == 82
                    and f["traffic_direction"] == "EGRESS")
        assert deny["egress_denied_by"][0]["name"] == "a-to-b"     # the deciding rule
        text = lab.ok("observe", "--verdict", "AUDIT", "--since", since, "--last", "2000")
        assert "policy-verdict:none INGRESS AUDITED" in text and " AUDIT (" in text
        eps = {e["podName"]: e for e in json.loads(lab.ok("get", "endpoints", "-o", "json"))}
        assert eps["b"]["policy"]["ingress"] == "disabled (audit)"
        assert eps["b"]["policy"]["auditSource"] == "cluster"
        assert "audit mode enabled (cluster)" in lab.ok("status")
    # Leaving audit: enforced again
    assert not lab.probe("ops/c", "ops/b", "80", timeout=0.5)
    assert not lab.probe("ops/a", "ops/b", "82", timeout=0.5)


def test_endpoint_audit_never_changes_an_enforcing_deny_and_leaving_is_immediate(lab: Lab
                                                                                   ) -> None:
    out = lab.ok("endpoint", "config", "ops/b", "PolicyAuditMode=enabled")
    assert "disabled (audit)" in out
    try:
        conn = _connect(lab, "ops/c", "ops/b", 80)        # default deny on b: audited
        try:
            assert _echo(conn, "one") == "one"
            # a's egress deny to b:82 is enforced on node1, whatever b's mode is
            assert not lab.probe("ops/a", "ops/b", "82", timeout=0.5)
            eps = {e["podName"]: e for e in json.loads(lab.ok("get", "endpoints", "-o",
                                                                  "json"))}
            assert eps["b"]["policy"]["auditSource"] == "endpoint"
            assert eps["a"]["policy"]["egress"] == "enabled"
            lab.ok("endpoint", "config", "ops/b", "PolicyAuditMode=disabled")
            assert _echo(conn, "two") is None     # the very next packet is dropped
        finally:
            conn.close()
    finally:
        lab.run("endpoint", "config", "ops/b", "PolicyAuditMode=disabled")
    assert not lab.probe("ops/c", "ops/b", "80", timeout=0.5)


def test_node_audit_mode_overrides_the_cluster_setting(lab: Lab) -> None:
    with _setting(lab, "--node", "node2", "PolicyAuditMode=enabled"):
        assert lab.probe("ops/c", "ops/b", "80")
        cfg = json.loads(lab.ok("config", "get", "-o", "json"))
        assert cfg["nodes"]["node2"]["auditModeSource"] == "node"
        assert cfg["nodes"]["node1"]["auditMode"] is False
        assert not lab.probe("ops/a", "ops/b", "82", timeout=0.5)   # node1 enforces
        with _setting(lab, "PolicyAuditMode=enabled"):
            with _setting(lab, "--node", "node2", "PolicyAuditMode=disabled"):
                assert not lab.probe("ops/c", "ops/b", "80", timeout=0.5)
                assert lab.probe("ops/a", "ops/b", "82")           # node1: cluster's
    assert not lab.probe("ops/c", "ops/b", "80", timeout=0.5)


def test_bad_settings_are_refused_and_change_nothing(lab: Lab) -> None:
    for args in (("PolicyAuditMode=maybe",), ("EnablePolicy=sometimes",),
                 ("Colour=red",), ("PolicyAuditMode",)):
        res = lab.run("config", "set", *args)
        assert res.returncode == 1 and "error:" in res.stderr, res
    res = lab.run("endpoint", "config", "ops/b", "EnablePolicy=never")
    assert res.returncode == 1 and "unknown setting 'EnablePolicy'" in res.stderr
    assert "nothing stored" in lab.ok("config", "get")


# --- enforcement modes -------------------------------------------------------------------

def test_enforcement_modes(lab: Lab) -> None:
    assert lab.probe("ops/b", "ops/c", "80")                    # default: c selects nothing
    with _setting(lab, "EnablePolicy=always"):
        assert not lab.probe("ops/b", "ops/c", "80", timeout=0.5)    # default deny everywhere
        eps = {e["podName"]: e for e in json.loads(lab.ok("get", "endpoints", "-o", "json"))}
        assert eps["c"]["policy"]["ingress"] == "enabled"
        assert eps["c"]["policy"]["egress"] == "enabled" and \
            eps["c"]["policy"]["enforcement"] == "always"
        assert "enforcement always" in lab.ok("status")
        assert lab.probe("ops/a", "ops/b", "80")                 # allowed both ways still
    with _setting(lab, "EnablePolicy=never"):
        assert lab.probe("ops/c", "ops/b", "80")                 # default deny off
        assert lab.probe("ops/a", "ops/b", "82")                 # deny rules too
        eps = {e["podName"]: e for e in json.loads(lab.ok("get", "endpoints", "-o", "json"))}
        assert eps["b"]["policy"]["ingress"] == "disabled"
    assert not lab.probe("ops/c", "ops/b", "80", timeout=0.5)
    assert lab.probe("ops/b", "ops/c", "80")


# --- the last-resort switch --------------------------------------------------------------

def test_degrade_with_agent_killed_and_etcd_stopped_then_restore(lab: Lab) -> None:
    lab.ok("lab", "agent", "kill", "node2")
    lab.ok("lab", "etcd", "stop")
    try:
        out = lab.ok("datapath", "policy", "degrade", "--node", "node2")
        assert "DEGRADED" in out
        assert lab.probe("ops/c", "ops/b", "80")        # what policy drops is forwarded
        assert lab.probe("ops/a", "ops/b", "81")
        res = lab.run("status")
        assert res.returncode == 1 and "DEGRADED" in res.stdout, res.stdout
        assert lab.run("status", "--brief").stdout.startswith("error in policy (node2)")
        res = lab.run("lab", "status")
        assert res.returncode == 1 and "POLICY DEGRADED" in res.stdout.replace("\n", " ")
        sw = lab.run("datapath", "policy", "status")
        assert sw.returncode == 1 and "DEGRADED since" in sw.stdout
    finally:
        lab.ok("lab", "etcd", "start")
        lab.ok("lab", "agent", "start", "node2")
    # The agent honours the switch on start: still degraded, loudly, until restore.
    assert lab.probe("ops/c", "ops/b", "80")
    res = lab.run("status", "-o", "json")
    health = json.loads(res.stdout)
    assert res.returncode == 1
    assert health["node2"]["policy"]["degraded"] is True
    assert 'villi_policy_degraded{source="node"} 1.0' in _metrics(lab, "node2")
    assert 'villi_policy_degraded{source="node"} 0.0' in _metrics(lab, "node1")
    since = _since()
    assert lab.probe("ops/c", "ops/b", "80")
    time.sleep(0.5)
    assert any(f["source"].get("pod_name") == "c" for f in
               _flows(lab, "--verdict", "AUDIT", "--since", since))
    out = lab.ok("datapath", "policy", "restore", "--node", "node2")
    assert "restored" in out
    assert not lab.probe("ops/c", "ops/b", "80", timeout=0.5)
    assert lab.ok("status", "--brief").strip() == "OK"
    assert 'villi_policy_degraded{source="node"} 0.0' in _metrics(lab, "node2")


def test_cluster_wide_degrade_through_the_kvstore(lab: Lab) -> None:
    lab.ok("policy", "degrade", "--all")
    try:
        time.sleep(1.0)
        assert lab.probe("ops/c", "ops/b", "80")          # node2's default deny
        assert lab.probe("ops/a", "ops/b", "82")          # node1's deny rule
        assert "cluster-wide" in lab.run("status", "--brief").stdout
    finally:
        lab.ok("policy", "restore", "--all")
    time.sleep(1.0)
    assert not lab.probe("ops/c", "ops/b", "80", timeout=0.5)
    assert lab.ok("status", "--brief").strip() == "OK"
