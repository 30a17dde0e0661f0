"""Issues 10 §2/§3 and 11 §4 end-to-end: failure drills on one shared 2-node lab.

The drills run in order on one lab (module fixture; a lab comes up in ~5 s, the drills
themselves take ~3 min, most of it the outage lengths the issues ask for):

- an agent killed (SIGKILL): established connections survive, policy holds, restart
  restores the same endpoints, IPs and identities, nothing duplicated;
- an agent stopped for 60 s: pods on the other node keep reaching its pods under the
  last policy and denied pods stay denied (fail-static across nodes);
- etcd frozen (SIGSTOP) for 35 s: ``villi status`` says the kvstore is unreachable while
  it is, and no lease expires (no node or ipcache key is deleted and re-written);
- etcd stopped for 30 s: traffic and policy hold, pod add and apply fail clearly and
  quickly, and after etcd returns the agents reconnect on their own and a policy applied
  then takes effect on every node;
- ``lab node add`` / ``lab node del``: a node deleted on purpose is withdrawn from the
  other nodes at once and its pod CIDR is reclaimed without a grace period.

Lease TTL: the agents' default is 900 s; this lab uses 90 s. 90 s is still longer than
the 60 s agent outage the acceptance asks for (so the fail-static test means the same),
and short enough that a keep-alive (every TTL/3 = 30 s) is guaranteed to fall inside the
35 s etcd freeze, so the freeze test exercises keep-alive retries instead of passing
because no keep-alive was due.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e._lab import Lab, running_lab
from villi._nsenter import in_netns
from villi.lab._api import agent_call, store_run
from villi.netns import routes

pytestmark = [pytest.mark.e2e, pytest.mark.etcd]

LEASE_TTL = 90
AGENT_OUTAGE = 60.0   # issue 10 §2
ETCD_FREEZE = 35.0    # > one keep-alive interval (TTL/3), < TTL
ETCD_OUTAGE = 30.0    # issue 10 §3

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: b-from-a, namespace: drill}
spec:
  endpointSelector: {matchLabels: {app: b}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: a}}]
"""

# Applied after the etcd outage: one rule enforced on node2 (b's ingress now also lets d
# in), one on node1 (a's egress now only reaches port 81).
AFTER_OUTAGE = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: b-from-d, namespace: drill}
spec:
  endpointSelector: {matchLabels: {app: b}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: d}}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: a-egress-81, namespace: drill}
spec:
  endpointSelector: {matchLabels: {app: a}}
  egress:
  - toEndpoints: [{matchLabels: {app: b}}]
    toPorts: [{ports: [{port: "81", protocol: TCP}]}]
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(tmp_path_factory, "drills", "--nodes", "2",
                     "--lease-ttl", str(LEASE_TTL)) as lab:
        lab.ok("lab", "pod", "add", "drill/a", "--node", "1", "--labels", "app=a")
        lab.ok("lab", "pod", "add", "drill/d", "--node", "1", "--labels", "app=d")
        lab.ok("lab", "pod", "add", "drill/b", "--node", "2", "--labels", "app=b",
               "--serve", "80/tcp,81/tcp")
        lab.apply(POLICY, "policy")
        assert lab.eventually("drill/d", "drill/b", "80", False)
        assert lab.eventually("drill/a", "drill/b", "80", True)
        yield lab


def _pod(lab: Lab, ref: str) -> dict[str, Any]:
    return lab.state["pods"][ref]


def _node(lab: Lab, name: str) -> dict[str, Any]:
    return next(n for n in lab.state["nodes"] if n["name"] == name)


def _connect(lab: Lab, src: str, dst: str, port: int) -> socket.socket:
    """A TCP connection from pod ``src`` to pod ``dst`` that outlives this call."""
    with in_netns(_pod(lab, src)["netns"]):
        s = socket.create_connection((_pod(lab, dst)["ip"], port), timeout=3)
    s.settimeout(3)
    return s


def _echo(s: socket.socket, text: str) -> str:
    s.sendall(text.encode() + b"\n")
    data = b""
    while not data.endswith(b"\n"):
        more = s.recv(4096)
        if not more:
            break
        data += more
    return data.decode().strip()


def _endpoints(lab: Lab) -> list[tuple[str, str, str, int, int]]:
    eps = json.loads(lab.ok("get", "endpoints", "-o", "json"))
    return sorted((e["node"], f"{e['namespace']}/{e['podName']}", e["ipv4"], e["identity"],
                   e["id"]) for e in eps)


def _state_keys(lab: Lab) -> dict[str, int]:
    """Node, ipcache and pod CIDR keys → their create revision (a key deleted and
    written again gets a new one; a reclaimed pod CIDR is a deleted key)."""
    async def fn(store: Any) -> dict[str, int]:
        out = {}
        for prefix in ("villi/state/nodes/v1/", "villi/state/ip/v1/",
                       "villi/state/ipam/v1/podcidrs/"):
            for kv in (await store.list(prefix)).items:
                out[kv.key] = kv.create_revision
        return out
    return store_run(lab.state, fn)


def _wait_status(lab: Lab, ok: bool, within: float) -> str:
    deadline = time.monotonic() + within
    while True:
        res = lab.run("status")
        if (res.returncode == 0) == ok:
            return res.stdout
        if time.monotonic() > deadline:
            raise AssertionError(f"villi status still {'not ' if ok else ''}ok after "
                                 f"{within}s:\n{res.stdout}{res.stderr}")
        time.sleep(0.5)


def _kvstore_status(lab: Lab) -> dict[str, str]:
    """Node → the kvstore status its agent reports (``villi status -o json``)."""
    res = lab.run("status", "-o", "json")
    return {node: r.get("kvstore", {}).get("status", r.get("error", "?"))
            for node, r in json.loads(res.stdout).items()}


def _routes_to(netns: str, cidr: str) -> bool:
    return any(dst == cidr for dst, _, _ in routes.routes(netns))


# --- the drills ----------------------------------------------------------------------------

def test_agent_killed_keeps_connections_and_policy_and_restart_restores(lab: Lab) -> None:
    before = _endpoints(lab)
    conn = _connect(lab, "drill/a", "drill/b", 80)
    try:
        assert _echo(conn, "before") == "before"
        out = lab.ok("lab", "agent", "kill", "node2")
        assert "killed" in out
        st = lab.run("lab", "status")
        assert st.returncode == 1 and "killed" in st.stdout, st.stdout
        # the established connection through node2 survives its agent
        assert _echo(conn, "during") == "during"
        assert lab.probe("drill/a", "drill/b", "80")
        assert not lab.probe("drill/d", "drill/b", "80")   # policy still enforced

        out = lab.ok("lab", "agent", "start", "node2")
        assert "healthy" in out
        assert _echo(conn, "after") == "after"
    finally:
        conn.close()
    after = _endpoints(lab)
    assert after == before   # same endpoints, ids, IPs, identities; nothing duplicated
    assert len({e[2] for e in after}) == len(after)
    # status follows the restarted agent (new pid), and the node is healthy again
    st = lab.run("lab", "status", "-o", "json")
    assert st.returncode == 0, st.stdout
    node2 = next(n for n in json.loads(st.stdout)["nodes"] if n["name"] == "node2")
    assert node2["alive"] and node2["pid"] == _node(lab, "node2")["pid"]
    assert lab.probe("drill/a", "drill/b", "80")
    assert not lab.probe("drill/d", "drill/b", "80")
    # restart = stop + start, same outcome
    lab.ok("lab", "agent", "restart", "node2")
    assert _endpoints(lab) == before


def test_agent_stopped_60s_other_nodes_keep_reaching_its_pods(lab: Lab) -> None:
    b_ip = _pod(lab, "drill/b")["ip"]
    node1 = _node(lab, "node1")
    cidr2 = _node(lab, "node2")["pod_cidrs"][0]
    keys_before = _state_keys(lab)
    assert "villi/state/ipam/v1/podcidrs/node2" in keys_before
    lab.ok("lab", "agent", "stop", "node2")
    t0 = time.monotonic()
    try:
        st = lab.run("lab", "status")
        assert st.returncode == 1 and "stopped" in st.stdout
        while time.monotonic() - t0 < AGENT_OUTAGE:
            time.sleep(5)
            assert _routes_to(node1["netns"], cidr2)
            assert lab.ipcache_has("node1", b_ip)
        # after the full outage: still reachable under the last policy, denied still denied
        assert lab.probe("drill/a", "drill/b", "80")
        assert not lab.probe("drill/d", "drill/b", "80")
        assert "node2" in {n["name"] for n in json.loads(lab.ok("get", "nodes", "-o", "json"))}
    finally:
        lab.ok("lab", "agent", "start", "node2")
    # node2's entries were never withdrawn and its pod CIDR never reclaimed: same keys,
    # same create revisions
    assert {k: v for k, v in _state_keys(lab).items() if k in keys_before} == keys_before


def test_etcd_frozen_shorter_than_ttl_reported_unreachable_and_no_lease_expires(
        lab: Lab) -> None:
    keys_before = _state_keys(lab)
    assert set(keys_before) >= {"villi/state/nodes/v1/node1", "villi/state/nodes/v1/node2"}
    etcd = lab.state["processes"]["etcd"]["pid"]
    logs = {n["name"]: Path(n["log"]).read_text() for n in lab.state["nodes"]}
    os.kill(etcd, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        deadline = time.monotonic() + 10
        while not all(s.startswith("unreachable") for s in _kvstore_status(lab).values()):
            assert time.monotonic() < deadline, _kvstore_status(lab)   # every node says so
            time.sleep(0.5)
        assert lab.probe("drill/a", "drill/b", "80")
        assert not lab.probe("drill/d", "drill/b", "80")
        time.sleep(max(0.0, ETCD_FREEZE - (time.monotonic() - t0)))
    finally:
        os.kill(etcd, signal.SIGCONT)
    out = _wait_status(lab, ok=True, within=20)
    assert "KVStore:     ok" in out
    # nothing expired: every node and ipcache key is the one written before the freeze
    assert _state_keys(lab) == keys_before
    for n in lab.state["nodes"]:
        new = Path(n["log"]).read_text()[len(logs[n["name"]]):]
        assert "was lost" not in new, new   # no lease had to be granted again
        assert "kvstore unreachable" in new, new


def test_etcd_stopped_30s_traffic_holds_then_agents_reconnect(lab: Lab) -> None:
    lab.ok("lab", "etcd", "stop")
    t0 = time.monotonic()
    try:
        assert lab.probe("drill/a", "drill/b", "80")
        assert not lab.probe("drill/d", "drill/b", "80")
        out = _wait_status(lab, ok=False, within=10)
        assert "unreachable" in out and "KVStore" in out
        res = lab.run("lab", "status")
        assert "stopped" in res.stdout   # etcd shown as stopped, not dead

        # pod add fails clearly and leaves no record behind
        t1 = time.monotonic()
        res = lab.run("lab", "pod", "add", "drill/x", "--node", "1", timeout=60)
        assert res.returncode == 1, res.stdout
        assert "etcd" in res.stderr and "unreachable" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
        assert time.monotonic() - t1 < 15
        assert "drill/x" not in lab.state["pods"]

        # villi apply fails within 5 s and names the kvstore
        path = lab.state_path.parent / "after.yaml"
        path.write_text(AFTER_OUTAGE)
        t1 = time.monotonic()
        res = lab.run("apply", "-f", str(path))
        took = time.monotonic() - t1
        assert res.returncode == 1 and "etcd" in res.stderr, res.stderr
        assert took < 5.0, took
        # TODO(lead, security branch): issue 10 §3 also wants the message to say that
        # nothing was applied; assert it here once `villi apply` says so.
        time.sleep(max(0.0, ETCD_OUTAGE - (time.monotonic() - t0)))
        assert lab.probe("drill/a", "drill/b", "80")
        assert not lab.probe("drill/d", "drill/b", "80")
    finally:
        lab.ok("lab", "etcd", "start")
    # the agents reconnect on their own (no restart), then a new policy reaches every node
    _wait_status(lab, ok=True, within=30)
    policies = json.loads(lab.ok("get", "policies", "-o", "json"))
    assert "b-from-d" not in json.dumps(policies)   # the failed apply left nothing
    lab.ok("apply", "-f", str(lab.state_path.parent / "after.yaml"))
    try:
        for n in lab.state["nodes"]:
            deadline = time.monotonic() + 15
            while True:
                names = {r["name"] for r in agent_call(n["socket"], "GET",
                                                       "/v1/policy")["resources"]}
                if {"b-from-d", "a-egress-81"} <= names:
                    break
                assert time.monotonic() < deadline, (n["name"], names)
                time.sleep(0.2)
        assert lab.eventually("drill/d", "drill/b", "80", True)    # node2's ingress
        assert lab.eventually("drill/a", "drill/b", "80", False)   # node1's egress
        assert lab.eventually("drill/a", "drill/b", "81", True)
    finally:
        lab.ok("delete", "-f", str(lab.state_path.parent / "after.yaml"))
    assert lab.eventually("drill/a", "drill/b", "80", True)
    assert lab.eventually("drill/d", "drill/b", "80", False)


def test_node_added_then_deleted_on_purpose_is_withdrawn_at_once(lab: Lab) -> None:
    out = lab.ok("lab", "node", "add")
    assert "node3 added" in out
    node3 = _node(lab, "node3")
    cidr3 = node3["pod_cidrs"][0]
    lab.ok("lab", "pod", "add", "drill/c", "--node", "node3", "--labels", "app=c",
           "--serve", "80/tcp")
    c_ip = _pod(lab, "drill/c")["ip"]
    assert lab.eventually("drill/a", "drill/c", "80", True)
    others = [n for n in lab.state["nodes"] if n["name"] != "node3"]
    assert all(_routes_to(n["netns"], cidr3) for n in others)

    t0 = time.monotonic()
    out = lab.ok("lab", "node", "del", "node3")
    assert "node3 deleted" in out
    deadline = t0 + 5   # at once: no lease TTL (90 s here), no grace period
    while any(_routes_to(n["netns"], cidr3) or lab.ipcache_has(n["name"], c_ip)
              for n in others):
        assert time.monotonic() < deadline, "node3 still routed / in an ipcache"
        time.sleep(0.1)
    assert "node3" not in {n["name"] for n in json.loads(lab.ok("get", "nodes", "-o", "json"))}

    async def podcidrs(store: Any) -> tuple[Any, list[str]]:
        kv = await store.get("villi/state/ipam/v1/podcidrs/node3")
        # the CIDR claims and the podcidrs key (node3's usage report is not a claim:
        # it lives under node3's lease and goes with it)
        claims = [k.key for k in (await store.list("villi/state/ipam/v1/")).items
                  if (k.value == b"node3" or k.key.endswith("/node3"))
                  and not k.key.startswith("villi/state/ipam/v1/usage/")]
        return kv, claims

    while True:   # the operator reclaims the CIDR without its grace period
        kv, claims = store_run(lab.state, podcidrs)
        if kv is None and not claims:
            break
        assert time.monotonic() < t0 + 10, (kv, claims)
        time.sleep(0.2)
    state = lab.state
    assert "node3" not in {n["name"] for n in state["nodes"]}
    assert "drill/c" not in state["pods"]
    assert node3["netns"] not in os.listdir("/var/run/netns")
    deadline = time.monotonic() + 15   # the remaining nodes report healthy (a busy
    while (res := lab.run("lab", "status", "-o", "json")).returncode != 0:   # machine lags)
        assert time.monotonic() < deadline, res.stdout[-4000:]
        time.sleep(0.5)
