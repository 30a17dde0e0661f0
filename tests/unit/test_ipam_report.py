"""RateLimitedReporter: at most one publish per interval, always the latest state.

Time is a fake clock: ``sleep`` parks the reporter until the test advances the clock,
so no test waits for real.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging

import pytest

from villi.errors import StoreUnavailable
from villi.ipam.report import RateLimitedReporter


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + delay, next(self._seq), fut))
        await fut

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking sleepers in deadline order."""
        target = self.now + seconds
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, fut = heapq.heappop(self._sleepers)
            self.now = deadline
            if not fut.done():
                fut.set_result(None)
            await settle()
        self.now = target
        await settle()


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


class Node:
    """The state being reported and a log of what was published when."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.state = 0
        self.published: list[tuple[float, int]] = []

    async def publish(self) -> None:
        self.published.append((self.clock(), self.state))

    def change(self, reporter: RateLimitedReporter, state: int) -> None:
        self.state = state
        reporter.notify()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(node: Node, clock: FakeClock, interval: float = 15.0) -> RateLimitedReporter:
    return RateLimitedReporter(publish=node.publish, min_interval_s=interval,
                               clock=clock, sleep=clock.sleep)


async def test_first_change_publishes_promptly(clock: FakeClock) -> None:
    node = Node(clock)
    async with make(node, clock) as reporter:
        node.change(reporter, 1)
        await settle()
        assert node.published == [(0.0, 1)]
        assert not reporter.pending and reporter.publishes == 1


async def test_changes_within_the_window_coalesce_into_the_latest_state(clock) -> None:
    node = Node(clock)
    async with make(node, clock) as reporter:
        node.change(reporter, 1)
        await settle()
        await clock.advance(1)
        node.change(reporter, 2)
        await clock.advance(1)
        node.change(reporter, 3)
        await clock.advance(12.9)
        assert node.published == [(0.0, 1)] and reporter.pending
        await clock.advance(0.1)
        assert node.published == [(0.0, 1), (15.0, 3)]
        await clock.advance(100)
        assert len(node.published) == 2  # nothing changed since: nothing published


async def test_a_change_after_a_quiet_period_publishes_at_once(clock) -> None:
    node = Node(clock)
    async with make(node, clock) as reporter:
        node.change(reporter, 1)
        await settle()
        await clock.advance(40)
        node.change(reporter, 2)
        await settle()
        assert node.published == [(0.0, 1), (40.0, 2)]


async def test_steady_changes_publish_once_per_interval(clock) -> None:
    node = Node(clock)
    async with make(node, clock) as reporter:
        for second in range(61):
            node.change(reporter, second)
            await settle()
            await clock.advance(1)
        times = [t for t, _ in node.published]
        assert times == [0.0, 15.0, 30.0, 45.0, 60.0]
        # The window closing at t=60 fired just before change 60: that one follows.
        assert node.published[-1] == (60.0, 59) and reporter.pending
        await clock.advance(15)
        assert node.published[-1] == (75.0, 60) and not reporter.pending


async def test_change_during_a_slow_publish_is_published_next_window(clock) -> None:
    node = Node(clock)
    gate = asyncio.Event()

    async def slow_publish() -> None:
        state = node.state
        await gate.wait()
        node.published.append((clock(), state))

    async with RateLimitedReporter(publish=slow_publish, min_interval_s=15.0,
                                   clock=clock, sleep=clock.sleep) as reporter:
        node.change(reporter, 1)
        await settle()
        node.change(reporter, 2)  # while the first publish is in flight
        await clock.advance(5)
        gate.set()
        await settle()
        assert node.published == [(5.0, 1)]
        await clock.advance(10)
        assert node.published == [(5.0, 1), (15.0, 2)]


async def test_failed_publish_is_retried_one_interval_later(clock, caplog) -> None:
    node = Node(clock)
    fail = [True]

    async def flaky() -> None:
        if fail.pop() if fail else False:
            raise StoreUnavailable("etcd down")
        await node.publish()

    with caplog.at_level(logging.WARNING, logger="villi.ipam.report"):
        async with RateLimitedReporter(publish=flaky, min_interval_s=15.0,
                                       clock=clock, sleep=clock.sleep) as reporter:
            node.change(reporter, 1)
            await settle()
            assert reporter.failures == 1 and reporter.pending and node.published == []
            await clock.advance(15)
            assert node.published == [(15.0, 1)] and not reporter.pending
    assert "etcd down" in caplog.text


async def test_flush_publishes_now_and_aclose_drops(clock) -> None:
    node = Node(clock)
    reporter = make(node, clock)
    node.change(reporter, 1)
    await settle()
    node.change(reporter, 2)
    await clock.advance(1)
    await reporter.flush()
    assert node.published == [(0.0, 1), (1.0, 2)]
    node.change(reporter, 3)
    await reporter.aclose()
    await clock.advance(100)
    assert node.published[-1] == (1.0, 2) and reporter.pending


async def test_zero_interval_publishes_every_change(clock) -> None:
    node = Node(clock)
    async with make(node, clock, interval=0) as reporter:
        for state in range(3):
            node.change(reporter, state)
            await settle()
    assert [s for _, s in node.published] == [0, 1, 2]


def test_negative_interval_refused() -> None:
    async def publish() -> None: ...
    with pytest.raises(ValueError):
        RateLimitedReporter(publish=publish, min_interval_s=-1)
