"""Shared fixtures: private Redis servers and the stand-in engagement API.

Every test talks to processes and sockets of its own on loopback; nothing
here touches a Redis server the suite did not start.

Async fixtures are function-scoped and run on the test's own event loop
(``asyncio_default_fixture_loop_scope = "function"`` in pyproject.toml); the
session-scoped Redis fixture is synchronous, so it needs no loop at all.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio

from forwarder.embedded import RedisServer
from forwarder.standin import StandIn

# A CI runner may start the suite with SIGINT ignored (a background job of a
# non-interactive shell). Every child would inherit that and Python would leave it
# ignored, so a test of what Ctrl-C does would see nothing happen. A handled signal goes
# back to its default action in a child at exec: the children get Ctrl-C as in a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A temporary directory that lives as long as the test session."""
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="session")
def redis_server(session_tmp: Path) -> Iterator[RedisServer]:
    """One private Redis server on a free port, shared by the whole session."""
    with RedisServer(session_tmp / "redis") as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session server's URL, emptied (FLUSHALL) for this test."""
    if not redis_server.is_running():
        # A test that killed the shared server must not break the ones after it.
        redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh Redis server for this test only, appendonly on (safe to kill/restart)."""
    with RedisServer(tmp_path / "own-redis", appendonly=True) as server:
        yield server


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """An asyncio client (bytes replies) to the emptied session server."""
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=False)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def standin() -> AsyncIterator[StandIn]:
    """A started stand-in engagement API on a free loopback port."""
    async with StandIn() as api:
        yield api
