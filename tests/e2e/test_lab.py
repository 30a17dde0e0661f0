"""Issue 5 end-to-end: a 3-node `villi lab` on this machine, driven through its CLI.

One lab is shared by the module (it takes ~3 s to come up). It has its own state file
(``VILLI_LAB_STATE`` in a temp dir), so a lab the user is running is never touched,
and a short lease TTL so that a node killed hard disappears quickly. Test order
matters: the node-kill test runs after the traffic tests, and the teardown check last.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.e2e._lab import VILLI, Lab, running_lab  # noqa: F401  (Lab: imported by other modules)
from villi.lab import cluster
from villi.netns import routes

pytestmark = [pytest.mark.e2e, pytest.mark.etcd]

LEASE_TTL = 3
NODES = 3


def _root_net() -> tuple[set[str], list[tuple[str, str | None, int]], list[str]]:
    links = set(subprocess.run(["ip", "-o", "link"], capture_output=True, text=True)
                .stdout.split("\n"))
    names = {line.split(":")[1].strip().split("@")[0] for line in links if ":" in line}
    addrs = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True,
                           text=True).stdout.splitlines()
    return names, routes.routes(None), addrs


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    t0 = time.monotonic()
    with running_lab(tmp_path_factory, "lab", "--nodes", str(NODES),
                     "--lease-ttl", str(LEASE_TTL)) as lab:
        lab.up_seconds = time.monotonic() - t0   # type: ignore[attr-defined]
        yield lab


def test_lab_comes_up_with_three_healthy_nodes_and_nothing_in_root(lab: Lab) -> None:
    state = lab.state
    assert [n["name"] for n in state["nodes"]] == ["node1", "node2", "node3"]
    assert lab.up_seconds < 60   # type: ignore[attr-defined]
    out = lab.ok("status", "--brief")
    assert out.strip() == "OK"
    nodes = json.loads(lab.ok("get", "nodes", "-o", "json"))
    assert sorted(n["name"] for n in nodes) == ["node1", "node2", "node3"]
    cidrs = [c for n in nodes for c in n["podCIDRs"]]
    assert len(set(cidrs)) == 3
    # every namespace that routes pod CIDRs has the cluster-wide unreachable route
    for ns in [n["netns"] for n in state["nodes"]] + [state["underlay"]["netns"]]:
        table = routes.routes(ns)
        assert ("10.64.0.0/10", None, routes.RTN_UNREACHABLE) in table, (ns, table)
        assert not any(dst.startswith("10.255.") for dst, _, _ in table)
    # nothing in the root namespace: no lab link, address or pod route
    names, root_routes, addrs = _root_net()
    assert not {"br0", "eth0peer"} & names
    assert not any(re.fullmatch(r"n\d+(peer)?", n) for n in names)
    assert not any(dst.startswith("10.64.") for dst, _, _ in root_routes), root_routes
    assert not any("172.30.0." in a for a in addrs)
    assert json.loads(lab.ok("lab", "status", "-o", "json"))["lab"]["id"] == state["id"]


def test_up_twice_is_refused_clearly(lab: Lab) -> None:
    res = lab.run("lab", "up")
    assert res.returncode == 1
    assert "already running" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_pods_on_different_nodes_reach_each_other(lab: Lab) -> None:
    lab.ok("lab", "pod", "add", "e2e/a", "--node", "1", "--labels", "app=a",
           "--serve", "80/tcp,81/udp")
    lab.ok("lab", "pod", "add", "e2e/b", "--node", "2", "--labels", "app=b",
           "--serve", "80/tcp,81/udp")
    lab.ok("lab", "pod", "add", "e2e/c", "--node", "3", "--labels", "app=c",
           "--serve", "80/tcp,web=8080/tcp")
    pods = lab.state["pods"]
    assert {pods[k]["node"] for k in ("e2e/a", "e2e/b", "e2e/c")} == {"node1", "node2",
                                                                     "node3"}
    for src, dst, port in [("e2e/a", "e2e/b", "80"), ("e2e/b", "e2e/c", "80"),
                           ("e2e/c", "e2e/a", "80"), ("e2e/c", "e2e/b", "81/udp"),
                           ("e2e/a", "e2e/c", "8080/tcp")]:
        assert lab.probe(src, dst, port), f"{src} → {dst}:{port}"
    # the named ports reached the agent
    eps = json.loads(lab.ok("get", "endpoints", "-o", "json"))
    c = next(e for e in eps if e["podName"] == "c")
    assert c["namedPorts"]["web"] == [8080, "TCP"]
    assert c["namedPorts"]["serve-80-tcp"] == [80, "TCP"]
    # exec runs in the pod and passes the exit code through
    res = lab.run("lab", "exec", "e2e/a", "--", "ip", "-o", "-4", "addr", "show", "eth0")
    assert res.returncode == 0 and pods["e2e/a"]["ip"] in res.stdout
    assert lab.run("lab", "exec", "e2e/a", "--", "sh", "-c", "exit 7").returncode == 7


def test_policies_enforced_across_nodes_in_both_directions(lab: Lab) -> None:
    ingress = """\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: b-from-x, namespace: e2e}
        spec:
          endpointSelector: {matchLabels: {app: b}}
          ingress:
          - fromEndpoints: [{matchLabels: {role: x}}]
            toPorts: [{ports: [{port: "80", protocol: TCP}]}]
        """
    egress = """\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: a-to-c, namespace: e2e}
        spec:
          endpointSelector: {matchLabels: {app: a}}
          egress:
          - toEndpoints: [{matchLabels: {app: c}}]
        """
    lab.apply(ingress, "ingress")
    try:
        # ingress on node2: a (node1) and c (node3) are refused, until a gets role=x
        assert lab.eventually("e2e/a", "e2e/b", "80", False)
        assert lab.eventually("e2e/c", "e2e/b", "80", False)
        lab.ok("lab", "pod", "label", "e2e/a", "role=x")
        assert lab.eventually("e2e/a", "e2e/b", "80", True)
        assert lab.probe("e2e/c", "e2e/b", "80") is False
        assert lab.probe("e2e/a", "e2e/b", "81/udp") is False   # port not allowed
        lab.ok("lab", "pod", "label", "e2e/a", "--remove", "role")
        assert lab.eventually("e2e/a", "e2e/b", "80", False)
    finally:
        lab.apply(ingress, "ingress", delete=True)
    assert lab.eventually("e2e/a", "e2e/b", "80", True)

    lab.apply(egress, "egress")
    try:
        # egress on node1: a may only reach c (node3), not b (node2)
        assert lab.eventually("e2e/a", "e2e/b", "80", False)
        assert lab.probe("e2e/a", "e2e/c", "80")
        assert lab.probe("e2e/b", "e2e/a", "80")   # a's ingress is untouched
    finally:
        lab.apply(egress, "egress", delete=True)
    assert lab.eventually("e2e/a", "e2e/b", "80", True)


def test_connectivity_suite_passes(lab: Lab) -> None:
    res = lab.run("connectivity", "test", "-o", "json", timeout=240)
    report = json.loads(res.stdout)
    failed = [r for r in report["results"] if not r["ok"]]
    assert res.returncode == 0 and report["passed"], (failed, report["errors"], res.stderr)
    assert len({r["scenario"] for r in report["results"]}) >= 12
    # the suite cleaned up after itself
    assert not [k for k in lab.state["pods"] if k.startswith("villi-test")]
    assert "villi-test" not in lab.ok("get", "policies")


def test_node_killed_hard_disappears_within_lease_ttl(lab: Lab) -> None:
    state = lab.state
    node3 = state["nodes"][2]
    c_ip = state["pods"]["e2e/c"]["ip"]
    cidr3 = json.loads(lab.ok("get", "nodes", "-o", "json"))
    cidr3 = next(n for n in cidr3 if n["name"] == "node3")["podCIDRs"][0]
    watchers = state["nodes"][:2]
    for n in watchers:
        assert any(dst == cidr3 for dst, _, _ in routes.routes(n["netns"]))
        assert lab.ipcache_has(n["name"], c_ip)

    os.kill(node3["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    gone_at = None
    while time.monotonic() - t0 < LEASE_TTL + 5:
        if all(not any(dst == cidr3 for dst, _, _ in routes.routes(n["netns"]))
               and not lab.ipcache_has(n["name"], c_ip) for n in watchers):
            gone_at = time.monotonic() - t0
            break
        time.sleep(0.1)
    assert gone_at is not None, "node3 still routed / in the ipcache of the other nodes"
    # within the TTL, plus the store's expiry sweep and the watch delivery
    assert gone_at <= LEASE_TTL + 2.0, gone_at
    nodes = json.loads(lab.ok("get", "nodes", "-o", "json"))
    assert "node3" not in {n["name"] for n in nodes}
    # the survivors still talk to each other
    assert lab.probe("e2e/a", "e2e/b", "80")
    st = lab.run("lab", "status")
    assert st.returncode == 1 and "dead" in st.stdout


def test_down_leaves_nothing_behind(lab: Lab) -> None:
    lab_id = lab.state["id"]
    before = cluster.leftovers(lab_id)
    assert before["namespaces"] and before["processes"] and before["pins"]
    out = lab.ok("lab", "down")
    assert f"lab {lab_id} removed" in out
    after = cluster.leftovers(lab_id)
    assert after == {"namespaces": [], "processes": [], "pins": [], "mounts": [],
                     "directories": [], "cgroups": []}, after
    assert not lab.state_path.exists()
    names, root_routes, _ = _root_net()
    assert not {"br0"} & names
    assert not any(dst.startswith("10.64.") for dst, _, _ in root_routes)
    # down again: nothing up, a clear message, success
    res = lab.run("lab", "down")
    assert res.returncode == 0 and "no lab is running" in res.stdout
    assert "Traceback" not in res.stderr
    # and the commands that need a lab say so
    res = lab.run("lab", "status")
    assert res.returncode == 1 and "no lab is running" in res.stderr
