"""The queue's scripts on their own, against a real Redis."""

from __future__ import annotations

import asyncio
import re
import time

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from forwarder import queue as queue_module
from forwarder.producer import Producer, make_update
from forwarder.queue import Keys, Op, Queue, Settlement

KEYS = Keys("forwarder")


async def _worker_with_ten_pending(redis_client: Redis) -> Queue:
    """Worker w1's queue, with ten messages pending (visitors v0 to v9)."""
    await Producer(redis_client).enqueue_many(
        [make_update("1", f"v{i}", "s", {"pageId": "p"}) for i in range(10)]
    )
    return Queue(redis_client, "forwarder", "w1")


async def test_a_claim_sent_again_after_a_lost_reply_hands_over_the_same_batch(
    redis_client: Redis,
) -> None:
    queue = await _worker_with_ten_pending(redis_client)
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


async def test_a_claim_run_late_after_later_claims_writes_over_nothing(
    redis_client: Redis,
) -> None:
    queue = await _worker_with_ten_pending(redis_client)
    first = await queue.claim(2)
    await queue.claim(2)
    await queue.settle([Settlement("ack", first[0].token)])
    held = await redis_client.hgetall(KEYS.inflight("w1"))
    # The first claim's request, held up in the network, runs now: the same worker id,
    # the same claim numbers (a new Queue starts at the same first number).
    late = await Queue(redis_client, "forwarder", "w1").claim(2)
    assert late == first[1:]  # what is still in flight under its numbers
    assert await redis_client.hgetall(KEYS.inflight("w1")) == held
    assert await redis_client.llen(KEYS.queue) == 6
    assert [c.token for c in await queue.claim(1)] == [5]
    # A clean stop leaves no claim record behind.
    await queue.release()
    assert await redis_client.exists(KEYS.claims) == 0


async def test_what_a_live_worker_no_longer_holds_goes_back_to_the_queue(
    redis_client: Redis,
) -> None:
    await redis_client.lpush(KEYS.queue, b"a", b"b", b"c")
    queue = Queue(redis_client, "forwarder", "w1")
    a, _, _ = await queue.claim(3)
    await queue.settle([Settlement("ack", a.token)])
    # Redis loses the ack (restarted from an older snapshot): a is in flight again.
    await redis_client.hset(KEYS.inflight("w1"), str(a.token), a.raw)
    # Numbers above the worker's mark belong to a claim whose reply is on its way.
    await redis_client.hset(KEYS.inflight("w1"), "4", b"d")
    assert await queue.give_back_strays() == 1
    assert await redis_client.lrange(KEYS.queue, 0, -1) == [b"a"]
    assert sorted(await redis_client.hkeys(KEYS.inflight("w1"))) == [b"2", b"3", b"4"]
    assert await queue.give_back_strays() == 0


async def _reaped_by(queue: Queue, dead_after: float) -> dict[str, int]:
    """Heartbeat ``queue`` steadily until it takes some worker for dead."""
    deadline = time.monotonic() + 10 * dead_after + 1
    while time.monotonic() < deadline:
        recovered = await queue.heartbeat(dead_after)
        if recovered:
            return recovered
        await asyncio.sleep(dead_after / 5)
    raise AssertionError("no worker was taken for dead")


async def test_a_worker_that_has_just_started_judges_no_one(redis_client: Redis) -> None:
    # As Redis comes back from an outage longer than the timeout, every worker looks
    # silent; one that starts just then must leave them time to reconnect too.
    timeout = 0.3
    await redis_client.lpush(KEYS.queue, b"a")
    await Queue(redis_client, "forwarder", "w1").claim(1)
    await asyncio.sleep(timeout + 0.1)
    assert await Queue(redis_client, "forwarder", "w2").heartbeat(timeout) == {}
    assert await redis_client.hlen(KEYS.inflight("w1")) == 1


async def test_a_worker_silent_as_long_as_the_others_judges_none_of_them_at_once(
    redis_client: Redis,
) -> None:
    timeout = 0.3
    w1, w2 = Queue(redis_client, "forwarder", "w1"), Queue(redis_client, "forwarder", "w2")
    await redis_client.lpush(KEYS.queue, b"a", b"b", b"c")
    await w2.claim(3)
    await w1.heartbeat(timeout)
    await asyncio.sleep(timeout + 0.1)  # Redis down for longer than the timeout: no one beat
    back = time.monotonic()
    assert await w1.heartbeat(timeout) == {}  # w2 was as silent as w1 itself
    # w2 never comes back: once w1 has been in touch for a whole timeout, it is dead.
    recovered: dict[str, int] = {}
    while not recovered:
        await asyncio.sleep(0.05)
        recovered = await w1.heartbeat(timeout)
    assert recovered == {"w2": 3}
    assert time.monotonic() - back >= timeout - 0.05  # Redis' clock and ours may differ


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


# Lua's unpack takes fewer than 8,000 values, and a worker may hold more in flight:
# up to FORWARDER_CONCURRENCY (10,000 at most) plus twice the claim batch.
MANY = 9_000


async def _claim_many(redis_client: Redis, worker: str) -> tuple[Queue, list[bytes]]:
    pushed = [f"m{i}".encode() for i in range(MANY)]
    await redis_client.lpush(KEYS.queue, *pushed)  # m0 at the consuming (right) end
    queue = Queue(redis_client, "forwarder", worker)
    while await redis_client.llen(KEYS.queue):
        await queue.claim(1000)
    assert await redis_client.hlen(KEYS.inflight(worker)) == MANY
    return queue, pushed


async def test_a_release_gives_back_more_than_lua_can_unpack_at_once(redis_client: Redis) -> None:
    queue, pushed = await _claim_many(redis_client, "w1")
    assert await queue.release() == MANY
    # Back as they were pushed: the oldest at the consuming end, taken first again.
    assert await redis_client.lrange(KEYS.queue, 0, -1) == pushed[::-1]
    assert not await redis_client.exists(KEYS.inflight("w1"))


async def test_a_dead_worker_holding_more_than_lua_can_unpack_at_once_is_recovered(
    redis_client: Redis,
) -> None:
    _, pushed = await _claim_many(redis_client, "w1")
    assert await _reaped_by(Queue(redis_client, "forwarder", "w2"), 0.1) == {"w1": MANY}
    assert await redis_client.lrange(KEYS.queue, 0, -1) == pushed[::-1]
    assert await redis_client.zrange(KEYS.workers, 0, -1) == [b"w2"]
    assert await redis_client.exists(KEYS.inflight("w1")) == 0
    # Its claim record is kept a while (see the next test), and when it was reaped.
    assert await redis_client.hexists(KEYS.claims, "w1")
    assert await redis_client.zscore(KEYS.reaped, "w1") is not None


async def test_a_late_claim_of_a_reaped_worker_that_was_only_stalled_takes_nothing(
    redis_client: Redis,
) -> None:
    timeout = 0.3
    await redis_client.lpush(KEYS.queue, b"m1", b"m2", b"m3", b"m4")
    w1, w2 = Queue(redis_client, "forwarder", "w1"), Queue(redis_client, "forwarder", "w2")
    first = await w1.claim(2)
    # w1 stalls (a GC pause, a frozen VM) past the timeout.
    assert await _reaped_by(w2, timeout) == {"w1": 2}
    assert [c.raw for c in await w2.claim(2)] == [b"m1", b"m2"]
    # A copy of w1's first claim, held up in the network, runs now: it must not take m3
    # and m4 under the numbers w1 still holds m1 and m2 by.
    assert await Queue(redis_client, "forwarder", "w1").claim(2) == []
    acked, _ = await w1.settle([Settlement("ack", c.token) for c in first])
    assert acked == 0
    assert await redis_client.lrange(KEYS.queue, 0, -1) == [b"m4", b"m3"]


async def test_a_reaped_workers_claim_record_goes_once_no_late_copy_can_run(
    redis_client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queue_module, "CLAIM_COPY_LIFETIME", 0.3)
    await redis_client.lpush(KEYS.queue, b"a", b"b")
    w1, w2, w3 = (Queue(redis_client, "forwarder", w) for w in ("w1", "w2", "w3"))
    await w1.claim(1)
    await w3.claim(1)
    assert await _reaped_by(w2, 0.1) == {"w1": 1, "w3": 1}
    await w3.heartbeat(0.1)  # w3 was only stalled, and is back
    await asyncio.sleep(0.4)
    await w3.heartbeat(10)
    await w2.heartbeat(10)
    assert await redis_client.zcard(KEYS.reaped) == 0
    assert await redis_client.hkeys(KEYS.claims) == [b"w3"]


@pytest.mark.parametrize("ordered", [False, True])
async def test_a_claim_takes_no_more_bytes_than_its_budget_and_at_least_one(
    redis_client: Redis, monkeypatch: pytest.MonkeyPatch, ordered: bool
) -> None:
    monkeypatch.setattr(queue_module, "CLAIM_BYTES", 10)
    # Oldest first: a (4 bytes), b (4), c (20, over the budget alone), d (2).
    await redis_client.lpush(KEYS.queue, b"aaaa", b"bbbb", b"c" * 20, b"dd")
    queue = Queue(redis_client, "forwarder", "w1", ordered=ordered)
    taken = [[c.raw for c in await queue.claim(10)] for _ in range(3)]
    assert taken == [[b"aaaa", b"bbbb"], [b"c" * 20], [b"dd"]]
    assert await redis_client.llen(KEYS.queue) == 0
    assert await redis_client.hlen(KEYS.inflight("w1")) == 4


# A script that takes a message out of one key and then writes it into another would lose
# it if Redis refused the write: its writes before an error stay done. A key of the
# queue's that holds another type (a name clash, a producer's SET) is refused before
# anything moves.
FOREIGN = "not the forwarder's"
WRONG_QUEUE = f"^WRONGTYPE {re.escape(KEYS.queue)} holds a string, not a list"


@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize(("op", "key"), [("retry", KEYS.delayed), ("dead", KEYS.dead)])
async def test_a_settle_into_a_key_of_another_type_moves_nothing(
    redis_client: Redis, ordered: bool, op: Op, key: str
) -> None:
    await redis_client.lpush(KEYS.queue, b"a", b"b")
    queue = Queue(redis_client, "forwarder", "w1", ordered=ordered)
    first, second = await queue.claim(2)
    await redis_client.set(key, FOREIGN)
    settlements = [Settlement("ack", first.token), Settlement(op, second.token, b"b2", 1.0)]
    with pytest.raises(ResponseError, match=f"^WRONGTYPE {re.escape(key)} holds a string"):
        await queue.settle(settlements)
    # The ack is recorded (else every restart would send it again); the other stays.
    assert await redis_client.hkeys(KEYS.inflight("w1")) == [str(second.token).encode()]
    assert await redis_client.get(key) == FOREIGN.encode()


async def test_an_ordered_ack_whose_next_update_cannot_be_queued_moves_nothing(
    redis_client: Redis,
) -> None:
    await Producer(redis_client).enqueue_many(
        [make_update("1", "v", "s", {"pageId": str(i)}) for i in range(2)]
    )
    queue = Queue(redis_client, "forwarder", "w1", ordered=True)
    [holder] = await queue.claim(10)  # the other waits in the session's held list
    await redis_client.set(KEYS.queue, FOREIGN)
    with pytest.raises(ResponseError, match=WRONG_QUEUE):
        await queue.settle([Settlement("ack", holder.token)])
    assert await redis_client.hlen(KEYS.inflight("w1")) == 1
    assert await redis_client.llen(KEYS.held_prefix + "1\nv\ns") == 1


async def test_promote_moves_a_members_message_alone_for_a_later_version(
    redis_client: Redis,
) -> None:
    # A later version may keep identical messages apart with a NUL and more after the
    # message: promoted whole, that member would reach the queue as no JSON at all.
    await redis_client.zadd(KEYS.delayed, {b'{"id":"a"}\0inflight:w2 7': 0, b'{"id":"b"}': 0})
    promoted = await Queue(redis_client, "forwarder", "w1").promote()
    assert promoted.moved == 2
    assert sorted(await redis_client.lrange(KEYS.queue, 0, -1)) == [b'{"id":"a"}', b'{"id":"b"}']


async def test_due_retries_stay_delayed_while_the_queue_key_holds_another_type(
    redis_client: Redis,
) -> None:
    await redis_client.zadd(KEYS.delayed, {b"due": 0})
    await redis_client.set(KEYS.queue, FOREIGN)
    with pytest.raises(ResponseError, match=WRONG_QUEUE):
        await Queue(redis_client, "forwarder", "w1").promote()
    assert await redis_client.zrange(KEYS.delayed, 0, -1) == [b"due"]


@pytest.mark.parametrize("give_back", ["strays", "release"])
async def test_what_a_worker_gives_back_stays_in_flight_while_the_queue_holds_another_type(
    redis_client: Redis, give_back: str
) -> None:
    await redis_client.lpush(KEYS.queue, b"a")
    queue = Queue(redis_client, "forwarder", "w1")
    [claimed] = await queue.claim(1)
    queue._held.discard(claimed.token)  # a stray: its outcome recorded, then lost by Redis
    await redis_client.set(KEYS.queue, FOREIGN)
    with pytest.raises(ResponseError, match=WRONG_QUEUE):
        await (queue.give_back_strays() if give_back == "strays" else queue.release())
    assert await redis_client.hlen(KEYS.inflight("w1")) == 1


async def test_a_turn_cannot_be_taken_over_into_a_queue_key_of_another_type(
    redis_client: Redis,
) -> None:
    await Producer(redis_client).enqueue_many(
        [make_update("1", "v", "s", {"pageId": str(i)}) for i in range(2)]
    )
    ghost = Queue(redis_client, "forwarder", "ghost", ordered=True, turn_timeout=0.1)
    assert len(await ghost.claim(10)) == 1
    await asyncio.sleep(0.2)  # the turn is stale now
    await redis_client.set(KEYS.queue, FOREIGN)
    with pytest.raises(ResponseError, match=WRONG_QUEUE):
        await ghost.take_over_turns()
    assert await redis_client.llen(KEYS.held_prefix + "1\nv\ns") == 1


@pytest.mark.parametrize(
    ("ordered", "key"),
    [
        (False, KEYS.inflight("w1")),
        (False, KEYS.workers),
        (False, KEYS.claims),
        (True, KEYS.inflight("w1")),
        (True, KEYS.sessions),
        (True, KEYS.held_prefix + "1\nv\ns"),
    ],
)
async def test_a_claim_into_a_key_of_another_type_takes_nothing(
    redis_client: Redis, ordered: bool, key: str
) -> None:
    await Producer(redis_client).enqueue_many(
        [make_update("1", "v", "s", {"pageId": str(i)}) for i in range(2)]
    )
    await redis_client.set(key, FOREIGN)
    queue = Queue(redis_client, "forwarder", "w1", ordered=ordered)
    named = "a held list" if key.startswith(KEYS.held_prefix) else key  # not a visitor's ids
    with pytest.raises(ResponseError, match=f"^WRONGTYPE {re.escape(named)} holds a string"):
        await queue.claim(10)
    assert await redis_client.llen(KEYS.queue) == 2


async def test_a_dead_workers_messages_stay_in_flight_while_the_queue_key_holds_another_type(
    redis_client: Redis,
) -> None:
    await redis_client.lpush(KEYS.queue, b"a")
    await Queue(redis_client, "forwarder", "dead").claim(1)
    await redis_client.set(KEYS.queue, FOREIGN)
    live = Queue(redis_client, "forwarder", "live")
    with pytest.raises(ResponseError, match=WRONG_QUEUE):
        await _reaped_by(live, 0.1)
    assert await redis_client.hlen(KEYS.inflight("dead")) == 1
