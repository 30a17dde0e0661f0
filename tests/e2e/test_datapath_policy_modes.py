"""Enforcement modes, audit mode, the degradation switch and policy-verdict events in
the datapath itself, through BPF_PROG_TEST_RUN (crafted frames, pre-filled maps).

The lab tests (test_policy_ops.py) show the same with real pods and the CLI; these pin
down the kernel's decisions one packet at a time.
"""

from __future__ import annotations

import time

import pytest

from tests.e2e.test_datapath_progs import (
    EGR,
    EP_A,
    EP_C,
    ID_A,
    ID_B,
    ID_C,
    ING,
    A,
    B,
    C,
    add_endpoint,
    add_ipcache,
    add_rule,
    dp,
)
from villi.datapath import abi
from villi.datapath.node import NodeDatapath
from villi.datapath.policycfg import PolicyConfigMap
from villi.datapath.testrun import TC_ACT_OK, TC_ACT_SHOT, run
from villi.policy.mapstate import MapKey as Key
from villi.testing import packets as pk

pytestmark = pytest.mark.e2e
__all__ = ["dp"]   # the fixture

ENFORCED_IN = abi.EP_F_INGRESS_ENFORCED | abi.EP_F_INGRESS_LOOKUP
PV = abi.EventType.POLICY_VERDICT


def _setup(dp: NodeDatapath, extra_flags: int = 0) -> None:
    """C: ingress enforced, allows A on 80/tcp (cookie 7), denies B on 81/tcp."""
    add_endpoint(dp, C, EP_C, ID_C, ENFORCED_IN | extra_flags)
    add_ipcache(dp, A, ID_A)
    add_ipcache(dp, B, ID_B)
    add_rule(dp, EP_C, Key(ID_A, ING, 6, 80, 16), cookie=7)
    add_rule(dp, EP_C, Key(ID_B, ING, 6, 81, 16), deny=True, cookie=9)


def _split(dp: NodeDatapath) -> tuple[list, list]:
    evs = list(dp.events.drain())
    return ([e for e in evs if e["event_type"] == PV],
            [e for e in evs if e["event_type"] != PV])


def test_policy_verdict_for_first_packet_only(dp: NodeDatapath) -> None:
    _setup(dp)
    assert run(dp.to_pod.fd, pk.tcp(A, C, 40000, 80)).retval == TC_ACT_OK
    assert run(dp.from_pod.fd, pk.tcp(C, A, 80, 40000, pk.SYN | pk.ACK)).retval == TC_ACT_OK
    assert run(dp.to_pod.fd, pk.tcp(A, C, 40000, 80, pk.ACK)).retval == TC_ACT_OK
    assert run(dp.to_pod.fd, pk.tcp(B, C, 40001, 80)).retval == TC_ACT_SHOT
    verdicts, _ = _split(dp)
    assert len(verdicts) == 2, verdicts          # not the reply, not the second packet
    ok, denied = verdicts
    assert (ok["drop_reason"], ok["cookie"], ok["match_type"], ok["direction"]) == \
        (0, 7, abi.MatchType.L3_L4, ING)
    assert (ok["src_identity"], ok["dst_identity"], ok["dport"]) == (ID_A, ID_C, 80)
    assert ok["ct_state"] == abi.CtState.NEW and not ok["flags"] & abi.EVF_IS_REPLY
    assert denied["drop_reason"] == 133 and denied["match_type"] == abi.MatchType.NONE


def test_no_verdict_where_no_policy_applies(dp: NodeDatapath) -> None:
    add_endpoint(dp, C, EP_C, ID_C, 0)
    add_ipcache(dp, A, ID_A)
    assert run(dp.to_pod.fd, pk.tcp(A, C, 40000, 80)).retval == TC_ACT_OK
    verdicts, traces = _split(dp)
    assert verdicts == [] and len(traces) == 1


def test_audit_forwards_what_policy_drops_and_says_why(dp: NodeDatapath) -> None:
    _setup(dp, abi.EP_F_AUDIT)
    assert run(dp.to_pod.fd, pk.tcp(B, C, 40000, 80)).retval == TC_ACT_OK    # default deny
    assert run(dp.to_pod.fd, pk.tcp(B, C, 40001, 81)).retval == TC_ACT_OK    # deny rule
    assert run(dp.to_pod.fd, pk.tcp(A, C, 40002, 80)).retval == TC_ACT_OK    # allowed
    verdicts, traces = _split(dp)
    assert [int(e["audit_reason"]) for e in verdicts] == [133, 181, 0]
    assert [int(e["drop_reason"]) for e in verdicts] == [0, 0, 0]
    assert int(verdicts[1]["cookie"]) == 9              # the deciding deny rule is kept
    assert [int(e["audit_reason"]) for e in traces] == [133, 181, 0]
    assert len(dp.ct.items()) == 3                       # audited connections are tracked


def test_leaving_audit_applies_to_the_next_packet(dp: NodeDatapath) -> None:
    _setup(dp, abi.EP_F_AUDIT)
    assert run(dp.to_pod.fd, pk.tcp(B, C, 40000, 80)).retval == TC_ACT_OK
    add_endpoint(dp, C, EP_C, ID_C, ENFORCED_IN)                    # audit off
    assert run(dp.to_pod.fd, pk.tcp(B, C, 40000, 80, pk.ACK)).retval == TC_ACT_SHOT


def test_node_audit_and_degraded_slots(dp: NodeDatapath) -> None:
    _setup(dp)
    cfg = dp.policy_cfg
    for slot in (abi.POLICY_CFG_AUDIT, abi.POLICY_CFG_DEGRADED,
                 abi.POLICY_CFG_CLUSTER_DEGRADED):
        cfg.set(slot, 1)
        assert run(dp.to_pod.fd, pk.tcp(B, C, 40000 + slot, 80)).retval == TC_ACT_OK, slot
        cfg.set(slot, 0)
        assert run(dp.to_pod.fd, pk.tcp(B, C, 40100 + slot, 80)).retval == TC_ACT_SHOT, slot


def test_degrade_through_the_pinned_map(dp: NodeDatapath) -> None:
    _setup(dp)
    sw = PolicyConfigMap.open_pinned(dp.pin_dir)    # what the CLI does, agent or not
    try:
        since = sw.degrade()
        assert abs(since - time.time()) < 5 and sw.degrade() == since   # idempotent
        assert dp.policy_cfg.read().degraded
        assert run(dp.to_pod.fd, pk.tcp(B, C, 40000, 80)).retval == TC_ACT_OK
        verdicts, _ = _split(dp)
        assert verdicts[0]["audit_reason"] == 133
        assert sw.restore() and not sw.restore()
        assert run(dp.to_pod.fd, pk.tcp(B, C, 40001, 80)).retval == TC_ACT_SHOT
    finally:
        sw.close()


def test_audit_never_opens_the_control_plane(dp: NodeDatapath) -> None:
    add_endpoint(dp, A, EP_A, ID_A, abi.EP_F_AUDIT)
    add_ipcache(dp, B, abi.ReservedIdentity.HOST)
    dp.policy_cfg.set(abi.POLICY_CFG_DEGRADED, 1)
    res = run(dp.from_pod.fd, pk.tcp(A, B, 40000, 4240))
    assert res.retval == TC_ACT_SHOT
    verdicts, traces = _split(dp)
    assert traces[0]["drop_reason"] == abi.DropReason.CONTROL_PLANE
    assert verdicts and verdicts[0]["drop_reason"] == abi.DropReason.CONTROL_PLANE


def test_enforcement_always_and_never(dp: NodeDatapath) -> None:
    add_endpoint(dp, C, EP_C, ID_C, 0)          # no policy selects C
    add_ipcache(dp, A, ID_A)
    cfg = dp.policy_cfg
    cfg.set(abi.POLICY_CFG_ENFORCEMENT, abi.Enforcement.ALWAYS)
    assert run(dp.to_pod.fd, pk.tcp(A, C, 40000, 80)).retval == TC_ACT_SHOT
    assert run(dp.from_pod.fd, pk.udp(C, A, 5000, 53)).retval == TC_ACT_SHOT   # egress too
    _setup(dp)                                  # C enforced, deny for B on 81
    cfg.set(abi.POLICY_CFG_ENFORCEMENT, abi.Enforcement.NEVER)
    assert run(dp.to_pod.fd, pk.tcp(B, C, 40001, 81)).retval == TC_ACT_OK     # deny ignored
    assert run(dp.to_pod.fd, pk.tcp(B, C, 40002, 80)).retval == TC_ACT_OK
    cfg.set(abi.POLICY_CFG_ENFORCEMENT, abi.Enforcement.DEFAULT)
    assert run(dp.to_pod.fd, pk.tcp(B, C, 40003, 80)).retval == TC_ACT_SHOT
    verdicts, _ = _split(dp)
    assert [int(e["drop_reason"]) for e in verdicts] == [133, 133, 133]
    assert int(verdicts[1]["direction"]) == EGR
