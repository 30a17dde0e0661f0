"""The operator's run loop: list-then-watch, reclaim timers, retries, identity GC,
clean shutdown; on the in-memory store and, when installed, on a real etcd."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from ipaddress import IPv4Network

import pytest

from villi.errors import StoreError, StoreUnavailable
from villi.ipam.keys import (
    IPAM_PREFIX,
    NodeEntry,
    claim_key,
    decode_podcidrs,
    node_key,
    podcidrs_key,
)
from villi.kvstore import BackoffPolicy, EmbeddedStore, EtcdStore, ListResult, Store
from villi.operator import Operator, OperatorSettings, run_operator
from villi.testing.etcd import EtcdServer, etcd_available
from villi.testing.kvstore import FlakyStore, eventually

N = IPv4Network
FAST = BackoffPolicy(base=0.01, cap=0.05, max_attempts=None)


async def no_gc() -> None:
    return None


def settings(**overrides: object) -> OperatorSettings:
    base: dict[str, object] = dict(grace_period_s=0, identity_gc_interval_s=3600,
                                   resync_interval_s=5, backoff=FAST)
    base.update(overrides)
    return OperatorSettings(**base)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(coro: Awaitable[None]) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.ensure_future(coro)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def cidrs_of(store: Store, node: str) -> tuple[IPv4Network, ...] | None:
    kv = await store.get(podcidrs_key(node))
    return None if kv is None else decode_podcidrs(kv.value)


async def add_node(store: Store, name: str, **kw: object) -> None:
    await store.put(node_key(name), NodeEntry(name, None).encode(), **kw)  # type: ignore[arg-type]


async def assignments(store: Store, *, settled: bool = True) -> dict[str, IPv4Network]:
    """node -> its one CIDR. Always true (even mid-change): a published CIDR is claimed
    by its node and no CIDR is published twice. ``settled``: also no claim is left
    without a published CIDR (transiently there is one, between the two writes)."""
    listing = await store.list(IPAM_PREFIX)
    pods: dict[str, IPv4Network] = {}
    claimed: dict[str, str] = {}
    for kv in listing.items:
        if kv.key.startswith(IPAM_PREFIX + "podcidrs/"):
            (cidr,) = decode_podcidrs(kv.value)
            pods[kv.key.rsplit("/", 1)[1]] = cidr
        else:
            claimed[kv.key] = kv.value.decode()
    assert len(set(pods.values())) == len(pods)
    for node, cidr in pods.items():
        assert claimed.get(claim_key(cidr)) == node
    if settled and len(claimed) != len(pods):
        return {}
    return pods


@pytest.fixture
async def store() -> AsyncIterator[EmbeddedStore]:
    async with EmbeddedStore(None) as s:
        yield s


async def test_node_appears_gets_a_cidr_and_is_reclaimed_when_gone(store) -> None:
    async with running(run_operator(store, settings(), identity_gc=no_gc)) as task:
        await add_node(store, "n1")
        await eventually(lambda: cidrs_of(store, "n1"), what="n1 gets a CIDR")
        assert await cidrs_of(store, "n1") == (N("10.64.0.0/24"),)
        await add_node(store, "n2")
        await eventually(lambda: cidrs_of(store, "n2"), what="n2 gets a CIDR")
        await store.delete(node_key("n1"))
        async def n1_reclaimed() -> bool:
            return await assignments(store) == {"n2": N("10.64.1.0/24")}
        await eventually(n1_reclaimed, what="n1's CIDR reclaimed")
        await add_node(store, "n3")
        async def n3_reuses() -> bool:
            return (await assignments(store)).get("n3") == N("10.64.0.0/24")
        await eventually(n3_reuses, what="n3 reuses the reclaimed CIDR")
        assert not task.done()
    assert task.cancelled()


async def test_lease_expiry_reclaims_after_a_real_grace_period(store) -> None:
    async with running(run_operator(store, settings(grace_period_s=0.3), identity_gc=no_gc)):
        lease = await store.grant_lease(60)
        await add_node(store, "n1", lease=lease)
        await eventually(lambda: cidrs_of(store, "n1"))
        await store.revoke_lease(lease)  # the agent died
        await asyncio.sleep(0.1)
        assert await cidrs_of(store, "n1") is not None  # still within the grace period
        async def reclaimed() -> bool:
            return await cidrs_of(store, "n1") is None
        await eventually(reclaimed, timeout=5, what="reclaimed after the grace period")


async def test_node_back_within_grace_keeps_its_cidr(store) -> None:
    async with running(run_operator(store, settings(grace_period_s=60), identity_gc=no_gc)):
        await add_node(store, "n0")
        await add_node(store, "n1")
        await eventually(lambda: cidrs_of(store, "n1"))
        before = await assignments(store)
        await store.delete(node_key("n1"))
        await asyncio.sleep(0.1)
        await add_node(store, "n1")
        await add_node(store, "n2")
        await eventually(lambda: cidrs_of(store, "n2"))
        after = await assignments(store)
        assert {k: after[k] for k in before} == before


async def test_rebuilds_from_the_store_on_start(store) -> None:
    for name in ("a", "b"):
        await add_node(store, name)
    async with running(run_operator(store, settings(), identity_gc=no_gc)):
        await eventually(lambda: cidrs_of(store, "b"))
    first = await assignments(store)
    # Restart: nothing changes, and a claim left half-done by a crash is adopted.
    await store.put(claim_key(N("10.64.9.0/24")), b"c")
    await add_node(store, "c")
    async with running(run_operator(store, settings(), identity_gc=no_gc)):
        await eventually(lambda: cidrs_of(store, "c"))
    assert await assignments(store) == {**first, "c": N("10.64.9.0/24")}


async def test_two_operators_never_double_allocate(store) -> None:
    ops = [run_operator(store, settings(), identity_gc=no_gc) for _ in range(2)]
    async with running(ops[0]), running(ops[1]):
        names = [f"node-{i:02d}" for i in range(24)]
        await asyncio.gather(*(add_node(store, n) for n in names))
        async def all_assigned() -> bool:
            return len(await assignments(store)) == len(names)
        await eventually(all_assigned, timeout=10, what="every node has a CIDR")
        await asyncio.gather(*(store.delete(node_key(n)) for n in names[::2]))
        async def reclaimed() -> bool:
            return set(await assignments(store)) == set(names[1::2])
        await eventually(reclaimed, timeout=10, what="half the nodes reclaimed")
        await asyncio.gather(*(add_node(store, f"new-{i}") for i in range(12)))
        async def settled() -> bool:
            got = await assignments(store)
            return set(got) == set(names[1::2]) | {f"new-{i}" for i in range(12)}
        await eventually(settled, timeout=10, what="new nodes assigned")
        # The new nodes got exactly the reclaimed CIDRs (lowest free first).
        assert set((await assignments(store)).values()) == {
            N(f"10.64.{i}.0/24") for i in range(24)}


class FailingLists(FlakyStore):
    """Lists fail ``fail`` times before working again (the store is flapping)."""

    def __init__(self, inner: Store, fail: int) -> None:
        super().__init__(inner)
        self.fail = fail

    async def list(self, prefix: str) -> ListResult:
        if self.fail > 0:
            self.fail -= 1
            raise StoreUnavailable("injected list failure")
        return await self.inner.list(prefix)


async def test_retries_with_backoff_when_the_store_fails(store) -> None:
    flaky = FailingLists(store, fail=6)
    await add_node(store, "n1")
    async with running(run_operator(flaky, settings(), identity_gc=no_gc)):
        await eventually(lambda: cidrs_of(store, "n1"), what="assigned once the store is back")
        assert flaky.fail == 0
        flaky.broken = True  # watches break: they resume, and the next node is seen
        await asyncio.sleep(0.05)
        flaky.broken = False
        await add_node(store, "n2")
        await eventually(lambda: cidrs_of(store, "n2"), what="watch resumed")


async def test_identity_gc_runs_at_jittered_intervals_and_survives_failures(store) -> None:
    calls: list[float] = []
    delays: list[float] = []

    async def gc() -> None:
        calls.append(asyncio.get_running_loop().time())
        if len(calls) == 2:
            raise StoreError("etcd down")
        if len(calls) == 3:
            raise RuntimeError("a bug")

    async def sleep(delay: float) -> None:
        delays.append(delay)
        await asyncio.sleep(0.001)

    op = Operator(store, settings(identity_gc_interval_s=10, identity_gc_jitter=0.2),
                  identity_gc=gc, sleep=sleep)
    async with running(op.run()):
        await eventually(lambda: len(calls) >= 5, what="GC keeps running")
    assert op.gc_failures == 2 and op.gc_passes >= 3
    assert all(8 <= d <= 12 for d in delays) and len(set(delays)) > 1


async def test_default_identity_gc_collects_unused_identities(store) -> None:
    ids = "villi/state/identities/v1/"
    await store.put(ids + "id/300", b"k8s:app=gone;")
    await store.put(ids + "value/k8s:app=gone;", b"300")
    await store.put(ids + "id/301", b"k8s:app=used;")
    await store.put(ids + "value/k8s:app=used;", b"301")
    await store.put(ids + "value/k8s:app=used;/n1", b"301")
    op = Operator(store, settings(identity_gc_interval_s=0.01, identity_gc_jitter=0))
    async with running(op.run()):
        async def collected() -> bool:
            return await store.get(ids + "id/300") is None
        await eventually(collected, what="unused identity collected")
    assert await store.get(ids + "id/301") is not None


def test_settings_validate_early() -> None:
    with pytest.raises(ValueError):
        OperatorSettings(grace_period_s=-1)
    with pytest.raises(ValueError):
        OperatorSettings(identity_gc_jitter=1)


# --- real etcd -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def etcd_server() -> Iterator[EtcdServer]:
    if not etcd_available():
        pytest.skip("needs /usr/bin/etcd")
    with EtcdServer() as server:
        yield server


@pytest.mark.etcd
async def test_two_operators_on_real_etcd(etcd_server: EtcdServer) -> None:
    async with EtcdStore(etcd_server.endpoint) as store:
        await store.delete_prefix("villi/state/")
        ops = [run_operator(store, settings(grace_period_s=0.2), identity_gc=no_gc)
               for _ in range(2)]
        async with running(ops[0]), running(ops[1]):
            lease = await store.grant_lease(30)
            names = [f"etcd-{uuid.uuid4().hex[:6]}-{i}" for i in range(8)]
            await asyncio.gather(*(add_node(store, n, lease=lease) for n in names[:4]))
            await asyncio.gather(*(add_node(store, n) for n in names[4:]))
            async def all_assigned() -> bool:
                return len(await assignments(store)) == 8
            await eventually(all_assigned, timeout=10, what="8 nodes assigned on etcd")
            await store.revoke_lease(lease)  # four agents die at once
            async def reclaimed() -> bool:
                return set(await assignments(store)) == set(names[4:])
            await eventually(reclaimed, timeout=10, what="their CIDRs reclaimed")
        await store.delete_prefix("villi/state/")


def test_operator_flags_documented_in_ipam_md_exist() -> None:
    """docs/ipam.md names these flags; `villi operator` must accept them."""
    import re
    from pathlib import Path

    from villi.cli.main import _parser as build_parser

    doc = (Path(__file__).parents[2] / "docs" / "ipam.md").read_text()
    section = doc.split("## The operator", 1)[1].split("\n## ", 1)[0]
    flags = set(re.findall(r"`(--[a-z-]+)`", section))
    assert {"--cluster-cidr", "--node-mask", "--node-grace-period"} <= flags
    parser = build_parser()
    for flag in sorted(flags):
        value = {"--cluster-cidr": "10.64.0.0/10", "--node-mask": "24"}.get(flag, "5")
        args = parser.parse_args(["operator", flag, value])
        assert args.command == "operator", flag
