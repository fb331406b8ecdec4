"""``forwarder demo``: the whole flow on one machine, with nothing installed but Python.

Uses the Redis at ``FORWARDER_REDIS_URL`` when one answers, else starts a private server
with its data in ``./.forwarder-demo``; starts the stand-in engagement API; enqueues sample
updates built from LivePerson's examples (some accepted, some rejected, some failing then
accepted, a few never accepted, a few malformed); runs a worker; shows the counts live;
ends with a summary. Ctrl-C stops everything it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import structlog

from forwarder import logs
from forwarder.connections import AsyncRedis, redis_client
from forwarder.dlq import print_stats
from forwarder.embedded import RedisServer, ServerNotFound, redis_answers
from forwarder.producer import Producer, make_update
from forwarder.queue import Keys
from forwarder.settings import Settings
from forwarder.standin import StandIn
from forwarder.worker import running

DATA_DIR = Path(".forwarder-demo")
# Short delays so the demo ends in seconds; the real default is 5,10,15.
DEMO_DELAYS = (0.5, 1.0, 1.5)
DEMO_QUEUE = "forwarder-demo"

# The example body of LivePerson's Update Session page, verbatim.
DOCS_EXAMPLE_BODY: dict[str, Any] = {
    "pageId": "4743822558",
    "impAttributes": [
        {
            "type": "impAccept",
            "campaign": 3115242510,
            "engId": 3115242810,
            "revision": 537,
            "eContext": [{"type": "engagementContext", "id": "1"}],
        },
        {
            "type": "impDisplay",
            "campaign": 3115242510,
            "engId": 3115242810,
            "revision": 537,
            "eContext": [{"type": "engagementContext", "id": "1"}],
        },
    ],
    "engagementAttributes": [
        {
            "type": "personal",
            "personal": {
                "contacts": [{"email": "sarah@gmail.com", "phone": "0987653"}],
                "age": {"age": 30.0, "year": 1986, "month": 7, "day": 22},
                "firstname": "Sarah",
                "lastname": "West",
                "gender": "FEMALE",
                "company": "liveperson",
            },
        },
    ],
}

# Bodies from LivePerson's Update Session and engagement-attribute examples.
SAMPLE_BODIES: list[dict[str, Any]] = [
    DOCS_EXAMPLE_BODY,
    {
        "pageId": "4743822558",
        "engagementAttributes": [
            {
                "type": "cart",
                "total": 11.7,
                "currency": "USD",
                "numItems": 6,
                "products": [
                    {
                        "product": {
                            "name": "prod1",
                            "category": "category",
                            "sku": "sku",
                            "price": 7.8,
                        },
                        "quantity": 1,
                    }
                ],
            },
        ],
    },
    {
        "pageId": "4743822558",
        "engagementAttributes": [
            {
                "type": "purchase",
                "total": 11.7,
                "currency": "USD",
                "orderId": "DRV1534XC",
                "cart": {
                    "numItems": 1,
                    "products": [
                        {
                            "product": {
                                "name": "prod1",
                                "category": "category",
                                "sku": "sku",
                                "price": 7.8,
                            },
                            "quantity": 1,
                        }
                    ],
                },
            },
        ],
    },
    {
        "pageId": "4743822558",
        "engagementAttributes": [
            {
                "type": "mrktInfo",
                "info": {"channel": "1", "affiliate": "Yahoo", "campaignId": "US-VA"},
            },
            {"type": "searchInfo", "keywords": ["summer", "shoes"]},
        ],
    },
]

# visitorId prefixes the stand-in API answers by (see forwarder.standin), with shares.
MIX = [
    ("ok", 0.70),
    ("bad", 0.08),
    ("gone", 0.04),
    ("flaky1", 0.08),
    ("flaky2", 0.06),
    ("down", 0.04),
]
MALFORMED = [b"not json at all", b'{"accountId": "123", "body": {}}', b"[1, 2, 3]"]


def samples(count: int) -> list[dict[str, Any]]:
    """``count`` wire messages cycling through the sample bodies and the outcome mix."""
    kinds = [prefix for prefix, share in MIX for _ in range(round(share * 100))]
    # Spread the outcomes evenly, so a short demo shows each of them.
    random.Random(0).shuffle(kinds)
    return [
        make_update(
            "12345678",
            f"{kinds[i % len(kinds)]}-visitor{i}",
            f"session{i % 50}",
            SAMPLE_BODIES[i % len(SAMPLE_BODIES)],
        )
        for i in range(count)
    ]


def run(settings: Settings, *, count: int, queue: str | None = None) -> int:
    """Run the demo on ``queue`` (by default a queue of its own); the exit code."""
    DATA_DIR.mkdir(exist_ok=True)
    updates = samples(count)
    (DATA_DIR / "samples.ndjson").write_bytes(b"\n".join(orjson.dumps(u) for u in updates))
    # Never drain a real queue into the stand-in: FORWARDER_QUEUE, which a worker's
    # environment sets, is not the demo's; only a queue named on its command line is.
    settings = settings.model_copy(update={"queue": queue or DEMO_QUEUE})
    with open(DATA_DIR / "worker.log", "w") as log_file, _stops_as_ctrl_c():
        logs.configure(settings.log_level, "json", stream=log_file)
        try:
            return asyncio.run(_demo(settings, updates))
        except ServerNotFound as exc:
            # The URL is not shown: it may carry a password.
            print(f"forwarder: no Redis answers at the configured URL, and {exc}", file=sys.stderr)
            return 3


# A kill or a closed terminal stops the demo as Ctrl-C does: by default they would end
# the process at once, leaving its private Redis running.
_STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _stops_as_ctrl_c() -> Iterator[None]:
    previous = {sig: signal.signal(sig, signal.default_int_handler) for sig in _STOPS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


async def _demo(settings: Settings, updates: list[dict[str, Any]]) -> int:
    async with _redis(settings) as redis_url, StandIn() as api:
        settings = settings.model_copy(
            update={
                "redis_url": redis_url,
                "api_base_url": api.base_url,
                "retry_delays": DEMO_DELAYS,
                "shutdown_grace": 2.0,
                # The demo is one process on a laptop: nothing scrapes it.
                "metrics_port": 0,
            }
        )
        print(
            f"redis:        {redis_url} (queue {settings.queue!r})\n"
            f"stand-in API: {api.base_url}\n"
            f"retry delays: {DEMO_DELAYS} s (demo only; the default is 5,10,15)\n"
            f"worker log:   {DATA_DIR / 'worker.log'}\n"
        )
        if not await _queue_is_free(settings):
            print(
                f"queue {settings.queue!r} holds messages or has workers: "
                "the demo needs a queue that nothing uses",
                file=sys.stderr,
            )
            return 2
        enqueued = await _enqueue(settings, updates)
        finished = await _run_worker(settings, api, enqueued)
        await _summary(settings, api, finished)
        print(f"\nforwarder dlq stats --queue {settings.queue}:")
        await print_stats(settings)
    return 0 if finished else 130


@contextlib.asynccontextmanager
async def _redis(settings: Settings) -> AsyncIterator[str]:
    if await redis_answers(settings.redis_url):
        yield settings.redis_url
        return
    server = RedisServer(DATA_DIR / "redis", appendonly=True)
    await asyncio.to_thread(server.start)
    try:
        yield server.url
    finally:
        await asyncio.to_thread(server.stop)


async def _queue_is_free(settings: Settings) -> bool:
    """Whether the demo may use the queue: its own (what an interrupted run left there is
    cleared), or another that nothing uses: no messages, and no workers (a live queue
    drained empty still has them, and they would send the demo's updates for real)."""
    keys = Keys(settings.queue)
    redis = redis_client(settings)
    try:
        if settings.queue == DEMO_QUEUE:
            # Not while a worker serves it (one started as the closing hint says): it would
            # take the demo's updates to its own API, and the demo would wait for ever.
            seconds, micros = await redis.time()
            alive_since = seconds + micros / 1e6 - settings.worker_timeout
            if await redis.zcount(keys.workers, alive_since, "+inf"):
                return False
            await redis.delete(keys.queue, keys.delayed, keys.dead)
            return True
        used = (keys.queue, keys.delayed, keys.dead, keys.workers, keys.sessions)
        return not await redis.exists(*used)
    finally:
        await redis.aclose()


async def _enqueue(settings: Settings, updates: list[dict[str, Any]]) -> int:
    producer = Producer(redis_client(settings), settings.queue)
    try:
        await producer.enqueue_many(updates)
        # What a broken producer might push with a raw LPUSH.
        await producer.client.lpush(producer.key, *MALFORMED)
    finally:
        await producer.aclose()
    print(f"enqueued {len(updates)} sample updates and {len(MALFORMED)} malformed elements\n")
    return len(updates) + len(MALFORMED)


async def _run_worker(settings: Settings, api: StandIn, enqueued: int) -> bool:
    """Run a worker until every message is delivered or dead; False on Ctrl-C."""
    interrupted = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in _STOPS:
        loop.add_signal_handler(sig, interrupted.set)
    redis = redis_client(settings)
    keys = Keys(settings.queue)
    shown: dict[str, int] = {}
    try:
        async with running(settings):
            while not interrupted.is_set():
                counts = await _counts(redis, keys, api)
                if counts != shown:
                    _show(counts)
                    shown = counts
                if counts["delivered"] + counts["dead"] >= enqueued:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(interrupted.wait(), 0.25)
            print(file=sys.stdout)
    finally:
        for sig in _STOPS:
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.default_int_handler)  # not back to the default kill
        await redis.aclose()
    return not interrupted.is_set()


async def _counts(redis: AsyncRedis, keys: Keys, api: StandIn) -> dict[str, int]:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.llen(keys.queue)
        pipe.zcard(keys.delayed)
        pipe.llen(keys.dead)
        pending, delayed, dead = await pipe.execute()
    return {
        "delivered": len(api.delivered),
        "pending": pending,
        "retrying": delayed,
        "dead": dead,
        "requests": len(api.requests),
    }


def _show(counts: dict[str, int]) -> None:
    line = (
        f"delivered {counts['delivered']:>4}   pending {counts['pending']:>4}   "
        f"waiting for retry {counts['retrying']:>3}   dead-lettered {counts['dead']:>3}   "
        f"(API requests {counts['requests']})"
    )
    if sys.stdout.isatty():
        print("\r" + line, end="", flush=True)
    else:
        print(line, flush=True)


async def _summary(settings: Settings, api: StandIn, finished: bool) -> None:
    redis = redis_client(settings)
    try:
        records = [orjson.loads(r) for r in await redis.lrange(Keys(settings.queue).dead, 0, -1)]
    finally:
        await redis.aclose()
    by_status = Counter(r.status for r in api.requests)
    reasons = Counter(r["reason"] for r in records)
    print("stopped early (Ctrl-C); nothing is left running." if not finished else "done.")
    print(f"API answers:    {dict(sorted(by_status.items()))}")
    print(f"delivered:      {len(api.delivered)}")
    print(f"dead letters:   {dict(reasons)}")
    structlog.get_logger().info("demo_finished", delivered=len(api.delivered), dead=len(records))
    flags = f"--queue {settings.queue}"
    print(
        "\nTry next (with FORWARDER_REDIS_URL pointing at a Redis of yours):\n"
        "  forwarder schema                          # the wire message's JSON Schema\n"
        "  forwarder standin-api --port 8080 &       # a stand-in API for staging\n"
        f"  forwarder enqueue {DATA_DIR / 'samples.ndjson'} {flags}\n"
        f"  FORWARDER_API_BASE_URL=http://127.0.0.1:8080 forwarder worker {flags}"
    )
