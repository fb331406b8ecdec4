"""The worker: claims messages, delivers them concurrently, records each outcome.

One asyncio task claims (in batches when the queue is deep, with a blocking pop when it
is empty), decodes each batch and builds its requests, into a small local buffer;
``FORWARDER_CONCURRENCY`` long-lived consumer tasks take from it and deliver, one message
at a time each; one task records outcomes in
batches; two background tasks heartbeat (recovering dead workers' messages) and move due
retries back to the queue. A message's way through Redis is in :mod:`forwarder.queue`;
what an attempt's result means is in :mod:`forwarder.outcome`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import gc
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import aiohttp
import msgspec
import structlog
from redis.exceptions import OutOfMemoryError

from forwarder import outcome
from forwarder.breaker import Breakers
from forwarder.client import Attempt, EngagementClient, Put
from forwarder.connections import (
    EVICTING_POLICIES,
    REDIS_CALL_FAILED,
    AsyncRedis,
    eviction_policy,
    is_cluster,
    raise_if_cancelled,
    redis_client,
    redis_outage,
)
from forwarder.deadletters import Retention
from forwarder.domain import DomainLookupError, DomainResolver
from forwarder.metrics import Metrics, listening
from forwarder.model import InvalidMessage, decode
from forwarder.outcome import Outcome
from forwarder.queue import Claimed, Queue
from forwarder.settings import Settings

log = structlog.get_logger("forwarder.worker")

# How long an idle blocking pop waits before the loop looks at its stop flag again.
BLOCK_SECONDS = 1
SETTLE_BATCH = 500
# How long the recorder lets outcomes gather before it settles fewer than a batch: each
# settle is a round trip that costs the worker ~100 µs of CPU, so at thousands a second
# one per ~200 outcomes rather than one per few dozen. Acks lag by at most this much.
SETTLE_LINGER = 0.05
# How long a stopping worker keeps trying to record outcomes and give back what it holds
# while Redis does not answer, before it exits and leaves that to the live workers.
GIVE_UP_SECONDS = 10.0

T = TypeVar("T")


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Worker:
    """Drains one queue into the App Engagement API until :meth:`stop` is called."""

    def __init__(
        self,
        settings: Settings,
        redis: AsyncRedis,
        client: EngagementClient,
        *,
        worker_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.id = worker_id or new_worker_id()
        self.queue = Queue(
            redis,
            settings.queue,
            self.id,
            ordered=settings.ordering == "session",
            turn_timeout=settings.turn_timeout,
        )
        self.client = client
        self.breakers = Breakers(
            window=settings.breaker_window,
            min_calls=settings.breaker_min_calls,
            failure_ratio=settings.breaker_failure_ratio,
            cooldown=settings.breaker_cooldown,
            max_cooldown=settings.breaker_max_cooldown,
        )
        self._policy = outcome.RetryPolicy(settings.retry_delays, settings.max_retry_after)
        self._ready = _Ready()
        # How many the last claim took (fewer than the claim batch where the queue ran
        # short or its messages are large): the claimer refills below that.
        self._batch = settings.claim_batch
        self._refill = asyncio.Event()
        self._stopping = asyncio.Event()
        self._closing = asyncio.Event()
        # Set when the recorder records a retry (and at closing): the promoter looks again.
        self._retries_recorded = asyncio.Event()
        self._results = _Results()
        self.metrics = Metrics()
        self.retention = Retention(redis, settings)
        # Set when a background task failed (a bug) and so stopped the worker.
        self.failed = False
        # The first refusal by Redis (WRONGTYPE, a wrong setting), which stopped the worker.
        self.refused: BaseException | None = None
        # When Redis last took this worker's heartbeat or a claim (monotonic); None: never.
        self._written_at: float | None = None

    def stop(self) -> None:
        """Stop taking messages; :meth:`run` then finishes what is in flight and returns."""
        self._stopping.set()
        self._refill.set()

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called (the worker is no longer ready for work)."""
        return self._stopping.is_set()

    def unready(self) -> str | None:
        """Why the worker takes no work now (for ``/readyz``); None while it does.

        A PING alone passes on a read-only replica (a fail-over behind one address), where
        every write fails: the worker is ready only while Redis takes its writes.
        """
        if self.stopping:
            return "stopping"
        if self._written_at is None:
            return "starting"
        if time.monotonic() - self._written_at > self.settings.worker_timeout:
            return "redis_refuses_writes"
        return None

    def _written(self) -> None:
        self._written_at = time.monotonic()

    async def run(self) -> None:
        """Run until :meth:`stop`; on return this worker has no keys left in Redis
        (unless Redis stayed unreachable through the stop: see ``release_failed``).

        Raises the first refusal Redis answered (see :attr:`refused`), once stopped.
        """
        if await self._register():
            await self._check_eviction()
            log.info(
                "worker_started",
                worker=self.id,
                queue=self.settings.queue,
                concurrency=self.settings.concurrency,
            )
            await self._work()
        if self.refused is not None:
            raise self.refused

    async def _work(self) -> None:
        recorder = asyncio.create_task(self._record_outcomes())
        background = [
            recorder,
            asyncio.create_task(self._heartbeat()),
            asyncio.create_task(self._promote()),
        ]
        for task in background:
            task.add_done_callback(self._background_done)
        consumers = [asyncio.create_task(self._consume()) for _ in range(self.settings.concurrency)]
        for task in consumers:
            # One lost for a bug would leave its message in flight while this worker lives.
            task.add_done_callback(self._background_done)
        try:
            await self._claim_loop()
            await self._drain(consumers)
            log.info("worker_draining", worker=self.id, outcomes=len(self._results))
            # If the recorder died, what it had not recorded stays in flight in Redis and
            # goes back to the queue with the release below.
            recorded = asyncio.ensure_future(self._results.all_recorded())
            await asyncio.wait(
                [recorded, recorder], timeout=GIVE_UP_SECONDS, return_when=asyncio.FIRST_COMPLETED
            )
            recorded.cancel()
        finally:
            for task in consumers:
                task.cancel()
            # The loops end on this flag, not by cancellation: a cancel that lands in a
            # Redis call can be swallowed by the client, and then the loop never ends.
            self._closing.set()
            self._retries_recorded.set()
            recorder.cancel()  # idle by now, unless Redis has been down since the stop
            await asyncio.gather(*background, *consumers, return_exceptions=True)
            await self._release()

    async def _register(self) -> bool:
        """Heartbeat once before the first claim; False if stopped before Redis answered."""
        backoff = _Backoff()
        while not self._stopping.is_set():
            try:
                await self.queue.heartbeat(self.settings.worker_timeout)
                self._written()
                return True
            except OutOfMemoryError as exc:
                # A full Redis refuses the heartbeat's write; the first claim that takes
                # a message, which frees memory before it writes, registers this worker.
                self._waited_out("start", exc)
                return True
            except REDIS_CALL_FAILED as exc:
                if not self._waited_out("start", exc):
                    return False
                await backoff.sleep()
        return False

    async def _check_eviction(self) -> None:
        """Warn if Redis may evict the queue's keys (and so messages) when out of memory."""
        try:
            policy = await eviction_policy(self.queue.redis)
        except REDIS_CALL_FAILED as exc:
            # INFO may be denied (ACLs, managed services) or Redis gone again: not fatal.
            log.debug("redis_policy_unknown", worker=self.id, error=type(exc).__name__)
            return
        if policy in EVICTING_POLICIES:
            log.warning("redis_may_evict", worker=self.id, policy=policy)

    async def _release(self) -> None:
        try:
            returned = await asyncio.wait_for(
                self._until_redis(self.queue.release), GIVE_UP_SECONDS
            )
        except REDIS_CALL_FAILED as exc:  # Redis stayed away (a timeout), or refused
            # What it held stays in its in-flight record; a live worker returns it to
            # the queue once this one's heartbeat is older than FORWARDER_WORKER_TIMEOUT.
            error = str(exc) or type(exc).__name__
            log.error("release_failed", worker=self.id, unrecorded=len(self._results), error=error)
            return
        log.info("worker_stopped", worker=self.id, returned=returned)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        # A bug, not an outage (those are retried where they happen): stop cleanly, so
        # everything in flight goes back to the queue, rather than run half a worker.
        log.error("worker_task_failed", worker=self.id, exc_info=task.exception())
        self.failed = True
        self.stop()

    async def _claim_loop(self) -> None:
        # Claim a batch whenever fewer than the last claim took are ready: consumers
        # never wait on a round trip while the queue is deep (in one, a busy worker
        # finishes dozens of messages), and each claim takes many. At most concurrency +
        # 2 x batch - 1 held, and beyond those in delivery about 2 x CLAIM_BYTES.
        backoff = _Backoff()
        while not self._stopping.is_set():
            if len(self._ready) >= self._batch:
                self._refill.clear()
                await self._refill.wait()
                continue
            try:
                claimed = await self.queue.claim(self.settings.claim_batch)
                if not claimed:
                    # Woken by the next message; the next claim takes it.
                    await self.queue.wait(BLOCK_SECONDS)
            except REDIS_CALL_FAILED as exc:
                if not self._waited_out("claim", exc):
                    return  # stopped: what was claimed is still delivered and recorded
                await backoff.sleep()
                continue
            backoff.reset()
            self._written()  # a claim refreshes the heartbeat
            if claimed:
                self._batch = len(claimed)
            # Decoded and built here, a batch at a time: in one tight loop the parser's
            # and validator's code and data stay in the CPU's caches (measured: 4 µs a
            # message less than decoding each one in its consumer, between HTTP calls).
            jobs = []
            for one in claimed:
                job = self._prepare(one)
                if isinstance(job, Outcome):
                    self._results.add(job)
                else:
                    jobs.append(job)
            self._ready.extend(jobs)

    def _prepare(self, claimed: Claimed) -> _Job | Outcome:
        """The claimed message, decoded and its request built; or its invalid dead letter."""
        try:
            decoded = decode(claimed.raw, self.settings.max_message_bytes)
            put = self.client.prepare(decoded.message, decoded.body)
            return _Job(claimed, decoded.message, put)
        except InvalidMessage as exc:
            return outcome.invalid(claimed, exc.errors)
        except Exception as exc:
            # A bug in decoding must neither strand the message nor end the claimer:
            # dead-letter it with its raw bytes, to replay once fixed.
            log.exception("decode_crashed", worker=self.id)
            return outcome.invalid(
                claimed, [f"(root): could not be decoded ({type(exc).__name__})"]
            )

    async def _consume(self) -> None:
        """Deliver claimed messages one after another until the worker stops."""
        ready = self._ready
        client = self.client
        fixed_host = client.fixed_base_url
        # Once stopping, what is left stays in this worker's in-flight record: the
        # release gives it back.
        while not self._stopping.is_set():
            job = ready.jobs.popleft() if ready.jobs else await ready.take()
            if job is None:
                return
            if len(ready.jobs) < self._batch:
                self._refill.set()
            started = time.perf_counter()
            host = fixed_host
            try:
                # Awaited here, not in a helper coroutine: see update_session.
                host = fixed_host or await client.base_url(job.message["accountId"])
                admission = self.breakers.admit(host)
                job.probe = admission.probe
                if admission.wait is not None:
                    result = outcome.parked(job.claimed, job.message, admission.wait, admission.why)
                else:
                    attempt = await client.update_session(host, job.put)
                    result = self._after(job, host, attempt)
            except DomainLookupError:
                attempt = Attempt(None, 0.0, failure="domain_lookup")
                result = outcome.after_attempt(job.claimed, job.message, attempt, self._policy)
            except Exception:
                # A bug must not strand the message in flight: count it as a failed attempt.
                message = job.message
                log.exception("delivery_crashed", id=message["id"], account=message["accountId"])
                attempt = Attempt(None, time.perf_counter() - started, failure="internal")
                result = _after_crash(job, attempt, self._policy)
                if job.probe and host:
                    # Only a probe's result ends its breaker's half-open wait: without
                    # one, the host would stay shut (every message parked) for good.
                    self.breakers.record(host, True, probe=True)
            self._results.add(result)

    def _after(self, job: _Job, host: str, attempt: Attempt) -> Outcome:
        # A probe is a real attempt: it spends one, so a message that fails alone on a
        # quiet host (and keeps tripping the breaker) still reaches its dead letter.
        self.breakers.record(host, attempt.failed, probe=job.probe)
        result = outcome.after_attempt(job.claimed, job.message, attempt, self._policy)
        if result.event == "parked":
            self.breakers.pause(host, result.settlement.delay)
        return result

    async def _drain(self, consumers: list[asyncio.Task[None]]) -> None:
        """Give in-flight deliveries the grace period, then cancel the rest."""
        self._ready.close()
        _, pending = await asyncio.wait(consumers, timeout=self.settings.shutdown_grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if pending:
            log.warning("grace_expired", worker=self.id, cancelled=len(pending))

    async def _record_outcomes(self) -> None:
        while True:
            batch = await self._results.take(SETTLE_BATCH, SETTLE_LINGER)
            settle = functools.partial(self.queue.settle, [o.settlement for o in batch])
            try:
                acked, kept = await self._until_redis(settle)
            except REDIS_CALL_FAILED:
                return  # refused (see refused): what is unrecorded goes back on release
            self._report(batch, acked, iter(kept))
            self._results.recorded(len(batch))

    def _report(self, batch: list[Outcome], acked: int, kept: Iterator[bool]) -> None:
        # A busy worker delivers thousands a second: skip building unlogged ack lines.
        log_acks = log.is_enabled_for(logging.INFO)
        acks = 0
        recorded = []
        for result in batch:
            op = result.settlement.op
            if op == "ack":
                acks += 1
                if log_acks:
                    log.info(result.event, **result.fields)
                recorded.append(result)
                continue
            if not next(kept):
                log.warning("settle_orphaned", event_dropped=result.event, **result.fields)
                continue
            if result.event == "parked":
                # Parking repeats every cool-down for a whole outage: not worth a line each.
                log.debug(result.event, **result.fields)
            else:
                log.info(result.event, **result.fields)
            if op == "retry":
                self._retries_recorded.set()  # retried or parked: the promoter looks again
            recorded.append(result)
        self.metrics.observe(recorded)
        if acked < acks:
            # Given back while being delivered: another worker will deliver them again.
            log.warning("acks_orphaned", worker=self.id, count=acks - acked)

    def _waited_out(self, during: str, exc: BaseException) -> bool:
        """True for an outage (said; try again); False for a refusal (WRONGTYPE, a wrong
        setting), which stops the worker: waiting would hide it."""
        # The error may be a cancellation in disguise: a stopping worker would otherwise
        # wait on this loop forever.
        raise_if_cancelled()
        if redis_outage(exc, cluster=is_cluster(self.queue.redis)):
            log.warning("redis_unavailable", during=during, error=type(exc).__name__)
            return True
        if self.refused is None:
            self.refused = exc  # Redis' words name a key or a setting, never a value
            log.error("redis_refused", worker=self.id, during=during, error=str(exc))
        self.stop()
        return False

    async def _until_redis(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run ``call`` until Redis answers: an outcome or a release must not be dropped."""
        backoff = _Backoff()
        while True:
            try:
                return await call()
            except REDIS_CALL_FAILED as exc:
                if not self._waited_out("record", exc):
                    raise
                await backoff.sleep()

    async def _nap(self, seconds: float, wake: asyncio.Event | None = None) -> None:
        """Sleep ``seconds``, or less once ``wake`` is set (by default: the worker is
        closing; any other event given must be set at closing too)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for((wake or self._closing).wait(), seconds)

    async def _heartbeat(self) -> None:
        while True:
            await self._nap(self.settings.heartbeat_interval)
            if self._closing.is_set():
                return
            try:
                recovered = await self.queue.heartbeat(self.settings.worker_timeout)
                strays = await self.queue.give_back_strays()
                dropped = await self.retention.enforce()
                taken_over = await self.queue.take_over_turns() if self.queue.ordered else 0
            except REDIS_CALL_FAILED as exc:
                if not self._waited_out("heartbeat", exc):
                    return
                continue
            self._written()
            if strays:
                # Redis lost recorded outcomes (a restart, a fail-over): sent again.
                log.warning("strays_returned", worker=self.id, returned=strays)
            if taken_over:
                log.warning("turns_taken_over", worker=self.id, released=taken_over)
            self.metrics.observe_dropped(dropped)
            for dead, count in recovered.items():
                log.warning("worker_recovered", worker=self.id, dead_worker=dead, returned=count)

    async def _promote(self) -> None:
        # Sleeps until the next known due time, or until a retry is recorded: that one
        # may be due sooner (its delay counts from when it was decided, and it may have
        # waited to be recorded). The horizon only bounds a sleep with nothing due.
        horizon = min([*self.settings.retry_delays, 1.0])
        while not self._closing.is_set():
            # Cleared before the pass: a retry recorded during it ends the next sleep.
            self._retries_recorded.clear()
            try:
                promoted = await self.queue.promote()
            except REDIS_CALL_FAILED as exc:
                if not self._waited_out("promote", exc):
                    return
                await self._nap(1.0)
                continue
            wake = promoted.now + max(horizon, 0.05)
            if promoted.next_due is not None:
                wake = min(wake, promoted.next_due)
            await self._nap(max(wake - promoted.now, 0.002), self._retries_recorded)


class _Job(msgspec.Struct, gc=False):  # a Struct, as forwarder.queue.Claimed
    """A claimed message, decoded, with its request built: ready for a consumer."""

    claimed: Claimed
    message: dict[str, Any]
    put: Put
    probe: bool = False  # sent as its host's breaker's probe


class _Ready:
    """Claimed jobs no consumer has taken yet, oldest first.

    The claimer adds a batch at a time; a consumer takes straight from ``jobs`` while any
    is left, and awaits :meth:`take` only when none is (asyncio.Queue's put and get cost
    more per message than everything else the handover does).
    """

    def __init__(self) -> None:
        self.jobs: collections.deque[_Job] = collections.deque()
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

    def __len__(self) -> int:
        return len(self.jobs)

    def extend(self, jobs: list[_Job]) -> None:
        self.jobs.extend(jobs)
        self._wake(len(jobs))

    def close(self) -> None:
        """Every waiting and later :meth:`take` returns None."""
        self._closed = True
        self._wake(len(self._waiters))

    async def take(self) -> _Job | None:
        """The oldest job, once there is one; None once closed."""
        while not self._closed:
            if self.jobs:
                return self.jobs.popleft()
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.cancelled():
                    # Still in, unless a wake-up skipped it. Looked for only here: a
                    # search that finds nothing formats the item's repr (CPython's
                    # ValueError), which cost a busy worker 10 µs a message.
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(waiter)
                elif self.jobs:
                    self._wake(1)  # woken for a job, then cancelled: another takes it
                raise
        return None

    def _wake(self, count: int) -> None:
        """Wake up to ``count`` waiters, oldest first, skipping any cancelled meanwhile."""
        waiters = self._waiters
        while count and waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                count -= 1


class _Results:
    """Outcomes handed from the consumers to the recorder, which settles them in batches."""

    def __init__(self) -> None:
        self._waiting: list[Outcome] = []
        self._unrecorded = 0
        self._added = asyncio.Event()
        self._none_left = asyncio.Event()
        self._none_left.set()

    def __len__(self) -> int:
        """Outcomes not recorded yet (waiting, or being settled)."""
        return self._unrecorded

    def add(self, result: Outcome) -> None:
        # Each event changes only as the first is added: one per message would cost more.
        if not self._waiting:
            self._added.set()  # the recorder waits for one only while there is none
        if not self._unrecorded:
            self._none_left.clear()
        self._waiting.append(result)
        self._unrecorded += 1

    async def take(self, most: int, linger: float) -> list[Outcome]:
        """Up to ``most`` outcomes, oldest first: once there is one, ``linger`` seconds
        later unless there are ``most`` already."""
        while not self._waiting:
            self._added.clear()
            await self._added.wait()
        if len(self._waiting) < most:
            await asyncio.sleep(linger)
        batch, self._waiting = self._waiting[:most], self._waiting[most:]
        return batch

    def recorded(self, count: int) -> None:
        self._unrecorded -= count
        if not self._unrecorded:
            self._none_left.set()

    async def all_recorded(self) -> None:
        await self._none_left.wait()


def _after_crash(job: _Job, attempt: Attempt, policy: outcome.RetryPolicy) -> Outcome:
    """The outcome of a delivery that crashed; its raw bytes dead-lettered if deciding
    it crashes too (the bug is in the outcome), never a consumer lost."""
    try:
        return outcome.after_attempt(job.claimed, job.message, attempt, policy)
    except Exception as exc:
        log.exception("outcome_crashed", id=job.message["id"])
        return outcome.invalid(
            job.claimed, [f"(root): could not be settled ({type(exc).__name__})"]
        )


class _Backoff:
    """Exponential back-off between Redis reconnection attempts, capped at 5 s."""

    def __init__(self) -> None:
        self.delay = 0.05

    async def sleep(self) -> None:
        await asyncio.sleep(self.delay)
        self.delay = min(self.delay * 2, 5.0)

    def reset(self) -> None:
        self.delay = 0.05


def tune_gc() -> None:
    """Collect garbage less often in a worker process.

    Each message leaves a few dozen short-lived objects behind; with the default
    thresholds the collector ran a full pass every ~900 messages (38 ms each), about a
    sixth of a busy worker's CPU. Freezing what start-up allocated and raising the
    first threshold cut that to almost nothing (measured in bench/).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 1000)


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


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Worker]:
    """A worker serving in this event loop for the block; stopped and awaited at its end."""
    ready: asyncio.Future[Worker] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(settings, on_ready=ready.set_result))
    waiters: list[asyncio.Future[Any]] = [ready, task]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    if not ready.done():
        task.result()  # serve() failed before the worker existed: raise its error
        raise RuntimeError("the worker ended before it started")
    worker = ready.result()
    try:
        yield worker
    finally:
        worker.stop()
        await task


async def serve(settings: Settings, *, on_ready: Callable[[Worker], Any] | None = None) -> None:
    """Run one worker with its own Redis connection pool and HTTP session."""
    redis = redis_client(settings)
    connector = aiohttp.TCPConnector(limit=settings.concurrency, keepalive_timeout=30)
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            worker = Worker(settings, redis, build_client(settings, session))
            async with listening(settings, worker.metrics, redis, worker.unready):
                if on_ready is not None:
                    on_ready(worker)
                await worker.run()
    finally:
        await redis.aclose()
