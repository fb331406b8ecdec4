"""The worker against a real Redis and the stand-in API over loopback: every outcome."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gzip
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any, cast

import aiohttp
import orjson
import pytest
import structlog
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from forwarder import cli, model, outcome
from forwarder import worker as worker_module
from forwarder.answers import MAX_ANSWER_BYTES
from forwarder.client import Put
from forwarder.deadletters import Retention
from forwarder.domain import DomainLookupError, DomainResolver
from forwarder.producer import Producer, make_update
from forwarder.queue import Claimed, Keys
from forwarder.settings import Settings
from forwarder.standin import Received, StandIn
from forwarder.worker import _Job, _Ready, running
from tests.support import fast_settings, serving, wait_until

KEYS = Keys("forwarder")
BODY: dict[str, Any] = {
    "pageId": "4743822558",
    "engagementAttributes": [{"type": "cart", "total": 11.7, "numItems": 6}],
}


def update(visitor: str, session: str = "s1", **extra: Any) -> dict[str, Any]:
    return {**make_update("12345678", visitor, session, BODY), **extra}


async def enqueue(redis_url: str, *updates: dict[str, Any]) -> list[str]:
    producer = Producer.from_url(redis_url)
    try:
        return await producer.enqueue_many(updates)
    finally:
        await producer.aclose()


async def dead_records(redis: Redis) -> list[dict[str, Any]]:
    return [orjson.loads(r) for r in await redis.lrange(KEYS.dead, 0, -1)]


async def assert_drained(redis: Redis, *, pending: int = 0) -> None:
    """Nothing (but ``pending``) queued, waiting or in flight, and no worker registered."""
    assert await redis.llen(KEYS.queue) == pending
    assert await redis.zcard(KEYS.delayed) == 0
    assert await redis.zcard(KEYS.workers) == 0
    assert await redis.exists(KEYS.claims) == 0
    assert await redis.keys(KEYS.inflight_prefix + "*") == []


def arrivals(api: StandIn, visitor: str) -> list[Received]:
    return [r for r in api.requests if r.visitor_id == visitor]


async def test_delivers_each_update_once_with_the_documented_request(
    redis_url: str, redis_client: Redis, standin: StandIn
) -> None:
    ids = await enqueue(redis_url, *(update(f"ok-{i}", f"sess {i}") for i in range(20)))
    async with running(fast_settings(redis_url, standin)):
        await standin.wait_for(lambda api: len(api.delivered) == 20, 10)
    assert len(set(ids)) == 20
    first = arrivals(standin, "ok-0")[0]
    assert (first.method, first.account_id, first.version) == ("PUT", "12345678", "1.0")
    assert first.session_id == "sess 0"
    assert first.body == BODY
    assert sorted(r.visitor_id for r in standin.delivered) == sorted(f"ok-{i}" for i in range(20))
    assert await dead_records(redis_client) == []
    await assert_drained(redis_client)


async def test_takes_the_oldest_first(
    redis_url: str, redis_client: Redis, standin: StandIn
) -> None:
    await enqueue(redis_url, *(update(f"ok-{i}") for i in range(30)))
    async with running(fast_settings(redis_url, standin, concurrency=1)):
        await standin.wait_for(lambda api: len(api.delivered) == 30, 10)
    assert [r.visitor_id for r in standin.delivered] == [f"ok-{i}" for i in range(30)]


@pytest.mark.parametrize(("visitor", "status", "code"), [("bad-1", 400, 5), ("gone-1", 404, 37)])
async def test_client_error_is_dead_lettered_at_once_with_the_error_entity(
    redis_url: str, redis_client: Redis, standin: StandIn, visitor: str, status: int, code: int
) -> None:
    sent = update(visitor)
    [message_id] = await enqueue(redis_url, sent)
    record = await _dead_letter_of(redis_client, fast_settings(redis_url, standin), 10)
    assert len(arrivals(standin, visitor)) == 1
    assert record["id"] == message_id
    assert (record["reason"], record["status"], record["attempts"]) == ("client_error", status, 1)
    assert record["error"]["internalCode"] == code
    assert isinstance(record["error"]["time"], int)
    assert record["message"]["id"] == message_id
    assert record["message"]["body"] == BODY
    assert record["message"]["visitorId"] == visitor
    assert "attempts" not in record["message"]
    assert dt.datetime.fromisoformat(record["deadAt"]).tzinfo is not None
    await assert_drained(redis_client)


async def test_server_error_is_retried_on_schedule_then_delivered(
    redis_url: str, redis_client: Redis, standin: StandIn
) -> None:
    await enqueue(redis_url, update("flaky2-a"))
    async with running(fast_settings(redis_url, standin)):
        await standin.wait_for(lambda api: len(api.delivered) == 1, 10)
    times = [r.at for r in arrivals(standin, "flaky2-a")]
    assert [r.status for r in arrivals(standin, "flaky2-a")] == [503, 503, 200]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert 0.2 <= gaps[0] < 0.35
    assert 0.4 <= gaps[1] < 0.55
    assert await dead_records(redis_client) == []
    await assert_drained(redis_client)


async def test_retries_exhausted_after_the_last_delay(
    redis_url: str, redis_client: Redis, standin: StandIn
) -> None:
    [message_id] = await enqueue(redis_url, update("down-1"))
    async with running(fast_settings(redis_url, standin)):
        await wait_until(lambda: _dead_count(redis_client, 1), 10, "a dead letter")
    times = [r.at for r in arrivals(standin, "down-1")]
    assert len(times) == 4
    gaps = [b - a for a, b in itertools.pairwise(times)]
    for gap, delay in zip(gaps, (0.2, 0.4, 0.6), strict=True):
        assert delay <= gap < delay + 0.15
    [record] = await dead_records(redis_client)
    assert record["id"] == message_id
    assert (record["reason"], record["status"], record["attempts"]) == ("retries_exhausted", 503, 4)
    assert record["lastError"] == "http_503"
    await assert_drained(redis_client)


@pytest.mark.parametrize(
    ("visitor", "failure"), [("slow3000-x", "timeout"), ("drop-x", "connection")]
)
async def test_timeouts_and_dropped_connections_are_retried(
    redis_url: str, redis_client: Redis, standin: StandIn, visitor: str, failure: str
) -> None:
    await enqueue(redis_url, update(visitor))
    settings = fast_settings(redis_url, standin, request_timeout=0.3, retry_delays=(0.1,))
    async with running(settings):
        await wait_until(lambda: _dead_count(redis_client, 1), 10, "a dead letter")
        # Checked before the stop: the stand-in still answers a slow call after the
        # client gave up on it (3 s after it came in), and counts that answer.
        assert not standin.delivered
    [record] = await dead_records(redis_client)
    assert (record["reason"], record["status"], record["attempts"]) == (
        "retries_exhausted",
        None,
        2,
    )
    assert record["error"] is None
    assert record["lastError"] == failure
    await assert_drained(redis_client)


def _endless_answer(status: int, streamed: list[int]) -> web.Response:
    """``status`` with a chunked body that never ends (chunks counted in ``streamed``)."""

    async def chunks() -> AsyncIterator[bytes]:
        while True:
            streamed.append(1)
            yield b"x" * 16_384
            await asyncio.sleep(0)

    return web.Response(status=status, body=chunks())


async def test_an_endless_error_answer_is_dead_lettered_without_its_entity_or_the_timeout(
    redis_url: str, redis_client: Redis, standin: StandIn
) -> None:
    streamed: list[int] = []

    async def answer(rec: Received) -> web.StreamResponse:
        return _endless_answer(400, streamed)

    standin.override = answer
    [message_id] = await enqueue(redis_url, update("bad-endless"))
    settings = fast_settings(redis_url, standin, request_timeout=30.0)
    # Well inside the request timeout: the body was cut short, not waited out.
    record = await _dead_letter_of(redis_client, settings, 5)
    assert record["id"] == message_id
    assert (record["reason"], record["status"], record["error"]) == ("client_error", 400, None)
    # The connection was closed after about MAX_ANSWER_BYTES (64 kB: 4 chunks of 16 kB),
    # plus what the sockets' buffers took before the client stopped reading.
    assert len(streamed) < 500
    await assert_drained(redis_client)


@pytest.mark.parametrize("streamed", [True, False], ids=["endless", "long_with_length"])
async def test_a_success_with_a_long_body_is_delivered(
    redis_url: str, redis_client: Redis, standin: StandIn, streamed: bool
) -> None:
    async def answer(rec: Received) -> web.StreamResponse:
        if streamed:
            return _endless_answer(200, [])
        return web.Response(status=200, body=b"x" * (MAX_ANSWER_BYTES + 1))

    standin.override = answer
    await enqueue(redis_url, update("ok-long"), update("ok-long", session="s2"))
    async with running(fast_settings(redis_url, standin, request_timeout=30.0)) as worker:
        await wait_until(lambda: _all_acked(redis_client, worker.id), 5, "two acks")
    # The second went out, on a new connection, after the first one's was closed unread.
    assert [r.status for r in arrivals(standin, "ok-long")] == [200, 200]
    assert await dead_records(redis_client) == []
    await assert_drained(redis_client)


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
async def test_an_error_entity_over_the_cap_is_not_read(
    redis_url: str, redis_client: Redis, standin: StandIn, compressed: bool
) -> None:
    entity = {"time": 1, "message": "m" * MAX_ANSWER_BYTES, "internalCode": 5}

    async def answer(rec: Received) -> web.StreamResponse:
        if compressed:  # a few hundred bytes on the wire, over the cap once inflated
            body = gzip.compress(orjson.dumps(entity))
            headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
            return web.Response(status=400, body=body, headers=headers)
        return web.json_response(entity, status=400)

    standin.override = answer
    await enqueue(redis_url, update("bad-long"))
    record = await _dead_letter_of(redis_client, fast_settings(redis_url, standin), 5)
    assert (record["reason"], record["status"], record["error"]) == ("client_error", 400, None)
    await assert_drained(redis_client)


async def test_a_failed_background_task_stops_the_worker_with_a_failing_exit_code(
    redis_url: str, redis_client: Redis, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(self: Retention) -> None:
        raise RuntimeError("a bug in a background task")

    monkeypatch.setattr(Retention, "enforce", broken)
    await enqueue(redis_url, *(update(f"ok-{i}") for i in range(3)))
    # The command's own loop: it stops at the first heartbeat, by itself.
    code = await asyncio.wait_for(cli._run_until_signal(fast_settings(redis_url, standin)), 20)
    assert code == 1  # so that a restart policy such as on-failure starts it again
    # Stopped cleanly: what it did not deliver is back in the queue, nothing in flight.
    pending = await redis_client.llen(KEYS.queue)
    assert len(standin.delivered) + pending == 3
    await assert_drained(redis_client, pending=pending)


async def test_waiting_retries_are_kept_in_the_delayed_set(
    redis_url: str, redis_client: Redis, standin: StandIn
) -> None:
    [message_id] = await enqueue(redis_url, update("down-1"))
    async with running(fast_settings(redis_url, standin, retry_delays=(30.0,))):
        await wait_until(lambda: _zcard(redis_client, 1), 5, "a delayed retry")
        waiting_list = await redis_client.zrange(KEYS.delayed, 0, -1, withscores=True)
        [(raw, due)] = cast(list[tuple[bytes, float]], waiting_list)
        seconds, micros = await redis_client.time()
        server_now = seconds + micros / 1e6
        waiting = orjson.loads(raw)
        assert (waiting["id"], waiting["attempts"], waiting["lastError"]) == (
            message_id,
            1,
            "http_503",
        )
        assert 28 < due - server_now <= 30
    assert await redis_client.zcard(KEYS.delayed) == 1  # a stopped worker keeps it waiting


@pytest.mark.parametrize(
    "element",
    [
        b"not json",
        b"[1, 2]",
        b'"a string"',
        b'{"accountId": "1", "visitorId": "v", "sessionId": "s"}',
        b'{"accountId": "a/b", "visitorId": "v", "sessionId": "s", "body": {"pageId": "p"}}',
        b"\xff\xfe{}",
        # Counters the worker could not write back (past 64 bits) once it adds one.
        b'{"accountId": "1", "visitorId": "bad-1", "sessionId": "s", "body": {"pageId": "p"},'
        b' "attempts": 18446744073709551615}',
        b'{"accountId": "1", "visitorId": "v", "sessionId": "s", "body": {"pageId": "p"},'
        b' "replayed": 1000000000000000000000000000000}',
    ],
)
async def test_malformed_elements_are_dead_lettered_and_the_worker_goes_on(
    redis_url: str, redis_client: Redis, standin: StandIn, element: bytes
) -> None:
    await enqueue(redis_url, update("ok-before"))
    await redis_client.lpush(KEYS.queue, element)
    await enqueue(redis_url, update("ok-after"))
    async with running(fast_settings(redis_url, standin)):
        await standin.wait_for(lambda api: len(api.delivered) == 2, 10)
        await wait_until(lambda: _dead_count(redis_client, 1), 5, "a dead letter")
    [record] = await dead_records(redis_client)
    assert record["reason"] == "invalid_message"
    assert record["message"] is None
    assert record["raw"] == element.decode("utf-8", errors="backslashreplace")
    assert record["errors"]
    assert all(isinstance(e, str) for e in record["errors"])
    await assert_drained(redis_client)


def _pushed_by_hand(visitor: str, size: int) -> bytes:
    """An element as a non-Python producer may push it: no id, no bookkeeping, ``size``
    bytes (padded in an unknown body field)."""
    head = b'{"accountId":"1","visitorId":"%s","sessionId":"s","body":{"pageId":"p","note":"'
    head %= visitor.encode()
    return head + b"x" * (size - len(head) - 3) + b'"}}'


async def test_a_hand_pushed_element_is_held_to_the_cap_a_retry_is_not(
    redis_url: str, redis_client: Redis, standin: StandIn
) -> None:
    # Taken above the cap, the first would be sent, then its retry (an id, attempts and
    # lastError added) dead-lettered as over the cap: it goes at once, unsent. The second,
    # at the cap, keeps its retries with what the forwarder adds.
    over, at_cap = _pushed_by_hand("flaky1-over", 4352), _pushed_by_hand("flaky2-cap", 4096)
    await redis_client.lpush(KEYS.queue, over, at_cap)
    async with running(fast_settings(redis_url, standin, max_message_bytes=4096)):
        await standin.wait_for(lambda api: len(api.delivered) == 1, 10)
        await wait_until(lambda: _dead_count(redis_client, 1), 5, "a dead letter")
    assert [r.status for r in arrivals(standin, "flaky2-cap")] == [503, 503, 200]
    assert arrivals(standin, "flaky1-over") == []
    [record] = await dead_records(redis_client)
    assert record["errors"] == ["(root): message is 4352 bytes, over the 4096-byte cap"]
    await assert_drained(redis_client)


async def test_an_invalid_elements_dead_letter_keeps_only_its_start(
    redis_url: str, redis_client: Redis, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Escaped as JSON, a huge element grew past what Redis takes in one request, and
    # every settle after it was refused in turn.
    monkeypatch.setattr(outcome, "RAW_KEPT", 40)
    element = b"\x00" * 100 + b"not json"
    await redis_client.lpush(KEYS.queue, element)
    async with running(fast_settings(redis_url, standin)):
        await wait_until(lambda: _dead_count(redis_client, 1), 5, "a dead letter")
    [record] = await dead_records(redis_client)
    assert record["raw"] == "\x00" * 40
    assert record["rawBytes"] == 108
    await assert_drained(redis_client)


async def test_a_crash_in_decoding_dead_letters_the_message_and_the_worker_goes_on(
    redis_url: str, redis_client: Redis, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    def decode(raw: bytes, max_bytes: int) -> model.Decoded:
        if b"boom-" in raw:
            raise RuntimeError("a bug")
        return model.decode(raw, max_bytes)

    monkeypatch.setattr(worker_module, "decode", decode)
    await enqueue(redis_url, update("boom-1"), *(update(f"ok-{i}") for i in range(3)))
    async with running(fast_settings(redis_url, standin, concurrency=1)):
        await wait_until(lambda: _dead_count(redis_client, 1), 5, "a dead letter")
        await standin.wait_for(lambda api: len(api.delivered) == 3, 5)
    (record,) = await dead_records(redis_client)
    assert record["reason"] == "invalid_message"
    assert record["errors"] == ["(root): could not be decoded (RuntimeError)"]
    assert "boom-1" in record["raw"]
    await assert_drained(redis_client)


async def test_a_crash_in_deciding_an_outcome_dead_letters_the_message_and_the_worker_goes_on(
    redis_url: str, redis_client: Redis, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    decide = outcome.after_attempt

    def after_attempt(claimed: Any, message: dict[str, Any], *args: Any) -> outcome.Outcome:
        if message["visitorId"].startswith("boom-"):
            raise RuntimeError("a bug")
        return decide(claimed, message, *args)

    monkeypatch.setattr(outcome, "after_attempt", after_attempt)
    await enqueue(redis_url, update("boom-1"), *(update(f"ok-{i}") for i in range(3)))
    # One consumer: had it died, nothing after boom-1 would be delivered.
    async with running(fast_settings(redis_url, standin, concurrency=1)) as worker:
        await wait_until(lambda: _dead_count(redis_client, 1), 5, "a dead letter")
        await standin.wait_for(lambda api: len(api.delivered) == 4, 5)
    assert not worker.failed
    (record,) = await dead_records(redis_client)
    assert record["reason"] == "invalid_message"
    assert record["errors"] == ["(root): could not be settled (RuntimeError)"]
    assert "boom-1" in record["raw"]
    await assert_drained(redis_client)


async def test_a_message_without_id_gets_one(
    redis_url: str, redis_client: Redis, standin: StandIn
) -> None:
    raw = orjson.dumps(update("bad-raw"))  # as a plain LPUSH from another language
    await redis_client.lpush(KEYS.queue, raw)
    record = await _dead_letter_of(redis_client, fast_settings(redis_url, standin), 5)
    assert len(record["id"]) >= 16
    assert record["message"]["id"] == record["id"]


async def test_python_field_names_pushed_by_hand_are_sent_under_their_wire_names(
    redis_url: str, redis_client: Redis, standin: StandIn
) -> None:
    # A plain LPUSH the producer did not write: the models take the Python names, so the
    # worker delivers it, to the right URL, with the body the API understands.
    raw = orjson.dumps(
        {
            "account_id": "12345678",
            "visitor_id": "snake-1",
            "session_id": "s1",
            "body": {
                "page_id": BODY["pageId"],
                "engagement_attributes": [{"type": "cart", "total": 11.7, "num_items": 6}],
            },
        }
    )
    await redis_client.lpush(KEYS.queue, raw)
    async with running(fast_settings(redis_url, standin)):
        await standin.wait_for(lambda api: len(api.delivered) == 1, 10)
    [arrival] = arrivals(standin, "snake-1")
    assert (arrival.account_id, arrival.session_id) == ("12345678", "s1")
    assert arrival.body == BODY
    assert await dead_records(redis_client) == []
    await assert_drained(redis_client)


def _via_domain_api(
    redis_url: str, api: StandIn, domain_api_url: str, **overrides: Any
) -> Settings:
    """Test settings with no fixed base URL: each account's host from ``domain_api_url``."""
    return fast_settings(
        redis_url,
        api,
        api_base_url=None,
        domain_api_url=domain_api_url,
        api_scheme="http",
        **overrides,
    )


async def test_domain_is_looked_up_once_per_account_and_cached(
    redis_url: str, redis_client: Redis, standin: StandIn
) -> None:
    await enqueue(redis_url, *(update(f"ok-{i}") for i in range(10)))
    settings = _via_domain_api(redis_url, standin, standin.base_url)
    async with running(settings):
        await standin.wait_for(lambda api: len(api.delivered) == 10, 10)
    assert len(standin.domain_requests) == 1


async def test_a_failed_domain_refresh_keeps_the_known_host(
    redis_url: str, redis_client: Redis, standin: StandIn
) -> None:
    settings = _via_domain_api(
        redis_url, standin, standin.base_url, domain_cache_ttl=0.2, retry_delays=(0.1, 0.1)
    )
    async with running(settings):
        await enqueue(redis_url, update("ok-1"))
        await standin.wait_for(lambda api: len(api.delivered) == 1, 10)
        standin.domain_fail_accounts.add("12345678")  # the Domain API goes down
        await asyncio.sleep(0.3)  # past the TTL
        await enqueue(redis_url, update("ok-2"))
        await standin.wait_for(lambda api: len(api.delivered) == 2, 10)
        await standin.wait_for(lambda api: len(api.domain_requests) == 2, 10)  # the refresh
    assert len(standin.domain_requests) == 2  # tried once, not once a message
    assert await dead_records(redis_client) == []
    await assert_drained(redis_client)


@contextlib.asynccontextmanager
async def _domain_api(
    answer: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    """A Domain API answering every lookup with ``answer``; its base URL."""
    app = web.Application()
    app.router.add_get("/api/account/{account}/service/msdkgw/baseURI.json", answer)
    async with serving(app) as base:
        yield base


async def test_an_expired_host_is_used_while_a_hanging_domain_api_is_asked_again() -> None:
    calls: list[float] = []

    async def answer(request: web.Request) -> web.Response:
        calls.append(time.monotonic())
        if len(calls) > 1:
            await asyncio.sleep(4)  # hangs, past the lookup's timeout
        return web.json_response({"service": "msdkgw", "baseURI": "va.example.net"})

    async with _domain_api(answer) as url, aiohttp.ClientSession() as session:
        resolver = DomainResolver(session, url, ttl=0.1, timeout=3)
        assert await resolver.host("12345678") == "va.example.net"
        await asyncio.sleep(0.2)  # past the TTL
        started = time.monotonic()
        assert await resolver.host("12345678") == "va.example.net"
        assert time.monotonic() - started < 0.5  # not the 3 s the refresh takes
        await asyncio.sleep(0.1)
        assert len(calls) == 2  # the refresh is on its way


@pytest.mark.parametrize(
    "host", ["\uff45vil.example", "127.0.0.1:443:1", "h:65536", "xn--", "h/x", "u@h", ""]
)
async def test_a_domain_api_host_that_cannot_make_a_url_fails_the_lookup(host: str) -> None:
    # Taken, it was cached for the TTL and crashed every delivery of the account.
    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"service": "msdkgw", "baseURI": host})

    async with _domain_api(answer) as url, aiohttp.ClientSession() as session:
        resolver = DomainResolver(session, url, ttl=60, timeout=5)
        with pytest.raises(DomainLookupError, match="no valid baseURI"):
            await resolver.host("12345678")


async def test_a_failed_first_lookup_says_why_once() -> None:
    # The attempt records only "domain_lookup": why (a 404 for an unknown account, say)
    # was said nowhere.
    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"error": "unknown account"}, status=404)

    async with _domain_api(answer) as url, aiohttp.ClientSession() as session:
        resolver = DomainResolver(session, url, ttl=60, timeout=5)
        with structlog.testing.capture_logs() as logs:
            results = await asyncio.gather(
                *(resolver.host("12345678") for _ in range(3)), return_exceptions=True
            )
    assert all(isinstance(r, DomainLookupError) for r in results)
    assert [(e["event"], e["account"], e["error"]) for e in logs] == [
        ("domain_lookup_failed", "12345678", "domain API answered 404")
    ]


async def test_an_endless_domain_api_answer_fails_the_lookup_without_the_timeout(
    redis_url: str, redis_client: Redis, standin: StandIn
) -> None:
    async def endless(request: web.Request) -> web.Response:
        return _endless_answer(200, [])

    async with _domain_api(endless) as url:
        await enqueue(redis_url, update("ok-1"))
        settings = _via_domain_api(
            redis_url, standin, url, retry_delays=(0.1,), request_timeout=30.0
        )
        record = await _dead_letter_of(redis_client, settings, 5)
    assert standin.requests == []
    assert (record["reason"], record["attempts"], record["lastError"]) == (
        "retries_exhausted",
        2,
        "domain_lookup",
    )
    await assert_drained(redis_client)


async def test_failed_domain_lookup_counts_like_a_server_error(
    redis_url: str, redis_client: Redis
) -> None:
    async with StandIn(domain_fail_accounts={"12345678"}) as api:
        await enqueue(redis_url, update("ok-1"))
        settings = _via_domain_api(redis_url, api, api.base_url, retry_delays=(0.1, 0.1))
        record = await _dead_letter_of(redis_client, settings, 10)
        assert api.requests == []
    assert (record["reason"], record["attempts"], record["lastError"]) == (
        "retries_exhausted",
        3,
        "domain_lookup",
    )


async def test_clean_stop_returns_unfinished_messages_and_leaves_no_keys(
    redis_url: str, redis_client: Redis, standin: StandIn
) -> None:
    ids = await enqueue(redis_url, *(update(f"slow5000-{i}") for i in range(5)))
    settings = fast_settings(redis_url, standin, shutdown_grace=0.3, request_timeout=10)
    async with running(settings) as worker:
        inflight = KEYS.inflight(worker.id)
        await wait_until(lambda: _hlen(redis_client, inflight, 5), 5, "5 in flight")
        await asyncio.sleep(0.2)  # the PUTs are on their way
    pending = [orjson.loads(r)["id"] for r in await redis_client.lrange(KEYS.queue, 0, -1)]
    assert sorted(pending) == sorted(ids)
    assert await redis_client.keys(KEYS.inflight_prefix + "*") == []
    assert await redis_client.zcard(KEYS.workers) == 0


async def test_stop_waits_for_deliveries_within_the_grace_period(
    redis_url: str, redis_client: Redis, standin: StandIn
) -> None:
    await enqueue(redis_url, *(update(f"slow300-{i}") for i in range(5)))
    async with running(fast_settings(redis_url, standin, shutdown_grace=5)) as worker:
        inflight = KEYS.inflight(worker.id)
        await wait_until(lambda: _hlen(redis_client, inflight, 5), 5, "5 in flight")
    assert len(standin.delivered) == 5
    await assert_drained(redis_client)


async def test_claims_ahead_are_bounded_and_given_back_unsent_on_stop(
    redis_url: str, redis_client: Redis, standin: StandIn
) -> None:
    arrived: list[str] = []

    async def hang(received: Received) -> web.StreamResponse | None:
        arrived.append(received.visitor_id)
        await asyncio.sleep(5)
        return None

    standin.override = hang
    ids = await enqueue(redis_url, *(update(f"ok-{i}") for i in range(30)))
    settings = fast_settings(redis_url, standin, concurrency=2, claim_batch=4, shutdown_grace=0.2)
    async with running(settings) as worker:
        inflight = KEYS.inflight(worker.id)
        # Two being delivered, and some claimed ahead for the next free consumer...
        await wait_until(lambda: _hlen(redis_client, inflight, 3), 5, "3 in flight")
        await asyncio.sleep(0.3)
        # ...but never more than two claim batches ahead.
        assert 3 <= await redis_client.hlen(inflight) <= 2 + 2 * 4
        assert arrived == ["ok-0", "ok-1"]
    pending = [orjson.loads(r)["id"] for r in await redis_client.lrange(KEYS.queue, 0, -1)]
    assert sorted(pending) == sorted(ids)
    assert arrived == ["ok-0", "ok-1"]
    assert await redis_client.keys(KEYS.inflight_prefix + "*") == []


async def test_claims_ahead_are_bounded_in_bytes_too(
    redis_url: str, redis_client: Redis, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def hang(received: Received) -> web.StreamResponse | None:
        await asyncio.sleep(5)
        return None

    standin.override = hang
    body = {**BODY, "note": "x" * 10_000}
    await enqueue(redis_url, *(update(f"ok-{i}", body=body) for i in range(60)))
    size = len(cast(bytes, await redis_client.lindex(KEYS.queue, 0)))
    # A claim brings three of these, not the claim batch of 16.
    monkeypatch.setattr("forwarder.queue.CLAIM_BYTES", 3 * size + 100)
    settings = fast_settings(redis_url, standin, concurrency=2, claim_batch=16, shutdown_grace=0.2)
    async with running(settings) as worker:
        inflight = KEYS.inflight(worker.id)
        await wait_until(lambda: _hlen(redis_client, inflight, 3), 5, "3 in flight")
        await asyncio.sleep(0.3)
        assert await redis_client.hlen(inflight) <= 2 + 2 * 3
    assert await redis_client.llen(KEYS.queue) == 60


async def _dead_count(redis: Redis, n: int) -> bool:
    return int(await redis.llen(KEYS.dead)) >= n


async def _dead_letter_of(redis: Redis, settings: Settings, within: float) -> dict[str, Any]:
    """Run a worker until the one message queued is dead-lettered; its record."""
    async with running(settings):
        await wait_until(lambda: _dead_count(redis, 1), within, "a dead letter")
    [record] = await dead_records(redis)
    return record


async def _all_acked(redis: Redis, worker_id: str) -> bool:
    """Nothing left queued, in flight, waiting or dead (so all were acked)."""
    counts = [
        await redis.llen(KEYS.queue),
        await redis.hlen(KEYS.inflight(worker_id)),
        await redis.zcard(KEYS.delayed),
        await redis.llen(KEYS.dead),
    ]
    return not any(counts)


async def _hlen(redis: Redis, key: str, n: int) -> bool:
    return int(await redis.hlen(key)) >= n


async def _zcard(redis: Redis, n: int) -> bool:
    return int(await redis.zcard(KEYS.delayed)) >= n


async def test_the_real_5_10_15_second_policy(
    redis_url: str, redis_client: Redis, standin: StandIn
) -> None:
    await enqueue(redis_url, update("down-real"))
    settings = fast_settings(redis_url, standin, retry_delays=(5.0, 10.0, 15.0))
    async with running(settings):
        await wait_until(lambda: _dead_count(redis_client, 1), 40, "a dead letter")
    times = [r.at for r in arrivals(standin, "down-real")]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) == 3
    for gap, delay in zip(gaps, (5.0, 10.0, 15.0), strict=True):
        assert delay <= gap < delay + 0.1
    [record] = await dead_records(redis_client)
    assert (record["reason"], record["attempts"]) == ("retries_exhausted", 4)


async def test_a_retry_recorded_late_still_fires_when_due(
    redis_url: str, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The recorder holds the failure for 0.9 s; the retry is due 1 s after the failure,
    # 0.1 s after it is recorded. The promoter's pass about 1 s after start (0.7 s after
    # the failure) saw nothing due and would sleep another second: recording the retry
    # must wake it, or the retry fires ~0.7 s late.
    monkeypatch.setattr(worker_module, "SETTLE_LINGER", 0.9)
    async with running(fast_settings(redis_url, standin, retry_delays=(1.0,))):
        await asyncio.sleep(0.3)
        await enqueue(redis_url, update("flaky1-late"))
        await standin.wait_for(lambda api: len(api.delivered) == 1, 5)
    failed, retried = standin.requests
    assert failed.status == 503
    assert retried.at - failed.at == pytest.approx(1.0, abs=0.3)


@pytest.mark.parametrize(("policy", "warned"), [("allkeys-lru", True), ("noeviction", False)])
async def test_warns_at_start_when_redis_may_evict_the_queue(
    redis_url: str, redis_client: Redis, standin: StandIn, policy: str, warned: bool
) -> None:
    await redis_client.config_set("maxmemory-policy", policy)
    try:
        with structlog.testing.capture_logs() as logs:
            async with running(fast_settings(redis_url, standin)) as worker:
                await wait_until(lambda: _logged(logs, "worker_started"), 5, "the worker to start")
    finally:
        await redis_client.config_set("maxmemory-policy", "noeviction")
    warnings = [e for e in logs if e["event"] == "redis_may_evict"]
    expected = [{"worker": worker.id, "policy": policy}] if warned else []
    assert [{k: e[k] for k in ("worker", "policy")} for e in warnings] == expected


async def _logged(logs: list[MutableMapping[str, Any]], event: str) -> bool:
    return any(e["event"] == event for e in logs)


# A refusal (here a key of the queue's holding another type) stops the worker; met
# first by a background task (the promoter, the heartbeat, the recorder), it was logged
# as a bug (worker_task_failed, with a traceback), cut off in-flight deliveries and left
# the exit line to the release's own, nameless error.
async def test_a_refusal_mid_run_stops_the_worker_in_redis_words_after_its_deliveries(
    redis_url: str, redis_client: Redis, standin: StandIn
) -> None:
    await enqueue(redis_url, *[update(f"slow400-{i}") for i in range(3)])

    async def meanwhile() -> None:
        await standin.wait_for(lambda api: len(api.requests) == 3, 5)
        await redis_client.set(KEYS.claims, "not the forwarder's")

    refused = r"^WRONGTYPE \{forwarder\}:claims holds a string"
    worker = await _refused(fast_settings(redis_url, standin), refused, meanwhile)
    assert len(standin.delivered) == 3  # each once: finished, recorded, not given back
    assert await redis_client.hlen(KEYS.inflight(worker.id)) == 0


async def test_a_second_refusal_met_by_the_recorder_is_no_bug_either(
    redis_url: str, redis_client: Redis, standin: StandIn
) -> None:
    # The promoter is refused first; then the recorder, settling the 503s' retries.
    await enqueue(redis_url, *[update(f"down-{i}") for i in range(20)])
    await redis_client.set(KEYS.delayed, "not the forwarder's")
    refused = r"^WRONGTYPE \{forwarder\}:delayed holds a string"
    await _refused(fast_settings(redis_url, standin), refused)
    assert await redis_client.llen(KEYS.queue) == 20  # given back, none lost


async def _refused(
    settings: Settings, refused: str, meanwhile: Callable[[], Awaitable[None]] | None = None
) -> worker_module.Worker:
    """Run a worker (and ``meanwhile``) until a refusal matching ``refused`` stops it;
    check that it said so once, and as no bug. Returns the worker."""
    seen: list[worker_module.Worker] = []

    async def run() -> None:
        async with running(settings) as worker:
            seen.append(worker)
            if meanwhile is not None:
                await meanwhile()

            async def stopped() -> bool:
                return worker.stopping

            await wait_until(stopped, 10, "a refusal to stop the worker")

    with structlog.testing.capture_logs() as logs, pytest.raises(ResponseError, match=refused):
        await run()
    events = [entry["event"] for entry in logs]
    assert events.count("redis_refused") == 1
    assert "worker_task_failed" not in events
    [worker] = seen
    assert not worker.failed
    return worker


def _job(token: int) -> _Job:
    return _Job(Claimed(token, b"{}"), {}, Put("/", "", b"{}"))


class _ReprCounted(asyncio.Future[None]):
    reprs = 0

    def __repr__(self) -> str:
        _ReprCounted.reprs += 1
        return super().__repr__()


async def test_a_consumer_woken_for_a_job_costs_no_repr_of_its_waiter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A removal that finds nothing formats the missing item's repr (CPython's ValueError):
    # for a future it cost a busy worker 10 µs a message.
    loop = asyncio.get_running_loop()
    monkeypatch.setattr(loop, "create_future", lambda: _ReprCounted(loop=loop))
    monkeypatch.setattr(_ReprCounted, "reprs", 0)
    ready = _Ready()
    taking = [asyncio.create_task(ready.take()) for _ in range(3)]
    await asyncio.sleep(0)

    ready.extend([_job(1), _job(2), _job(3)])
    taken = await asyncio.gather(*taking)

    assert [job.claimed.token for job in taken if job] == [1, 2, 3]
    assert _ReprCounted.reprs == 0


async def test_a_cancelled_take_leaves_no_waiter_behind() -> None:
    ready = _Ready()
    cancelled = asyncio.create_task(ready.take())
    waiting = asyncio.create_task(ready.take())
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)

    ready.extend([_job(1)])

    job = await asyncio.wait_for(waiting, 5)
    assert job is not None
    assert job.claimed.token == 1


@pytest.mark.parametrize("cancelled", ["before the job comes", "after it was woken"])
async def test_a_take_cancelled_before_it_resumes_leaves_the_job_to_another(
    cancelled: str,
) -> None:
    ready = _Ready()
    first = asyncio.create_task(ready.take())
    second = asyncio.create_task(ready.take())
    await asyncio.sleep(0)
    if cancelled == "before the job comes":
        first.cancel()
        ready.extend([_job(1)])
    else:
        ready.extend([_job(1)])
        first.cancel()
    await asyncio.gather(first, return_exceptions=True)

    job = await asyncio.wait_for(second, 5)
    assert job is not None
    assert job.claimed.token == 1
