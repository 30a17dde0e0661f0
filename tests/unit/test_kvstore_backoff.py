"""Full-jitter backoff: bounds, cap, attempt bound, and no fixed sleeps in the package."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import villi.kvstore
from villi.kvstore.backoff import Backoff, BackoffPolicy, retry


class Upper:
    """An rng stub that always draws the top of the window (and records the windows)."""

    def __init__(self) -> None:
        self.windows: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.windows.append((a, b))
        return b


class Recorder:
    def __init__(self) -> None:
        self.sleeps: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.sleeps.append(delay)


def test_ceiling_doubles_then_caps() -> None:
    policy = BackoffPolicy(base=0.1, cap=1.0, max_attempts=None)
    assert [policy.ceiling(i) for i in range(6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert policy.ceiling(10_000) == 1.0


@given(
    base=st.floats(0.001, 1.0),
    factor=st.floats(1.0, 100.0),
    attempt=st.integers(0, 200),
    seed=st.integers(0, 2**32),
)
def test_full_jitter_stays_in_window(base: float, factor: float, attempt: int, seed: int) -> None:
    policy = BackoffPolicy(base=base, cap=base * factor)
    delay = policy.delay(attempt, random.Random(seed))
    assert 0.0 <= delay <= min(policy.cap, base * 2**min(attempt, 64)) + 1e-12


def test_full_jitter_uses_whole_window() -> None:
    """Full jitter, not "equal jitter": draws reach near 0 and near the ceiling."""
    policy = BackoffPolicy(base=1.0, cap=1.0)
    rng = random.Random(7)
    draws = [policy.delay(0, rng) for _ in range(2000)]
    assert min(draws) < 0.05 and max(draws) > 0.95
    assert len(set(draws)) == len(draws)  # never a fixed value


async def test_retry_bounded_attempts_and_windows() -> None:
    calls = 0

    async def always_fails() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError(f"try {calls}")

    rng, sleep = Upper(), Recorder()
    policy = BackoffPolicy(base=0.05, cap=0.3, max_attempts=5)
    with pytest.raises(ConnectionError, match="try 5"):  # the last error, unchanged
        await retry(always_fails, policy, rng=rng, sleep=sleep)
    assert calls == 5
    assert rng.windows == [(0.0, 0.05), (0.0, 0.1), (0.0, 0.2), (0.0, 0.3)]
    assert sleep.sleeps == pytest.approx([0.05, 0.1, 0.2, 0.3])
    assert policy.worst_case_sleep() == pytest.approx(0.65)


async def test_retry_succeeds_after_failures_and_only_retries_given_errors() -> None:
    outcomes: list[Exception | str] = [OSError("a"), OSError("b"), "ok"]

    async def flaky() -> str:
        item = outcomes.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    seen: list[int] = []
    sleep = Recorder()
    assert await retry(flaky, BackoffPolicy(), retry_on=OSError, sleep=sleep,
                       on_retry=lambda n, exc: seen.append(n)) == "ok"
    assert len(sleep.sleeps) == 2 and seen == [1, 2]

    async def bug() -> None:
        raise KeyError("not a transient error")

    with pytest.raises(KeyError):
        await retry(bug, BackoffPolicy(), retry_on=OSError, sleep=sleep)
    assert len(sleep.sleeps) == 2  # no sleep for an error that is not retried


async def test_unbounded_policy_and_reset() -> None:
    sleep = Recorder()
    policy = BackoffPolicy(base=0.01, cap=1.0, max_attempts=None)
    backoff = Backoff(policy, rng=Upper(), sleep=sleep)
    for _ in range(50):
        assert await backoff.failed() is True
    assert not backoff.exhausted and sleep.sleeps[-1] == 1.0
    backoff.reset()
    await backoff.failed()
    assert sleep.sleeps[-1] == 0.01  # after a success the sleeps start short again


async def test_bounded_backoff_reports_exhaustion_without_sleeping() -> None:
    sleep = Recorder()
    backoff = Backoff(BackoffPolicy(max_attempts=2), sleep=sleep)
    assert await backoff.failed() is True
    assert await backoff.failed() is False
    assert backoff.exhausted and len(sleep.sleeps) == 1


@pytest.mark.parametrize(
    "kwargs", [{"base": 0}, {"base": 1.0, "cap": 0.5}, {"max_attempts": 0}])
def test_policy_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        BackoffPolicy(**kwargs)


def test_no_fixed_sleep_in_the_package() -> None:
    """Retries go through Backoff; a literal ``sleep(0.5)`` would bring back lock-step
    reconnect storms."""
    package = Path(villi.kvstore.__file__).parent
    literal_sleep = re.compile(r"sleep\(\s*[0-9][0-9_.]*\s*\)")
    offenders = [
        f"{path.name}:{n}: {line.strip()}"
        for path in sorted(package.glob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if literal_sleep.search(line)
    ]
    assert offenders == []
