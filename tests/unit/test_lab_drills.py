"""Drill bookkeeping that needs no lab: finding nodes, and following an agent whose
pid in the state file is stale (it was restarted outside ``villi lab agent start``)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from villi.lab import cluster, drills
from villi.lab._state import LabError


def _state() -> dict:
    return {"id": "abc123", "nodes": [
        {"name": "node1", "index": 1, "netns": "villi-lab-abc123-node1", "pid": None},
        {"name": "node2", "index": 2, "netns": "villi-lab-abc123-node2", "pid": None}]}


def test_find_node_by_name_or_index_and_clear_error() -> None:
    st = _state()
    assert drills.find_node(st, "node2")["index"] == 2
    assert drills.find_node(st, "1")["name"] == "node1"
    with pytest.raises(LabError, match="no node 'node9' in this lab: one of node1, node2"):
        drills.find_node(st, "node9")


def test_status_follows_an_agent_restarted_by_hand() -> None:
    st = _state()
    node = st["nodes"][1]
    node["pid"] = 999_999_999   # the old, dead agent
    assert cluster.agent_pid(st, node) is None
    # a process whose command line is the lab agent's (as `villi --netns NS agent ...`)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)",
                             "--netns", node["netns"], "agent", "--node", "node2",
                             "--cluster", "lab-abc123"])
    try:
        deadline = time.monotonic() + 5
        while cluster.agent_pid(st, node) != proc.pid:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert cluster.agent_pid(st, st["nodes"][0]) is None   # not node1's
    finally:
        proc.kill()
        proc.wait()
    assert cluster.agent_pid(st, node) is None
