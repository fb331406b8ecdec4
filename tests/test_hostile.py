"""Hostile and broken input: the producer refuses it clearly, the worker dead-letters it."""

from __future__ import annotations

import math
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from forwarder.model import Decoded, InvalidMessage, decode
from forwarder.outcome import RAW_KEPT
from forwarder.producer import InvalidUpdate, encode, make_update
from forwarder.queue import Keys
from forwarder.standin import StandIn
from forwarder.worker import running
from tests.support import fast_settings, wait_until

KEYS = Keys("forwarder")
CAP = 256 * 1024

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
envelope_keys = st.sampled_from(["id", "accountId", "visitorId", "sessionId", "body", "attempts"])
shapes = st.dictionaries(envelope_keys | st.text(max_size=8), json_values, max_size=6)


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


def _encoded(update: dict[str, Any]) -> bytes | list[str]:
    """The wire bytes, or the producer's errors."""
    try:
        return encode(update)[1]
    except InvalidUpdate as exc:
        return exc.errors


def _decoded(raw: bytes) -> Decoded | list[str]:
    """The decoded message, or the worker's errors."""
    try:
        return decode(raw, CAP)
    except InvalidMessage as exc:
        return exc.errors


@given(shapes)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_the_producer_accepts_only_what_the_worker_accepts(update: dict[str, Any]) -> None:
    result = _encoded(update)
    if isinstance(result, list):
        assert result
        assert all(isinstance(e, str) and ": " in e for e in result)
        return
    assert _finite(update)
    data = _decoded(result)  # what the producer sends, the worker takes
    assert isinstance(data, Decoded)
    assert orjson.loads(data.body) == update["body"]


@given(
    st.builds(
        make_update,
        st.just("123"),
        st.just("v"),
        st.just("s"),
        st.fixed_dictionaries({"pageId": st.just("p")}, optional={"x": json_values}),
    )
)
def test_bodies_with_any_json_extras_round_trip_or_are_refused(update: dict[str, Any]) -> None:
    result = _encoded(update)
    if isinstance(result, list):
        assert not _finite(update) or "64-bit" in result[0]
        return
    assert orjson.loads(result)["body"] == update["body"]


@given(st.binary(max_size=300))
@settings(max_examples=500)
def test_any_bytes_either_decode_or_raise_invalid_message(raw: bytes) -> None:
    assert _decoded(raw)  # a message, or at least one error: never another exception


def _envelope(body: bytes, account: bytes = b'"1"', visitor: bytes = b'"v"') -> bytes:
    return (
        b'{"accountId": ' + account + b', "visitorId": ' + visitor + b', "sessionId": "s", '
        b'"body": ' + body + b"}"
    )


HOSTILE = [
    b"",
    b"\x00\x01\x02",
    b"\xff\xfe\xfd",
    b'{"accountId": "\xff"}',
    b"[" * 5000 + b"]" * 5000,
    b'{"a":' * 2000 + b"1" + b"}" * 2000,
    _envelope(b'{"pageId": NaN}'),
    _envelope(b'{"pageId": "p", "x": Infinity}'),
    _envelope(b'{"pageId": "p"}', account=b'"1", "accountId": "2"'),
    _envelope(b'{"pageId": 1, "pageId": "p"}'),  # each value is checked
    # Compact, as the producer writes: fields the models do not know are read in full too.
    _envelope(b'{"pageId":"p","x":1e999}').replace(b", ", b",").replace(b": ", b":"),
    _envelope(b'{"pageId":"p","x":"\xff"}').replace(b", ", b",").replace(b": ", b":"),
    _envelope(b'{"pageId": "p"}', account=b'"../../evil"'),
    _envelope(b'{"pageId": "p"}', visitor=b'"v\\n"'),
    b'{"accountId": "1", "visitorId": "v", "sessionId": "s", "body": {"pageId": "'
    + b"x" * 300_000
    + b'"}}',
    orjson.dumps({"accountId": "1", "visitorId": "v", "sessionId": "s", "body": []}),
    orjson.dumps({"accountId": 1, "visitorId": "v", "sessionId": "s", "body": {"pageId": "p"}}),
    b"12345678901234567890123456789012345678901234567890",
    b'"just a string"',
    b"null",
]


async def test_the_worker_dead_letters_every_hostile_element_and_keeps_going(
    redis_url: str, redis_client: Redis, standin: StandIn
) -> None:
    good = orjson.dumps(make_update("123", "ok-last", "s", {"pageId": "p"}))
    await redis_client.lpush(KEYS.queue, *HOSTILE, good)
    async with running(fast_settings(redis_url, standin)):
        await standin.wait_for(lambda api: len(api.delivered) == 1, 10)
        await wait_until(lambda: _dead_is(redis_client, len(HOSTILE)), 10, "all dead letters")
    records = [orjson.loads(r) for r in await redis_client.lrange(KEYS.dead, 0, -1)]
    assert {r["reason"] for r in records} == {"invalid_message"}
    # Each as it was pushed, an oversized one cut at what a dead letter keeps.
    assert sorted(r["raw"] for r in records) == sorted(
        h[:RAW_KEPT].decode("utf-8", errors="backslashreplace") for h in HOSTILE
    )
    assert [r.visitor_id for r in standin.requests] == ["ok-last"]


async def test_path_parts_cannot_reach_another_path(redis_url: str, standin: StandIn) -> None:
    sneaky = "ok-../../../service/x?sid=1#frag"
    good = orjson.dumps(make_update("123", sneaky, "s/../..?x=1", {"pageId": "p"}))
    redis = Redis.from_url(redis_url)
    await redis.lpush(KEYS.queue, good)
    await redis.aclose()
    async with running(fast_settings(redis_url, standin)):
        await standin.wait_for(lambda api: len(api.delivered) == 1, 10)
    [received] = standin.requests
    assert (received.account_id, received.visitor_id, received.session_id) == (
        "123",
        sneaky,
        "s/../..?x=1",
    )


async def _dead_is(redis: Redis, n: int) -> bool:
    return int(await redis.llen(KEYS.dead)) >= n
