"""A worker's Prometheus metrics, and its metrics and health listener.

The listener (``FORWARDER_METRICS_HOST``:``FORWARDER_METRICS_PORT``, 0 = none) serves:

- ``/metrics``: what this worker recorded (outcomes, latencies, retries, dead letters)
  plus the queue's depths, read from Redis on a scrape (at most once a second);
- ``/healthz``: 200 while the event loop keeps up (its lag under :data:`LAG_LIMIT`);
- ``/readyz``: 200 while Redis (on a cluster, the queue's node) answers a PING within
  :data:`READY_TIMEOUT` and the worker is ready (``unready`` says why not: stopping,
  starting, or Redis took none of its writes for ``FORWARDER_WORKER_TIMEOUT``); 503
  otherwise.

Labels are bounded sets only: no visitor, session or account ids.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import functools
import itertools
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from forwarder.connections import REDIS_CALL_FAILED, AsyncRedis, ping
from forwarder.deadletters import REASONS, Dropped
from forwarder.outcome import Outcome
from forwarder.settings import Settings
from forwarder.stats import QueueState, Snapshot

log = structlog.get_logger("forwarder.metrics")

MESSAGE_STATES = ("pending", "delayed", "inflight", "held", "dead")

LAG_LIMIT = 5.0
LAG_TICK = 0.5
READY_TIMEOUT = 1.0
# Scrapes closer together than this share one read of the queue's state.
STATE_TTL = 1.0
STOP_TIMEOUT = 2.0

_RESULTS = {"delivered": "delivered", "retry_scheduled": "retried", "dead_lettered": "dead"}
_STATUS_CLASSES = ("2xx", "4xx", "5xx", "none")
# Failures that happen after a request was sent: only those have a PUT latency.
_SENT = frozenset({"timeout", "connection"})
_NUMBER = (int, float)
# The exposition's spelling of a bucket bound (prometheus_client leaves it untyped).
_go_float: Callable[[float], str] = floatToGoString
# From a few milliseconds (an idle worker's) to hours (a backlog's).
_ENQUEUE_BUCKETS = (
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
    900,
    3600,
    21600,
)


class Metrics:
    """Every metric of one worker, in a registry of its own (not the process-global one)."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.outcomes = Counter(
            "forwarder_outcomes",
            "Recorded delivery outcomes, by result and HTTP status class",
            ["result", "status_class"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "forwarder_dead_letters",
            "Messages dead-lettered, by reason",
            ["reason"],
            registry=registry,
        )
        self.retries = Counter(
            "forwarder_retries",
            "Retries scheduled, by the number of the attempt that failed",
            ["attempt"],
            registry=registry,
        )
        self.parked = Counter(
            "forwarder_parked",
            "Messages put back to wait without spending an attempt, by cause",
            ["cause"],
            registry=registry,
        )
        self.domain_lookup_failures = Counter(
            "forwarder_domain_lookup_failures",
            "Attempts that failed because the Domain API gave no host",
            registry=registry,
        )
        self.dropped = Counter(
            "forwarder_dead_letters_dropped",
            "Dead letters dropped by FORWARDER_DEAD_MAX_LEN / _MAX_AGE, by cap",
            ["cap"],
            registry=registry,
        )
        self.put_seconds = Tally(
            "forwarder_put_duration_seconds",
            "Duration of Update Session PUTs (answered or timed out)",
            Histogram.DEFAULT_BUCKETS,
            registry=registry,
        )
        self.enqueue_to_delivery = Tally(
            "forwarder_enqueue_to_delivery_seconds",
            "From enqueuedAt to the API's 2xx (producer's clock to this worker's)",
            _ENQUEUE_BUCKETS,
            registry=registry,
        )
        self.messages = Gauge(
            "forwarder_messages",
            "Messages of the queue by state (pending, delayed, inflight, held, dead), from Redis",
            ["state"],
            registry=registry,
        )
        self.oldest_pending = Gauge(
            "forwarder_oldest_pending_age_seconds",
            "Age of the oldest pending message (by its enqueuedAt); 0 when none",
            registry=registry,
        )
        self.busy_sessions = Gauge(
            "forwarder_busy_sessions",
            "Sessions whose turn an update holds (session ordering), from Redis",
            registry=registry,
        )
        self.live_workers = Gauge(
            "forwarder_live_workers", "Workers whose heartbeat is recent", registry=registry
        )
        self.redis_up = Gauge(
            "forwarder_redis_up",
            "1 if the latest read of the queue's state from Redis succeeded",
            registry=registry,
        )
        self._zero_series()
        # labels() validates and locks on every call: look each child up once.
        self._outcome = functools.cache(self.outcomes.labels)

    def _zero_series(self) -> None:
        # Series that exist from the start read as 0, not as absent, in rate() and alerts.
        for result in _RESULTS.values():
            for status_class in _STATUS_CLASSES:
                self.outcomes.labels(result, status_class)
        for reason in REASONS:
            self.dead_letters.labels(reason)
        for cap in ("max_len", "max_age"):
            self.dropped.labels(cap)

    def observe(self, outcomes: Iterable[Outcome]) -> None:
        """Count recorded outcomes (a settled batch, as the worker reports it)."""
        counts: collections.Counter[tuple[str, str]] = collections.Counter()
        latencies: list[float] = []
        enqueued: list[tuple[object, float | None]] = []
        for outcome in outcomes:
            attempt, message = outcome.attempt, outcome.message
            if outcome.event == "delivered" and attempt is not None and message is not None:
                # Nearly every outcome of a busy worker: gathered, counted once a batch.
                latencies.append(attempt.latency)
                enqueued.append((message.get("enqueuedAt"), attempt.answered))
            else:
                self._observe_other(outcome, counts, latencies)
        if enqueued:
            counts["delivered", "2xx"] += len(enqueued)
        self.put_seconds.observe_many(latencies)
        # Answers are timed by the monotonic clock (one read a message, which the PUT's
        # latency takes anyway); enqueuedAt is wall-clock time.
        to_wall = time.time() - time.perf_counter()
        self.enqueue_to_delivery.observe_many(
            [
                done + to_wall - e
                for e, done in enqueued
                if isinstance(e, _NUMBER) and done is not None
            ]
        )
        # One increment per series a batch: each takes a lock.
        for labels, count in counts.items():
            self._outcome(*labels).inc(count)

    def _observe_other(
        self,
        outcome: Outcome,
        counts: collections.Counter[tuple[str, str]],
        latencies: list[float],
    ) -> None:
        if outcome.event == "parked":
            self.parked.labels(_park_cause(outcome.fields.get("why"))).inc()
            return
        result = _RESULTS[outcome.event]
        attempt = outcome.attempt
        status = None if attempt is None else attempt.status
        counts[result, _status_class(status)] += 1
        if attempt is not None and (status is not None or attempt.failure in _SENT):
            latencies.append(attempt.latency)
        if attempt is not None and attempt.failure == "domain_lookup":
            self.domain_lookup_failures.inc()
        if result == "retried":
            self.retries.labels(str(outcome.fields["attempt"])).inc()
        elif result == "dead":
            self.dead_letters.labels(str(outcome.fields["reason"])).inc()

    def observe_dropped(self, dropped: Dropped) -> None:
        self.dropped.labels("max_len").inc(len(dropped.by_len))
        self.dropped.labels("max_age").inc(len(dropped.by_age))

    def observe_state(self, snapshot: Snapshot | None) -> None:
        """Set the depth gauges from ``snapshot``; None: Redis did not answer."""
        self.redis_up.set(snapshot is not None)
        if snapshot is None:
            # Unknown: the last values read would keep alerts quiet (a live worker, an
            # old queue) for the whole outage.
            for gauge in (self.busy_sessions, self.oldest_pending, self.live_workers):
                gauge.set(math.nan)
            for state in MESSAGE_STATES:
                self.messages.labels(state).set(math.nan)
            return
        for state, count in zip(
            MESSAGE_STATES,
            (snapshot.pending, snapshot.delayed, snapshot.inflight, snapshot.held, snapshot.dead),
            strict=True,
        ):
            self.messages.labels(state).set(count)
        self.busy_sessions.set(snapshot.busy_sessions)
        self.oldest_pending.set(snapshot.oldest_pending_age or 0.0)
        self.live_workers.set(snapshot.live_workers)


class Tally(Collector):
    """A histogram counted in plain ints, read into the exposition on a scrape.

    prometheus_client's ``Histogram.observe`` takes a lock per value and walks the
    buckets in Python; a worker observes two values a message, all from its event loop's
    thread, a batch at a time: a sort and a bisect per bucket do.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        *,
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = [float(b) for b in buckets if b != float("inf")]
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound
        self._les = [_go_float(b) for b in self.bounds] + ["+Inf"]
        self.sum = 0.0
        registry.register(self)

    def observe_many(self, values: list[float]) -> None:
        """Count each of ``values`` (sorted in place); a negative one counts as 0 (an
        age across two clocks can come out below 0)."""
        if not values:
            return
        values.sort()
        # A batch costs a bisect per bucket, not one per value.
        self.sum += sum(values[bisect.bisect_left(values, 0.0) :])
        counts, done = self.counts, 0
        for i, bound in enumerate(self.bounds):
            # bisect_right: a value equal to a bound counts in that bound's bucket (le=).
            upto = bisect.bisect_right(values, bound)
            counts[i] += upto - done
            done = upto
        counts[-1] += len(values) - done

    def collect(self) -> Iterable[Metric]:
        buckets = list(zip(self._les, itertools.accumulate(self.counts), strict=True))
        family = HistogramMetricFamily(self.name, self.documentation)
        family.add_metric([], buckets, self.sum)
        return [family]


def _status_class(status: object) -> str:
    return f"{status // 100}xx" if isinstance(status, int) else "none"


def _park_cause(why: object) -> str:
    # A 429, or another message of a host that answered one: the host asked to slow down.
    return "rate_limited" if why in ("http_429", "host_throttled") else "circuit_open"


class Listener:
    """The HTTP side: ``/metrics``, ``/healthz``, ``/readyz``."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        redis: AsyncRedis,
        unready: Callable[[], str | None],
        *,
        lag_limit: float = LAG_LIMIT,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.redis = redis
        self.unready = unready  # why not ready, None if ready
        self.lag_limit = lag_limit
        self.lag = 0.0
        self._state = QueueState(redis, settings.queue, settings.worker_timeout)
        self._state_read_at = float("-inf")
        self._state_lock = asyncio.Lock()
        self._runner: web.AppRunner | None = None
        self._lag_task: asyncio.Task[None] | None = None
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self.app = app

    async def start(self) -> None:
        # A stopping worker must not wait the default minute for a slow scrape.
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=STOP_TIMEOUT)
        await runner.setup()
        try:
            await web.TCPSite(
                runner, self.settings.metrics_host, self.settings.metrics_port
            ).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._lag_task = asyncio.create_task(self._watch_lag())

    async def stop(self) -> None:
        if self._lag_task is not None:
            self._lag_task.cancel()
            await asyncio.gather(self._lag_task, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()

    async def _watch_lag(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(LAG_TICK)
            self.lag = loop.time() - before - LAG_TICK

    async def _metrics(self, request: web.Request) -> web.Response:
        await self._refresh_state()
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _refresh_state(self) -> None:
        async with self._state_lock:
            if time.monotonic() - self._state_read_at < STATE_TTL:
                return
            try:
                async with asyncio.timeout(READY_TIMEOUT):
                    snapshot: Snapshot | None = await self._state.read()
            except REDIS_CALL_FAILED:
                snapshot = None
            self.metrics.observe_state(snapshot)
            self._state_read_at = time.monotonic()

    async def _healthz(self, request: web.Request) -> web.Response:
        healthy = self.lag <= self.lag_limit
        return _status(healthy, loopLagSeconds=round(self.lag, 3))

    async def _readyz(self, request: web.Request) -> web.Response:
        # Redis first: a Redis that does not answer takes no writes either, and is the
        # reason to name.
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                await ping(self.redis, self._state.keys.queue)
        except REDIS_CALL_FAILED as exc:
            return _status(False, reason="redis_unavailable", error=type(exc).__name__)
        why = self.unready()
        if why is not None:
            return _status(False, reason=why)
        return _status(True)


def _status(ok: bool, **details: Any) -> web.Response:
    return web.json_response({"ok": ok, **details}, status=200 if ok else 503)


@contextlib.asynccontextmanager
async def listening(
    settings: Settings, metrics: Metrics, redis: AsyncRedis, unready: Callable[[], str | None]
) -> AsyncIterator[Listener | None]:
    """Serve the listener for the block; none when the port is 0 or cannot be bound.

    A port that cannot be bound is logged (``metrics_listen_failed``), not fatal:
    delivering matters more than being observed.
    """
    if not settings.metrics_port:
        yield None
        return
    listener = Listener(settings, metrics, redis, unready)
    try:
        await listener.start()
    except OSError as exc:
        log.error(
            "metrics_listen_failed",
            host=settings.metrics_host,
            port=settings.metrics_port,
            error=str(exc),
        )
        yield None
        return
    log.info("metrics_listening", host=settings.metrics_host, port=settings.metrics_port)
    try:
        yield listener
    finally:
        await listener.stop()
