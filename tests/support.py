"""Helpers shared by the tests: a worker running in this event loop, and polling waits."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from forwarder.settings import Settings
from forwarder.standin import StandIn
from forwarder.worker import Worker, serve


def fast_settings(redis_url: str, api: StandIn, **overrides: Any) -> Settings:
    """Settings for a test worker: the stand-in API, short delays and heartbeats."""
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "api_base_url": api.base_url,
        "retry_delays": (0.2, 0.4, 0.6),
        "request_timeout": 2.0,
        "heartbeat_interval": 0.2,
        "worker_timeout": 1.0,
        "shutdown_grace": 2.0,
        "concurrency": 16,
    }
    values.update(overrides)
    return Settings(**values)


@contextlib.asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[Worker]:
    """A worker in this event loop; stopped (and awaited) when the block ends."""
    ready: asyncio.Future[Worker] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(settings, on_ready=ready.set_result))
    waiters: list[asyncio.Future[Any]] = [ready, task]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # serve() failed before the worker existed: raise its error
    worker = ready.result()
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], within: float, what: str = "condition"
) -> None:
    """Poll ``predicate`` until it holds; fail the test after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)
