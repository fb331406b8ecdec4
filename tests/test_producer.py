"""The producer API: validation before Redis, one round trip per batch, exact counts."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import decimal
import enum
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any
from unittest.mock import ANY

import orjson
import pytest
import redis
import redis.asyncio
from pydantic import ValidationError
from redis.asyncio import Redis

from forwarder.embedded import RedisServer, free_port
from forwarder.model import SessionUpdate, UpdateSessionBody, format_errors
from forwarder.producer import (
    PUSH_BYTES,
    InvalidUpdate,
    Producer,
    QueueUnavailable,
    SyncProducer,
    encode,
    encode_many,
    make_update,
)
from forwarder.queue import Keys
from tests.support import BUSY_AFTER, run_busy_script

QUEUE = Keys("forwarder").queue
BODY: dict[str, Any] = {"pageId": "p1", "engagementAttributes": [{"type": "searchInfo"}]}


async def test_enqueue_returns_the_id_and_pushes_the_wire_message(
    redis_url: str, redis_client: Redis
) -> None:
    producer = Producer.from_url(redis_url)
    try:
        message_id = await producer.enqueue("123", "v1", "s1", BODY)
    finally:
        await producer.aclose()
    [raw] = await redis_client.lrange(QUEUE, 0, -1)
    message = orjson.loads(raw)
    assert message["id"] == message_id
    assert (message["accountId"], message["visitorId"], message["sessionId"]) == ("123", "v1", "s1")
    assert message["body"] == BODY
    assert isinstance(message["enqueuedAt"], float)


async def test_a_batch_with_one_invalid_update_enqueues_nothing(
    redis_url: str, redis_client: Redis
) -> None:
    good = make_update("123", "v1", "s1", BODY)
    bad = make_update("123", "v2", "s1", {"engagementAttributes": []})
    producer = Producer.from_url(redis_url)
    try:
        with pytest.raises(InvalidUpdate) as caught:
            await producer.enqueue_many([good, good, bad])
    finally:
        await producer.aclose()
    assert caught.value.index == 2
    assert caught.value.errors == ["body.pageId: Field required"]
    assert "update #2 is invalid: body.pageId: Field required" in str(caught.value)
    assert await redis_client.llen(QUEUE) == 0


async def test_models_and_given_ids_are_kept(redis_url: str, redis_client: Redis) -> None:
    body = UpdateSessionBody.model_validate(BODY)
    model = SessionUpdate.model_validate(
        {"id": "m-1", "accountId": "123", "visitorId": "v", "sessionId": "s", "body": BODY}
    )
    producer = Producer.from_url(redis_url, queue="other")
    try:
        ids = await producer.enqueue_many([model])
        ids.append(await producer.enqueue("123", "v", "s", body, id="m-2"))
    finally:
        await producer.aclose()
    assert ids == ["m-1", "m-2"]
    raws = await redis_client.lrange(Keys("other").queue, 0, -1)
    assert [orjson.loads(r)["body"] for r in raws] == [BODY, BODY]


def test_sync_batch_of_ten_thousand_is_exact_and_in_order(redis_url: str) -> None:
    updates = [make_update("123", f"v{i}", "s", BODY) for i in range(10_000)]
    client = redis.Redis.from_url(redis_url)
    producer = SyncProducer(client)
    try:
        ids = producer.enqueue_many(updates)
        raws = client.lrange(QUEUE, 0, -1)
    finally:
        producer.close()
    assert len(ids) == len(set(ids)) == 10_000
    # Workers take from the right: the first enqueued is the rightmost.
    taken_order = [orjson.loads(r) for r in reversed(raws)]
    assert [m["id"] for m in taken_order] == ids
    assert [m["visitorId"] for m in taken_order] == [f"v{i}" for i in range(10_000)]


# --- batches of several LPUSHes: one MULTI/EXEC streamed on one connection ------------

BIG = 1500


def _updates(n: int = BIG, tag: str = "v") -> list[dict[str, Any]]:
    return [make_update("123", f"{tag}{i}", "s", BODY) for i in range(n)]


def test_a_big_batch_spans_several_lpushes() -> None:
    # What the tests below rely on: their batches stream, they are not one LPUSH.
    assert sum(map(len, encode_many(_updates())[1])) > 3 * PUSH_BYTES


@contextlib.asynccontextmanager
async def _closing(producer: Producer, sync: SyncProducer) -> AsyncIterator[None]:
    """Closes the async and the sync producer at the end of the block."""
    try:
        yield
    finally:
        await producer.aclose()
        sync.close()


async def _queued_visitors(client: Redis) -> list[str]:
    return [orjson.loads(r)["visitorId"] for r in reversed(await client.lrange(QUEUE, 0, -1))]


async def test_a_bad_update_deep_in_a_big_batch_enqueues_none_of_it(
    redis_url: str, redis_client: Redis
) -> None:
    bad = make_update("123", "bad", "s", {"engagementAttributes": []})
    producer = Producer.from_url(redis_url)
    sync = SyncProducer.from_url(redis_url)
    async with _closing(producer, sync):
        # The first LPUSHes are already queued in the transaction when the bad one shows.
        with pytest.raises(InvalidUpdate) as caught:
            await producer.enqueue_many([*_updates(), bad])
        assert caught.value.index == BIG
        with pytest.raises(InvalidUpdate):
            sync.enqueue_many([*_updates(), bad])
        assert await redis_client.llen(QUEUE) == 0
        # The aborted transaction's connection is not handed out again half used.
        await producer.enqueue_many(_updates(tag="a"))
        sync.enqueue_many(_updates(tag="s"))
    expected = [f"a{i}" for i in range(BIG)] + [f"s{i}" for i in range(BIG)]
    assert await _queued_visitors(redis_client) == expected


async def test_an_error_reply_in_a_big_batch_raises_and_enqueues_nothing(
    redis_url: str, redis_client: Redis
) -> None:
    await redis_client.set(QUEUE, "not a list")
    producer = Producer.from_url(redis_url)
    sync = SyncProducer.from_url(redis_url)
    async with _closing(producer, sync):
        with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
            await producer.enqueue_many(_updates())
        with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
            sync.enqueue_many(_updates())
        assert await redis_client.get(QUEUE) == b"not a list"
        await redis_client.delete(QUEUE)
        await producer.enqueue_many(_updates(tag="a"))
        sync.enqueue_many(_updates(tag="s"))
    assert len(await _queued_visitors(redis_client)) == 2 * BIG


async def test_a_batch_streaming_past_the_health_check_interval_lands_whole(
    redis_url: str, redis_client: Redis
) -> None:
    # redis-py checks a connection's health on a send once its interval has passed since
    # the last reply: inside the transaction that PING would read MULTI's reply instead.
    def slow(tag: str) -> Iterator[dict[str, Any]]:
        for i, update in enumerate(_updates(tag=tag)):
            if i == BIG // 2:
                time.sleep(1.2)  # a slow source: a cursor, a generator doing work
            yield update

    producer = Producer(redis.asyncio.Redis.from_url(redis_url, health_check_interval=1))
    sync = SyncProducer(redis.Redis.from_url(redis_url, health_check_interval=1))
    async with _closing(producer, sync):
        await producer.enqueue_many(slow("a"))
        sync.enqueue_many(slow("s"))
    expected = [f"a{i}" for i in range(BIG)] + [f"s{i}" for i in range(BIG)]
    assert await _queued_visitors(redis_client) == expected


async def test_a_producer_takes_the_workers_max_message_bytes(
    redis_url: str, redis_client: Redis
) -> None:
    big = {"pageId": "p" * 5000}
    producer = Producer.from_url(redis_url, max_message_bytes=4096)
    sync = SyncProducer.from_url(redis_url, max_message_bytes=4096)
    async with _closing(producer, sync):
        with pytest.raises(InvalidUpdate, match="over the 4096-byte cap"):
            await producer.enqueue("123", "v", "s", big)
        with pytest.raises(InvalidUpdate, match="over the 4096-byte cap"):
            sync.enqueue("123", "v", "s", big)
        await producer.enqueue("123", "v", "s", BODY)
    assert await _queued_visitors(redis_client) == ["v"]


def test_redis_going_away_mid_batch_is_queue_unavailable_and_lands_nothing(
    own_redis: RedisServer,
) -> None:
    def killing_redis_half_way() -> Iterator[dict[str, Any]]:
        for i, update in enumerate(_updates()):
            if i == BIG // 2:
                own_redis.kill()
            yield update

    producer = SyncProducer.from_url(own_redis.url)
    try:
        producer.enqueue("123", "first", "s", BODY)  # connected before the batch
        with pytest.raises(QueueUnavailable, match="did not take the batch"):
            producer.enqueue_many(killing_redis_half_way())
        own_redis.start()
        assert [orjson.loads(r)["visitorId"] for r in producer.client.lrange(QUEUE, 0, -1)] == [
            "first"
        ]
    finally:
        producer.close()


async def test_a_big_batch_cancelled_half_way_lands_whole_or_not_at_all(
    redis_url: str, redis_client: Redis
) -> None:
    producer = Producer.from_url(redis_url)

    def cancelling_half_way() -> Iterator[dict[str, Any]]:
        for i, update in enumerate(_updates()):
            if i == BIG // 2:
                job.cancel()
            yield update

    try:
        job = asyncio.create_task(producer.enqueue_many(cancelling_half_way()))
        # On Python 3.11 redis-py's send (asyncio.wait_for) may swallow a cancel that
        # arrives while it runs, and the batch goes on; from 3.12 the next send raises.
        ids = await asyncio.gather(job, return_exceptions=True)
        queued = await _queued_visitors(redis_client)
        if isinstance(ids[0], asyncio.CancelledError):
            assert queued == []
        else:
            assert queued == [f"v{i}" for i in range(BIG)]
        await redis_client.delete(QUEUE)
        await producer.enqueue_many(_updates())
    finally:
        await producer.aclose()
    assert await redis_client.llen(QUEUE) == BIG


def test_sync_enqueue_validates_before_redis() -> None:
    # An unreachable Redis is never contacted: validation fails first.
    producer = SyncProducer.from_url("redis://127.0.0.1:1/0")
    with pytest.raises(InvalidUpdate, match="accountId"):
        producer.enqueue("12/34", "v", "s", BODY)


@pytest.mark.parametrize("producer", [Producer, SyncProducer])
@pytest.mark.parametrize(
    ("url", "error"),
    [
        # redis-py would read it as database 0: another environment's queue, perhaps.
        ("redis://127.0.0.1:1/1x", "must be a database number"),
        # redis-py would hand it to the connection: a TypeError at the first enqueue.
        ("redis://127.0.0.1:1/0?sockettimeout=2", "does not take: 'sockettimeout'"),
    ],
)
def test_a_producer_refuses_a_wrong_url_when_built_as_the_worker_does(
    producer: type[Producer | SyncProducer], url: str, error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        producer.from_url(url)


def test_a_url_option_only_the_blocking_client_takes_is_the_sync_producers_to_use() -> None:
    # The check asked the asyncio classes, and refused it to the sync producer too.
    url = "rediss://127.0.0.1:1/0?ssl_validate_ocsp_stapled=true"
    SyncProducer.from_url(url).close()
    with pytest.raises(ValueError, match="does not take: 'ssl_validate_ocsp_stapled'"):
        Producer.from_url(url)


async def test_an_unreachable_redis_is_a_typed_error_not_a_silent_drop() -> None:
    producer = Producer.from_url(f"redis://127.0.0.1:{free_port()}/0")
    try:
        with pytest.raises(QueueUnavailable, match="did not take the batch"):
            await producer.enqueue("123", "v", "s", BODY)
    finally:
        await producer.aclose()
    sync = SyncProducer.from_url(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(QueueUnavailable):
        sync.enqueue("123", "v", "s", BODY)


async def test_redis_busy_with_another_clients_script_is_queue_unavailable(
    tmp_path: Path,
) -> None:
    # Past busy-reply-threshold Redis answers BUSY to every other call until the script
    # ends: an outage, as the workers take it, not a refusal to raise as it came.
    with RedisServer(tmp_path / "busy", extra_args=BUSY_AFTER) as server:
        busy = asyncio.create_task(asyncio.to_thread(run_busy_script, server.url))
        await asyncio.sleep(0.5)
        producer = Producer.from_url(server.url)
        sync = SyncProducer.from_url(server.url)
        async with _closing(producer, sync):
            with pytest.raises(QueueUnavailable, match="BUSY"):
                await producer.enqueue("123", "v", "s", BODY)
            with pytest.raises(QueueUnavailable, match="BUSY"):
                sync.enqueue("123", "v", "s", BODY)
            await busy
            await producer.enqueue("123", "v", "s", BODY)


async def test_a_password_redis_refuses_is_raised_as_it_came(tmp_path: Path) -> None:
    # A setting to fix: QueueUnavailable would have the caller retry for ever.
    with RedisServer(tmp_path / "auth", password="right") as server:
        wrong = server.url.replace(":right@", ":wrong@")
        producer = Producer.from_url(wrong)
        sync = SyncProducer.from_url(wrong)
        async with _closing(producer, sync):
            with pytest.raises(redis.exceptions.AuthenticationError):
                await producer.enqueue("123", "v", "s", BODY)
            with pytest.raises(redis.exceptions.AuthenticationError):
                sync.enqueue("123", "v", "s", BODY)


def test_an_outage_met_while_the_caller_handles_a_refusal_is_still_an_outage() -> None:
    # The caller's own exception is the context of what redis-py raises inside its
    # except block: it says nothing of this call.
    sync = SyncProducer.from_url(f"redis://127.0.0.1:{free_port()}/0")
    try:
        raise redis.exceptions.AuthenticationError("the caller's, another client's")
    except redis.exceptions.AuthenticationError:
        with pytest.raises(QueueUnavailable):
            sync.enqueue("123", "v", "s", BODY)
    finally:
        sync.close()


async def test_the_cluster_flag_against_a_lone_redis_is_no_outage(redis_url: str) -> None:
    # A setting to fix: QueueUnavailable would have the caller retry for ever.
    producer = Producer.from_url(redis_url, cluster=True)
    try:
        with pytest.raises(redis.exceptions.RedisClusterException, match="Cluster mode"):
            await producer.enqueue("123", "v", "s", BODY)
    finally:
        await producer.aclose()


def test_encode_leaves_the_callers_mapping_alone() -> None:
    update = make_update("123", "v", "s", BODY)
    before = copy.deepcopy(update)

    message_id, raw = encode(MappingProxyType(update))

    assert update == before
    assert orjson.loads(raw) == {**before, "id": message_id, "enqueuedAt": ANY}


async def test_python_field_names_are_enqueued_under_their_wire_names(
    redis_url: str, redis_client: Redis
) -> None:
    # The models take a field's Python name; the queue, the worker and the API know only
    # the wire names.
    update = {
        "account_id": "123",
        "visitor_id": "v1",
        "session_id": "s1",
        "body": {"page_id": "p1", "engagement_attributes": [{"type": "searchInfo"}], "x_y": 1},
    }
    producer = Producer.from_url(redis_url)
    try:
        message_id = await producer.enqueue_many([update])
    finally:
        await producer.aclose()
    [raw] = await redis_client.lrange(QUEUE, 0, -1)
    assert orjson.loads(raw) == {
        "accountId": "123",
        "visitorId": "v1",
        "sessionId": "s1",
        "body": {**BODY, "x_y": 1},
        "id": message_id[0],
        "enqueuedAt": ANY,
    }


def test_encode_gives_the_models_errors() -> None:
    update = make_update("12/34", "v", "s", {"pageId": "p", "engagementAttributes": [{}]})
    with pytest.raises(ValidationError) as expected:
        SessionUpdate.model_validate(update)

    with pytest.raises(InvalidUpdate) as caught:
        encode(update, index=3)

    assert caught.value.errors == format_errors(expected.value)
    assert caught.value.index == 3


@pytest.mark.parametrize("update", [["not", "an", "object"], None, 12])
def test_encode_refuses_what_is_not_a_mapping(update: Any) -> None:
    with pytest.raises(InvalidUpdate) as caught:
        encode(update)

    assert caught.value.errors == [
        f"(root): an update must be a mapping or a SessionUpdate, not {type(update).__name__}"
    ]


def test_encode_refuses_nan_where_the_models_take_any_value() -> None:
    # impExpanded's fields are untyped: the models take NaN, which orjson writes as null.
    body = {"pageId": "p", "impAttributes": [{"type": "impExpanded", "expanded": float("nan")}]}
    with pytest.raises(InvalidUpdate) as caught:
        encode(make_update("123", "v", "s", body))
    assert caught.value.errors == ["body.impAttributes.0.expanded: Input should be a finite number"]


def test_a_session_update_changed_after_it_was_built_is_checked_again() -> None:
    update = SessionUpdate.model_validate(make_update("123", "v", "s", BODY))
    update.account_id = "../../x"
    update.body.page_id = 42  # type: ignore[assignment]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pydantic's serializer warning would quote the value
        with pytest.raises(InvalidUpdate) as caught:
            encode(update)
    assert caught.value.errors == [
        "accountId: String should match pattern '^[A-Za-z0-9_]{1,20}$'",
        "body.pageId: Input should be a valid string",
    ]


_UNTYPED = {"pageId": "p", "impAttributes": [{"type": "impExpanded"}]}


@pytest.mark.parametrize(
    "value",
    [
        float("nan"),
        float("inf"),
        b"\xff",
        datetime.datetime(2026, 1, 1),
        decimal.Decimal("1.5"),
        {1, 2},
    ],
    ids=["nan", "inf", "bytes", "datetime", "decimal", "set"],
)
def test_a_model_is_judged_as_the_same_data_in_a_dict_is(value: object) -> None:
    # Dumped as JSON first, a model's NaN became null, a Decimal a string, and so on.
    update = SessionUpdate.model_validate(make_update("123", "v", "s", _UNTYPED))
    update.body.imp_attributes[0].expanded = value  # type: ignore[index,union-attr]
    body = {"pageId": "p", "impAttributes": [{"type": "impExpanded", "expanded": value}]}
    with pytest.raises(InvalidUpdate) as as_dict:
        encode(make_update("123", "v", "s", body))

    for given in (update, make_update("123", "v", "s", update.body)):
        with pytest.raises(InvalidUpdate) as as_model:
            encode(given)
        assert as_model.value.errors == as_dict.value.errors


def test_a_null_enqueued_at_is_filled_in_as_a_missing_one_is() -> None:
    _, raw = encode({**make_update("123", "v", "s", BODY), "enqueuedAt": None}, enqueued_at=7.5)
    assert orjson.loads(raw)["enqueuedAt"] == 7.5


def test_encode_refuses_infinity_under_a_fields_python_name() -> None:
    # orjson would write it as null: the producer must refuse it, not send a null.
    update = make_update("123", "v", "s", {**BODY, "page_id": float("inf")})

    with pytest.raises(InvalidUpdate) as caught:
        encode(update)

    assert caught.value.errors == ["body.page_id.float: Input should be a finite number"]


class _Kind(enum.Enum):
    CART = "cart"


_ENVELOPE = {"accountId": "1", "visitorId": "v", "sessionId": "s"}
_SDE = {"type": _Kind.CART, "total": 1.0, "numItems": 1}


@pytest.mark.parametrize(
    ("body", "with_a_null"),
    [
        ({"pageId": uuid.UUID(int=7)}, {"pageId": uuid.UUID(int=7), "x": None}),
        (
            {"pageId": "p", "engagementAttributes": [_SDE]},
            {"pageId": "p", "engagementAttributes": [{**_SDE, "currency": None}]},
        ),
    ],
    ids=["uuid_page_id", "enum_type"],
)
def test_a_value_orjson_writes_as_json_is_taken_whatever_nulls_sit_beside_it(
    body: dict[str, Any], with_a_null: dict[str, Any]
) -> None:
    # A null sent the check to the models, which refuse a UUID or an Enum for a string.
    encode({**_ENVELOPE, "body": body})
    encode({**_ENVELOPE, "body": with_a_null})
    encode({**_ENVELOPE, "body": body, "lastError": None})


def test_enqueued_at_is_taken_under_its_python_name() -> None:
    update = {"accountId": "1", "visitorId": "v", "sessionId": "s", "body": {"pageId": "p"}}
    _, raw = encode({**update, "enqueued_at": 1764380000.0})
    assert orjson.loads(raw)["enqueuedAt"] == 1764380000.0
    _, raw = encode({**update, "enqueued_at": None}, enqueued_at=5.0)
    assert orjson.loads(raw)["enqueuedAt"] == 5.0


async def test_a_big_batch_for_a_user_without_multi_raises_and_enqueues_nothing(
    own_redis: RedisServer,
) -> None:
    # A least-privilege producer: small batches (one LPUSH) pass, so only a big one shows
    # it. Before, each streamed LPUSH was applied on its own, and the call still raised:
    # a caller's retry after fixing the ACL enqueued the batch twice.
    admin = redis.asyncio.Redis.from_url(own_redis.url)
    await admin.acl_setuser(
        "producer",
        enabled=True,
        passwords=["+pw"],
        keys=["{forwarder}:*"],
        commands=["+lpush", "+ping"],
    )
    url = own_redis.url.replace("redis://", "redis://producer:pw@", 1)
    producer = Producer.from_url(url)
    sync = SyncProducer.from_url(url)
    try:
        async with _closing(producer, sync):
            await producer.enqueue("123", "v", "s", BODY)  # one LPUSH: allowed
            with pytest.raises(redis.exceptions.NoPermissionError, match="multi"):
                await producer.enqueue_many(_updates())
            with pytest.raises(redis.exceptions.NoPermissionError, match="multi"):
                sync.enqueue_many(_updates())
        assert await admin.llen(QUEUE) == 1
    finally:
        await admin.aclose()
