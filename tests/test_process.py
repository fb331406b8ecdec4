"""The worker as a real process: SIGKILL loses nothing, SIGTERM exits 0 and cleans up."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from forwarder.producer import Producer, make_update
from forwarder.queue import Keys
from forwarder.standin import StandIn
from tests.support import fast_settings, running_worker, wait_until

KEYS = Keys("forwarder")
PII = "sarah.west@example.com"
BODY: dict[str, Any] = {
    "pageId": "4743822558",
    "engagementAttributes": [
        {"type": "personal", "personal": {"firstname": "Sarah", "contacts": [{"email": PII}]}}
    ],
}


def worker_process(redis_url: str, api: StandIn, log: Path, **env: str) -> subprocess.Popen[bytes]:
    """``forwarder worker`` in a child process, logging JSON to ``log``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}
    clean.update(
        FORWARDER_REDIS_URL=redis_url,
        FORWARDER_API_BASE_URL=api.base_url,
        FORWARDER_RETRY_DELAYS="0.2,0.4",
        FORWARDER_HEARTBEAT_INTERVAL="0.2",
        FORWARDER_WORKER_TIMEOUT="1",
        FORWARDER_METRICS_PORT="0",
        **env,
    )
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "forwarder", "worker"], env=clean, stderr=out, stdout=out
        )


async def enqueue(redis_url: str, visitors: list[str]) -> None:
    producer = Producer.from_url(redis_url)
    try:
        await producer.enqueue_many(make_update("123", v, "s", BODY) for v in visitors)
    finally:
        await producer.aclose()


async def wait_exit(proc: subprocess.Popen[bytes], within: float) -> int:
    for _ in range(int(within / 0.05)):
        if proc.poll() is not None:
            return proc.returncode
        await asyncio.sleep(0.05)
    proc.kill()
    raise AssertionError(f"worker did not exit within {within}s")


async def in_flight(redis: Redis) -> int:
    return sum([int(await redis.hlen(k)) for k in await redis.keys(KEYS.inflight_prefix + "*")])


@pytest.mark.parametrize("prefix", ["slow400", "ok"])
async def test_sigkill_with_messages_in_flight_loses_none(
    redis_url: str, redis_client: Redis, standin: StandIn, tmp_path: Path, prefix: str
) -> None:
    visitors = [f"{prefix}-{i}" for i in range(300)]
    await enqueue(redis_url, visitors)
    victim = worker_process(redis_url, standin, tmp_path / "victim.log", FORWARDER_CONCURRENCY="32")
    try:
        await standin.wait_for(lambda api: len(api.delivered) >= 20, 10)
        await asyncio.sleep(random.uniform(0, 0.2))
    finally:
        victim.kill()
        victim.wait()
    assert await in_flight(redis_client) > 0 or await redis_client.llen(KEYS.queue) > 0
    async with running_worker(fast_settings(redis_url, standin)):
        await standin.wait_for(
            lambda api: {r.visitor_id for r in api.delivered} >= set(visitors), 20
        )
    assert await redis_client.llen(KEYS.dead) == 0
    assert await redis_client.llen(KEYS.queue) == 0
    assert await in_flight(redis_client) == 0
    assert await redis_client.zcard(KEYS.workers) == 0


async def test_sigterm_finishes_in_flight_returns_the_rest_and_exits_0(
    redis_url: str, redis_client: Redis, standin: StandIn, tmp_path: Path
) -> None:
    await enqueue(
        redis_url, [f"slow200-{i}" for i in range(4)] + [f"slow5000-{i}" for i in range(4)]
    )
    log = tmp_path / "worker.log"
    proc = worker_process(redis_url, standin, log, FORWARDER_SHUTDOWN_GRACE="1")
    try:
        await wait_until(lambda: _in_flight_is(redis_client, 8), 10, "8 in flight")
        await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc, 10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sorted(r.visitor_id for r in standin.delivered) == [f"slow200-{i}" for i in range(4)]
    returned = [orjson.loads(r)["visitorId"] for r in await redis_client.lrange(KEYS.queue, 0, -1)]
    assert sorted(returned) == [f"slow5000-{i}" for i in range(4)]
    assert await in_flight(redis_client) == 0
    assert await redis_client.keys(KEYS.staging_prefix + "*") == []
    assert await redis_client.zcard(KEYS.workers) == 0
    events = [orjson.loads(line)["event"] for line in log.read_bytes().splitlines()]
    assert events[0] == "worker_started"
    assert events.count("delivered") == 4
    assert events[-1] == "worker_stopped"


async def test_logs_carry_no_payload(
    redis_url: str, redis_client: Redis, standin: StandIn, tmp_path: Path
) -> None:
    await enqueue(redis_url, ["ok-1", "bad-1", "flaky1-1", "down-1"])
    await redis_client.lpush(KEYS.queue, b'{"oops": "' + PII.encode() + b'"}')
    log = tmp_path / "worker.log"
    proc = worker_process(redis_url, standin, log)
    try:
        await wait_until(lambda: _dead_is(redis_client, 3), 10, "3 dead letters")
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc, 10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "dead_lettered" in text
    assert "delivered" in text
    assert PII not in text
    assert "Sarah" not in text


async def _in_flight_is(redis: Redis, n: int) -> bool:
    return await in_flight(redis) == n


async def _dead_is(redis: Redis, n: int) -> bool:
    return int(await redis.llen(KEYS.dead)) == n
