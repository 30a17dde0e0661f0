"""Exponential backoff with full jitter, for every retry in the kvstore.

Why full jitter: when etcd restarts, every agent of the cluster notices at the same
moment. With a plain exponential backoff they all retry in lock-step and the recovering
server sees synchronised waves of reconnects and re-lists (Cilium's clustermesh
thundering herd, cilium#22037). Drawing each sleep uniformly from
``[0, min(cap, base * 2**attempt)]`` ("full jitter", AWS architecture blog, 2015)
spreads the retries over the whole window and has the lowest total work of the common
jitter variants.

There is deliberately no fixed sleep anywhere in ``villi.kvstore``: a retry either goes
through :class:`Backoff` or it does not sleep. The random source and the sleep function
are injectable so tests can check the bounds without waiting.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

T = TypeVar("T")

SleepFn = Callable[[float], Awaitable[None]]


class UniformSource(Protocol):
    """Anything with ``random.Random.uniform``'s signature (tests pass a stub)."""

    def uniform(self, a: float, b: float) -> float: ...


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """How long and how often to retry.

    ``base``: upper bound of the first sleep (seconds); it doubles per attempt up to
    ``cap``. ``max_attempts``: how many tries in total (the first one included) before
    giving up; ``None`` retries forever (long-running watches: the caller cancels).
    Defaults follow Cilium's reconnect backoff (50 ms minimum), with a smaller cap
    because a request that gives up after a few seconds is more useful to a CLI user
    than one that hangs for a minute.
    """

    base: float = 0.05
    cap: float = 2.0
    max_attempts: int | None = 5

    def __post_init__(self) -> None:
        if self.base <= 0:
            raise ValueError(f"backoff base must be > 0, got {self.base}")
        if self.cap < self.base:
            raise ValueError(f"backoff cap ({self.cap}) must be >= base ({self.base})")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"backoff max_attempts must be >= 1 or None, got {self.max_attempts}")

    def ceiling(self, attempt: int) -> float:
        """Upper bound of the sleep after failed attempt number ``attempt`` (0-based)."""
        if attempt >= 64:  # far past any cap; also keeps ldexp away from overflow
            return self.cap
        return min(self.cap, math.ldexp(self.base, attempt))  # base * 2**attempt

    def delay(self, attempt: int, rng: UniformSource) -> float:
        """One full-jitter sleep: uniform in ``[0, ceiling(attempt)]``."""
        return rng.uniform(0.0, self.ceiling(attempt))

    def exhausted(self, attempts_made: int) -> bool:
        """True when ``attempts_made`` tries used up the bound."""
        return self.max_attempts is not None and attempts_made >= self.max_attempts

    def worst_case_sleep(self) -> float:
        """Total sleep of a bounded retry loop in the worst case (for docs and tests)."""
        if self.max_attempts is None:
            return float("inf")
        return sum(self.ceiling(i) for i in range(self.max_attempts - 1))


class Backoff:
    """The retry state of one loop: counts failed attempts and sleeps between them.

    Loops that run for a long time (a watch, a list-then-watch) call :meth:`reset`
    after each success, so a flap an hour later starts again from the short sleeps.
    """

    def __init__(
        self,
        policy: BackoffPolicy,
        *,
        rng: UniformSource | None = None,
        sleep: SleepFn | None = None,
    ) -> None:
        self.policy = policy
        self._rng: UniformSource = rng if rng is not None else random.Random()
        self._sleep: SleepFn = sleep if sleep is not None else asyncio.sleep
        self.failures = 0

    def reset(self) -> None:
        self.failures = 0

    @property
    def exhausted(self) -> bool:
        return self.policy.exhausted(self.failures)

    async def failed(self) -> bool:
        """Record a failed attempt; sleep before the next one and return True, or
        return False at once when the attempt bound is used up."""
        attempt = self.failures
        self.failures += 1
        if self.policy.exhausted(self.failures):
            return False
        await self._sleep(self.policy.delay(attempt, self._rng))
        return True


async def retry(
    fn: Callable[[], Awaitable[T]],
    policy: BackoffPolicy,
    *,
    retry_on: type[BaseException] | tuple[type[BaseException], ...] = Exception,
    rng: UniformSource | None = None,
    sleep: SleepFn | None = None,
    on_retry: Callable[[int, BaseException], None] | None = None,
) -> T:
    """Call ``fn`` until it succeeds, sleeping with full jitter between tries.

    Only exceptions matching ``retry_on`` are retried; when the policy's attempt bound
    is used up the last one is re-raised unchanged (callers wrap it in an error that
    says what was unreachable). ``on_retry(failures, exc)`` is called before each sleep,
    for logging.
    """
    backoff = Backoff(policy, rng=rng, sleep=sleep)
    while True:
        try:
            return await fn()
        except retry_on as exc:
            if on_retry is not None and not policy.exhausted(backoff.failures + 1):
                on_retry(backoff.failures + 1, exc)
            if not await backoff.failed():
                raise
