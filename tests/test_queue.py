"""The queue's scripts on their own, against a real Redis."""

from __future__ import annotations

from redis.asyncio import Redis

from forwarder.producer import Producer, make_update
from forwarder.queue import Keys, Queue

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
