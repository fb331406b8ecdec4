"""The producer API: validation before Redis, one round trip per batch, exact counts."""

from __future__ import annotations

import copy
from types import MappingProxyType
from typing import Any
from unittest.mock import ANY

import orjson
import pytest
import redis
from pydantic import ValidationError
from redis.asyncio import Redis

from forwarder.embedded import free_port
from forwarder.model import SessionUpdate, UpdateSessionBody, format_errors
from forwarder.producer import (
    InvalidUpdate,
    Producer,
    QueueUnavailable,
    SyncProducer,
    encode,
    make_update,
)
from forwarder.queue import Keys

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


def test_sync_enqueue_validates_before_redis() -> None:
    # An unreachable Redis is never contacted: validation fails first.
    producer = SyncProducer.from_url("redis://127.0.0.1:1/0")
    with pytest.raises(InvalidUpdate, match="accountId"):
        producer.enqueue("12/34", "v", "s", BODY)


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


def test_encode_leaves_the_callers_mapping_alone() -> None:
    update = make_update("123", "v", "s", BODY)
    before = copy.deepcopy(update)

    message_id, raw = encode(MappingProxyType(update))

    assert update == before
    assert orjson.loads(raw) == {**before, "id": message_id, "enqueuedAt": ANY}


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


def test_encode_refuses_infinity_under_a_fields_python_name() -> None:
    # orjson would write it as null: the producer must refuse it, not send a null.
    update = make_update("123", "v", "s", {**BODY, "page_id": float("inf")})

    with pytest.raises(InvalidUpdate) as caught:
        encode(update)

    assert caught.value.errors == ["body.page_id.float: Input should be a finite number"]
