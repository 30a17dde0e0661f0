"""Issue 2 acceptance: three pods on one node, real packets through the datapath.

All namespaces are created by the test (a node netns and one per pod); nothing is
added to the root namespace. One topology is shared by the tests of this module and
every test resets the policy it set.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

from villi._nsenter import in_netns
from villi.datapath import abi
from villi.datapath.node import NodeDatapath
from villi.endpoint.manager import EndpointManager
from villi.lab.probe import ping, tcp_connect, udp_roundtrip
from villi.policy.mapstate import MapKey as Key
from villi.policy.mapstate import MapValue as Val
from villi.testing.topology import SingleNode

pytestmark = pytest.mark.e2e

ID_A, ID_B, ID_C = 2001, 2002, 2003
ING = 0




@pytest.fixture(scope="module")
def node() -> Iterator[SingleNode]:
    with SingleNode() as n:
        for name, ident in (("a", ID_A), ("b", ID_B), ("c", ID_C)):
            n.add_pod(name, ident, serve=("80/tcp", "81/tcp", "82/udp"))
        yield n


@pytest.fixture(autouse=True)
def clean_policy(node: SingleNode) -> Iterator[None]:
    node.datapath.events.drain()
    yield
    for pod in node.pods.values():
        node.manager.set_policy(pod.endpoint.id, ingress_enforced=False, egress_enforced=False,
                                map_state={})


def set_ingress(node: SingleNode, pod: str, entries: dict) -> None:
    node.manager.set_policy(node.pods[pod].endpoint.id, ingress_enforced=True,
                            egress_enforced=False, map_state=entries)


def test_no_policy_everyone_reaches_everyone(node: SingleNode) -> None:
    for src in "abc":
        for dst in "abc":
            if src == dst:
                continue
            s, d = node.pods[src], node.pods[dst]
            assert tcp_connect(s.netns, d.ip, 80), f"{src}->{dst} tcp"
            assert udp_roundtrip(s.netns, d.ip, 82), f"{src}->{dst} udp"
            assert ping(s.netns, d.ip), f"{src}->{dst} icmp"


def ip_of(raw: object) -> str:
    """An IPv4 from an event field (stored in network order)."""
    return socket.inet_ntoa(int(raw).to_bytes(4, "little"))


def _events(node: SingleNode) -> list:
    return list(node.datapath.events.drain())


def test_ingress_policy_allows_a_to_c_80_only(node: SingleNode) -> None:
    a, b, c = (node.pods[x] for x in "abc")
    set_ingress(node, "c", {Key(ID_A, ING, 6, 80, 16): Val(cookie=5)})
    before = node.datapath.metrics_totals()
    assert tcp_connect(a.netns, c.ip, 80)          # reply works with no egress entry on C
    assert not tcp_connect(b.netns, c.ip, 80, timeout=0.5)
    assert not tcp_connect(a.netns, c.ip, 81, timeout=0.5)
    evs = _events(node)
    drops = [e for e in evs if e["event_type"] == abi.EventType.DROP]
    fwd = [e for e in evs if e["event_type"] == abi.EventType.TRACE]
    assert any(e["dst_identity"] == ID_C and e["src_identity"] == ID_A and e["dport"] == 80
               and e["cookie"] == 5 and e["direction"] == ING for e in fwd)
    assert any(ip_of(e["src_ip"]) == b.ip and e["src_identity"] == ID_B and e["dport"] == 80
               and e["drop_reason"] == 133 for e in drops)
    assert any(e["src_identity"] == ID_A and e["dport"] == 81 and e["drop_reason"] == 133
               for e in drops)
    after = node.datapath.metrics_totals()
    assert after[(133, ING)][0] > before.get((133, ING), (0, 0))[0]


def test_event_carries_five_tuple(node: SingleNode) -> None:
    b, c = node.pods["b"], node.pods["c"]
    set_ingress(node, "c", {})
    assert not udp_roundtrip(b.netns, c.ip, 82, timeout=0.5)
    drops = [e for e in _events(node) if e["event_type"] == abi.EventType.DROP]
    e = drops[0]
    assert ip_of(e["src_ip"]) == b.ip and ip_of(e["dst_ip"]) == c.ip
    assert (int(e["protocol"]), int(e["dport"])) == (17, 82)
    assert (int(e["src_identity"]), int(e["dst_identity"])) == (ID_B, ID_C)
    assert int(e["drop_reason"]) == 133 and int(e["direction"]) == ING


def test_deny_beats_allow(node: SingleNode) -> None:
    a, c = node.pods["a"], node.pods["c"]
    set_ingress(node, "c", {Key(0, ING): Val(), Key(ID_A, ING, 6, 80, 16): Val(deny=True)})
    assert not tcp_connect(a.netns, c.ip, 80, timeout=0.5)
    assert tcp_connect(a.netns, c.ip, 81)
    drops = [e for e in _events(node) if e["event_type"] == abi.EventType.DROP]
    assert drops and all(int(e["drop_reason"]) == 181 for e in drops)


def test_wildcard_port_and_identity_entries(node: SingleNode) -> None:
    a, b, c = (node.pods[x] for x in "abc")
    set_ingress(node, "c", {Key(ID_A, ING, 6, 0, 0): Val(),      # A: every TCP port
                            Key(0, ING, 17, 82, 16): Val()})     # anyone: UDP 82
    assert tcp_connect(a.netns, c.ip, 80) and tcp_connect(a.netns, c.ip, 81)
    assert not tcp_connect(b.netns, c.ip, 81, timeout=0.5)
    assert udp_roundtrip(b.netns, c.ip, 82)
    assert not ping(b.netns, c.ip)


FAIL_STATIC_SETUP = textwrap.dedent("""
    import sys
    from pathlib import Path
    from villi.datapath.node import NodeDatapath
    from villi.endpoint.manager import EndpointManager
    from villi.policy.mapstate import MapKey as Key, MapValue as Val
    cluster, node, node_netns, state_dir, ep_c, id_a = sys.argv[1:7]
    dp = NodeDatapath(cluster, node)
    mgr = EndpointManager(dp, node_netns=node_netns, state_dir=Path(state_dir))
    mgr.restore()
    mgr.set_policy(int(ep_c), ingress_enforced=True, egress_enforced=False,
                   map_state={Key(int(id_a), 0, 6, 80, 16): Val()})
    print("applied", flush=True)
""")


def test_fail_static_after_process_exit(node: SingleNode) -> None:
    """Kill the process that set policy: enforcement and open connections survive."""
    a, b, c = (node.pods[x] for x in "abc")
    with in_netns(a.netns):
        conn = socket.create_connection((c.ip, 80), timeout=2)
    try:
        conn.sendall(b"before\n")
        assert conn.recv(16) == b"before\n"
        env = dict(os.environ, PYTHONPATH=os.getcwd())
        proc = subprocess.Popen(
            [sys.executable, "-c", FAIL_STATIC_SETUP, node.CLUSTER, node.node_name,
             node.node_netns, str(node.state_dir), str(c.endpoint.id), str(ID_A)],
            stdout=subprocess.PIPE, text=True, env=env)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "applied"
        proc.kill()
        proc.wait()
        # The policy process is gone; the kernel still enforces what it wrote.
        assert not tcp_connect(b.netns, c.ip, 80, timeout=0.5)
        assert tcp_connect(a.netns, c.ip, 80)
        conn.sendall(b"after\n")
        assert conn.recv(16) == b"after\n"
        # A new process re-opens the pinned state and reconciles without a rebuild.
        dp2 = NodeDatapath(node.CLUSTER, node.node_name)
        try:
            mgr2 = EndpointManager(dp2, node_netns=node.node_netns, state_dir=node.state_dir)
            restored = {ep.id for ep in mgr2.restore()}
            assert restored == {p.endpoint.id for p in node.pods.values()}
            assert len(mgr2.map_state(c.endpoint.id)) == 1
            conn.sendall(b"again\n")
            assert conn.recv(16) == b"again\n"
            assert not tcp_connect(b.netns, c.ip, 80, timeout=0.5)
        finally:
            dp2.close()
        node.manager._map_state[c.endpoint.id] = mgr2.map_state(c.endpoint.id)
    finally:
        conn.close()
    time.sleep(0)


def test_kernel_state_survives_in_pins(node: SingleNode) -> None:
    pins = {p.name for p in node.datapath.pin_dir.iterdir()}
    assert {"villi_policy", "villi_ct", "villi_ipcache", "villi_endpoints", "villi_events",
            "villi_metrics"} <= pins
    assert isinstance(node.datapath, NodeDatapath)
    assert isinstance(node.manager, EndpointManager)
