"""Issue 17 end-to-end: `villi lab up --ipam eni` — cloud-sim, the operator in ENI mode
and two agents, driven through the CLI.

The lab's instance type holds 2 pod interfaces x 5 IPs = 10 pod IPs per node; the
operator releases excess IPs after 3 s (180 s by default). Test order matters: the
exhaustion and placement tests fill the nodes, the release test empties node1, the
node-delete test runs last.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e._lab import Lab, running_lab
from villi.lab import eni as lab_eni
from villi.netns import routes

pytestmark = [pytest.mark.e2e, pytest.mark.etcd]

RELEASE_DELAY = 3


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(tmp_path_factory, "enilab", "--nodes", "2", "--lease-ttl", "3",
                     "--ipam", "eni", "--cloud-latency", "5",
                     "--excess-ip-release-delay", str(RELEASE_DELAY)) as lab:
        yield lab


def _nodes(lab: Lab) -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in json.loads(lab.ok("get", "nodes", "-o", "json"))}


def _wait(check: Any, within: float = 20.0, what: str = "") -> Any:
    deadline = time.monotonic() + within
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.3)


def _packets(netns: str, dev: str, direction: str) -> int:
    out = subprocess.run(["ip", "netns", "exec", netns, "cat",
                          f"/sys/class/net/{dev}/statistics/{direction}_packets"],
                         capture_output=True, text=True, check=True).stdout
    return int(out)


def _pod_ip(lab: Lab, ref: str, *extra: str) -> str:
    out = lab.ok("lab", "pod", "add", ref, *extra)
    return out.split("IP ")[1].split()[0].rstrip(",")


def test_pods_get_interface_ips_and_reach_each_other_across_nodes(lab: Lab) -> None:
    state = lab.state
    # the pool fills to the pre-allocation watermark (8) on two interfaces
    nodes = _wait(lambda: (n := _nodes(lab)) and all(
        sum(len(e["ips"]) for e in v.get("eni", [])) >= 8 for v in n.values()) and n,
        what="pools at the watermark")
    a = _pod_ip(lab, "default/a", "--node", "1", "--serve", "80/tcp")
    b = _pod_ip(lab, "default/b", "--node", "2")
    pool1 = {ip for e in nodes["node1"]["eni"] for ip in e["ips"]}
    assert a in pool1 and a.startswith("10.70.")
    assert [e["index"] for e in nodes["node1"]["eni"]] == [1, 2]
    assert b in {ip for e in _nodes(lab)["node2"]["eni"] for ip in e["ips"]}
    assert lab.eventually("default/b", "default/a", "80/tcp", True, within=10)
    # ...through the interfaces that own the pods' IPs, not the node's own link
    n1, n2 = (n["netns"] for n in state["nodes"])
    idx_a = next(e["index"] for e in nodes["node1"]["eni"] if a in e["ips"])
    idx_b = next(e["index"] for e in _nodes(lab)["node2"]["eni"] if b in e["ips"])
    before = (_packets(n1, f"eni{idx_a}", "rx"), _packets(n2, f"eni{idx_b}", "tx"))
    for _ in range(3):
        assert lab.probe("default/b", "default/a", "80/tcp")
    after = (_packets(n1, f"eni{idx_a}", "rx"), _packets(n2, f"eni{idx_b}", "tx"))
    assert after[0] - before[0] >= 6 and after[1] - before[1] >= 6, (before, after)
    rules = subprocess.run(["ip", "netns", "exec", n1, "ip", "rule"], capture_output=True,
                           text=True).stdout
    assert f"from {a} lookup {100 + idx_a}" in rules
    # the interfaces exist in the cloud, tagged for this cluster and node
    ours = lab_eni.interfaces(state, "node1")
    assert sorted(e["NetworkInterfaceId"] for e in ours) == sorted(
        e["id"] for e in nodes["node1"]["eni"])
    # network safety: every namespace routing pod IPs holds the unreachable route
    for ns in [n["netns"] for n in state["nodes"]] + [state["underlay"]["netns"]]:
        assert ("10.64.0.0/10", None, routes.RTN_UNREACHABLE) in routes.routes(ns)
    health = json.loads(lab.ok("status", "-o", "json"))
    text = json.dumps(health)
    assert "villi.io/ip" in text


def test_connectivity_suite_passes_with_eni_routing(lab: Lab) -> None:
    """Policies, entities and "world" traffic all work over the interfaces (the
    underlay reaches pod IPs through the subnets' router addresses)."""
    out = lab.ok("connectivity", "test", timeout=300)
    assert "scenarios passed" in out and "✗" not in out, out[-2000:]
    assert not [k for k in lab.state["pods"] if k.startswith("villi-test/")]


def test_refill_at_the_watermark(lab: Lab) -> None:
    for i in range(3):
        lab.ok("lab", "pod", "add", f"default/w{i}", "--node", "1")
    # 4 used of 8 -> free 4 < 8: the operator tops the pool up to 10 (instance limit)
    _wait(lambda: sum(len(e["ips"]) for e in _nodes(lab)["node1"]["eni"]) == 10,
          what="refill to 10 IPs")


def test_placement_and_exhaustion(lab: Lab) -> None:
    placed = []
    while True:
        res = lab.run("lab", "pod", "add", f"default/f{len(placed)}")
        if res.returncode != 0:
            break
        placed.append(res.stdout.split(" on ")[1].split(":")[0])
        assert len(placed) < 30
    # node1 held 4 pods, node2 1: the most free is chosen first, nobody over capacity
    assert placed.count("node1") == 6 and placed.count("node2") == 9, placed
    assert placed[0] == "node2"
    assert "cannot place the pod" in res.stderr and "full: node1, node2" in res.stderr
    assert "Traceback" not in res.stderr
    res = lab.run("lab", "pod", "add", "default/over", "--node", "1")
    assert res.returncode == 1
    assert "code 11" in res.stderr and "no free ENI IP on node" in res.stderr, res.stderr
    nodes = _nodes(lab)
    assert nodes["node1"]["villi.io/ip"] == 0 and nodes["node2"]["villi.io/ip"] == 0
    table = lab.ok("get", "nodes")
    assert "ALLOCATABLE" in table and "eni-" in table


def test_excess_released_after_the_delay(lab: Lab) -> None:
    pods = [k for k, v in lab.state["pods"].items() if v["node"] == "node1"]
    for ref in pods:
        lab.ok("lab", "pod", "delete", ref)
    t0 = time.monotonic()
    _wait(lambda: sum(len(e["ips"]) for e in _nodes(lab)["node1"]["eni"]) == 8,
          within=RELEASE_DELAY + 20, what="excess released")
    assert time.monotonic() - t0 >= RELEASE_DELAY - 1.5  # not before the delay


def test_node_delete_collects_its_interfaces(lab: Lab) -> None:
    state = lab.state
    node2 = next(n for n in state["nodes"] if n["name"] == "node2")
    assert lab_eni.interfaces(state, "node2")
    os.kill(node2["pid"], signal.SIGKILL)     # the VM dies with its agent...
    lab_eni.terminate(state, node2)           # ...and the provider terminates it
    _wait(lambda: not lab_eni.interfaces(state, "node2"), within=30,
          what="node2's interfaces garbage-collected")
    assert lab_eni.interfaces(state, "node1")  # the live node keeps its own
    Path(state["dir"]).exists()
