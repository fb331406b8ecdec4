"""The worker as a real process: SIGKILL loses nothing, SIGTERM exits 0 and cleans up."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from forwarder.embedded import free_port
from forwarder.queue import Keys
from forwarder.standin import StandIn
from forwarder.worker import running
from tests.support import (
    enqueue_visitors,
    fast_settings,
    wait_until,
    worker_process,
)

KEYS = Keys("forwarder")
PII = "sarah.west@example.com"
BODY: dict[str, Any] = {
    "pageId": "4743822558",
    "engagementAttributes": [
        {"type": "personal", "personal": {"firstname": "Sarah", "contacts": [{"email": PII}]}}
    ],
}


async def enqueue(redis_url: str, visitors: list[str]) -> None:
    await enqueue_visitors(redis_url, visitors, BODY)


async def wait_exit(proc: subprocess.Popen[bytes], within: float) -> int:
    for _ in range(int(within / 0.05)):
        if proc.poll() is not None:
            return proc.returncode
        await asyncio.sleep(0.05)
    proc.kill()
    raise AssertionError(f"worker did not exit within {within}s")


async def in_flight(redis: Redis) -> int:
    return sum([int(await redis.hlen(k)) for k in await redis.keys(KEYS.inflight_prefix + "*")])


@pytest.mark.parametrize(("prefix", "count"), [("slow400", 300), ("ok", 5000)])
async def test_sigkill_with_messages_in_flight_loses_none(
    redis_url: str, redis_client: Redis, standin: StandIn, tmp_path: Path, prefix: str, count: int
) -> None:
    visitors = [f"{prefix}-{i}" for i in range(count)]
    await enqueue(redis_url, visitors)
    victim = worker_process(redis_url, standin, tmp_path / "victim.log", FORWARDER_CONCURRENCY="32")
    try:
        await standin.wait_for(lambda api: len(api.delivered) >= 20, 10)
        await asyncio.sleep(random.uniform(0, 0.1))
    finally:
        victim.kill()
        victim.wait()
    assert await in_flight(redis_client) > 0 or await redis_client.llen(KEYS.queue) > 0
    async with running(fast_settings(redis_url, standin)):
        await standin.wait_for(
            lambda api: {r.visitor_id for r in api.delivered} >= set(visitors), 20
        )
        # What the victim had sent but not recorded comes back too (at least once).
        await wait_until(lambda: _drained(redis_client), 10, "an empty queue")
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
    assert await redis_client.zcard(KEYS.workers) == 0
    events = [orjson.loads(line)["event"] for line in log.read_bytes().splitlines()]
    assert events[0] == "worker_started"
    assert events.count("delivered") == 4
    assert events[-1] == "worker_stopped"


async def test_no_output_carries_payload_or_password(
    redis_url: str, redis_client: Redis, standin: StandIn, tmp_path: Path
) -> None:
    """Every outcome with personal data in the payloads: logs, metrics, stats, dlq
    listings and error messages never show it, nor a Redis password."""
    await enqueue(redis_url, ["ok-1", "bad-1", "flaky1-1", "down-1", "slow3000-1"])
    await redis_client.lpush(KEYS.queue, b'{"oops": "' + PII.encode() + b'"}')
    log = tmp_path / "worker.log"
    port = free_port()
    proc = worker_process(
        redis_url, standin, log, FORWARDER_METRICS_PORT=str(port), FORWARDER_REQUEST_TIMEOUT="1"
    )
    try:
        await wait_until(lambda: _dead_is(redis_client, 4), 15, "4 dead letters")
        async with aiohttp.ClientSession() as http:
            metrics = await (await http.get(f"http://127.0.0.1:{port}/metrics")).text()
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc, 10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    outputs = {"worker log": log.read_text(), "metrics": metrics}
    for command in (
        ["stats", "--json"],
        ["dlq", "stats"],
        ["dlq", "list"],
        ["dlq", "list", "--json"],
    ):
        done = await asyncio.to_thread(_forwarder, *command, "--redis-url", redis_url)
        outputs[" ".join(command)] = done.stdout + done.stderr
    secret_url = redis_url.replace("redis://", "redis://:s3cret-pw@")
    refused = await asyncio.to_thread(_forwarder, "stats", "--redis-url", secret_url)
    outputs["auth error"] = refused.stdout + refused.stderr
    assert "delivered" in outputs["worker log"]
    assert "dead_lettered" in outputs["worker log"]
    assert "forwarder_outcomes_total" in metrics
    for where, text in outputs.items():
        for secret in (PII, "Sarah", "s3cret-pw"):
            assert secret not in text, f"{secret!r} in {where}"


def _forwarder(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "forwarder", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def _drained(redis: Redis) -> bool:
    return await redis.llen(KEYS.queue) == 0 and await in_flight(redis) == 0


async def _in_flight_is(redis: Redis, n: int) -> bool:
    return await in_flight(redis) == n


async def _dead_is(redis: Redis, n: int) -> bool:
    return int(await redis.llen(KEYS.dead)) == n


@contextlib.asynccontextmanager
async def _two_workers(
    redis_url: str, redis: Redis, standin: StandIn, log: Path
) -> AsyncIterator[subprocess.Popen[bytes]]:
    """``forwarder worker --processes 2``, once both workers are registered; killed at
    the end if still running."""
    parent = worker_process(redis_url, standin, log, "--processes", "2")
    try:
        await wait_until(lambda: _workers_are(redis, 2), 10, "2 registered workers")
        yield parent
    finally:
        if parent.poll() is None:
            parent.kill()


async def test_processes_runs_several_workers_and_stops_them_together(
    redis_url: str, redis_client: Redis, standin: StandIn, tmp_path: Path
) -> None:
    await enqueue(redis_url, [f"ok-{i}" for i in range(500)])
    log = tmp_path / "workers.log"
    async with _two_workers(redis_url, redis_client, standin, log) as parent:
        await standin.wait_for(lambda api: len(api.delivered) == 500, 20)
        parent.send_signal(signal.SIGTERM)
        assert await wait_exit(parent, 15) == 0
    assert await redis_client.zcard(KEYS.workers) == 0
    assert log.read_text().count("worker_stopped") == 2


async def test_a_parent_killed_outright_takes_its_worker_processes_with_it(
    redis_url: str, redis_client: Redis, standin: StandIn, tmp_path: Path
) -> None:
    log = tmp_path / "workers.log"
    async with _two_workers(redis_url, redis_client, standin, log) as parent:
        parent.kill()
        await wait_exit(parent, 5)
        # Each child got SIGTERM as its parent died and stopped as a worker does (its last
        # line comes just after it leaves the workers' set).
        await wait_until(lambda: _workers_are(redis_client, 0), 15, "the children to stop")
        await wait_until(lambda: _logged(log, "worker_stopped", 2), 5, "2 worker_stopped")


async def test_a_worker_process_killed_outright_stops_the_others_and_the_parent_says_so(
    redis_url: str, redis_client: Redis, standin: StandIn, tmp_path: Path
) -> None:
    log = tmp_path / "workers.log"
    async with _two_workers(redis_url, redis_client, standin, log) as parent:
        [first] = cast(list[bytes], await redis_client.zrange(KEYS.workers, 0, 0))
        os.kill(int(first.rsplit(b":", 2)[1]), signal.SIGKILL)  # as the OOM killer does
        # As a shell reports a death by signal, not 9 (which reads as the worker's own).
        assert await wait_exit(parent, 20) == 128 + signal.SIGKILL
        await wait_until(lambda: _logged(log, "worker_stopped"), 5, "the other to stop")


async def test_processes_stopped_while_their_workers_start_exit_0(
    redis_url: str, standin: StandIn, tmp_path: Path
) -> None:
    log = tmp_path / "workers.log"
    parent = worker_process(redis_url, standin, log, "--processes", "2")
    try:
        # The parent is up (its handlers set); its children are still importing.
        await wait_until(lambda: _logged(log, "workers_started"), 10, "the parent to start")
        parent.send_signal(signal.SIGTERM)
        # A supervisor's normal stop, not a failure (it was exit 15).
        assert await wait_exit(parent, 15) == 0
    finally:
        if parent.poll() is None:
            parent.kill()


async def _logged(log: Path, event: str, times: int = 1) -> bool:
    return (await asyncio.to_thread(log.read_text)).count(event) >= times


async def _workers_are(redis: Redis, n: int) -> bool:
    return int(await redis.zcard(KEYS.workers)) == n


def _catches_sigterm(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
async def test_a_sigterm_during_start_up_stops_the_worker_cleanly(
    redis_url: str, redis_client: Redis, standin: StandIn, tmp_path: Path
) -> None:
    # Its handler came with the worker, a second or so in: before, a SIGTERM killed it
    # (-15), and as PID 1 in a container, where a signal with no handler is dropped, it
    # was ignored: the stop waited out the grace period, then a SIGKILL.
    log = tmp_path / "worker.log"
    proc = worker_process(redis_url, standin, log, FORWARDER_METRICS_PORT=str(free_port()))
    try:
        caught = functools.partial(asyncio.to_thread, _catches_sigterm, proc.pid)
        await wait_until(caught, 10, "SIGTERM handled")
        assert b"metrics_listening" not in log.read_bytes()  # still starting
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc, 15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert b"Traceback" not in log.read_bytes()
    assert await redis_client.zcard(KEYS.workers) == 0  # it took nothing, and left no key


_SIGTERM_DURING_SPAWN = """
import os, signal, sys
from forwarder import processes

spawn = processes._spawn

def spawn_then_sigterm(index, env, port):
    child = spawn(index, env, port)
    if index == 1:  # as if it came while Popen started the second child
        os.kill(os.getpid(), signal.SIGTERM)
    return child

processes._spawn = spawn_then_sigterm
sys.exit(processes.supervise(3, {}, 0))
"""


def test_a_sigterm_while_the_supervisor_starts_a_child_stops_every_child(
    redis_url: str, standin: StandIn
) -> None:
    # The child being started was not yet among those it forwards SIGTERM to: that one
    # went on, and the supervisor waited for it for ever.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}
    env.update(
        FORWARDER_REDIS_URL=redis_url,
        FORWARDER_API_BASE_URL=standin.base_url,
        FORWARDER_METRICS_PORT="0",
    )
    proc = subprocess.Popen([sys.executable, "-c", _SIGTERM_DURING_SPAWN], env=env)
    try:
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            subprocess.run(["pkill", "-TERM", "-P", str(proc.pid)], check=False)
            proc.kill()
