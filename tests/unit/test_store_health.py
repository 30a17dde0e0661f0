"""StoreHealth: the agent's view of kvstore reachability (``villi status``)."""

from __future__ import annotations

import asyncio

from villi.agent.sync import StoreHealth
from villi.errors import StoreUnavailable
from villi.kvstore import EmbeddedStore


class Flaky(EmbeddedStore):
    def __init__(self) -> None:
        super().__init__(None)
        self.mode = "ok"

    async def revision(self) -> int:
        if self.mode == "down":
            raise StoreUnavailable("etcd at http://x:2379 is unreachable: connection refused")
        if self.mode == "frozen":
            await asyncio.sleep(3600)
        return await super().revision()


async def test_reports_unreachable_while_it_is_and_ok_after() -> None:
    async with Flaky() as store:
        t = [100.0]
        health = StoreHealth(store, timeout=0.05, clock=lambda: t[0])
        assert await health.probe() and health.status == "ok"
        store.mode = "down"
        assert not await health.probe()
        t[0] += 7
        assert health.status.startswith("unreachable: etcd at http://x:2379")
        assert health.status.endswith("(for 7 s)")
        store.mode = "frozen"   # process alive, not answering: bounded by the timeout
        assert not await health.probe()
        assert health.status.startswith("unreachable: no answer within 0.05 s")
        store.mode = "ok"
        assert await health.probe() and health.status == "ok"


async def test_failing_probes_back_off_with_full_jitter_under_the_cap() -> None:
    sleeps: list[float] = []

    async def sleep(s: float) -> None:
        sleeps.append(s)
        if len(sleeps) >= 12:
            raise asyncio.CancelledError

    class Top:
        def uniform(self, a: float, b: float) -> float:
            return b   # the ceiling of each draw

    async with Flaky() as store:
        store.mode = "down"
        health = StoreHealth(store, cap=1.0, rng=Top(), sleep=sleep)
        try:
            await health.run()
        except asyncio.CancelledError:
            pass
    assert sleeps[:4] == [0.2, 0.4, 0.8, 1.0] and max(sleeps) == 1.0
