"""The worker's /metrics, /healthz and /readyz, against a real Redis and the stand-in API."""

from __future__ import annotations

import asyncio
import math
import re
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import structlog
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from forwarder.client import Attempt
from forwarder.embedded import RedisServer, free_port
from forwarder.metrics import LAG_TICK, Listener, Metrics, Tally, listening
from forwarder.outcome import Outcome
from forwarder.queue import Keys, Queue, Settlement
from forwarder.settings import Settings
from forwarder.standin import StandIn
from forwarder.worker import running
from tests.support import enqueue_visitors, fast_settings, wait_until

KEYS = Keys("forwarder")
BODY = {"pageId": "p1"}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def enqueue(redis_url: str, visitors: Iterable[str]) -> None:
    await enqueue_visitors(redis_url, visitors, BODY, account="12345678")


async def get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{host}:{port}{path}", timeout=aiohttp.ClientTimeout(5)) as resp,
    ):
        return resp.status, await resp.text()


async def scrape(port: int) -> Samples:
    status, text = await get(port, "/metrics")
    assert status == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of ``name`` over the series that have ``labels`` (and any others)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def listened(settings_port: int, **overrides: Any) -> dict[str, Any]:
    return {"metrics_port": settings_port, "metrics_host": "127.0.0.1", **overrides}


async def test_counters_match_what_the_api_saw(
    redis_url: str, redis_client: Redis, standin: StandIn
) -> None:
    visitors = (
        [f"ok-{i}" for i in range(8)]
        + [f"bad-{i}" for i in range(3)]
        + [f"flaky1-{i}" for i in range(4)]
        + [f"down-{i}" for i in range(2)]
    )
    await enqueue(redis_url, visitors)
    port = free_port()
    # No circuit breaking: every outcome here comes from an answer the stand-in gave.
    unbreakable = {"breaker_window": 10_000, "breaker_min_calls": 10_000}
    settings = fast_settings(
        redis_url, standin, **listened(port, retry_delays=(0.1, 0.1), **unbreakable)
    )
    async with running(settings):

        async def settled() -> bool:
            done = len(standin.delivered) == 12 and await redis_client.llen(KEYS.dead) == 5
            return done and total(await scrape(port), "forwarder_outcomes_total") == len(
                standin.requests
            )

        await wait_until(settled, 15, "every outcome counted")
        await asyncio.sleep(1.1)  # past the state cache of the scrapes above
        samples = await scrape(port)
    counts = standin.counts
    assert (counts[200], counts[400], counts[503]) == (12, 3, 4 + 2 * 3)
    outcomes = "forwarder_outcomes_total"
    assert value(samples, outcomes, result="delivered", status_class="2xx") == counts[200]
    assert total(samples, outcomes, status_class="4xx") == counts[400]
    assert total(samples, outcomes, status_class="5xx") == counts[503]
    assert value(samples, outcomes, result="retried", status_class="5xx") == 4 + 2 * 2
    assert value(samples, outcomes, result="dead", status_class="5xx") == 2
    assert value(samples, "forwarder_dead_letters_total", reason="client_error") == 3
    assert value(samples, "forwarder_dead_letters_total", reason="retries_exhausted") == 2
    assert value(samples, "forwarder_dead_letters_total", reason="invalid_message") == 0
    assert value(samples, "forwarder_retries_total", attempt="1") == 4 + 2
    assert value(samples, "forwarder_retries_total", attempt="2") == 2
    assert value(samples, "forwarder_put_duration_seconds_count") == len(standin.requests)
    assert value(samples, "forwarder_enqueue_to_delivery_seconds_count") == 12
    assert value(samples, "forwarder_domain_lookup_failures_total") == 0
    assert value(samples, "forwarder_messages", state="dead") == 5
    assert value(samples, "forwarder_messages", state="pending") == 0
    assert value(samples, "forwarder_live_workers") == 1
    assert value(samples, "forwarder_redis_up") == 1
    labels = {v for (_, ls) in samples for _, v in ls}
    assert not {v for v in labels if "12345678" in v or "-" in v}  # no ids as labels


async def test_held_messages_and_busy_sessions_are_gauged(
    redis_url: str, redis_client: Redis
) -> None:
    """Session ordering: v1's session has 3 updates and v2's 2; the first of each is claimed."""
    await enqueue(redis_url, ["v1", "v1", "v1", "v2", "v2"])
    queue = Queue(redis_client, "forwarder", "w1", ordered=True)
    assert len(await queue.claim(10)) == 2
    port = free_port()
    settings = Settings(redis_url=redis_url, **listened(port))
    listener = Listener(settings, Metrics(), redis_client, lambda: None)
    await listener.start()
    try:
        samples = await scrape(port)
    finally:
        await listener.stop()
    assert value(samples, "forwarder_busy_sessions") == 2
    assert value(samples, "forwarder_messages", state="held") == 3
    assert value(samples, "forwarder_messages", state="inflight") == 2
    assert value(samples, "forwarder_messages", state="pending") == 0


async def test_domain_lookup_failures_are_counted(redis_url: str) -> None:
    port = free_port()
    async with StandIn(domain_fail_accounts={"12345678"}) as api:
        await enqueue(redis_url, ["ok-1"])
        settings = fast_settings(
            redis_url,
            api,
            **listened(port, api_base_url=None, domain_api_url=api.base_url, api_scheme="http"),
            retry_delays=(0.1,),
        )
        async with running(settings):

            async def dead() -> bool:
                samples = await scrape(port)
                return total(samples, "forwarder_dead_letters_total") == 1

            await wait_until(dead, 10, "a dead letter")
            samples = await scrape(port)
    assert value(samples, "forwarder_domain_lookup_failures_total") == 2
    assert value(samples, "forwarder_outcomes_total", result="retried", status_class="none") == 1
    assert value(samples, "forwarder_put_duration_seconds_count") == 0


async def test_dead_letters_dropped_by_the_cap_are_counted_and_named(
    redis_url: str, redis_client: Redis, standin: StandIn
) -> None:
    await redis_client.lpush(KEYS.dead, *(orjson.dumps({"id": f"old-{i}"}) for i in range(5)))
    port = free_port()
    settings = fast_settings(redis_url, standin, **listened(port, dead_max_len=2))
    with structlog.testing.capture_logs() as logs:
        async with running(settings):
            await wait_until(lambda: _llen_is(redis_client, KEYS.dead, 2), 5, "the cap")
            samples = await scrape(port)
    assert value(samples, "forwarder_dead_letters_dropped_total", cap="max_len") == 3
    assert value(samples, "forwarder_dead_letters_dropped_total", cap="max_age") == 0
    [event] = [e for e in logs if e["event"] == "dead_letters_dropped"]
    assert (event["cap"], event["ids"]) == ("max_len", ["old-0", "old-1", "old-2"])


async def test_readyz_follows_redis_down_and_back(own_redis: RedisServer, standin: StandIn) -> None:
    port = free_port()
    async with running(fast_settings(own_redis.url, standin, **listened(port))):
        await wait_until(lambda: _status_is(port, "/readyz", 200), 5, "200 once registered")
        await asyncio.to_thread(own_redis.kill)
        await wait_until(lambda: _status_is(port, "/readyz", 503), 5, "503 while Redis is down")
        _, body = await get(port, "/readyz")
        assert orjson.loads(body)["reason"] == "redis_unavailable"
        assert (await get(port, "/healthz"))[0] == 200  # the process itself is fine
        samples = await scrape(port)
        assert value(samples, "forwarder_redis_up") == 0
        # Unknown, not the last values read: those kept the no-live-worker alert quiet.
        for name in ("forwarder_live_workers", "forwarder_oldest_pending_age_seconds"):
            assert math.isnan(value(samples, name))
        assert math.isnan(value(samples, "forwarder_messages", state="pending"))
        await asyncio.to_thread(own_redis.start)
        await wait_until(lambda: _status_is(port, "/readyz", 200), 10, "200 once Redis is back")


async def test_readyz_is_503_while_redis_takes_no_write(
    own_redis: RedisServer, standin: StandIn
) -> None:
    # A fail-over behind one address: the worker's Redis turned replica answers PINGs,
    # and /readyz said 200 while every write failed and the worker did nothing.
    port = free_port()
    settings = fast_settings(own_redis.url, standin, **listened(port))
    admin = Redis.from_url(own_redis.url)
    try:
        async with running(settings):
            await wait_until(lambda: _status_is(port, "/readyz", 200), 5, "200 once registered")
            await admin.replicaof("127.0.0.1", free_port())
            within = settings.worker_timeout + 5
            await wait_until(lambda: _status_is(port, "/readyz", 503), within, "503")
            _, body = await get(port, "/readyz")
            assert orjson.loads(body)["reason"] == "redis_refuses_writes"
            await admin.replicaof("NO", "ONE")
            await wait_until(lambda: _status_is(port, "/readyz", 200), 10, "200 once it writes")
    finally:
        await admin.aclose()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
async def test_by_default_the_probes_answer_on_ipv4_and_ipv6(
    redis_url: str, standin: StandIn
) -> None:
    # It bound 0.0.0.0: on an IPv6-only cluster the kubelet's probes, sent to the pod's
    # IPv6 address, were refused, and the pod restarted for ever.
    port = free_port()
    settings = fast_settings(redis_url, standin, metrics_port=port)
    async with running(settings):
        assert (await get(port, "/healthz"))[0] == 200
        assert (await get(port, "/healthz", host="[::1]"))[0] == 200


async def test_enqueue_to_delivery_is_timed_to_the_answer_not_to_the_record(
    redis_url: str, standin: StandIn
) -> None:
    # An idle worker delivers in a few milliseconds; it was timed when the outcome was
    # recorded, a settle batch's linger (50 ms) later, with 50 ms the first bucket.
    port = free_port()
    async with running(fast_settings(redis_url, standin, **listened(port))):
        for i in range(5):
            await enqueue(redis_url, [f"ok-{i}"])
            await asyncio.sleep(0.02)
        name = "forwarder_enqueue_to_delivery_seconds"
        await wait_until(lambda: _counted(port, name, 5), 10, "5 deliveries timed")
        samples = await scrape(port)
    assert value(samples, name + "_bucket", le="0.025") >= 1


async def _counted(port: int, name: str, n: int) -> bool:
    return value(await scrape(port), name + "_count") >= n


async def test_readyz_is_503_once_the_worker_is_stopping(
    redis_url: str, redis_client: Redis, standin: StandIn
) -> None:
    await enqueue(redis_url, ["slow1500-x"])
    port = free_port()
    settings = fast_settings(redis_url, standin, **listened(port, shutdown_grace=5))
    async with running(settings) as worker:
        await wait_until(lambda: _llen_is(redis_client, KEYS.queue, 0), 5, "the claim")
        worker.stop()
        status, body = await get(port, "/readyz")
        assert (status, orjson.loads(body)["reason"]) == (503, "stopping")


async def test_healthz_turns_503_after_the_event_loop_stalls(
    redis_url: str, redis_client: Redis
) -> None:
    port = free_port()
    settings = Settings(redis_url=redis_url, **listened(port))
    listener = Listener(settings, Metrics(), redis_client, lambda: None, lag_limit=0.3)
    await listener.start()
    try:
        assert (await get(port, "/healthz"))[0] == 200
        time.sleep(1.0)  # noqa: ASYNC251 - the point: a loop blocked by a synchronous call
        status, body = await get(port, "/healthz")
        assert status == 503
        assert orjson.loads(body)["loopLagSeconds"] >= 0.5
        await asyncio.sleep(2 * LAG_TICK + 0.2)
        assert (await get(port, "/healthz"))[0] == 200
    finally:
        await listener.stop()


async def test_a_taken_port_is_logged_and_the_worker_still_delivers(
    redis_url: str, standin: StandIn
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        await enqueue(redis_url, ["ok-1"])
        with structlog.testing.capture_logs() as logs:
            async with running(fast_settings(redis_url, standin, **listened(port))):
                await standin.wait_for(lambda api: len(api.delivered) == 1, 10)
    [failed] = [e for e in logs if e["event"] == "metrics_listen_failed"]
    assert failed["port"] == port


async def test_port_zero_means_no_listener(redis_url: str, redis_client: Redis) -> None:
    settings = Settings(redis_url=redis_url, metrics_port=0)
    async with listening(settings, Metrics(), redis_client, lambda: None) as listener:
        assert listener is None


def test_parked_messages_are_counted_by_cause() -> None:
    metrics = Metrics()
    metrics.observe(
        Outcome(Settlement("retry", 1, b"{}", 1.0), "parked", {"id": "x", "why": why})
        for why in ("http_429", "host_throttled", "circuit_open")
    )
    samples = {
        s.labels["cause"]: s.value
        for family in metrics.parked.collect()
        for s in family.samples
        if s.name.endswith("_total")
    }
    assert samples == {"rate_limited": 2, "circuit_open": 1}


def test_a_delivery_without_the_answers_time_is_counted_but_not_timed() -> None:
    # Timed from a clock reading of 0.0, it counted as an instant delivery.
    metrics = Metrics()
    message = {"id": "x", "enqueuedAt": time.time() - 40}
    timed = Attempt(200, 0.001, answered=time.perf_counter())
    metrics.observe(
        Outcome(Settlement("ack", n, b"", 0.0), "delivered", None, message, attempt)
        for n, attempt in enumerate([timed, Attempt(200, 0.001)])
    )
    assert metrics.enqueue_to_delivery.counts == [0] * 13 + [1] + [0] * 6
    assert metrics.enqueue_to_delivery.sum == pytest.approx(40, abs=0.5)


def test_a_tally_exposes_what_a_prometheus_histogram_does() -> None:
    values = [0.0, 0.005, 0.0051, 0.3, 2.5, 9.99, 10.0, 10.5, 1e9]
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    tally = Tally("t_seconds", "help", Histogram.DEFAULT_BUCKETS, registry=ours)
    histogram = Histogram("t_seconds", "help", registry=theirs)
    tally.observe_many(values[:4])
    tally.observe_many([*values[4:], -3.0])  # an age across clocks below 0 counts as 0
    for value in [*values, 0.0]:
        histogram.observe(value)

    def samples(registry: CollectorRegistry) -> set[tuple[str, str, float]]:
        text = generate_latest(registry).decode()
        return {
            (s.name, s.labels.get("le", ""), s.value)
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if not s.name.endswith("_created")
        }

    assert samples(ours) == samples(theirs)
    assert ("t_seconds_bucket", "10.0", 8) in samples(ours)  # a value on a bound counts there


async def _llen_is(redis: Redis, key: str, n: int) -> bool:
    return int(await redis.llen(key)) == n


async def _status_is(port: int, path: str, status: int) -> bool:
    try:
        return (await get(port, path))[0] == status
    except aiohttp.ClientError:
        return False


def test_the_deploy_examples_use_only_exposed_metrics() -> None:
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""]}
    exposed = {
        family.name + suffix
        for family in Metrics().registry.collect()
        for suffix in suffixes[family.type]
    }
    deploy = Path(__file__).resolve().parent.parent / "deploy"
    for example in ("grafana-dashboard.json", "prometheus-rules.yml"):
        used = set(re.findall(r"\bforwarder_[a-z_]+", (deploy / example).read_text()))
        assert used, example
        assert used <= exposed, (example, used - exposed)
