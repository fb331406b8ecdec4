"""``forwarder stats``: every state of the queue, read from a real Redis."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys

import orjson
import pytest
import redis
import redis.asyncio

from forwarder.embedded import RedisServer, free_port
from forwarder.output import human_age
from forwarder.producer import Producer, make_update
from forwarder.queue import Keys, Queue
from forwarder.stats import HELD_COUNT_CAP

KEYS = Keys("forwarder")


def stats(*args: str, **forwarder_env: str) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}
    env.update(forwarder_env)
    return subprocess.run(
        [sys.executable, "-m", "forwarder", "stats", *args],
        capture_output=True,
        env=env,
        timeout=30,
        check=False,
    )


def _seed_every_state(url: str) -> float:
    """3 pending (oldest enqueued 30 s ago), 2 delayed, 4 dead, a live and a silent worker."""
    client = redis.Redis.from_url(url)
    seconds, micros = client.time()
    now = seconds + micros / 1e6
    try:
        client.lpush(
            KEYS.queue, *(orjson.dumps({"id": i, "enqueuedAt": now - 30 + i}) for i in range(3))
        )
        client.zadd(KEYS.delayed, {b"r1": now + 5, b"r2": now + 50})
        client.lpush(KEYS.dead, *(b"{}" for _ in range(4)))
        client.zadd(KEYS.workers, {"live-1": now - 0.5, "silent-1": now - 100})
        client.hset(KEYS.inflight("live-1"), mapping={"1": b"m", "2": b"m"})
        client.hset(KEYS.inflight("silent-1"), "7", b"m")
    finally:
        client.close()
    return now


def test_stats_json_reports_every_state(redis_url: str) -> None:
    _seed_every_state(redis_url)
    result = stats("--json", "--redis-url", redis_url)
    assert result.returncode == 0, result.stderr
    state = orjson.loads(result.stdout)
    assert 29 <= state["oldestPendingAgeSeconds"] <= 35
    assert 3 <= state["nextRetryInSeconds"] <= 5
    workers = {w.pop("id"): w for w in state.pop("workers")}
    assert workers["live-1"]["live"] is True
    assert workers["live-1"]["heartbeatAgeSeconds"] < 5
    assert workers["live-1"]["inflight"] == 2
    assert (workers["silent-1"]["live"], workers["silent-1"]["inflight"]) == (False, 1)
    assert {k: state[k] for k in ("pending", "delayed", "inflight", "dead", "liveWorkers")} == {
        "pending": 3,
        "delayed": 2,
        "inflight": 3,
        "dead": 4,
        "liveWorkers": 1,
    }


def test_stats_table_for_people(redis_url: str) -> None:
    _seed_every_state(redis_url)
    result = stats("--redis-url", redis_url)
    out = result.stdout.decode()
    assert result.returncode == 0
    assert "queue 'forwarder'" in out
    assert "workers: 1 live, 1 silent" in out
    for line in ("pending", "delayed", "in flight", "dead"):
        assert line in out
    assert "silent-1" in out


def test_a_queue_name_with_brackets_is_shown_as_written(redis_url: str) -> None:
    for queue in ("orders[eu]", "q[/]"):
        result = stats("--redis-url", redis_url, FORWARDER_QUEUE=queue)
        assert result.returncode == 0, result.stderr
        assert f"queue {queue!r}" in result.stdout.decode()


@pytest.mark.parametrize("stamp", [b"NaN", b"-Infinity", b"Infinity"])
def test_an_oldest_message_dated_by_no_number_has_no_age(redis_url: str, stamp: bytes) -> None:
    # Not JSON, but Redis' Lua reads it: pushed by hand, it crashed the table.
    with redis.Redis.from_url(redis_url) as client:
        client.lpush(KEYS.queue, b'{"accountId": "1", "enqueuedAt": ' + stamp + b"}")
    result = stats("--redis-url", redis_url)
    assert result.returncode == 0, result.stderr
    assert (
        orjson.loads(stats("--json", "--redis-url", redis_url).stdout)["oldestPendingAgeSeconds"]
        is None
    )


def test_stats_on_an_empty_queue(redis_url: str) -> None:
    state = orjson.loads(stats("--json", "--redis-url", redis_url).stdout)
    assert state["pending"] == state["dead"] == state["liveWorkers"] == 0
    assert state["oldestPendingAgeSeconds"] is None
    assert state["nextRetryInSeconds"] is None
    assert (state["busySessions"], state["held"], state["heldCapped"]) == (0, 0, False)


async def seed_held(redis_url: str) -> None:
    """Session ordering, two sessions: s1 with 3 updates, s2 with 2, all claimed at once.

    The first of each is then in flight and holds its session's turn; the other 3 are held.
    """
    updates = [make_update("123", "v1", "s1", {"pageId": str(i)}) for i in range(3)]
    updates += [make_update("123", "v2", "s2", {"pageId": str(i)}) for i in range(2)]
    producer = Producer.from_url(redis_url)
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        await producer.enqueue_many(updates)
        assert len(await Queue(client, "forwarder", "w1", ordered=True).claim(10)) == 2
    finally:
        await producer.aclose()
        await client.aclose()


def test_stats_counts_busy_sessions_and_held_messages(redis_url: str) -> None:
    asyncio.run(seed_held(redis_url))
    state = orjson.loads(stats("--json", "--redis-url", redis_url).stdout)
    assert {k: state[k] for k in ("pending", "inflight", "busySessions", "held")} == {
        "pending": 0,
        "inflight": 2,
        "busySessions": 2,
        "held": 3,
    }
    assert state["heldCapped"] is False
    assert re.search(
        r"held\W+3\W+busy sessions 2\b", stats("--redis-url", redis_url).stdout.decode()
    )


def test_held_row_only_when_any_or_ordering_is_on(redis_url: str) -> None:
    assert " held " not in stats("--redis-url", redis_url).stdout.decode()
    shown = stats("--redis-url", redis_url, FORWARDER_ORDERING="session").stdout.decode()
    assert re.search(r"held\W+0\W+busy sessions 0\b", shown)


def test_held_count_is_capped_past_many_busy_sessions(redis_url: str) -> None:
    """Past the cap, only that many sessions' held lists are counted, and it says so."""
    busy = HELD_COUNT_CAP + 1
    client = redis.Redis.from_url(redis_url)
    try:
        sessions = [f"123\nv{i}\ns1" for i in range(busy)]
        client.hset(KEYS.sessions, mapping={key: f"{'0' * 40}|1" for key in sessions})
        with client.pipeline(transaction=False) as pipe:
            for key in sessions:
                pipe.rpush(KEYS.held_prefix + key, b"m")
            pipe.execute()
    finally:
        client.close()
    state = orjson.loads(stats("--json", "--redis-url", redis_url).stdout)
    assert (state["busySessions"], state["held"], state["heldCapped"]) == (
        busy,
        HELD_COUNT_CAP,
        True,
    )
    table = stats("--redis-url", redis_url).stdout.decode()
    assert re.search(rf"held\W+{HELD_COUNT_CAP}\+\W+busy sessions {busy}\b", table), table


@pytest.mark.parametrize("flags", [["--json"], []])
def test_watch_refreshes_until_ctrl_c(redis_url: str, flags: list[str]) -> None:
    _seed_every_state(redis_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "forwarder", "stats", "--watch", *flags, "--redis-url", redis_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    snapshots = 0
    for line in proc.stdout:
        snapshots += line.startswith((b"{", b"queue"))
        if snapshots == 2:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert snapshots == 2


@pytest.mark.parametrize("flags", [["--json"], []])
def test_a_closed_stdout_ends_a_watch_quietly(redis_url: str, flags: list[str]) -> None:
    # `stats --watch | head -1`: the reader has what it wanted.
    unread, stdout = os.pipe()
    os.close(unread)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}
    argv = [sys.executable, "-m", "forwarder", "stats", "--watch", *flags]
    proc = subprocess.Popen(
        [*argv, "--redis-url", redis_url], stdout=stdout, stderr=subprocess.PIPE, env=env
    )
    os.close(stdout)
    _, err = proc.communicate(timeout=30)
    assert (proc.returncode, err) == (0, b"")


def test_a_hung_redis_is_unreachable_too(own_redis: RedisServer) -> None:
    assert own_redis.pid is not None
    os.kill(own_redis.pid, signal.SIGSTOP)
    try:
        result = stats("--redis-url", own_redis.url)
    finally:
        os.kill(own_redis.pid, signal.SIGCONT)
    assert result.returncode == 3  # as documented, not 1 ("Redis refused")
    assert b"cannot reach Redis" in result.stderr


def test_unreachable_redis_is_a_clear_error() -> None:
    result = stats("--redis-url", f"redis://127.0.0.1:{free_port()}/0")
    assert result.returncode == 3
    assert b"cannot reach Redis" in result.stderr


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (None, "-"),
        (0.42, "0.4s"),
        (12.7, "12s"),
        (245, "4m05s"),
        (7380, "2h03m"),
        (3 * 86400 + 4 * 3600 + 59, "3d04h"),
    ],
)
def test_human_age(seconds: float | None, shown: str) -> None:
    assert human_age(seconds) == shown
