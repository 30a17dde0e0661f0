"""Run one long-lived coroutine until SIGTERM or SIGINT: every villi daemon's main.

A signal cancels the coroutine, so its ``finally`` blocks and async context managers
run (leases kept or revoked on purpose, sockets closed) and the process exits 0.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable


def run_until_signal(make: Callable[[], Awaitable[None]]) -> int:
    async def runner() -> None:
        task = asyncio.ensure_future(make())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            pass

    asyncio.run(runner())
    return 0
