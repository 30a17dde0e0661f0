"""Rate-limited publishing of IPAM usage to the node entry.

Every CNI ADD and DEL changes the node's usage, and a burst of pod starts would turn
into a burst of kvstore writes that every agent and the operator then watch. Cilium
bounds this with a trigger whose minimum interval is ``ipam-cilium-node-update-rate``
(15 s); villi's agent flag is ``--ipam-node-update-rate`` with the same default.

Semantics of :class:`RateLimitedReporter`: callers :meth:`~RateLimitedReporter.notify`
on every change and never wait. The first change after a quiet period is published at
once (nobody waits 15 s to see a new node's capacity); changes within ``min_interval_s``
of the last publish coalesce into one publish at the end of that window. ``publish``
takes no argument and reads the current state itself, so whatever it writes is the
latest state, never an intermediate one. A failed publish is logged and retried one
interval later (the limit protects a struggling store too).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

PublishFn = Callable[[], Awaitable[None]]
ClockFn = Callable[[], float]
SleepFn = Callable[[float], Awaitable[None]]

#: Default of the agent's ``--ipam-node-update-rate`` (seconds), as Cilium's.
DEFAULT_NODE_UPDATE_RATE_S = 15.0


class RateLimitedReporter:
    """Publishes at most once per ``min_interval_s``, always the latest state.

    ``clock`` (monotonic seconds) and ``sleep`` are injectable so tests run without
    real waiting. Use ``async with`` or call :meth:`aclose` to stop the pending
    publish; :meth:`flush` publishes a pending change now (e.g. before shutdown).
    """

    def __init__(
        self,
        *,
        publish: PublishFn,
        min_interval_s: float = DEFAULT_NODE_UPDATE_RATE_S,
        clock: ClockFn = time.monotonic,
        sleep: SleepFn = asyncio.sleep,
        name: str = "ipam usage",
    ) -> None:
        if min_interval_s < 0:
            raise ValueError(f"min_interval_s must be >= 0, got {min_interval_s}")
        self.min_interval_s = min_interval_s
        self._publish = publish
        self._clock = clock
        self._sleep = sleep
        self.name = name
        self._dirty = False
        self._task: asyncio.Task[None] | None = None
        #: monotonic time the last publish attempt started (None: never).
        self.last_attempt: float | None = None
        self.publishes = 0
        self.failures = 0

    @property
    def pending(self) -> bool:
        """True while a change has not been published yet."""
        return self._dirty

    def notify(self) -> None:
        """Record that the state changed; it will be published within the interval.

        Must be called from the event loop thread (it may start a task)."""
        self._dirty = True
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"villi-reporter {self.name}")

    async def flush(self) -> None:
        """Publish a pending change now, ignoring the rate limit."""
        await self._cancel()
        if self._dirty:
            await self._attempt()
            if self._dirty:  # the publish failed: keep retrying at the normal pace
                self.notify()

    async def aclose(self) -> None:
        """Stop; a change not yet published is dropped."""
        await self._cancel()

    async def __aenter__(self) -> RateLimitedReporter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _cancel(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])  # (not "await task": our own cancel must propagate)

    async def _run(self) -> None:
        while self._dirty:
            if self.last_attempt is not None:
                wait = self.last_attempt + self.min_interval_s - self._clock()
                if wait > 0:
                    await self._sleep(wait)
            await self._attempt()

    async def _attempt(self) -> None:
        self._dirty = False
        self.last_attempt = self._clock()
        try:
            await self._publish()
        except asyncio.CancelledError:
            self._dirty = True
            raise
        except Exception as exc:
            self._dirty = True
            self.failures += 1
            log.warning("publishing %s failed (retrying in %.1f s): %s",
                        self.name, self.min_interval_s, exc)
        else:
            self.publishes += 1
