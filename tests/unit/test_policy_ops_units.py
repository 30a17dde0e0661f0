"""Pure parts of issue 14's policy operations: settings (parse, layers, views), AUDIT and
policy-verdict flows (JSON, compact lines, filters, metrics), the agent's policy modes
against a fake datapath map, and the CLI's argument checks."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from tests.unit.test_observer_units import CTX, records, with_policy_verdicts
from villi.datapath import abi
from villi.datapath.policycfg import PolicySwitches
from villi.endpoint.manager import Endpoint
from villi.kvstore import open_store
from villi.observer.filters import FilterSpec, Predicate, match
from villi.observer.flow import to_flow
from villi.observer.format import compact
from villi.observer.metrics import HubbleMetrics
from villi.observer.metricsconfig import parse
from villi.policy.modes import (
    CLUSTER_CONFIG_KEY,
    PolicySettings,
    SettingError,
    direction_text,
    effective,
    merge,
    node_config_key,
    parse_assignments,
)

# --- settings ------------------------------------------------------------------------------


def test_assignments_are_checked_and_canonical() -> None:
    assert parse_assignments(["EnablePolicy=Always", "PolicyAuditMode=true"]) == \
        {"EnablePolicy": "always", "PolicyAuditMode": "enabled"}
    for bad, words in ((["Colour=red"], "unknown setting 'Colour'"),
                       (["EnablePolicy=sometimes"], "use one of default, always, never"),
                       (["PolicyAuditMode=maybe"], "use enabled or disabled"),
                       (["PolicyAuditMode"], "expected KEY=VALUE"), ([], "nothing to set")):
        with pytest.raises(SettingError, match=words):
            parse_assignments(bad)


def test_layers_node_over_cluster_over_flags() -> None:
    flags = PolicySettings(enable_policy="default", audit=False)
    cluster = PolicySettings.from_json({"PolicyAuditMode": "enabled",
                                        "EnablePolicy": "always"}, "c")
    node = PolicySettings.from_json({"PolicyAuditMode": "disabled"}, "n")
    eff = effective(flags, cluster, node)
    assert (eff.enable_policy, eff.enable_policy_source) == ("always", "cluster")
    assert (eff.audit, eff.audit_source) == (False, "node")
    assert effective(flags, PolicySettings(), PolicySettings()).audit_source == "flag"
    assert effective(flags, PolicySettings(degraded=True), node).cluster_degraded


def test_stored_layers_name_the_key_of_a_bad_value() -> None:
    with pytest.raises(SettingError, match="villi/config/v1/cluster: EnablePolicy="):
        PolicySettings.from_bytes(b'{"EnablePolicy": "often"}', CLUSTER_CONFIG_KEY)
    with pytest.raises(SettingError, match="unknown setting"):
        PolicySettings.from_bytes(b'{"Mystery": 1}', "k")
    with pytest.raises(SettingError, match="not JSON"):
        PolicySettings.from_bytes(b"{", "k")
    assert PolicySettings.from_bytes(None, "k") == PolicySettings()
    with pytest.raises(SettingError):
        node_config_key("a/b")


def test_merge_sets_and_unsets() -> None:
    v = merge(None, {"PolicyAuditMode": "enabled"})
    v = merge(v, {"EnablePolicy": "never"})
    assert json.loads(v) == {"EnablePolicy": "never", "PolicyAuditMode": "enabled"}
    assert json.loads(merge(v, {}, ("EnablePolicy", "PolicyAuditMode"))) == {}


@pytest.mark.parametrize("selected, mode, audit, degraded, text", [
    (True, "default", False, False, "enabled"),
    (False, "default", True, False, "disabled"),
    (False, "always", False, False, "enabled"),
    (True, "never", True, True, "disabled"),
    (True, "default", True, False, "disabled (audit)"),
    (True, "always", True, True, "disabled (degraded)"),
])
def test_direction_text(selected: bool, mode: str, audit: bool, degraded: bool,
                        text: str) -> None:
    assert direction_text(selected, mode, audit, degraded) == text


# --- flows --------------------------------------------------------------------------------

def _audited() -> np.ndarray:
    """records() with the default-deny drop (row 2) and the deny (row 1) audited."""
    r = with_policy_verdicts(records())
    for i in (1, 2, 5, 6):      # the traces and their policy verdicts
        r[i]["audit_reason"], r[i]["drop_reason"] = r[i]["drop_reason"], 0
        if r[i]["event_type"] == 1:
            r[i]["event_type"] = 4
    return r


def test_audit_flows_keep_reason_and_rule() -> None:
    r = _audited()
    f = to_flow(r[1], 0, CTX)
    assert f["verdict"] == "AUDIT" and f["drop_reason_desc"] == "POLICY_DENY"
    assert f["ingress_denied_by"][0]["name"] == "p"
    assert f["villi"]["explain"]["decision"] == "AUDIT"
    assert "would be dropped by the ingress deny rule" in f["villi"]["explain"]["text"]
    assert " to-endpoint AUDIT (" in compact(f)


def test_policy_verdict_flows_print_as_hubble_does() -> None:
    r = with_policy_verdicts(records())
    pv = [to_flow(x, 0, CTX) for x in r if x["event_type"] == 5]
    assert all(f["event_type"] == {"type": 5, "sub_type": 0} for f in pv)
    assert all("trace_observation_point" not in f and f["is_reply"] is False for f in pv)
    r2 = r.copy()
    r2["match_type"] = 2
    lines = [compact(to_flow(x, 0, CTX)) for x in r2 if x["event_type"] == 5]
    assert lines[0].endswith("policy-verdict:L3-L4 INGRESS ALLOWED (TCP Flags: SYN)")
    assert lines[1].endswith("policy-verdict:L3-L4 INGRESS DENIED (TCP Flags: SYN)")
    a = _audited()
    a["match_type"] = 0
    audited = [compact(to_flow(x, 0, CTX)) for x in a if x["event_type"] == 5]
    assert audited[1].endswith("policy-verdict:none INGRESS AUDITED (TCP Flags: SYN)")


def test_filters_verdict_audit_and_type_policy_verdict() -> None:
    r = _audited()
    got = match(FilterSpec([Predicate("verdict", ["AUDIT"])]), r, CTX)
    assert list(np.flatnonzero(got)) == [1, 2, 5, 6]
    fwd = match(FilterSpec([Predicate("verdict", ["FORWARDED"])]), r, CTX)
    assert list(np.flatnonzero(fwd)) == [0, 3, 4]
    pv = match(FilterSpec([Predicate("type", ["policy-verdict"])]), r, CTX)
    assert list(np.flatnonzero(pv)) == [4, 5, 6]
    from villi.observer.flowfilter import flow_matches

    flows = [to_flow(x, 0, CTX) for x in r]
    spec = FilterSpec([Predicate("type", ["policy-verdict"])])
    assert [i for i, f in enumerate(flows) if flow_matches(spec, f)] == [4, 5, 6]


def test_metrics_count_policy_verdicts_from_their_events_only() -> None:
    m = HubbleMetrics(config=parse("policy drop flow"), ctx=CTX)
    m.count(with_policy_verdicts(records()))
    from prometheus_client import generate_latest

    text = generate_latest(m.registry).decode()
    assert 'hubble_policy_verdicts_total{action="forwarded",direction="ingress",' \
           'match="none"} 1.0' in text
    assert 'hubble_policy_verdicts_total{action="dropped",direction="ingress",' \
           'match="none"} 2.0' in text
    # drops are counted once (from the drop events), not again from their verdicts
    assert sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("hubble_drop_total{")) == 2.0
    assert 'hubble_flows_processed_total{subtype="",type="PolicyVerdict",' \
           'verdict="DROPPED"} 2.0' in text


# --- the agent's policy modes against a fake map ------------------------------------------

class FakeCfg:
    def __init__(self) -> None:
        self.slots = [0] * abi.POLICY_CFG_SLOTS

    def get(self, slot: int) -> int:
        return self.slots[slot]

    def set(self, slot: int, value: int) -> None:
        self.slots[slot] = value

    def read(self) -> PolicySwitches:
        return PolicySwitches(abi.Enforcement(self.slots[0]).name.lower(),
                              bool(self.slots[1]), self.slots[2], bool(self.slots[3]))


class FakeEndpoints:
    def __init__(self) -> None:
        self.endpoints = {1: Endpoint(id=1, ipv4="10.0.0.1", netns="n", ifname="eth0",
                                      host_ifname="lxc1", host_ifindex=5, host_mac="m",
                                      pod_mac="p", identity=300, ingress_enforced=True)}

    def set_policy_audit(self, endpoint_id: int, audit: bool) -> Endpoint:
        from dataclasses import replace

        self.endpoints[endpoint_id] = replace(self.endpoints[endpoint_id], policy_audit=audit)
        return self.endpoints[endpoint_id]


def test_policy_modes_follow_the_store_and_never_touch_the_switch() -> None:
    from villi.agent.policymode import PolicyModes

    async def scenario() -> None:
        store = open_store("memory://")
        cfg, eps = FakeCfg(), FakeEndpoints()
        cfg.slots[abi.POLICY_CFG_DEGRADED] = 1_700_000_000          # thrown before start
        modes = PolicyModes("n1", cfg, eps, PolicySettings("default", False))  # type: ignore[arg-type]
        await store.put(CLUSTER_CONFIG_KEY, b'{"PolicyAuditMode": "enabled"}')
        tasks: list[asyncio.Task[None]] = []
        await modes.follow(store, lambda c, n: tasks.append(asyncio.create_task(c)))
        assert cfg.slots[abi.POLICY_CFG_AUDIT] == 1
        assert cfg.slots[abi.POLICY_CFG_DEGRADED] == 1_700_000_000  # left as it was
        assert modes.status()["status"] == "DEGRADED"
        await store.put(node_config_key("n1"), b'{"EnablePolicy": "never"}')
        await store.put(node_config_key("n2"), b'{"EnablePolicy": "always"}')
        await store.put(CLUSTER_CONFIG_KEY, b'{"PolicyDegraded": "enabled"}')
        for _ in range(50):
            await asyncio.sleep(0.01)
            if cfg.slots[abi.POLICY_CFG_CLUSTER_DEGRADED]:
                break
        assert cfg.slots[abi.POLICY_CFG_ENFORCEMENT] == abi.Enforcement.NEVER
        assert cfg.slots[abi.POLICY_CFG_AUDIT] == 0 and cfg.slots[abi.POLICY_CFG_CLUSTER_DEGRADED]
        await store.put(CLUSTER_CONFIG_KEY, b'{"EnablePolicy": "bogus"}')   # bad: kept
        await asyncio.sleep(0.05)
        assert cfg.slots[abi.POLICY_CFG_CLUSTER_DEGRADED] and modes.status()["errors"]
        view = modes.endpoint_policy(eps.endpoints[1])
        assert view["ingress"] == "disabled" and view["enforcement"] == "never"
        await store.delete(node_config_key("n1"))
        await store.delete(CLUSTER_CONFIG_KEY)
        await asyncio.sleep(0.05)
        assert cfg.slots[abi.POLICY_CFG_ENFORCEMENT] == 0
        assert cfg.slots[abi.POLICY_CFG_CLUSTER_DEGRADED] == 0
        assert cfg.slots[abi.POLICY_CFG_DEGRADED] == 1_700_000_000
        ep = modes.configure_endpoint(eps.endpoints[1], {"PolicyAuditMode": "on"})
        assert ep.policy_audit
        assert modes.endpoint_policy(ep)["ingress"] == "disabled (degraded)"
        for t in tasks:
            t.cancel()
        await store.close()

    asyncio.run(scenario())


def test_endpoint_records_stay_readable_by_older_agents() -> None:
    ep = FakeEndpoints().endpoints[1]
    assert "policy_audit" not in json.loads(ep.to_json())
    from dataclasses import replace

    on = replace(ep, policy_audit=True)
    assert Endpoint.from_json(on.to_json()).policy_audit is True


# --- CLI ----------------------------------------------------------------------------------

def test_cli_refuses_bad_settings_before_any_store(capsys: pytest.CaptureFixture[str]) -> None:
    from villi.cli.main import main

    assert main(["--kvstore", "memory://", "config", "set", "PolicyAuditMode=perhaps"]) == 1
    assert "use enabled or disabled" in capsys.readouterr().err
    assert main(["--kvstore", "memory://", "endpoint", "config", "3", "EnablePolicy=never"]) == 1
    assert "unknown setting 'EnablePolicy'" in capsys.readouterr().err


def test_degrade_of_an_unknown_node_says_where_it_looked(tmp_path: object,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    from villi.cli.main import main

    assert main(["datapath", "policy", "degrade", "--node", "nowhere", "--cluster",
                 "nocluster", "--bpffs", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "no pinned policy switches at" in err and "nocluster/nowhere" in err


def test_agent_flags_enable_policy_and_audit() -> None:
    import argparse

    from villi.agent.config import AgentConfig, add_arguments, from_args
    from villi.errors import VilliError

    ap = argparse.ArgumentParser()
    add_arguments(ap)
    cfg = from_args(ap.parse_args(["--node", "n", "--enable-policy", "always",
                                   "--policy-audit-mode"]))
    assert (cfg.enable_policy, cfg.policy_audit_mode) == ("always", True)
    assert from_args(ap.parse_args(["--node", "n"])).enable_policy == "default"
    with pytest.raises(SystemExit):
        ap.parse_args(["--node", "n", "--enable-policy", "sometimes"])
    with pytest.raises(VilliError, match="--enable-policy must be"):
        AgentConfig(node="n", enable_policy="sometimes")


def test_cli_families_are_shared_with_other_modules() -> None:
    """Another module may register `villi policy trace` / `villi endpoint get` first."""
    import argparse

    from villi.cli import policyops

    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command")
    other = sub.add_parser("policy").add_subparsers(dest="policy_command")
    other.add_parser("trace").add_argument("--src")
    policyops.add_parsers(sub)
    args = ap.parse_args(["policy", "trace", "--src", "x"])
    assert args.src == "x" and not getattr(args, "policyops", None)
    args = ap.parse_args(["policy", "degrade", "--all"])
    assert (args.policyops, args.policy_switch) == ("policy", "degrade")
    args = ap.parse_args(["endpoint", "config", "3", "PolicyAuditMode=on", "--node", "n1"])
    assert args.policyops == "endpoint" and args.node == "n1"
