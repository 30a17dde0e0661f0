"""The IPAM key layout and codecs, capacity and node choice, and the agent's pod CIDR
follower."""

from __future__ import annotations

import asyncio
import json
from contextlib import aclosing
from ipaddress import IPv4Address, IPv4Network

import pytest

from villi.errors import IPAMError, PoolExhausted
from villi.ipam import (
    IPAMUsage,
    NodeCapacity,
    NodeEntry,
    claim_key,
    encode_podcidrs,
    follow_pod_cidrs,
    node_key,
    pick_node,
    podcidrs_key,
    wait_pod_cidrs,
)
from villi.ipam.keys import NODES_PREFIX, cidr_of_claim_key, decode_podcidrs, node_of_key
from villi.kvstore import EmbeddedStore
from villi.testing.kvstore import take

N = IPv4Network


def test_key_layout() -> None:
    assert node_key("n1") == "villi/state/nodes/v1/n1"
    assert podcidrs_key("n1") == "villi/state/ipam/v1/podcidrs/n1"
    assert claim_key(N("10.64.3.0/24")) == "villi/state/ipam/v1/cidrs/10.64.3.0_24"
    assert cidr_of_claim_key(claim_key(N("10.64.3.0/24"))) == N("10.64.3.0/24")
    assert cidr_of_claim_key("villi/state/ipam/v1/cidrs/10.64.3.1_24") is None
    assert cidr_of_claim_key("villi/state/ipam/v1/cidrs/junk") is None
    assert node_of_key(NODES_PREFIX + "n1", NODES_PREFIX) == "n1"
    assert node_of_key(NODES_PREFIX + "c/n1", NODES_PREFIX) is None
    with pytest.raises(IPAMError):
        node_key("a/b")


def test_podcidrs_codec() -> None:
    raw = encode_podcidrs([N("10.64.3.0/24")])
    assert json.loads(raw) == {"cidrs": ["10.64.3.0/24"]}
    assert decode_podcidrs(raw) == (N("10.64.3.0/24"),)
    for bad in (b"nope", b'{"cidrs": "10.64.3.0/24"}', b'{"cidrs": ["10.64.3.1/24"]}'):
        with pytest.raises(IPAMError):
            decode_podcidrs(bad)


def test_node_entry_round_trip_matches_the_contract() -> None:
    entry = NodeEntry("n1", IPv4Address("192.168.50.2"), (N("10.64.3.0/24"),),
                      IPAMUsage(3, 254))
    doc = json.loads(entry.encode())
    assert doc == {"name": "n1", "ipv4": "192.168.50.2", "podCIDRs": ["10.64.3.0/24"],
                   "ipam": {"allocated": 3, "capacity": 254, "free": 251},
                   "villi.io/ip": 251}
    assert NodeEntry.decode(entry.encode()) == entry
    assert NodeEntry.decode(b'{"name": "n2"}') == NodeEntry("n2", None)


@pytest.mark.parametrize("raw, reason", [
    (b"{", "not JSON"),
    (b'{"ipv4": "1.2.3.4"}', "'name'"),
    (b'{"name": "n", "ipv4": "1.2.3"}', "ipv4"),
    (b'{"name": "n", "podCIDRs": "10.64.0.0/24"}', "must be a list"),
    (b'{"name": "n", "ipam": {"allocated": 3}}', "lacks 'capacity'"),
    (b'{"name": "n", "ipam": {"allocated": 5, "capacity": 4}}', "invalid IPAM usage"),
])
def test_node_entry_errors_say_what_and_where(raw: bytes, reason: str) -> None:
    with pytest.raises(IPAMError, match=reason) as err:
        NodeEntry.decode(raw, key="villi/state/nodes/v1/n")
    assert str(err.value).startswith("villi/state/nodes/v1/n: ")


def test_usage_summary_is_the_healthz_line() -> None:
    usage = IPAMUsage(3, 254)
    assert usage.free == 251
    assert usage.summary() == "IPv4: 3/254 allocated"


def cap(name: str, allocated: int | None, capacity: int = 254) -> NodeCapacity:
    return NodeCapacity(name, None if allocated is None else IPAMUsage(allocated, capacity))


def test_pick_node_prefers_most_free_then_name() -> None:
    nodes = [cap("n3", 200), cap("n1", 10), cap("n2", 10)]
    assert pick_node(nodes) == "n1"
    assert pick_node(nodes, placed={"n1": 1}) == "n2"


def test_pick_node_avoids_full_nodes_and_ranks_unknown_last() -> None:
    assert pick_node([cap("a", 254), cap("b", None), cap("c", 253)]) == "c"
    assert pick_node([cap("a", 254), cap("b", None)]) == "b"
    assert pick_node([cap("a", 250)], placed={"a": 3}) == "a"


def test_pick_node_errors() -> None:
    with pytest.raises(PoolExhausted, match="full: a, b"):
        pick_node([cap("b", 254), cap("a", 200)], placed={"a": 54})
    with pytest.raises(IPAMError, match="no nodes"):
        pick_node([])


# --- the agent's follower ----------------------------------------------------------------------


async def test_follow_pod_cidrs_sees_only_its_own_key() -> None:
    async with EmbeddedStore(None) as store:
        await store.put(podcidrs_key("n10"), encode_podcidrs([N("10.64.10.0/24")]))
        await store.put(podcidrs_key("n1"), encode_podcidrs([N("10.64.1.0/24")]))
        async with aclosing(follow_pod_cidrs(store, "n1")) as updates:
            assert await take(updates, 1) == [(N("10.64.1.0/24"),)]
            await store.put(podcidrs_key("n10"), encode_podcidrs([N("10.64.11.0/24")]))
            await store.put(podcidrs_key("n1"), b"garbage")  # logged and skipped
            await store.put(podcidrs_key("n1"), encode_podcidrs([N("10.64.1.0/24")]))  # same
            await store.put(podcidrs_key("n1"),
                            encode_podcidrs([N("10.64.1.0/24"), N("10.64.2.0/24")]))
            await store.delete(podcidrs_key("n1"))
            assert await take(updates, 2) == [
                (N("10.64.1.0/24"), N("10.64.2.0/24")), ()]


async def test_wait_pod_cidrs() -> None:
    async with EmbeddedStore(None) as store:
        waiter = asyncio.create_task(wait_pod_cidrs(store, "n1", timeout=10))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await store.put(podcidrs_key("n1"), encode_podcidrs([N("10.64.1.0/24")]))
        assert await waiter == (N("10.64.1.0/24"),)
        with pytest.raises(TimeoutError, match="is `villi operator` running"):
            await wait_pod_cidrs(store, "n2", timeout=0.05)
