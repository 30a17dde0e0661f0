"""The agent's datapath metrics are typed as Prometheus expects (no kernel needed)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from villi.agent.observe import DatapathCollector


def _fake_agent() -> Any:
    def no_map() -> Any:
        raise OSError("no map in this test")

    bad = SimpleNamespace(map=SimpleNamespace(keys_raw=no_map, max_entries=1))
    datapath = SimpleNamespace(
        metrics_totals=lambda: {(133, 0): (5, 500), (181, 1): (2, 200), (0, 0): (7, 700),
                                (0, 1): (9, 900)},
        events_lost=lambda: 3, endpoints=bad, ipcache=bad)
    return SimpleNamespace(datapath=datapath, endpoints=SimpleNamespace(endpoints={}),
                           ipam=SimpleNamespace(usage=lambda: {"allocated": 1, "free": 2,
                                                               "capacity": 3}))


def test_datapath_totals_are_counters() -> None:
    reg = CollectorRegistry()
    agent = _fake_agent()
    reg.register(DatapathCollector(agent.datapath, agent.ipam, agent.endpoints))
    text = generate_latest(reg).decode()
    assert "# TYPE villi_datapath_drop_total counter" in text
    assert "# TYPE villi_datapath_forward_total counter" in text
    assert "# TYPE villi_events_lost_total counter" in text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples[("villi_datapath_drop_total",
                    (("direction", "ingress"), ("reason", "POLICY_DENIED")))] == 5
    assert samples[("villi_datapath_forward_total", (("direction", "egress"),))] == 9
    assert samples[("villi_events_lost_total", ())] == 3
