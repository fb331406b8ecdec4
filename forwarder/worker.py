"""The worker: claims messages, delivers them concurrently, records each outcome.

One asyncio task claims (in batches when the queue is deep, with a blocking pop when it
is empty), one task per message delivers it, one task records outcomes in batches, and
two background tasks heartbeat (recovering dead workers' messages) and move due retries
back to the queue. A message's way through Redis is in :mod:`forwarder.queue`; what an
attempt's result means is in :mod:`forwarder.outcome`.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import aiohttp
import structlog
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from forwarder import outcome
from forwarder.client import Attempt, EngagementClient
from forwarder.connections import redis_client
from forwarder.domain import DomainResolver
from forwarder.model import InvalidMessage, decode
from forwarder.outcome import Outcome
from forwarder.queue import Claimed, Queue
from forwarder.settings import Settings

log = structlog.get_logger("forwarder.worker")

REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)
# How long an idle blocking pop waits before the loop looks at its stop flag again.
BLOCK_SECONDS = 1
SETTLE_BATCH = 500

T = TypeVar("T")


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Worker:
    """Drains one queue into the App Engagement API until :meth:`stop` is called."""

    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        client: EngagementClient,
        *,
        worker_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.id = worker_id or new_worker_id()
        self.queue = Queue(redis, settings.queue, self.id)
        self.client = client
        self._tasks: set[asyncio.Task[None]] = set()
        self._slot_free = asyncio.Event()
        self._stopping = asyncio.Event()
        self._outcomes: asyncio.Queue[Outcome] = asyncio.Queue()

    def stop(self) -> None:
        """Stop taking messages; :meth:`run` then finishes what is in flight and returns."""
        self._stopping.set()
        self._slot_free.set()

    async def run(self) -> None:
        """Run until :meth:`stop`; on return this worker has no keys left in Redis."""
        await _until_redis(lambda: self.queue.heartbeat(self.settings.worker_timeout))
        log.info(
            "worker_started",
            worker=self.id,
            queue=self.settings.queue,
            concurrency=self.settings.concurrency,
        )
        background = [
            asyncio.create_task(self._record_outcomes()),
            asyncio.create_task(self._heartbeat()),
            asyncio.create_task(self._promote()),
        ]
        try:
            await self._claim_loop()
            await self._drain()
            await self._outcomes.join()
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            returned = await _until_redis(self.queue.release)
            log.info("worker_stopped", worker=self.id, returned=returned)

    async def _claim_loop(self) -> None:
        backoff = _Backoff()
        while not self._stopping.is_set():
            free = self.settings.concurrency - len(self._tasks)
            if free <= 0:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            try:
                claimed = await self.queue.claim(min(free, self.settings.claim_batch))
                if not claimed:
                    # What the blocking pop takes waits in staging for the next claim;
                    # on a stop, the release gives it back.
                    await self.queue.wait(BLOCK_SECONDS)
            except REDIS_DOWN as exc:
                log.warning("redis_unavailable", during="claim", error=type(exc).__name__)
                await backoff.sleep()
                continue
            backoff.reset()
            for one in claimed:
                self._start(one)

    def _start(self, claimed: Claimed) -> None:
        task = asyncio.create_task(self._handle(claimed))
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slot_free.set()

    async def _handle(self, claimed: Claimed) -> None:
        try:
            message, data = decode(claimed.raw)
        except InvalidMessage as exc:
            self._outcomes.put_nowait(outcome.invalid(claimed, exc.errors))
            return
        started = time.perf_counter()
        try:
            attempt = await self.client.update_session(message, data["body"])
        except Exception:
            # A bug must not strand the message in flight: count it as a failed attempt.
            log.exception("delivery_crashed", id=data["id"], account=message.account_id)
            attempt = Attempt(None, time.perf_counter() - started, failure="internal")
        self._outcomes.put_nowait(
            outcome.after_attempt(claimed, data, attempt, self.settings.retry_delays)
        )

    async def _drain(self) -> None:
        """Give in-flight deliveries the grace period, then cancel the rest."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(self._tasks, timeout=self.settings.shutdown_grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if pending:
            log.warning("grace_expired", worker=self.id, cancelled=len(pending))

    async def _record_outcomes(self) -> None:
        while True:
            batch = [await self._outcomes.get()]
            while len(batch) < SETTLE_BATCH and not self._outcomes.empty():
                batch.append(self._outcomes.get_nowait())
            settle = functools.partial(self.queue.settle, [o.settlement for o in batch])
            acked, kept = await _until_redis(settle)
            self._report(batch, acked, iter(kept))
            for _ in batch:
                self._outcomes.task_done()

    def _report(self, batch: list[Outcome], acked: int, kept: Iterator[bool]) -> None:
        acks = 0
        for result in batch:
            if result.settlement.op == "ack":
                acks += 1
                log.info(result.event, **result.fields)
            elif next(kept):
                log.info(result.event, **result.fields)
            else:
                log.warning("settle_orphaned", event_dropped=result.event, **result.fields)
        if acked < acks:
            # Given back while being delivered: another worker will deliver them again.
            log.warning("acks_orphaned", worker=self.id, count=acks - acked)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            try:
                recovered = await self.queue.heartbeat(self.settings.worker_timeout)
            except REDIS_DOWN as exc:
                log.warning("redis_unavailable", during="heartbeat", error=type(exc).__name__)
                continue
            for dead, count in recovered.items():
                log.warning("worker_recovered", worker=self.id, dead_worker=dead, returned=count)

    async def _promote(self) -> None:
        # A retry scheduled after a pass is due no sooner than the shortest delay, so
        # sleeping until the next known due time (or that horizon) misses nothing.
        horizon = min([*self.settings.retry_delays, 1.0])
        while True:
            try:
                promoted = await self.queue.promote()
            except REDIS_DOWN as exc:
                log.warning("redis_unavailable", during="promote", error=type(exc).__name__)
                await asyncio.sleep(1.0)
                continue
            wake = promoted.now + max(horizon, 0.05)
            if promoted.next_due is not None:
                wake = min(wake, promoted.next_due)
            await asyncio.sleep(max(wake - promoted.now, 0.002))


class _Backoff:
    """Exponential back-off between Redis reconnection attempts, capped at 5 s."""

    def __init__(self) -> None:
        self.delay = 0.05

    async def sleep(self) -> None:
        await asyncio.sleep(self.delay)
        self.delay = min(self.delay * 2, 5.0)

    def reset(self) -> None:
        self.delay = 0.05


async def _until_redis(call: Callable[[], Awaitable[T]]) -> T:
    """Run ``call`` until Redis answers: an outcome or a release must not be dropped."""
    backoff = _Backoff()
    while True:
        try:
            return await call()
        except REDIS_DOWN as exc:
            log.warning("redis_unavailable", during="record", error=type(exc).__name__)
            await backoff.sleep()


def build_client(settings: Settings, session: aiohttp.ClientSession) -> EngagementClient:
    domains = None
    if settings.api_base_url is None:
        domains = DomainResolver(
            session,
            settings.domain_api_url,
            ttl=settings.domain_cache_ttl,
            timeout=settings.request_timeout,
        )
    return EngagementClient(
        session,
        timeout=settings.request_timeout,
        base_url=settings.api_base_url,
        domains=domains,
        scheme=settings.api_scheme,
    )


async def serve(settings: Settings, *, on_ready: Callable[[Worker], Any] | None = None) -> None:
    """Run one worker with its own Redis connection pool and HTTP session."""
    redis = redis_client(settings)
    connector = aiohttp.TCPConnector(limit=settings.concurrency, keepalive_timeout=30)
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            worker = Worker(settings, redis, build_client(settings, session))
            if on_ready is not None:
                on_ready(worker)
            await worker.run()
    finally:
        await redis.aclose()
