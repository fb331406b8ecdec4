"""Helpers shared by the tests: fast settings, worker processes, enqueueing, polling waits."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from aiohttp import web
from redis import Redis as SyncRedis

from forwarder.producer import Producer, make_update
from forwarder.settings import Settings
from forwarder.standin import StandIn


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
        # Tests run many workers at once: no listener unless a test asks for one.
        "metrics_port": 0,
    }
    values.update(overrides)
    return Settings(**values)


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], within: float, what: str = "condition"
) -> None:
    """Poll ``predicate`` until it holds; fail the test after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


def worker_process(
    redis_url: str, api: StandIn, log: Path, *args: str, **env: str
) -> subprocess.Popen[bytes]:
    """``forwarder worker [args]`` in a child process, logging JSON to ``log``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}
    clean.update(
        FORWARDER_REDIS_URL=redis_url,
        FORWARDER_API_BASE_URL=api.base_url,
        FORWARDER_RETRY_DELAYS="0.2,0.4",
        FORWARDER_HEARTBEAT_INTERVAL="0.2",
        FORWARDER_WORKER_TIMEOUT="1",
        FORWARDER_METRICS_PORT="0",
    )
    clean.update(env)
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "forwarder", "worker", *args], env=clean, stderr=out, stdout=out
        )


async def enqueue_visitors(
    redis_url: str, visitors: Iterable[str], body: dict[str, Any], account: str = "123"
) -> None:
    """One update per visitor id (session ``s``), enqueued as one batch."""
    producer = Producer.from_url(redis_url)
    try:
        await producer.enqueue_many(make_update(account, v, "s", body) for v in visitors)
    finally:
        await producer.aclose()


# Past this many ms, Redis answers BUSY to every other client while a script runs.
BUSY_AFTER = ["--busy-reply-threshold", "100"]


def run_busy_script(url: str, seconds: int = 2) -> None:
    """Run a Lua script that keeps Redis busy for ``seconds`` (blocking: use a thread)."""
    script = f"local t = redis.call('TIME')[1] while redis.call('TIME')[1] - t < {seconds} do end"
    client = SyncRedis.from_url(url)
    try:
        client.eval(script, 0)
    finally:
        client.close()


def forwarder(
    *args: str, stdin: bytes = b"", cwd: Path | None = None, **env: str
) -> subprocess.CompletedProcess[bytes]:
    """``python -m forwarder ARGS`` run to its end, with only the FORWARDER_ settings given."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}
    return subprocess.run(
        [sys.executable, "-m", "forwarder", *args],
        input=stdin,
        capture_output=True,
        env={**clean, **env},
        cwd=cwd,
        timeout=120,
        check=False,
    )


@contextlib.asynccontextmanager
async def serving(
    app: web.Application, *, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[str]:
    """``app`` served on a free loopback port for the block (over TLS with
    ``ssl_context``); its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
    scheme = "https" if ssl_context else "http"
    try:
        yield f"{scheme}://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
