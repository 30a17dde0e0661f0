"""NodePool: the node-local pod IP allocator and its persistence."""

from __future__ import annotations

import json
import os
import threading
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from villi.errors import IPAMError, PoolExhausted
from villi.ipam import pool as pool_module
from villi.ipam.pool import STATE_FILE, NodePool

A = IPv4Address


def fill(pool: NodePool, n: int, prefix: str = "c") -> list[IPv4Address]:
    return [pool.allocate(f"{prefix}{i}").ip for i in range(n)]


# --- allocation --------------------------------------------------------------------------------


def test_skips_network_and_broadcast() -> None:
    pool = NodePool("n1", ["10.64.1.0/30"])
    assert fill(pool, 2) == [A("10.64.1.1"), A("10.64.1.2")]
    assert pool.usage().capacity == 2
    with pytest.raises(PoolExhausted):
        pool.allocate("c2")


def test_exhaustion_message_names_cidr_counts_and_node() -> None:
    pool = NodePool("n1", ["10.64.1.0/24"])
    ips = fill(pool, 254)
    assert len(set(ips)) == 254
    assert A("10.64.1.0") not in ips and A("10.64.1.255") not in ips
    with pytest.raises(PoolExhausted) as err:
        pool.allocate("one-more")
    assert str(err.value) == "no free IPv4 in 10.64.1.0/24 (254/254 allocated) on node n1"
    assert isinstance(err.value, IPAMError)


def test_no_cidr_yet_is_a_retryable_exhaustion() -> None:
    pool = NodePool("n1")
    with pytest.raises(PoolExhausted, match="no pod CIDR assigned yet"):
        pool.allocate("c")
    assert pool.usage().capacity == 0


def test_allocate_is_idempotent_per_owner() -> None:
    pool = NodePool("n1", ["10.64.1.0/24"])
    first = pool.allocate("container-id:abc/eth0")
    assert pool.allocate("container-id:abc/eth0") == first
    assert first.cidr == IPv4Network("10.64.1.0/24")
    assert pool.used == 1 and pool.free == 253 and pool.capacity == 254
    assert pool.get("container-id:abc/eth0") == first
    assert pool.owner_of(first.ip) == "container-id:abc/eth0"


def test_empty_owner_refused() -> None:
    with pytest.raises(IPAMError, match="owner"):
        NodePool("n1", ["10.64.1.0/24"]).allocate("")


def test_next_fit_does_not_reuse_a_just_released_ip() -> None:
    pool = NodePool("n1", ["10.64.1.0/29"])  # .1 .. .6
    a, b, c = fill(pool, 3)
    pool.release(a)
    assert pool.allocate("d").ip == A("10.64.1.4")
    pool.release(c)
    assert [pool.allocate(o).ip for o in ("e", "f")] == [A("10.64.1.5"), A("10.64.1.6")]
    # Wrap around: the oldest free address comes before the one released last.
    assert pool.allocate("g").ip == a
    assert pool.allocate("h").ip == c


def test_next_fit_spans_several_cidrs() -> None:
    pool = NodePool("n1", ["10.64.1.0/30", "10.64.2.0/30"])
    assert fill(pool, 4) == [A("10.64.1.1"), A("10.64.1.2"), A("10.64.2.1"), A("10.64.2.2")]
    pool.release("10.64.1.1")
    pool.release("10.64.2.2")
    assert pool.allocate("x").ip == A("10.64.1.1")  # after the cursor (.2.2), wrapping


def test_release_is_idempotent() -> None:
    pool = NodePool("n1", ["10.64.1.0/24"])
    alloc = pool.allocate("c")
    assert pool.release(alloc.ip) == alloc
    assert pool.release(alloc.ip) is None
    assert pool.release_owner("c") is None
    other = pool.allocate("d")
    assert pool.release_owner("d") == other
    assert pool.allocations() == []


def test_allocate_specific() -> None:
    pool = NodePool("n1", ["10.64.1.0/24"])
    got = pool.allocate_specific("10.64.1.77", "router")
    assert got.ip == A("10.64.1.77")
    assert pool.allocate_specific(A("10.64.1.77"), "router") == got  # idempotent
    with pytest.raises(IPAMError, match="already allocated to 'router'"):
        pool.allocate_specific("10.64.1.77", "other")
    with pytest.raises(IPAMError, match="already holds 10.64.1.77"):
        pool.allocate_specific("10.64.1.78", "router")
    with pytest.raises(IPAMError, match="not in the pod CIDRs"):
        pool.allocate_specific("10.64.2.1", "x")
    with pytest.raises(IPAMError, match="network or broadcast"):
        pool.allocate_specific("10.64.1.255", "x")
    with pytest.raises(IPAMError, match="invalid IPv4"):
        pool.allocate_specific("10.64.1.300", "x")
    # The cursor did not move: dynamic allocation still starts at the bottom.
    assert pool.allocate("c").ip == A("10.64.1.1")


def test_add_cidr_after_exhaustion() -> None:
    pool = NodePool("n1", ["10.64.1.0/30"])
    fill(pool, 2)
    pool.add_cidr("10.64.9.0/30")
    assert pool.allocate("more").ip == A("10.64.9.1")
    assert pool.usage().capacity == 4 and pool.cidrs == (
        IPv4Network("10.64.1.0/30"), IPv4Network("10.64.9.0/30"))


def test_bad_cidrs_refused() -> None:
    pool = NodePool("n1")
    with pytest.raises(IPAMError, match="overlap"):
        pool.set_cidrs(["10.64.0.0/23", "10.64.1.0/24"])
    with pytest.raises(IPAMError, match="too small"):
        pool.set_cidrs(["10.64.1.0/31"])
    with pytest.raises(IPAMError, match="invalid IPv4 CIDR"):
        pool.set_cidrs(["10.64.1.1/24"])
    with pytest.raises(IPAMError, match="invalid node name"):
        NodePool("a/b")


def test_removed_cidr_drains_until_its_last_ip_is_released() -> None:
    pool = NodePool("n1", ["10.64.1.0/30"])
    old = pool.allocate("old").ip
    pool.set_cidrs(["10.64.2.0/30"])
    assert pool.draining == (IPv4Network("10.64.1.0/30"),)
    usage = pool.usage()
    assert (usage.allocated, usage.capacity, usage.free) == (1, 3, 2)
    assert pool.allocate("new").ip == A("10.64.2.1")  # nothing new from the old CIDR
    assert pool.get("old") is not None and pool.get("old").cidr == IPv4Network("10.64.1.0/30")
    pool.release(old)
    assert pool.draining == ()
    assert pool.usage().capacity == 2


# --- persistence -------------------------------------------------------------------------------


def test_allocations_survive_restart(tmp_path) -> None:
    pool = NodePool("n1", ["10.64.1.0/24"], state_dir=tmp_path)
    held = {o: pool.allocate(o).ip for o in ("a", "b", "c")}
    pool.release(held["b"])
    path = tmp_path / STATE_FILE
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    doc = json.loads(path.read_text())
    assert doc["allocations"] == {"10.64.1.1": "a", "10.64.1.3": "c"}

    again = NodePool("n1", state_dir=tmp_path)
    assert again.cidrs == (IPv4Network("10.64.1.0/24"),)
    assert {a.owner: a.ip for a in again.allocations()} == {"a": held["a"], "c": held["c"]}
    assert again.allocate("a").ip == held["a"]  # idempotent across restarts
    # The cursor survived too: .2 (released before the restart) is not reused first.
    assert again.allocate("d").ip == A("10.64.1.4")


def test_no_double_allocation_after_restart(tmp_path) -> None:
    pool = NodePool("n1", ["10.64.1.0/26"], state_dir=tmp_path)
    held = fill(pool, 40)
    for ip in held[::3]:
        pool.release(ip)
    kept = {a.ip for a in pool.allocations()}
    again = NodePool("n1", state_dir=tmp_path)
    fresh: list[IPv4Address] = []
    while True:
        try:
            fresh.append(again.allocate(f"new{len(fresh)}").ip)
        except PoolExhausted:
            break
    assert not kept & set(fresh)
    assert len(set(fresh)) == len(fresh) == 62 - len(kept)


def test_constructor_cidrs_replace_restored_ones(tmp_path) -> None:
    pool = NodePool("n1", ["10.64.1.0/24"], state_dir=tmp_path)
    pool.allocate("a")
    again = NodePool("n1", ["10.64.5.0/24"], state_dir=tmp_path)
    assert again.cidrs == (IPv4Network("10.64.5.0/24"),)
    assert again.draining == (IPv4Network("10.64.1.0/24"),)
    assert NodePool("n1", state_dir=tmp_path).draining == (IPv4Network("10.64.1.0/24"),)


def test_state_of_another_node_is_refused(tmp_path) -> None:
    NodePool("n1", ["10.64.1.0/24"], state_dir=tmp_path).allocate("a")
    with pytest.raises(IPAMError, match="belongs to node 'n1'"):
        NodePool("n2", state_dir=tmp_path)


@pytest.mark.parametrize("content, reason", [
    ("{not json", "corrupt"),
    ('{"version": 99}', "unsupported version"),
    ('{"version": 1, "node": "n1", "cidrs": ["10.64.1.0/24"],'
     ' "allocations": {"10.64.2.1": "a"}}', "outside its CIDRs"),
    ('{"version": 1, "node": "n1", "cidrs": ["10.64.1.0/24"],'
     ' "allocations": {"10.64.1.1": "a", "10.64.1.2": "a"}}', "holds two addresses"),
])
def test_corrupt_state_is_an_error_naming_the_file(tmp_path, content, reason) -> None:
    (tmp_path / STATE_FILE).write_text(content)
    with pytest.raises(IPAMError, match=reason) as err:
        NodePool("n1", state_dir=tmp_path)
    assert str(tmp_path / STATE_FILE) in str(err.value)


def test_failed_write_hands_out_nothing(tmp_path, monkeypatch) -> None:
    pool = NodePool("n1", ["10.64.1.0/24"], state_dir=tmp_path)
    kept = pool.allocate("a")

    def broken(path, doc):
        raise IPAMError(f"cannot write IPAM state {path}: No space left on device")

    monkeypatch.setattr(pool_module, "write_json_atomic", broken)
    with pytest.raises(IPAMError, match="No space left"):
        pool.allocate("b")
    with pytest.raises(IPAMError):
        pool.release(kept.ip)
    assert pool.allocations() == [kept] and pool.get("b") is None
    monkeypatch.undo()
    assert pool.allocate("b").ip == A("10.64.1.2")


def test_threads_never_share_an_ip() -> None:
    pool = NodePool("n1", ["10.64.0.0/22"])
    results: list[IPv4Address] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        mine = [pool.allocate(f"t{k}-{i}").ip for i in range(100)]
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == len(set(results)) == 800


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 15)), max_size=60))
def test_property_owners_and_ips_stay_one_to_one(ops) -> None:
    pool = NodePool("n1", ["10.64.1.0/29", "10.64.2.0/30"])  # 6 + 2 addresses
    model: dict[str, IPv4Address] = {}
    for alloc, k in ops:
        owner = f"o{k}"
        if alloc:
            try:
                model[owner] = pool.allocate(owner).ip
            except PoolExhausted:
                assert len(model) == 8 and owner not in model
        else:
            released = pool.release_owner(owner)
            assert (released.ip if released else None) == model.pop(owner, None)
        assert {a.owner: a.ip for a in pool.allocations()} == model
        assert len(set(model.values())) == len(model)
        assert pool.usage().free == 8 - len(model)
