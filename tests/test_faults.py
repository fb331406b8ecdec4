"""Faults: an API outage (circuit breaker), 429, unreachable hosts, Redis restarts, size caps."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MasterDownError,
    MovedError,
    OutOfMemoryError,
    RedisClusterException,
    ResponseError,
)

from forwarder.breaker import Breakers
from forwarder.client import Attempt, EngagementClient, Put
from forwarder.connections import redis_outage
from forwarder.embedded import RedisServer, free_port
from forwarder.producer import InvalidUpdate, Producer, QueueUnavailable, encode, make_update
from forwarder.queue import Keys
from forwarder.standin import Override, Received, StandIn, error_response
from forwarder.worker import running
from tests.support import (
    BUSY_AFTER,
    enqueue_visitors,
    fast_settings,
    run_busy_script,
    wait_until,
)

KEYS = Keys("forwarder")
BODY: dict[str, Any] = {"pageId": "p", "engagementAttributes": [{"type": "searchInfo"}]}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def breakers(clock: Clock) -> Breakers:
    return Breakers(
        window=10, min_calls=4, failure_ratio=0.5, cooldown=1.0, max_cooldown=4.0, clock=clock
    )


def test_breaker_opens_on_failures_and_probes_after_the_cooldown() -> None:
    clock = Clock()
    b = breakers(clock)
    for failed in (False, True, True, False):
        assert b.admit("h").wait is None
        b.record("h", failed, probe=False)
    assert b.state("h") == "open"
    parked = b.admit("h")
    assert parked.wait is not None
    assert 1.0 <= parked.wait <= 2.0
    assert b.admit("other").wait is None  # other hosts keep flowing
    clock.now += 1.0
    probe = b.admit("h")
    assert (probe.wait, probe.probe) == (None, True)
    assert b.admit("h").wait is not None  # one probe at a time
    b.record("h", True, probe=True)
    assert b.state("h") == "open"
    clock.now += 1.5
    assert b.admit("h").wait is not None  # the cool-down doubled to 2 s
    clock.now += 0.5
    assert b.admit("h").probe
    b.record("h", False, probe=True)
    assert b.state("h") == "closed"
    assert b.admit("h").wait is None


def test_breaker_ignores_late_results_and_caps_the_cooldown() -> None:
    clock = Clock()
    b = breakers(clock)
    for _ in range(4):
        b.record("h", True, probe=False)
    b.record("h", False, probe=False)  # sent before it opened: says nothing new
    assert b.state("h") == "open"
    for _ in range(5):
        clock.now += 10
        assert b.admit("h").probe
        b.record("h", True, probe=True)
    wait = b.admit("h").wait
    assert wait is not None
    assert wait <= 8.0  # max cool-down 4 s, plus at most one cool-down of spread


def test_breaker_pause_holds_a_host_for_retry_after() -> None:
    clock = Clock()
    b = breakers(clock)
    b.pause("h", 3.0)
    parked = b.admit("h")
    assert parked.wait is not None
    assert 3.0 <= parked.wait <= 4.0
    assert parked.why == "host_throttled"  # not circuit_open: the breaker is closed
    assert b.state("h") == "closed"
    clock.now += 3.0
    assert b.admit("h").wait is None


async def enqueue(redis_url: str, visitors: list[str]) -> None:
    await enqueue_visitors(redis_url, visitors, BODY)


async def test_a_40_second_outage_dead_letters_nothing_and_costs_few_requests(
    redis_url: str, redis_client: Redis, standin: StandIn
) -> None:
    start = time.monotonic()
    outage_end = start + 40

    async def outage(request: Received) -> web.StreamResponse | None:
        return web.Response(status=503) if time.monotonic() < outage_end else None

    standin.override = outage
    await enqueue(redis_url, [f"ok-a{i}" for i in range(1000)])
    settings = fast_settings(
        redis_url, standin, retry_delays=(5.0, 10.0, 15.0), concurrency=64, request_timeout=10
    )
    async with running(settings):
        await asyncio.sleep(15)
        await enqueue(redis_url, [f"ok-b{i}" for i in range(1000)])
        await standin.wait_for(lambda api: len(api.delivered) >= 2000, 70)
    during = [r for r in standin.requests if r.at < outage_end]
    last = max(r.at for r in standin.delivered)
    print(
        f"outage: {len(during)} requests while down; all delivered {last - outage_end:.1f} s after"
    )
    assert len(during) < 100
    assert await redis_client.llen(KEYS.dead) == 0
    assert {r.visitor_id for r in standin.delivered} == {
        f"ok-{p}{i}" for p in "ab" for i in range(1000)
    }
    assert last < outage_end + 20


def throttle_once(retry_after: str | Callable[[], str]) -> Override:
    """A 429 with ``Retry-After`` (or what it gives, when answering) for each visitor's
    first request, then the usual rules."""
    answered: set[str] = set()

    async def throttle(request: Received) -> web.StreamResponse | None:
        if request.visitor_id in answered:
            return None
        answered.add(request.visitor_id)
        value = retry_after() if callable(retry_after) else retry_after
        return web.Response(status=429, headers={"Retry-After": value})

    return throttle


async def test_429_waits_for_retry_after_without_spending_attempts(
    redis_url: str, redis_client: Redis, standin: StandIn
) -> None:
    standin.override = throttle_once("1")
    await enqueue(redis_url, ["ok-t"])
    async with running(fast_settings(redis_url, standin, retry_delays=())):
        await standin.wait_for(lambda api: len(api.delivered) == 1, 10)
    first, second = standin.requests
    assert (first.status, second.status) == (429, 200)
    assert 1.0 <= second.at - first.at < 2.5  # Retry-After, plus up to 1 s of spread
    assert await redis_client.llen(KEYS.dead) == 0


@pytest.mark.parametrize(
    "spelling",
    ["%a %b %e %H:%M:%S %Y", "%a, %d %b %Y %H:%M:%S -0000"],
    ids=["asctime", "zone_-0000"],
)
async def test_a_retry_after_date_without_a_zone_is_read_as_gmt(
    redis_url: str, standin: StandIn, spelling: str
) -> None:
    # HTTP dates are always GMT; these two spellings name no zone (RFC 9110, 5.6.7).
    standin.override = throttle_once(lambda: time.strftime(spelling, time.gmtime(time.time() + 3)))
    await enqueue(redis_url, ["ok-t"])
    async with running(fast_settings(redis_url, standin, retry_delays=(0.1,))):
        await standin.wait_for(lambda api: len(api.delivered) == 1, 10)
    first, second = standin.requests
    assert second.at - first.at >= 1.5  # the date's 2-3 s, not the 0.1 s retry delay


async def test_a_retry_after_of_zero_still_waits_a_second(redis_url: str, standin: StandIn) -> None:
    standin.override = throttle_once("0")
    await enqueue(redis_url, ["ok-t"])
    async with running(fast_settings(redis_url, standin)):
        await standin.wait_for(lambda api: len(api.delivered) == 1, 10)
    first, second = standin.requests
    assert second.at - first.at >= 1.0  # not again at once, on every 429


async def test_a_retry_after_in_other_digits_is_no_crash(
    redis_url: str, redis_client: Redis, standin: StandIn
) -> None:
    async def bad_request(rec: Received) -> web.StreamResponse:
        answer = error_response(400, 5, "request data missing")
        answer.headers["Retry-After"] = "\u00b2"  # a digit to str.isdigit, not to float()
        return answer

    standin.override = bad_request
    await enqueue(redis_url, ["ok-r"])
    async with running(fast_settings(redis_url, standin)):
        await wait_until(lambda: _llen(redis_client, KEYS.dead, 1), 5, "a dead letter")
    [record] = [orjson.loads(r) for r in await redis_client.lrange(KEYS.dead, 0, -1)]
    assert (record["reason"], record["status"], record["attempts"]) == ("client_error", 400, 1)
    assert record["error"]["internalCode"] == 5
    assert len(standin.requests) == 1


async def test_a_probe_that_crashes_still_ends_the_half_open_wait(
    redis_url: str, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0
    send = EngagementClient.update_session

    async def crash_the_first_probe(self: EngagementClient, base: str, put: Put) -> Attempt:
        nonlocal calls
        calls += 1
        if calls == 2:  # the first call after the breaker opened: its probe
            raise RuntimeError("a bug while sending")
        return await send(self, base, put)

    monkeypatch.setattr(EngagementClient, "update_session", crash_the_first_probe)
    await enqueue(redis_url, ["flaky1-p"])  # 503 once, then 200
    settings = fast_settings(
        redis_url,
        standin,
        retry_delays=(0.05,) * 5,
        breaker_window=1,
        breaker_min_calls=1,
        breaker_cooldown=0.2,
    )
    async with running(settings):
        # Stuck half-open, the host would never be tried again: nothing delivered.
        await standin.wait_for(lambda api: len(api.delivered) == 1, 10)
    assert calls == 3


async def test_retry_after_is_capped(redis_url: str, standin: StandIn) -> None:
    standin.override = throttle_once("3600")
    await enqueue(redis_url, ["ok-t"])
    async with running(fast_settings(redis_url, standin, max_retry_after=0.5)):
        await standin.wait_for(lambda api: len(api.delivered) == 1, 10)
    first, second = standin.requests
    assert second.at - first.at < 2.0


async def test_an_unreachable_host_is_a_connect_failure_retried_on_schedule(
    redis_url: str, redis_client: Redis, standin: StandIn
) -> None:
    await enqueue(redis_url, ["ok-1"])
    closed = f"http://127.0.0.1:{free_port()}"
    settings = fast_settings(redis_url, standin, api_base_url=closed, retry_delays=(0.1,))
    async with running(settings):
        await wait_until(lambda: _llen(redis_client, KEYS.dead, 1), 10, "a dead letter")
    [record] = [orjson.loads(r) for r in await redis_client.lrange(KEYS.dead, 0, -1)]
    assert (record["reason"], record["lastError"], record["attempts"]) == (
        "retries_exhausted",
        "connect",
        2,
    )


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """appendfsync always: what Redis acknowledged survives its SIGKILL (the README
    explains what everysec may lose)."""
    server = RedisServer(
        tmp_path / "durable", appendonly=True, extra_args=["--appendfsync", "always"]
    )
    with server:
        yield server


async def test_redis_restart_during_a_load_loses_nothing(durable_redis: RedisServer) -> None:
    server = durable_redis
    visitors = [f"slow20-{i}" for i in range(400)]
    async with StandIn() as api:
        await enqueue(server.url, visitors)
        async with running(fast_settings(server.url, api, concurrency=16)):
            await api.wait_for(lambda a: len(a.delivered) >= 100, 20)
            server.kill()
            await asyncio.sleep(1.0)
            server.start()
            await api.wait_for(lambda a: {r.visitor_id for r in a.delivered} >= set(visitors), 40)
            # Copies re-sent after the restart (at least once) are drained too.
            await wait_until(lambda: _drained(server.url), 10, "an empty queue")
    client = Redis.from_url(server.url)
    try:
        assert await client.llen(KEYS.dead) == 0
        assert await client.llen(KEYS.queue) == 0
        assert await client.keys(KEYS.inflight_prefix + "*") == []
    finally:
        await client.aclose()


async def test_the_producer_refuses_what_the_worker_would_dead_letter() -> None:
    huge = make_update("123", "v", "s", {"pageId": "p", "note": "x" * 300_000})
    with pytest.raises(InvalidUpdate, match="over the 262144-byte cap"):
        encode(huge)
    nan = make_update("123", "v", "s", {"pageId": "p", "extra": [1.0, float("nan")]})
    with pytest.raises(InvalidUpdate, match="finite number"):
        encode(nan)
    big = make_update("123", "v", "s", {"pageId": "p", "n": 2**70})
    with pytest.raises(InvalidUpdate, match="64-bit"):
        encode(big)


async def test_the_worker_dead_letters_an_oversized_element(
    redis_url: str, redis_client: Redis, standin: StandIn
) -> None:
    raw = orjson.dumps(make_update("123", "ok-big", "s", {"pageId": "p", "n": "x" * 5000}))
    await redis_client.lpush(KEYS.queue, raw)
    async with running(fast_settings(redis_url, standin, max_message_bytes=4096)):
        await wait_until(lambda: _llen(redis_client, KEYS.dead, 1), 5, "a dead letter")
    [record] = [orjson.loads(r) for r in await redis_client.lrange(KEYS.dead, 0, -1)]
    assert record["reason"] == "invalid_message"
    assert record["errors"] == [f"(root): message is {len(raw)} bytes, over the 4096-byte cap"]
    assert record["raw"] == raw.decode()
    assert standin.requests == []


@pytest.mark.parametrize("page_id", ["pageId", "page_id"])
async def test_a_message_at_the_cap_is_retried_though_its_retry_is_longer(
    redis_url: str, redis_client: Redis, standin: StandIn, page_id: str
) -> None:
    # Pushed by hand at exactly the cap, without an id: its retry gains an id, attempts
    # and lastError, which must not make the worker refuse it as too large; nor must its
    # new key order (or, with a Python name, the models' wire form) on the retry.
    update = make_update("123", "flaky1-big", "s", {page_id: "p", "n": ""})
    padding = 4096 - len(orjson.dumps(update))
    update["body"]["n"] = "x" * padding
    raw = orjson.dumps(update)
    assert len(raw) == 4096
    await redis_client.lpush(KEYS.queue, raw)
    settings = fast_settings(redis_url, standin, max_message_bytes=4096, retry_delays=(0.05,))
    async with running(settings):
        await standin.wait_for(lambda api: len(api.delivered) == 1, 10)
    assert [r.status for r in standin.requests] == [503, 200]
    assert await redis_client.llen(KEYS.dead) == 0


async def test_a_redis_out_of_memory_is_drained_not_a_crash(
    tmp_path: Path, standin: StandIn
) -> None:
    args = ["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"]
    with RedisServer(tmp_path / "full", extra_args=args) as server:
        redis = Redis.from_url(server.url)
        try:
            filled = await _fill(redis)
            # Over the limit for sure, whatever the client buffers held at the refusal.
            used = int((await redis.info("memory"))["used_memory"])
            await redis.config_set("maxmemory", used - 64 * 1024)
            # Full: a plain write is refused, as the heartbeat's is, and a producer is told
            # its batch was not taken (to retry once the workers have drained some).
            with pytest.raises(OutOfMemoryError):
                await redis.zadd("probe", {"x": 1})
            with pytest.raises(QueueUnavailable, match="did not take the batch"):
                await Producer(redis).enqueue("123", "late", "s", {"pageId": "p"})
            async with running(fast_settings(server.url, standin, concurrency=8)):
                await standin.wait_for(lambda api: len(api.delivered) == filled, 30)
                await wait_until(lambda: _llen(redis, KEYS.queue, 0, exactly=True), 5, "none")
            assert await redis.llen(KEYS.dead) == 0
        finally:
            await redis.aclose()


async def _fill(redis: Redis) -> int:
    """Enqueue one at a time until Redis refuses for want of memory; how many went in."""
    body = {"pageId": "p" * 500}
    count = 0
    while True:
        try:
            await redis.lpush(
                KEYS.queue, orjson.dumps(make_update("123", f"ok-{count}", "s", body))
            )
        except OutOfMemoryError:
            return count
        count += 1


async def _llen(redis: Redis, key: str, n: int, *, exactly: bool = False) -> bool:
    length = int(await redis.llen(key))
    return length == n if exactly else length >= n


async def test_a_worker_with_redis_unreachable_still_stops_on_request(standin: StandIn) -> None:
    settings = fast_settings(f"redis://127.0.0.1:{free_port()}/0", standin)
    started = time.monotonic()
    async with running(settings) as worker:
        await asyncio.sleep(0.5)
        assert not worker.stopping
    assert time.monotonic() - started < 5


async def test_redis_lost_during_a_stop_bounds_the_stop_and_loses_nothing(
    durable_redis: RedisServer, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    own_redis = durable_redis
    monkeypatch.setattr("forwarder.worker.GIVE_UP_SECONDS", 1.0)
    await enqueue(own_redis.url, [f"slow3000-{i}" for i in range(3)])
    settings = fast_settings(own_redis.url, standin, shutdown_grace=0.2)
    started = time.monotonic()
    async with running(settings):
        await wait_until(lambda: _in_flight(own_redis.url, 3), 5, "3 in flight")
        own_redis.kill()
    assert time.monotonic() - started < 10
    own_redis.start()
    # What the stopped worker held is still in its in-flight record, for others to return.
    assert await _in_flight(own_redis.url, 3)


async def test_an_ack_redis_lost_in_a_restart_is_found_and_the_message_sent_again(
    tmp_path: Path, standin: StandIn
) -> None:
    # Redis restarts from a snapshot taken while the message was in flight: the ack is
    # undone, and the message is back in the live worker's in-flight hash.
    with RedisServer(tmp_path / "snapshot", appendonly=False) as server:
        redis = Redis.from_url(server.url)
        try:
            await enqueue(server.url, ["slow1000-1"])
            async with running(fast_settings(server.url, standin)):
                await wait_until(lambda: _in_flight(server.url, 1), 5, "1 in flight")
                await redis.save()
                await standin.wait_for(lambda api: len(api.delivered) == 1, 5)
                await wait_until(lambda: _in_flight(server.url, 0), 5, "the ack")
                server.kill()
                server.start()
                assert await _in_flight(server.url, 1)
                await standin.wait_for(lambda api: len(api.delivered) == 2, 15)
                await wait_until(lambda: _in_flight(server.url, 0), 5, "the second ack")
        finally:
            await redis.aclose()
    assert [r.visitor_id for r in standin.delivered] == ["slow1000-1"] * 2


async def _drained(url: str) -> bool:
    client = Redis.from_url(url)
    try:
        return int(await client.llen(KEYS.queue)) == 0 and await _in_flight(url, 0)
    finally:
        await client.aclose()


async def _in_flight(url: str, n: int) -> bool:
    client = Redis.from_url(url)
    try:
        keys = await client.keys(KEYS.inflight_prefix + "*")
        return sum([int(await client.hlen(k)) for k in keys]) == n
    finally:
        await client.aclose()


async def test_a_master_demoted_to_a_replica_is_an_outage_not_a_crash(
    tmp_path: Path, standin: StandIn
) -> None:
    # A fail-over behind one address (a DNS name, a cloud primary endpoint): the node the
    # worker's connections reach becomes a replica, and every write answers READONLY.
    with (
        RedisServer(tmp_path / "first") as first,
        RedisServer(tmp_path / "second") as second,
    ):
        one, two = Redis.from_url(first.url), Redis.from_url(second.url)
        try:
            await two.replicaof("127.0.0.1", first.port)
            async with running(fast_settings(first.url, standin)) as worker:
                await enqueue(first.url, ["ok-before"])
                await standin.wait_for(lambda api: len(api.delivered) == 1, 5)
                await two.replicaof("NO", "ONE")
                await one.replicaof("127.0.0.1", second.port)
                connections = await _connections_received(one)
                await asyncio.sleep(1.5)
                assert not worker.stopping
                # A connection answered READONLY is dropped, so a new one can find the
                # new master once the address points there (dozens here; one, kept, before).
                assert await _connections_received(one) - connections > 5
                await one.replicaof("NO", "ONE")  # the address reaches a master again
                await enqueue(first.url, ["ok-after"])
                await standin.wait_for(lambda api: len(api.delivered) == 2, 15)
            assert not worker.failed
        finally:
            await one.aclose()
            await two.aclose()


def _cluster_mode_disabled() -> RedisClusterException:
    """What redis-py's cluster client raises against a lone Redis: its own exception,
    raised while handling the node's reply."""
    exc = RedisClusterException("Cluster mode is not enabled on this node")
    exc.__context__ = ResponseError("This instance has cluster support disabled")
    return exc


async def test_a_demoted_master_with_no_stale_data_to_serve_is_an_outage_too(
    tmp_path: Path, standin: StandIn
) -> None:
    # With replica-serve-stale-data no, a replica whose master link is down answers
    # MASTERDOWN to every call: a ClusterError to redis-py, not to be read as a cluster's
    # slot on the move (an outage only for a cluster client).
    async def demote(client: Redis) -> None:
        await client.config_set("replica-serve-stale-data", "no")
        await client.replicaof("127.0.0.1", free_port())  # a master never reached

    async def promote(client: Redis) -> None:
        await client.replicaof("NO", "ONE")

    with RedisServer(tmp_path / "node") as server:
        await _waited_out(server, standin, demote, promote)


async def test_too_few_replicas_in_touch_to_write_is_an_outage(
    tmp_path: Path, standin: StandIn
) -> None:
    # min-replicas-to-write (the README's advice with Sentinel) answers NOREPLICAS while
    # a replica restarts or loads its first copy: a plain ResponseError, which stopped
    # every worker and reached producers' callers raw.
    async def lose_replicas(client: Redis) -> None:
        await client.config_set("min-replicas-to-write", 1)  # and there is none
        producer = Producer(client)
        with pytest.raises(QueueUnavailable, match="NOREPLICAS"):
            await producer.enqueue("123", "ok-refused", "s", {"pageId": "p"})

    async def regain_replicas(client: Redis) -> None:
        await client.config_set("min-replicas-to-write", 0)

    with RedisServer(tmp_path / "node") as server:
        await _waited_out(server, standin, lose_replicas, regain_replicas)


async def _waited_out(
    server: RedisServer,
    standin: StandIn,
    begin: Callable[[Redis], Awaitable[None]],
    end: Callable[[Redis], Awaitable[None]],
) -> None:
    """A worker delivers, is still running 1.5 s after ``begin`` (an outage), and
    delivers again after ``end``."""
    client = Redis.from_url(server.url)
    try:
        async with running(fast_settings(server.url, standin)) as worker:
            await enqueue(server.url, ["ok-before"])
            await standin.wait_for(lambda api: len(api.delivered) == 1, 5)
            await begin(client)
            await asyncio.sleep(1.5)
            assert not worker.stopping
            await end(client)
            await enqueue(server.url, ["ok-after"])
            await standin.wait_for(lambda api: len(api.delivered) == 2, 15)
        assert not worker.failed
    finally:
        await client.aclose()


async def _connections_received(redis: Redis) -> int:
    return int((await redis.info("stats"))["total_connections_received"])


def test_a_slot_on_the_move_is_an_outage_and_a_refusal_is_not() -> None:
    # redis-py's cluster client follows ASK and MOVED itself: one that reaches the worker
    # (its redirects spent while a slot migrates) passes, as a producer has long taken it.
    # A plain client follows none: pointed at a cluster node, it would wait for ever.
    for redirect in (MovedError("3999 127.0.0.1:6381"), AskError("3999 127.0.0.1:6381")):
        assert redis_outage(redirect, cluster=True)
        assert not redis_outage(redirect, cluster=False)
    assert not redis_outage(ResponseError("WRONGTYPE Operation against a key"), cluster=False)
    # Fail-overs, for any client: MASTERDOWN is a ClusterError to redis-py.
    for passing in (
        MasterDownError("Link with MASTER is down and replica-serve-stale-data is set to 'no'."),
        ClusterDownError("The cluster is down"),
        ResponseError("NOREPLICAS Not enough good replicas to write."),
    ):
        assert redis_outage(passing, cluster=False)
    assert not redis_outage(ResponseError("BUSYKEY Target key name already exists."), cluster=False)
    assert not redis_outage(_cluster_mode_disabled(), cluster=True)


async def test_another_clients_long_script_is_an_outage_not_a_crash(
    tmp_path: Path, standin: StandIn
) -> None:
    # Past busy-reply-threshold Redis answers BUSY to every other call until the script
    # ends: a plain ResponseError, which stopped the worker.
    with RedisServer(tmp_path / "busy", extra_args=BUSY_AFTER) as server:
        async with running(fast_settings(server.url, standin)) as worker:
            await asyncio.sleep(0.3)
            busy = asyncio.create_task(asyncio.to_thread(run_busy_script, server.url))
            await asyncio.sleep(1.5)
            assert not worker.stopping
            await busy
            await enqueue(server.url, ["ok-after"])
            await standin.wait_for(lambda api: len(api.delivered) == 1, 10)
        assert not worker.failed
