"""Per-agent load on the store at scale (issue 16): health probes that piggyback on
other traffic, jittered keep-alive periods, a jittered pause before re-watching."""

from __future__ import annotations

import argparse
import asyncio
import random
import time

import pytest

from villi.agent.config import AgentConfig, add_arguments, from_args
from villi.agent.sync import DEFAULT_HEALTH_INTERVAL, StoreHealth
from villi.errors import StoreUnavailable, VilliError
from villi.kvstore import EmbeddedStore, EtcdStore, LeaseKeeper
from villi.kvstore.backoff import Backoff, BackoffPolicy


class Counting(EmbeddedStore):
    """An in-memory store that counts probes and claims an answer at ``last_answer``."""

    def __init__(self) -> None:
        super().__init__(None)
        self.revisions = 0
        self.last_answer: float | None = None

    async def revision(self) -> int:
        self.revisions += 1
        return await super().revision()


async def _run_for(health: StoreHealth, sleeps: int) -> list[float]:
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)
        if len(slept) >= sleeps:
            raise asyncio.CancelledError

    health._sleep = sleep
    try:
        await health.run()
    except asyncio.CancelledError:
        pass
    return slept


async def test_health_probe_is_skipped_while_the_store_answers_other_requests() -> None:
    async with Counting() as store:
        now = [1000.0]
        health = StoreHealth(store, interval=30, clock=lambda: now[0])
        store.last_answer = 995.0      # a keep-alive or watch event 5 s ago
        slept = await _run_for(health, 5)
        assert store.revisions == 0 and health.skipped == 5
        assert all(15 <= s <= 45 for s in slept)
        store.last_answer = 900.0      # nothing for 100 s: probe
        await _run_for(health, 1)
        assert store.revisions == 1 and health.ok


async def test_health_probes_while_failing_even_if_something_answered() -> None:
    async with Counting() as store:
        health = StoreHealth(store, interval=30)
        health._fail("connection refused")
        store.last_answer = time.monotonic()
        await _run_for(health, 1)
        assert store.revisions == 1 and health.ok


def test_health_interval_and_rewatch_jitter_are_flags() -> None:
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    cfg = from_args(ap.parse_args(["--node", "n1"]))
    assert cfg.kvstore_health_interval == DEFAULT_HEALTH_INTERVAL == 30.0
    assert cfg.kvstore_rewatch_jitter == 1.0
    cfg = from_args(ap.parse_args(["--node", "n1", "--kvstore-health-interval", "2",
                                   "--kvstore-rewatch-jitter", "5"]))
    assert (cfg.kvstore_health_interval, cfg.kvstore_rewatch_jitter) == (2, 5)
    with pytest.raises(VilliError, match="health-interval"):
        AgentConfig(node="n1", kvstore_health_interval=0)
    with pytest.raises(VilliError, match="rewatch-jitter"):
        AgentConfig(node="n1", kvstore_rewatch_jitter=-1)


def test_keepalive_period_is_jittered_below_a_third_of_the_ttl() -> None:
    keeper = LeaseKeeper(EmbeddedStore(None), 60, rng=random.Random(1))
    periods = [keeper.period() for _ in range(500)]
    assert all(10.0 <= p <= 20.0 for p in periods)
    assert max(periods) - min(periods) > 8       # spread over the window, not fixed
    fixed = LeaseKeeper(EmbeddedStore(None), 60, period_jitter=0.0)
    assert fixed.period() == 20.0
    with pytest.raises(ValueError):
        LeaseKeeper(EmbeddedStore(None), 60, period_jitter=1.5)


async def test_keepalive_loop_sleeps_the_jittered_period_and_records_answers() -> None:
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)
        if len(slept) > 4:
            raise asyncio.CancelledError
        await asyncio.sleep(0)

    async with EmbeddedStore(None) as store:
        keeper = LeaseKeeper(store, 30, rng=random.Random(2), sleep=sleep)
        await keeper.start()
        assert keeper._task is not None
        await asyncio.wait([keeper._task])
        assert len(set(slept)) == 5 and all(5.0 <= s <= 10.0 for s in slept)
        assert keeper.last_ok is not None


async def test_rewatch_waits_for_an_answer_then_a_uniform_pause() -> None:
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    class Top:
        def uniform(self, a: float, b: float) -> float:
            return b

    store = EtcdStore("http://127.0.0.1:1", rng=Top(), sleep=sleep, rewatch_jitter=3.0)
    answers = iter([StoreUnavailable("refused"), StoreUnavailable("refused"), {}])
    probes = []

    async def attempt_once(path: str, body: dict) -> dict:
        probes.append(path)
        a = next(answers)
        if isinstance(a, Exception):
            raise a
        return a

    store._gw.attempt_once = attempt_once  # type: ignore[method-assign]
    backoff = Backoff(BackoffPolicy(base=0.05, cap=5.0, max_attempts=None), rng=Top(),
                      sleep=sleep)
    await store._rewatch_pause(backoff)
    assert probes == ["/v3/kv/range"] * 3
    assert slept == [0.05, 0.1, 3.0]     # two backoffs, then the jitter draw (its top)
    await store.close()
    with pytest.raises(ValueError):
        EtcdStore("http://127.0.0.1:1", rewatch_jitter=-1)


def test_l7_snapshot_skips_the_ipcache_copy_without_l7_policy_or_proxy(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The proxy snapshot copied every ipcache entry (O(pods)) on each policy change,
    even with no L7 policy anywhere: 2.4 s at 50,000 pods (bench/scale.py)."""
    from types import SimpleNamespace

    from villi.agent.l7 import L7Proxy

    class Entries:
        def items(self) -> None:
            raise AssertionError("ipcache copied although nothing will be pushed")

    from prometheus_client import CollectorRegistry

    from villi.policy.simulate import PolicySimulator

    resolver = PolicySimulator().resolver
    sources = SimpleNamespace(
        endpoints={}, remote=Entries(),
        policy=SimpleNamespace(resolver=resolver, cidr_identities=lambda: {}))

    async def kernel(*_: object) -> None: ...

    proxy = L7Proxy(tmp_path, None, sources, kernel, lambda _i: None,  # type: ignore[arg-type]
                    CollectorRegistry(), lambda _c, _n: None)
    snap = proxy.snapshot()
    assert snap["ipcache"] == {} and snap["l7"] is False and snap["endpoints"] == []
