"""IPAM usage reports live at ``ipam/v1/usage/<node>``, not in the node entry (issue 16).

Every agent watches every node entry, so usage there cost N watch events per report:
O(N^2) at scale. These tests pin the contract: the agent's node entry carries no usage,
the report has its own key and format, the operator records it without a reconcile
pass, and ``villi get nodes`` folds it back in.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from villi.errors import IPAMError
from villi.ipam.capacity import IPAMUsage
from villi.ipam.keys import USAGE_PREFIX, NodeEntry, node_key, usage_key
from villi.ipam.usage import decode_usage, merge_usage, usage_report
from villi.kvstore import EmbeddedStore
from villi.kvstore import schema as agent_keys
from villi.operator import ClusterCIDRAllocator


def test_usage_key_is_under_the_ipam_prefix_only_the_operator_watches() -> None:
    assert usage_key("n1") == "villi/state/ipam/v1/usage/n1" == agent_keys.usage_key("n1")
    assert not usage_key("n1").startswith(agent_keys.NODES)
    with pytest.raises(IPAMError):
        usage_key("a/b")


def test_report_round_trips_and_free_is_derived() -> None:
    raw = usage_report({"allocated": 3, "capacity": 126, "free": 999})
    assert json.loads(raw) == {"ipam": {"allocated": 3, "capacity": 126, "free": 123},
                               "villi.io/ip": 123}
    assert decode_usage(raw) == IPAMUsage(3, 126)


@pytest.mark.parametrize("raw, why", [(b"nope", "not JSON"), (b"[]", "must be an object"),
                                       (b'{"ipam": {"allocated": 1}}', "lacks 'capacity'")])
def test_malformed_reports_name_the_key(raw: bytes, why: str) -> None:
    with pytest.raises(IPAMError, match=f"usage/n1: .*{why}"):
        decode_usage(raw, key=usage_key("n1"))


def test_get_nodes_folds_the_reports_into_the_node_entries() -> None:
    nodes = [{"name": "n1", "podCIDRs": ["10.64.0.0/24"]}, {"name": "n2"}]
    merged = merge_usage(nodes, [(usage_key("n1"), usage_report({"allocated": 2,
                                                                  "capacity": 254})),
                                 (usage_key("n2"), b"junk"), (USAGE_PREFIX + "x/y", b"{}")])
    assert merged[0]["ipam"] == {"allocated": 2, "capacity": 254, "free": 252}
    assert merged[0]["villi.io/ip"] == 252
    assert merged[1] == {"name": "n2"}  # unreadable report: shown without usage


def test_operator_records_usage_without_a_pass() -> None:
    alloc = ClusterCIDRAllocator(EmbeddedStore(None))
    raw = usage_report({"allocated": 5, "capacity": 126})
    assert alloc.observe_usage(usage_key("n1"), raw) is True
    assert alloc.usage == {"n1": IPAMUsage(5, 126)}
    assert alloc.observe_usage(usage_key("n1"), b"junk") is True
    assert alloc.usage == {}
    assert alloc.observe_usage(usage_key("n1"), raw) and alloc.observe_usage(usage_key("n1"),
                                                                             None)
    assert alloc.usage == {}
    # anything else under ipam/v1/ (claims, podcidrs) still wakes the pass
    assert alloc.observe_usage("villi/state/ipam/v1/podcidrs/n1", b"{}") is False


async def test_operator_loop_passes_on_nodes_not_on_usage_reports() -> None:
    async with EmbeddedStore(None) as store:
        alloc = ClusterCIDRAllocator(store)
        task = asyncio.create_task(alloc.run(resync_interval_s=300))
        try:
            await store.put(node_key("n1"), NodeEntry("n1", None).encode())
            for _ in range(200):
                if alloc.assignments.get("n1"):
                    break
                await asyncio.sleep(0.02)
            assert alloc.assignments.get("n1")
            passes = alloc.passes
            for k in range(20):
                await store.put(usage_key("n1"), usage_report({"allocated": k,
                                                               "capacity": 254}))
            for _ in range(100):
                if alloc.usage.get("n1") == IPAMUsage(19, 254):
                    break
                await asyncio.sleep(0.02)
            assert alloc.usage["n1"] == IPAMUsage(19, 254)
            await asyncio.sleep(0.2)
            assert alloc.passes == passes
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
