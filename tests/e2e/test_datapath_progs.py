"""Datapath logic through BPF_PROG_TEST_RUN: crafted packets, pre-filled maps.

No pods here: the programs run on single frames "arriving" on lo (ifindex 1), so the
endpoints under test claim ifindex 1. Each test gets a fresh set of pinned maps.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from villi.datapath import abi
from villi.datapath.compiler import NodeConfig, compile_program
from villi.datapath.loader import BpfObject
from villi.datapath.node import NodeDatapath
from villi.datapath.testrun import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, run
from villi.endpoint.manager import ip_be
from villi.endpoint.policymap import kernel_key, kernel_value
from villi.errors import LoadError
from villi.policy.mapstate import MapKey as Key
from villi.policy.mapstate import MapValue as Val
from villi.testing import packets as pk

pytestmark = pytest.mark.e2e

A, B, C = "10.198.0.1", "10.198.0.2", "10.198.0.3"
ID_A, ID_B, ID_C = 1001, 1002, 1003
EP_A, EP_C = 11, 13
ING, EGR = 0, 1




@pytest.fixture
def dp() -> Iterator[NodeDatapath]:
    node = NodeDatapath("unit", f"tr{uuid.uuid4().hex[:8]}", NodeConfig())
    try:
        yield node
    finally:
        node.close()
        node.unpin()


def add_endpoint(dp: NodeDatapath, ip: str, ep_id: int, identity: int, flags: int = 0,
                 ifindex: int = 1) -> None:
    v = abi.EndpointValue(ifindex=ifindex, identity=identity, endpoint_id=ep_id, flags=flags)
    v.pod_mac[:] = list(bytes.fromhex("0a0000000001"))
    v.host_mac[:] = list(bytes.fromhex("0a0000000002"))
    dp.endpoints.update(abi.EndpointKey(addr=ip_be(ip)), v)


def add_ipcache(dp: NodeDatapath, ip: str, identity: int) -> None:
    dp.ipcache.update(abi.IpcacheKey(prefixlen=32, addr=ip_be(ip)),
                      abi.IpcacheValue(identity=identity))


def add_rule(dp: NodeDatapath, ep_id: int, key: Key, deny: bool = False, cookie: int = 0) -> None:
    val = Val(deny, cookie)
    dp.policy.update(kernel_key(ep_id, key), kernel_value(key, val))


def events(dp: NodeDatapath) -> list:
    """Drop and trace records (policy-verdict records: test_datapath_policy_modes.py)."""
    return [e for e in dp.events.drain() if e["event_type"] != abi.EventType.POLICY_VERDICT]


def test_unknown_source_is_dropped_as_invalid_sip(dp: NodeDatapath) -> None:
    res = run(dp.from_pod.fd, pk.tcp(A, B, 40000, 80))
    assert res.retval == TC_ACT_SHOT
    (ev,) = events(dp)
    assert ev["event_type"] == abi.EventType.DROP
    assert ev["drop_reason"] == abi.DropReason.INVALID_SIP
    assert dp.metrics_totals()[(abi.DropReason.INVALID_SIP, EGR)][0] == 1


def test_no_policy_allows_and_tracks(dp: NodeDatapath) -> None:
    add_endpoint(dp, A, EP_A, ID_A)
    add_ipcache(dp, B, ID_B)
    res = run(dp.from_pod.fd, pk.tcp(A, B, 40000, 80))
    assert res.retval == TC_ACT_OK
    (ev,) = events(dp)
    assert ev["event_type"] == abi.EventType.TRACE
    assert ev["ct_state"] == abi.CtState.NEW
    assert (ev["src_identity"], ev["dst_identity"]) == (ID_A, ID_B)
    assert (ev["sport"], ev["dport"], ev["protocol"]) == (40000, 80, 6)
    assert ev["tcp_flags"] == pk.SYN
    assert ev["obs_point"] == abi.ObsPoint.TO_STACK
    ct = dp.ct.items()
    assert len(ct) == 1 and ct[0][0].direction == EGR and ct[0][0].dport == 80


def test_egress_default_deny_when_enforced(dp: NodeDatapath) -> None:
    add_endpoint(dp, A, EP_A, ID_A, abi.EP_F_EGRESS_ENFORCED)
    res = run(dp.from_pod.fd, pk.udp(A, B, 5000, 53))
    assert res.retval == TC_ACT_SHOT
    (ev,) = events(dp)
    assert ev["drop_reason"] == abi.DropReason.POLICY
    assert ev["direction"] == EGR
    assert ev["dst_identity"] == abi.ReservedIdentity.WORLD  # B is not in the ipcache
    assert dp.ct.items() == []


def _ingress_setup(dp: NodeDatapath) -> None:
    flags = abi.EP_F_INGRESS_ENFORCED | abi.EP_F_INGRESS_LOOKUP
    add_endpoint(dp, C, EP_C, ID_C, flags)
    add_ipcache(dp, A, ID_A)
    add_ipcache(dp, B, ID_B)
    add_rule(dp, EP_C, Key(ID_A, ING, 6, 80, 16), cookie=7)


def test_ingress_allow_identity_and_port(dp: NodeDatapath) -> None:
    _ingress_setup(dp)
    assert run(dp.to_pod.fd, pk.tcp(A, C, 40000, 80)).retval == TC_ACT_OK
    assert run(dp.to_pod.fd, pk.tcp(B, C, 40000, 80)).retval == TC_ACT_SHOT
    assert run(dp.to_pod.fd, pk.tcp(A, C, 40000, 81)).retval == TC_ACT_SHOT
    evs = events(dp)
    assert [e["drop_reason"] for e in evs] == [0, 133, 133]
    assert evs[0]["cookie"] == 7 and evs[0]["match_type"] == abi.MatchType.L3_L4
    assert evs[1]["src_identity"] == ID_B and evs[1]["dst_identity"] == ID_C
    (pkey, pval), = dp.policy.items()
    assert pval.packets == 1


def test_reply_passes_without_egress_entry(dp: NodeDatapath) -> None:
    _ingress_setup(dp)
    # C enforces egress too, with no egress entries: only CT lets the reply out.
    add_endpoint(dp, C, EP_C, ID_C, abi.EP_F_INGRESS_ENFORCED | abi.EP_F_INGRESS_LOOKUP
                 | abi.EP_F_EGRESS_ENFORCED)
    assert run(dp.to_pod.fd, pk.tcp(A, C, 40000, 80)).retval == TC_ACT_OK
    assert run(dp.from_pod.fd, pk.tcp(C, A, 80, 40000, pk.SYN | pk.ACK)).retval == TC_ACT_OK
    # An unsolicited packet from C to A is still denied.
    assert run(dp.from_pod.fd, pk.tcp(C, A, 80, 40001, pk.SYN)).retval == TC_ACT_SHOT
    evs = events(dp)
    reply = evs[1]
    assert reply["ct_state"] == abi.CtState.REPLY and reply["flags"] & abi.EVF_IS_REPLY


def test_deny_beats_allow(dp: NodeDatapath) -> None:
    add_endpoint(dp, C, EP_C, ID_C, abi.EP_F_INGRESS_ENFORCED | abi.EP_F_INGRESS_LOOKUP)
    add_ipcache(dp, A, ID_A)
    add_rule(dp, EP_C, Key(0, ING))                       # allow everything from anyone
    add_rule(dp, EP_C, Key(ID_A, ING, 6, 80, 16), deny=True, cookie=9)
    assert run(dp.to_pod.fd, pk.tcp(A, C, 40000, 80)).retval == TC_ACT_SHOT
    assert run(dp.to_pod.fd, pk.tcp(A, C, 40000, 81)).retval == TC_ACT_OK
    evs = events(dp)
    assert evs[0]["drop_reason"] == abi.DropReason.POLICY_DENY and evs[0]["cookie"] == 9


def test_wildcard_port_and_wildcard_identity(dp: NodeDatapath) -> None:
    add_endpoint(dp, C, EP_C, ID_C, abi.EP_F_INGRESS_ENFORCED | abi.EP_F_INGRESS_LOOKUP)
    add_ipcache(dp, A, ID_A)
    add_ipcache(dp, B, ID_B)
    add_rule(dp, EP_C, Key(ID_A, ING, 6, 0, 0))           # A: any TCP port
    add_rule(dp, EP_C, Key(0, ING, 17, 53, 16))           # anyone: UDP 53
    assert run(dp.to_pod.fd, pk.tcp(A, C, 1, 1234)).retval == TC_ACT_OK
    assert run(dp.to_pod.fd, pk.udp(A, C, 1, 1234)).retval == TC_ACT_SHOT
    assert run(dp.to_pod.fd, pk.udp(B, C, 1, 53)).retval == TC_ACT_OK
    assert run(dp.to_pod.fd, pk.tcp(B, C, 1, 53)).retval == TC_ACT_SHOT


def test_port_range_as_lpm_prefix(dp: NodeDatapath) -> None:
    add_endpoint(dp, C, EP_C, ID_C, abi.EP_F_INGRESS_ENFORCED | abi.EP_F_INGRESS_LOOKUP)
    add_ipcache(dp, A, ID_A)
    add_rule(dp, EP_C, Key(ID_A, ING, 6, 8080, 13))       # 8080-8087
    verdicts = {p: run(dp.to_pod.fd, pk.tcp(A, C, 1, p)).retval for p in (8079, 8080, 8087, 8088)}
    assert verdicts == {8079: TC_ACT_SHOT, 8080: TC_ACT_OK, 8087: TC_ACT_OK, 8088: TC_ACT_SHOT}


def test_icmp_echo_tracked(dp: NodeDatapath) -> None:
    add_endpoint(dp, A, EP_A, ID_A, abi.EP_F_INGRESS_ENFORCED)
    add_ipcache(dp, B, ID_B)
    assert run(dp.from_pod.fd, pk.icmp_echo(A, B, ident=42)).retval == TC_ACT_OK
    assert run(dp.to_pod.fd, pk.icmp_echo(B, A, ident=42, reply=True)).retval == TC_ACT_OK
    assert run(dp.to_pod.fd, pk.icmp_echo(B, A, ident=43, reply=True)).retval == TC_ACT_SHOT
    assert run(dp.to_pod.fd, pk.icmp_echo(B, A, ident=42)).retval == TC_ACT_SHOT


def test_arp_passes_ipv6_dropped(dp: NodeDatapath) -> None:
    assert run(dp.from_pod.fd, pk.arp()).retval == TC_ACT_OK
    assert run(dp.to_pod.fd, pk.arp()).retval == TC_ACT_OK
    assert run(dp.from_pod.fd, pk.ipv6()).retval == TC_ACT_SHOT
    (ev,) = events(dp)
    assert ev["drop_reason"] == abi.DropReason.UNKNOWN_L3


def test_local_delivery_redirects_with_macs(dp: NodeDatapath) -> None:
    add_endpoint(dp, A, EP_A, ID_A)
    add_endpoint(dp, C, EP_C, ID_C, abi.EP_F_INGRESS_ENFORCED | abi.EP_F_INGRESS_LOOKUP)
    add_rule(dp, EP_C, Key(ID_A, ING, 6, 80, 16))
    res = run(dp.from_pod.fd, pk.tcp(A, C, 40000, 80))
    assert res.retval == TC_ACT_REDIRECT
    assert res.packet[:6] == bytes.fromhex("0a0000000001")
    assert res.packet[6:12] == bytes.fromhex("0a0000000002")
    # The destination's ingress policy ran here: port 81 is dropped before redirect.
    assert run(dp.from_pod.fd, pk.tcp(A, C, 40000, 81)).retval == TC_ACT_SHOT
    evs = events(dp)
    assert [(e["direction"], e["obs_point"], e["drop_reason"]) for e in evs] == [
        (EGR, abi.ObsPoint.FROM_LXC, 0), (ING, abi.ObsPoint.TO_LXC, 0),
        (EGR, abi.ObsPoint.FROM_LXC, 0), (ING, 0, 133)]


def test_aggregation_reports_flag_changes_only(dp: NodeDatapath) -> None:
    add_endpoint(dp, A, EP_A, ID_A)
    run(dp.from_pod.fd, pk.tcp(A, B, 40000, 80, pk.SYN))
    for _ in range(5):
        run(dp.from_pod.fd, pk.tcp(A, B, 40000, 80, pk.ACK))
    run(dp.from_pod.fd, pk.tcp(A, B, 40000, 80, pk.FIN | pk.ACK))
    evs = events(dp)
    # ACK is not a report flag (Cilium: syn,fin,rst): the plain ACKs stay aggregated.
    assert [int(e["tcp_flags"]) for e in evs] == [pk.SYN, pk.FIN | pk.ACK]
    assert dp.metrics_totals()[(0, EGR)][0] == 7


def test_verifier_rejection_carries_log(tmp_path: Path) -> None:
    bad = """
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
SEC("tc")
int bad(struct __sk_buff *skb)
{
	char *data = (char *)(long)skb->data;
	return data[100];   /* no bounds check against data_end */
}
char _license[] SEC("license") = "GPL";
"""
    obj = compile_program("bad", NodeConfig(), cache_dir=tmp_path, extra_source=bad)
    with pytest.raises(LoadError) as info:
        BpfObject(obj)
    assert "invalid access to packet" in info.value.verifier_log
    assert "verifier log" in str(info.value)
    assert socket  # keep import for readers' packet helpers


def test_sctp_ports_match_allow_and_deny(dp: NodeDatapath) -> None:
    add_endpoint(dp, C, EP_C, ID_C, abi.EP_F_INGRESS_ENFORCED | abi.EP_F_INGRESS_LOOKUP)
    add_ipcache(dp, A, ID_A)
    add_rule(dp, EP_C, Key(ID_A, ING, 132, 0, 0))                      # A: any SCTP port
    add_rule(dp, EP_C, Key(ID_A, ING, 132, 9999, 16), deny=True, cookie=4)  # but not 9999
    add_rule(dp, EP_C, Key(0, ING, 132, 3868, 16))                     # anyone: SCTP 3868
    verdicts = [run(dp.to_pod.fd, pk.sctp(A, C, 5000, 9999)).retval,
                run(dp.to_pod.fd, pk.sctp(A, C, 5000, 38412)).retval,
                run(dp.to_pod.fd, pk.sctp("10.198.0.9", C, 5000, 3868)).retval,
                run(dp.to_pod.fd, pk.sctp("10.198.0.9", C, 5000, 3869)).retval]
    assert verdicts == [TC_ACT_SHOT, TC_ACT_OK, TC_ACT_OK, TC_ACT_SHOT]
    evs = events(dp)
    assert evs[0]["drop_reason"] == abi.DropReason.POLICY_DENY and evs[0]["cookie"] == 4
    assert (evs[1]["sport"], evs[1]["dport"], evs[1]["protocol"]) == (5000, 38412, 132)
    # The allowed association is tracked by its ports: the reply goes back out.
    add_endpoint(dp, C, EP_C, ID_C, abi.EP_F_INGRESS_ENFORCED | abi.EP_F_INGRESS_LOOKUP
                 | abi.EP_F_EGRESS_ENFORCED)
    assert run(dp.from_pod.fd, pk.sctp(C, A, 38412, 5000, 2)).retval == TC_ACT_OK
    assert run(dp.from_pod.fd, pk.sctp(C, A, 38412, 5001, 2)).retval == TC_ACT_SHOT


def test_icmp_events_carry_real_type_and_code(dp: NodeDatapath) -> None:
    add_endpoint(dp, A, EP_A, ID_A)
    add_ipcache(dp, B, ID_B)
    run(dp.from_pod.fd, pk.icmp_echo(A, B, ident=5))
    run(dp.from_pod.fd, pk.icmp(A, B, 3, 3))       # destination/port unreachable
    run(dp.from_pod.fd, pk.icmp(A, C, 11, 0))      # time exceeded (another peer: not aggregated)
    evs = events(dp)
    assert [(int(e["icmp_type"]), int(e["icmp_code"])) for e in evs] == [(8, 0), (3, 3), (11, 0)]
