"""The queue's scripts on their own, against a real Redis."""

from __future__ import annotations

import time

import pytest
from redis.asyncio import Redis

from forwarder.producer import Producer, make_update
from forwarder.queue import Keys, Queue, Settlement

KEYS = Keys("forwarder")


async def test_a_claim_sent_again_after_a_lost_reply_hands_over_the_same_batch(
    redis_client: Redis,
) -> None:
    await Producer(redis_client).enqueue_many(
        [make_update("1", f"v{i}", "s", {"pageId": "p"}) for i in range(10)]
    )
    queue = Queue(redis_client, "forwarder", "w1")
    first = await queue.claim(4)
    # As if that reply had been lost: the worker's next call repeats it.
    queue._claimed -= 4
    queue._unanswered = 4
    again = await queue.claim(2)
    assert again == first
    assert await redis_client.hlen(KEYS.inflight("w1")) == 4
    assert await redis_client.llen(KEYS.queue) == 6
    fresh = await queue.claim(3)
    assert [c.token for c in fresh] == [5, 6, 7]
    assert not {c.raw for c in fresh} & {c.raw for c in first}


async def test_the_blocking_wait_leaves_the_queue_as_it_was(redis_client: Redis) -> None:
    await redis_client.lpush(KEYS.queue, b"a", b"b")
    queue = Queue(redis_client, "forwarder", "w1")
    assert await queue.wait(1)
    assert await redis_client.lrange(KEYS.queue, 0, -1) == [b"b", b"a"]
    await redis_client.delete(KEYS.queue)
    assert not await queue.wait(1)


async def test_a_retry_is_due_its_delay_after_it_was_decided_not_after_it_was_recorded(
    redis_client: Redis,
) -> None:
    await redis_client.lpush(KEYS.queue, b"a", b"b")
    queue = Queue(redis_client, "forwarder", "w1")
    first, second = await queue.claim(2)
    decided = time.monotonic() - 0.3  # the recorder batched it for 0.3 s
    acked, kept = await queue.settle(
        [
            Settlement("retry", first.token, b"late", 1.0, decided),
            Settlement("retry", second.token, b"now", 1.0),
        ]
    )
    seconds, micros = await redis_client.time()
    now = seconds + micros / 1e6
    assert (acked, kept) == (0, [True, True])
    assert await redis_client.zscore(KEYS.delayed, b"late") == pytest.approx(now + 0.7, abs=0.1)
    assert await redis_client.zscore(KEYS.delayed, b"now") == pytest.approx(now + 1.0, abs=0.1)
