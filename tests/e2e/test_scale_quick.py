"""Issue 16: bench/scale.py end to end at its --quick size (real etcd, a real agent).

Checks the run completes and the JSON carries every figure docs/scale.md reports; the
figures themselves are measurements, not assertions (they live in bench/results/).
A smaller --quick than the default so the test stays well under a minute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from villi.testing.etcd import etcd_available

pytestmark = [
    pytest.mark.e2e, pytest.mark.etcd,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (node namespace, BPF)"),
    pytest.mark.skipif(not etcd_available(), reason="needs /usr/bin/etcd"),
]

ROOT = Path(__file__).resolve().parents[2]


def test_scale_bench_quick_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "scale.py"), "--quick", "--nodes", "60",
         "--pods", "600", "--policies", "100", "--namespaces", "5", "--restarts", "1",
         "--outage", "1", "--steady-seconds", "2", "--start-jitter", "1",
         "--policy-changes", "5", "--session-ttl", "6", "--workers", "2",
         "--out", str(out)],
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())

    pop = result["populate"]
    assert pop["keys"]["ipcache"] == 600 and pop["keys"]["nodes"] == 59
    assert pop["keys"]["usage_reports"] == 59   # IPAM usage: its own key, not the node entry
    assert pop["etcd_db_mib"] > 0

    agent = result["agent"]
    assert agent["ipcache_complete_at_ready"], agent
    assert agent["ipcache_map_entries"] >= 600 + 59
    assert agent["rss_kib_ready"] > 0 and agent["baseline_rss_kib"] > 0
    assert agent["policy_change_s"]["n"] == 5
    assert all(n > 0 for n in agent["policy_map_keys_per_endpoint"])
    assert agent["health"]["neigh"]["demand"] > 0

    steady = result["steady"]
    assert steady["etcd_rpcs_per_s"].get("LeaseKeepAlive", 0) > 0
    assert steady["events_delivered_per_s"] > 0

    herd = result["herd"]
    assert {r["strategy"] for r in herd["runs"]} == {"none", "equal", "full"}
    for run in herd["runs"]:
        assert run["requests"]["reconnect"] >= 59  # every session came back
        assert run["recovery"]["peak"] > 0

    storm = result["storm"]
    assert set(storm) == {"jitter_0s", "jitter_1s"}
    assert all(s["requests"]["lease"] == 59 for s in storm.values())
