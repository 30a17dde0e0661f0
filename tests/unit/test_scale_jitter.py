"""Start jitter, full-jitter retries and neighbour-table sizing (issue 16)."""

from __future__ import annotations

import argparse
import asyncio

import pytest

from villi.agent.config import AgentConfig, add_arguments, from_args
from villi.agentclient import CONNECT_BACKOFF_CAP, full_jitter
from villi.errors import VilliError
from villi.netns import neigh
from villi.operator.main import Operator, OperatorSettings


def test_cni_connect_retry_is_full_jitter_within_the_cap() -> None:
    for attempt in range(12):
        ceiling = min(CONNECT_BACKOFF_CAP, 0.05 * 2 ** attempt)
        draws = [full_jitter(attempt) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in draws)
        assert max(draws) - min(draws) > ceiling / 4  # spread, not a fixed sleep


def test_agent_start_jitter_and_neigh_flags_parse_and_validate() -> None:
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    cfg = from_args(ap.parse_args(["--node", "n1", "--start-jitter", "30",
                                   "--neigh-gc-thresh", "auto",
                                   "--pod-cidr-backoff-cap", "4"]))
    assert (cfg.start_jitter, cfg.neigh_gc_thresh, cfg.pod_cidr_backoff_cap) == (30, "auto", 4)
    with pytest.raises(VilliError, match="start-jitter"):
        AgentConfig(node="n1", start_jitter=-1)
    with pytest.raises(VilliError, match="neigh-gc-thresh"):
        AgentConfig(node="n1", neigh_gc_thresh="sometimes")


async def test_operator_start_jitter_sleeps_once_uniformly_before_working() -> None:
    slept: list[float] = []

    class Rng:
        def uniform(self, a: float, b: float) -> float:
            return b / 2

    async def sleep(d: float) -> None:
        slept.append(d)
        raise asyncio.CancelledError  # stop before any store request

    op = Operator(store=None, settings=OperatorSettings(start_jitter_s=8.0),  # type: ignore[arg-type]
                  rng=Rng(), sleep=sleep)
    with pytest.raises(asyncio.CancelledError):
        await op.run()
    assert slept == [4.0]
    with pytest.raises(ValueError, match="start jitter"):
        OperatorSettings(start_jitter_s=-1)


def test_neighbour_demand_counts_pods_and_underlay_hosts() -> None:
    assert neigh.neighbour_demand(254, "10.0.0.5/24") == 254 + 254
    assert neigh.neighbour_demand(110, "172.16.3.4/16") == 110 + 65534
    assert neigh.neighbour_demand(10, None) == 10
    want = neigh.recommended(65644)
    assert (want.gc_thresh1, want.gc_thresh2, want.gc_thresh3) == (65644, 131288, 262576)
    assert neigh.recommended(3).as_dict() == {"gc_thresh1": 128, "gc_thresh2": 512,
                                              "gc_thresh3": 1024}


def test_neighbour_warning_names_the_sysctls_to_set() -> None:
    defaults = neigh.NeighThresholds(128, 512, 1024)
    warning = neigh.check(65644, defaults)
    assert warning is not None
    assert "net.ipv4.neigh.default.gc_thresh3=262576" in warning
    assert "gc_thresh3=1024" in warning
    assert neigh.check(500, defaults) is None
    assert neigh.check(10**6, None) is None  # unknown thresholds: nothing to compare


def test_write_thresholds_only_raises(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for name, value in (("gc_thresh1", "128"), ("gc_thresh2", "4096"), ("gc_thresh3", "1024")):
        (tmp_path / name).write_text(value)
    after = neigh.write_thresholds(neigh.NeighThresholds(1000, 2000, 4000), str(tmp_path))
    assert after == neigh.NeighThresholds(1000, 4096, 4000)
    with pytest.raises(OSError, match="machine-wide"):
        neigh.write_thresholds(after, str(tmp_path / "absent"))


def test_status_sums_agents_demands_against_the_machine(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from villi.cli import status

    monkeypatch.setattr(neigh, "read_thresholds", lambda *a: neigh.NeighThresholds(128, 512, 1024))
    results = {"n1": {"neigh": {"demand": 600}}, "n2": {"neigh": {"demand": 600}},
               "n3": {"status": "error", "error": "down"}}
    warning = status.neighbour_warning(results)
    assert warning is not None and "1200 entries" in warning
    assert status.neighbour_warning({"n1": {"neigh": {"demand": 300}}}) is None


def test_node_sync_leaves_routes_alone_when_only_ipam_usage_changes(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import json as _json

    from villi.agent import sync
    from villi.kvstore import EventType, WatchEvent
    from villi.kvstore import schema as keys

    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(sync.routes, "replace_route",
                        lambda cidr, via, ipr=None: calls.append(("r", cidr)))
    monkeypatch.setattr(sync.routes, "delete_route",
                        lambda cidr, ipr=None: calls.append(("d", cidr)))
    monkeypatch.setattr(sync.routes, "open_netlink", lambda netns=None: object())

    class Map:
        def update(self, *a: object) -> None:
            calls.append(("ipcache", "update"))

        def delete(self, *a: object) -> None:
            calls.append(("ipcache", "delete"))

    class Datapath:
        ipcache = Map()

    node_sync = sync.NodeSync(store=None, datapath=Datapath(), self_name="me")  # type: ignore[arg-type]

    def put(entry: dict, rev: int) -> None:
        node_sync.apply(WatchEvent(EventType.PUT, keys.node_key("n2"),
                                   _json.dumps(entry).encode(), rev))

    entry = {"name": "n2", "ipv4": "172.20.0.3", "podCIDRs": ["10.64.1.0/24"],
             "ipam": {"allocated": 1, "capacity": 254}}
    put(entry, 1)
    assert ("r", "10.64.1.0/24") in calls
    calls.clear()
    put({**entry, "ipam": {"allocated": 2, "capacity": 254}}, 2)  # IPAM report: no kernel work
    ipam = node_sync.nodes["n2"].ipam
    assert calls == [] and ipam is not None and ipam.allocated == 2
    put({**entry, "podCIDRs": ["10.64.2.0/24"]}, 3)   # a new CIDR: routes follow
    assert ("d", "10.64.1.0/24") in calls and ("r", "10.64.2.0/24") in calls
