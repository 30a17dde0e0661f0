"""The operator's client of the cloud provider API (``villi cloud-sim`` in the lab).

Only the operator talks to the cloud (DESIGN.md), so this is the one place that has to
be polite to its rate limit. Two mechanisms, as in Cilium's operator:

* a client-side token bucket (``rate`` calls per second, ``burst``) that *waits* before
  a call, so a burst of allocations is spread out instead of being refused;
* full-jitter exponential backoff when the provider still answers
  ``RequestLimitExceeded`` (several operators, other tenants): the call is retried up to
  the policy's bound, then :class:`~villi.errors.CloudAPIError` is raised.

Counters (calls per action, throttles seen) are kept for the operator's status and the
benchmark.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp

from villi.errors import CloudAPIError
from villi.kvstore.backoff import Backoff, BackoffPolicy, SleepFn, UniformSource

THROTTLE_CODES = frozenset({"RequestLimitExceeded", "Throttling"})
#: Retry throttled calls: 50 ms doubling to 5 s, ten tries.
THROTTLE_BACKOFF = BackoffPolicy(base=0.05, cap=5.0, max_attempts=10)


class RateLimiter:
    """A waiting token bucket: :meth:`acquire` returns when a call may be made."""

    def __init__(self, rate: float, burst: float = 0.0, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: SleepFn = asyncio.sleep) -> None:
        if rate < 0 or burst < 0:
            raise ValueError("rate limit and burst must be >= 0")
        self.rate = rate
        self.capacity = max(burst or rate, 1.0)
        self.tokens = self.capacity
        self.clock = clock
        self.sleep = sleep
        self.stamp = clock()
        self.waited_s = 0.0
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        if self.rate <= 0:
            return
        async with self._lock:  # FIFO: callers are served in the order they came
            while True:
                now = self.clock()
                self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.tokens >= 1.0:
                    self.tokens -= 1.0
                    return
                wait = (1.0 - self.tokens) / self.rate
                self.waited_s += wait
                await self.sleep(wait)


class CloudClient:
    """JSON-over-HTTP calls to ``POST <url>/api/<Action>``; one :class:`aiohttp.ClientSession`.

    ``rate``/``burst``: the client-side limiter (0 = none). ``backoff``: the retry policy
    on throttling. Use as ``async with CloudClient(url) as cloud``.
    """

    def __init__(self, url: str, *, rate: float = 0.0, burst: float = 0.0,
                 backoff: BackoffPolicy = THROTTLE_BACKOFF, timeout_s: float = 30.0,
                 rng: UniformSource | None = None, sleep: SleepFn | None = None) -> None:
        self.url = url.rstrip("/")
        self.limiter = RateLimiter(rate, burst)
        self.backoff = backoff
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._rng: UniformSource = rng or random.Random()
        self._sleep: SleepFn = sleep or asyncio.sleep
        self._session: aiohttp.ClientSession | None = None
        self.calls: Counter[str] = Counter()
        self.throttled = 0

    async def __aenter__(self) -> CloudClient:
        self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def call(self, action: str, **params: Any) -> dict[str, Any]:
        """One API call, rate-limited, retried with full jitter while throttled."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        backoff = Backoff(self.backoff, rng=self._rng, sleep=self._sleep)
        while True:
            await self.limiter.acquire()
            self.calls[action] += 1
            try:
                async with self._session.post(f"{self.url}/api/{action}", json=params) as resp:
                    doc = await resp.json(content_type=None)
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                raise CloudAPIError(action, "Unreachable",
                                    f"cloud API at {self.url}: {exc}") from exc
            if status == 200 and isinstance(doc, dict):
                return doc
            err = doc.get("Error", {}) if isinstance(doc, dict) else {}
            code = str(err.get("Code", f"HTTP{status}"))
            message = str(err.get("Message", doc))
            if code in THROTTLE_CODES:
                self.throttled += 1
                if await backoff.failed():
                    continue
            raise CloudAPIError(action, code, message)

    async def describe_all(self, action: str, key: str, page_size: int = 1000,
                           **params: Any) -> list[dict[str, Any]]:
        """Every item of a paginated Describe (follows ``NextToken``)."""
        items: list[dict[str, Any]] = []
        token = ""
        while True:
            doc = await self.call(action, MaxResults=page_size, NextToken=token, **params)
            items.extend(doc.get(key) or [])
            token = doc.get("NextToken") or ""
            if not token:
                return items
