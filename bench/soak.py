"""``python bench/soak.py``: a long run under faults, then an exact reconciliation.

Run by hand, not in CI (see bench/README.md, "Soak"). Starts, on 127.0.0.1, a private
Redis with AOF on, a stand-in engagement API that fails at random, a producer at a steady
rate and worker processes; SIGKILLs and restarts workers at random moments and Redis a
few times; then stops producing, waits for the queue to drain, stops the workers with
SIGTERM and checks that every enqueued id was delivered (a 2xx seen by the stand-in) or
dead-lettered. Everything it starts is stopped at the end, also on Ctrl-C / SIGTERM.

    .venv/bin/python bench/soak.py --quick                  # about 3 minutes
    .venv/bin/python bench/soak.py --minutes 10 --json /tmp/soak.json

``python -m bench.soak --serve-api`` is the stand-in alone (the soak starts it itself).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import math
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

if __package__ in (None, ""):
    # Run as a script: make the repository root importable (bench.*, forwarder.*).
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson
import redis
import redis.asyncio
import redis.asyncio.retry
from redis.backoff import NoBackoff

from bench import procs
from bench.api import _UNAVAILABLE, _http, take_request
from bench.common import ACCOUNT
from bench.harness import (
    DEAD_KEY,
    DELAYED_KEY,
    PY,
    QUEUE_KEY,
    QUEUE_NAME,
    ROOT,
    TAG,
    WORKERS_KEY,
    ApiControl,
    machine,
)
from bench.procs import Child, Children
from forwarder.demo import DOCS_EXAMPLE_BODY as EXAMPLE_BODY
from forwarder.embedded import RedisServer
from forwarder.producer import Producer, QueueUnavailable, make_update

INFLIGHT_MATCH = f"{TAG}:inflight:*"
_VISITORS = "/visitors/"
_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
_BAD = _http(
    400, b'{"time":0,"message":"request data missing or invalid","internalCode":5}', "Bad Request"
)
# What the stand-in records per call, besides HTTP statuses.
DROPPED = 0  # connection closed, no answer
LATE = -1  # a slow answer the client no longer waited for (it timed out and closed)


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- the stand-in API (its own process) ---------------------------------------------------


class FaultyApi:
    """Which fate each Update Session call meets, and every visitor's answers."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.rng = random.Random(args.seed)
        self.p503, self.p_drop, self.p_slow = args.p503, args.p_drop, args.p_slow
        self.slow_s = args.slow_ms / 1000
        self.seen: dict[str, list[int]] = {}
        self.statuses: collections.Counter[int] = collections.Counter()

    def fate(self, visitor: str) -> str:
        """``ok``, ``503``, ``drop``, ``slow`` or ``400`` (``bad-`` visitors)."""
        roll = self.rng.random()
        if roll < self.p503:
            return "503"
        roll -= self.p503
        if roll < self.p_drop:
            return "drop"
        roll -= self.p_drop
        if roll < self.p_slow:
            return "slow"
        return "400" if visitor.startswith("bad-") else "ok"

    def record(self, visitor: str, status: int) -> None:
        self.seen.setdefault(visitor, []).append(status)
        self.statuses[status] += 1

    def control(self, target: str) -> bytes:
        if target.startswith("/_soak/record"):
            statuses = {str(k): v for k, v in self.statuses.items()}
            body = orjson.dumps({"visitors": self.seen, "statuses": statuses})
        else:
            body = orjson.dumps({"statuses": {str(k): v for k, v in self.statuses.items()}})
        return _http(200, body)


class _FaultyConnection(asyncio.Protocol):
    """One keep-alive connection; one request answered at a time (clients never pipeline)."""

    def __init__(self, api: FaultyApi) -> None:
        self.api = api
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.waiting = False  # a slow answer is pending
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._serve()

    def _serve(self) -> None:
        # Bounded by the bytes received: every pass consumes one whole request.
        while not self.waiting and not self.closed:
            request = take_request(self.buf)
            if request is None:
                return
            self._answer(request[1])

    def _answer(self, target: str) -> None:
        transport = self.transport
        assert transport is not None
        if target.startswith("/_soak/"):
            transport.write(self.api.control(target))
            return
        start = target.find(_VISITORS)
        end = target.find("?", start)
        visitor = target[start + len(_VISITORS) : end if end >= 0 else len(target)]
        fate = self.api.fate(visitor)
        if fate == "drop":
            self.api.record(visitor, DROPPED)
            self.closed = True
            transport.close()
        elif fate == "slow":
            self.waiting = True
            asyncio.get_running_loop().call_later(self.api.slow_s, self._late, visitor)
        elif fate == "503":
            self.api.record(visitor, 503)
            transport.write(_UNAVAILABLE)
        elif fate == "400":
            self.api.record(visitor, 400)
            transport.write(_BAD)
        else:
            self.api.record(visitor, 200)
            transport.write(_OK)

    def _late(self, visitor: str) -> None:
        self.waiting = False
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            self.api.record(visitor, LATE)
            return
        self.api.record(visitor, 200)
        transport.write(_OK)
        self._serve()


async def _serve_api(args: argparse.Namespace) -> None:
    api = FaultyApi(args)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _FaultyConnection(api), "127.0.0.1", 0, backlog=1024)
    print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


class SoakControl(ApiControl):
    """The faulty stand-in's control endpoints."""

    def record(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/_soak/record")
        return result

    def statuses(self) -> dict[str, int]:
        result: dict[str, int] = self._call("GET", "/_soak/stats")["statuses"]
        return result


# --- the soak -------------------------------------------------------------------------------


@dataclass
class Slot:
    """One of the N worker places; its process is replaced after each kill."""

    index: int
    child: Child | None = None
    gen: int = 0
    started_at: float = 0.0


@dataclass
class Soak:
    args: argparse.Namespace
    tmp: Path
    children: Children
    server: RedisServer
    api: Child
    control: SoakControl
    admin: redis.asyncio.Redis
    rng: random.Random
    slots: list[Slot] = field(default_factory=list)
    t0: float = 0.0
    # Producer
    enqueued: dict[str, float] = field(default_factory=dict)  # id -> time enqueued (rel)
    visitor_id: dict[str, str] = field(default_factory=dict)  # visitor -> id
    retried_ids: set[str] = field(default_factory=set)  # in a batch pushed more than once
    ambiguous_ids: set[str] = field(default_factory=set)  # retried after a lost reply
    producer_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    retried_batches: int = 0
    unconfirmed: list[str] = field(default_factory=list)
    max_lag: int = 0
    # Chaos
    events: list[dict[str, Any]] = field(default_factory=list)
    worker_kills: int = 0
    redis_restarts: int = 0
    unexpected_exits: list[dict[str, Any]] = field(default_factory=list)
    # Samples
    rss: list[tuple[float, int, int, int, int]] = field(default_factory=list)
    other_rss: list[tuple[float, int, int]] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def event(self, kind: str, **info: Any) -> None:
        entry = {"t": round(self.now(), 2), "event": kind, **info}
        self.events.append(entry)
        _progress(f"  [{entry['t']:7.1f}s] {kind} {info if info else ''}")

    def worker_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}
        env.update(
            FORWARDER_REDIS_URL=self.server.url,
            FORWARDER_API_BASE_URL=f"http://127.0.0.1:{self.control.port}",
            FORWARDER_QUEUE=QUEUE_NAME,
            FORWARDER_RETRY_DELAYS=self.args.retry_delays,
            FORWARDER_REQUEST_TIMEOUT=str(self.args.request_timeout),
            FORWARDER_HEARTBEAT_INTERVAL="1",
            FORWARDER_WORKER_TIMEOUT="5",
            FORWARDER_SHUTDOWN_GRACE="10",
            FORWARDER_METRICS_PORT="0",
            FORWARDER_LOG_LEVEL="warning",
            FORWARDER_DEAD_MAX_LEN="0",
            PYTHONUNBUFFERED="1",
        )
        return env

    def start_worker(self, slot: Slot) -> None:
        slot.gen += 1
        argv = [PY, "-m", "forwarder", "worker"]
        name = f"worker{slot.index}-{slot.gen}"
        slot.child = self.children.start(name, argv, env=self.worker_env(), cwd=ROOT)
        slot.started_at = self.now()

    def kill_worker(self, slot: Slot) -> int | None:
        child = slot.child
        slot.child = None
        if child is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.proc.wait()
        self.children.stop(child)
        return child.pid


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds``; True if ``stop`` was set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=max(0.0, seconds))
    return stop.is_set()


async def produce(soak: Soak, until: float) -> None:
    """Enqueue at ``--rate`` msg/s (a batch every 0.1 s) until ``until`` (run time)."""
    args = soak.args
    producer = Producer.from_url(soak.server.url, QUEUE_NAME)
    run = f"{args.seed:x}{os.getpid():x}"
    seq = 0
    try:
        while soak.now() < until:
            due = int(soak.now() * args.rate)
            soak.max_lag = max(soak.max_lag, due - seq)
            while seq < due:
                n = min(due - seq, 1000)
                batch, ids = [], []
                for i in range(seq, seq + n):
                    mid = f"{run}-{i:07d}"
                    prefix = "bad-" if soak.rng.random() < args.p_bad else "v"
                    visitor = f"{prefix}{i}"
                    body = {**EXAMPLE_BODY, "pageId": mid}
                    batch.append(make_update(ACCOUNT, visitor, f"s{i}", body, id=mid))
                    soak.visitor_id[visitor] = mid
                    ids.append(mid)
                await _push(soak, producer, batch, ids)
                seq += n
            await asyncio.sleep(0.1)
    finally:
        await producer.aclose()


async def _push(
    soak: Soak, producer: Producer, batch: list[dict[str, Any]], ids: list[str]
) -> None:
    """Push one batch; on ``QueueUnavailable`` push the same ids again (bounded)."""
    deadline = time.monotonic() + soak.args.push_deadline
    attempts = 0
    while True:
        attempts += 1
        try:
            await producer.enqueue_many(batch)
        except QueueUnavailable as exc:
            cause = exc.__cause__
            text = f"{type(cause).__name__}: {cause}" if cause else str(exc)
            refused = "refused" in text.lower() or "connect call failed" in text.lower()
            soak.producer_errors["refused" if refused else "ambiguous"] += 1
            if attempts == 1:
                soak.retried_batches += 1
            soak.retried_ids.update(ids)
            if not refused:
                # The LPUSH may have landed before the reply was lost: a retry may double.
                soak.ambiguous_ids.update(ids)
            if time.monotonic() > deadline:
                soak.unconfirmed.extend(ids)
                soak.event("producer_gave_up", batch=len(ids), error=text[:120])
                return
            await asyncio.sleep(0.2)
            continue
        at = soak.now()
        for mid in ids:
            soak.enqueued[mid] = at
        return


async def chaos_workers(soak: Soak, stop: asyncio.Event) -> None:
    """Every ``--kill-every`` s (random in the range) SIGKILL one worker, restart it."""
    low, high = soak.args.kill_every
    while not await _sleep_or_stop(stop, soak.rng.uniform(low, high)):
        slot = soak.rng.choice(soak.slots)
        if slot.child is None:
            continue
        pid = soak.kill_worker(slot)
        soak.worker_kills += 1
        soak.event("worker_killed", slot=slot.index, pid=pid)
        await asyncio.sleep(soak.rng.uniform(0.5, 3.0))
        if slot.child is None:
            soak.start_worker(slot)


async def chaos_redis(soak: Soak, stop: asyncio.Event, duration: float) -> None:
    """SIGKILL Redis ``--redis-kills`` times, at even fractions of the run (± jitter)."""
    kills = soak.args.redis_kills
    for k in range(kills):
        at = duration * (k + 1) / (kills + 1) + soak.rng.uniform(-0.05, 0.05) * duration
        if await _sleep_or_stop(stop, at - soak.now()):
            return
        down = soak.rng.uniform(2.0, 5.0)
        await asyncio.to_thread(soak.server.kill)
        soak.event("redis_killed", down_s=round(down, 1))
        await asyncio.sleep(down)
        await _start_redis(soak)
        soak.redis_restarts += 1
        soak.event("redis_restarted")


async def _start_redis(soak: Soak) -> None:
    for attempt in range(3):
        try:
            await asyncio.to_thread(soak.server.start)
            return
        except Exception as exc:  # ServerStartError: retry, then give up
            soak.event("redis_start_failed", attempt=attempt + 1, error=str(exc)[:200])
            await asyncio.sleep(1.0)
    raise RuntimeError("Redis did not come back")


async def watch_workers(soak: Soak, stop: asyncio.Event) -> None:
    """Restart a worker that exited on its own (counted: it should not happen)."""
    while not await _sleep_or_stop(stop, 1.0):
        for slot in soak.slots:
            child = slot.child
            if child is None or child.alive():
                continue
            soak.unexpected_exits.append(
                {
                    "t": round(soak.now(), 1),
                    "slot": slot.index,
                    "code": child.proc.returncode,
                    "log": child.log_tail(8),
                }
            )
            soak.event("worker_exited", slot=slot.index, code=child.proc.returncode)
            soak.children.stop(child)
            slot.child = None
            soak.start_worker(slot)


async def sample(soak: Soak, stop: asyncio.Event) -> None:
    """Worker RSS (and HWM) every ``--rss-interval`` s; Redis and stand-in RSS too."""
    while True:
        t = soak.now()
        for slot in soak.slots:
            child = slot.child
            if child is not None and child.alive():
                rss = procs.status_kb(child.pid, "VmRSS")
                hwm = procs.status_kb(child.pid, "VmHWM")
                if rss:
                    soak.rss.append((t, slot.index, child.pid, rss, hwm))
        redis_pid = soak.server.pid
        soak.other_rss.append(
            (
                t,
                procs.status_kb(redis_pid, "VmRSS") if redis_pid else 0,
                procs.status_kb(soak.api.pid, "VmRSS"),
            )
        )
        if await _sleep_or_stop(stop, soak.args.rss_interval):
            return


async def report_progress(soak: Soak, stop: asyncio.Event) -> None:
    while not await _sleep_or_stop(stop, 20.0):
        try:
            state: dict[str, Any] = dict(await _redis_state(soak))
        except (redis.RedisError, OSError) as exc:
            state = {"redis": type(exc).__name__}
        _progress(
            f"  [{soak.now():7.1f}s] enqueued {len(soak.enqueued)}  {state}  "
            f"kills {soak.worker_kills}  redis restarts {soak.redis_restarts}"
        )


async def _redis_state(soak: Soak) -> dict[str, int]:
    r = soak.admin
    inflight = 0
    async for key in r.scan_iter(match=INFLIGHT_MATCH, count=1000):
        inflight += int(await r.hlen(key))
    return {
        "queue": int(await r.llen(QUEUE_KEY)),
        "delayed": int(await r.zcard(DELAYED_KEY)),
        "inflight": inflight,
        "dead": int(await r.llen(DEAD_KEY)),
        "workers": int(await r.zcard(WORKERS_KEY)),
    }


async def drain(soak: Soak) -> tuple[bool, float, dict[str, int]]:
    """Wait (bounded) until queue, delayed and in-flight are empty twice in a row."""
    start = time.monotonic()
    deadline = start + soak.args.drain_timeout
    calm = 0
    state: dict[str, int] = {}
    while time.monotonic() < deadline:
        try:
            state = await _redis_state(soak)
        except (redis.RedisError, OSError):
            calm = 0
        else:
            empty = state["queue"] == 0 and state["delayed"] == 0 and state["inflight"] == 0
            calm = calm + 1 if empty else 0
            if calm >= 2:
                return True, time.monotonic() - start, state
        await asyncio.sleep(0.5)
    return False, time.monotonic() - start, state


async def leftovers(soak: Soak) -> dict[str, list[str]]:
    """Ids still in the queue, delayed set or any in-flight hash."""

    def ids(raws: Any) -> list[str]:
        out = []
        for raw in raws:
            try:
                out.append(str(orjson.loads(raw).get("id")))
            except orjson.JSONDecodeError:
                out.append("<not json>")
        return out

    r = soak.admin
    inflight: list[Any] = []
    async for key in r.scan_iter(match=INFLIGHT_MATCH, count=1000):
        inflight += list((await r.hgetall(key)).values())
    return {
        "queue": ids(await r.lrange(QUEUE_KEY, 0, -1)),
        "delayed": ids(await r.zrange(DELAYED_KEY, 0, -1)),
        "inflight": ids(inflight),
    }


# --- reconciliation and report ----------------------------------------------------------


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def rss_summary(soak: Soak, t_from: float, t_to: float) -> dict[str, Any]:
    """First-third vs last-third average, peak; overall and for the longest-lived process."""
    third = (t_to - t_from) / 3
    by_time: dict[float, list[int]] = collections.defaultdict(list)
    for t, _, _, rss, _ in soak.rss:
        by_time[t].append(rss)
    per_sample = [(t, statistics.fmean(v) / 1024) for t, v in sorted(by_time.items())]
    first = _mean([m for t, m in per_sample if t_from <= t < t_from + third])
    last = _mean([m for t, m in per_sample if t_to - third <= t <= t_to])
    peak_hwm = max((hwm for *_, hwm in soak.rss), default=0) / 1024
    peak_rss = max((rss for *_, rss, _ in soak.rss), default=0) / 1024
    lives: dict[int, list[tuple[float, int]]] = collections.defaultdict(list)
    for t, _, pid, rss, _ in soak.rss:
        lives[pid].append((t, rss))
    longest: dict[str, Any] = {}
    if lives:
        pid, samples = max(lives.items(), key=lambda kv: kv[1][-1][0] - kv[1][0][0])
        span = samples[-1][0] - samples[0][0]
        k = max(1, len(samples) // 3)
        l_first = statistics.fmean(s[1] for s in samples[:k]) / 1024
        l_last = statistics.fmean(s[1] for s in samples[-k:]) / 1024
        longest = {
            "pid": pid,
            "lived_s": round(span, 1),
            "samples": len(samples),
            "first_third_mb": l_first,
            "last_third_mb": l_last,
            "flat": l_last <= l_first * 1.05 + 2,
        }
    return {
        "samples": len(soak.rss),
        "processes": len(lives),
        "first_third_mb": first,
        "last_third_mb": last,
        "peak_rss_mb": peak_rss,
        "peak_hwm_mb": peak_hwm,
        "flat": None if first is None or last is None else last <= first * 1.05 + 2,
        "longest_lived": longest,
        "redis_rss_last_mb": soak.other_rss[-1][1] / 1024 if soak.other_rss else None,
        "api_rss_last_mb": soak.other_rss[-1][2] / 1024 if soak.other_rss else None,
    }


def reconcile(
    soak: Soak,
    seen: dict[str, list[int]],
    dead_raw: list[bytes],
    left: dict[str, list[str]],
) -> dict[str, Any]:
    enqueued = set(soak.enqueued)
    ok_count: collections.Counter[str] = collections.Counter()
    late_ids: set[str] = set()
    unknown_visitors = []
    for visitor, statuses in seen.items():
        mid = soak.visitor_id.get(visitor)
        if mid is None:
            unknown_visitors.append(visitor)
            continue
        ok_count[mid] = sum(1 for s in statuses if 200 <= s < 300)
        if LATE in statuses:
            late_ids.add(mid)
    delivered = {mid for mid, n in ok_count.items() if n > 0}
    dead_by_id: collections.Counter[str] = collections.Counter()
    by_reason: collections.Counter[str] = collections.Counter()
    by_detail: collections.Counter[str] = collections.Counter()
    for raw in dead_raw:
        rec = orjson.loads(raw)
        dead_by_id[str(rec.get("id"))] += 1
        by_reason[str(rec.get("reason"))] += 1
        by_detail[f"{rec.get('reason')}/{rec.get('lastError')}"] += 1
    dead = set(dead_by_id)
    still = set(left["queue"]) | set(left["delayed"]) | set(left["inflight"])
    lost = enqueued - delivered - dead
    lost_nowhere = lost - still
    duplicates = {mid: n for mid, n in ok_count.items() if n > 1}
    dup_ambiguous = sum(1 for mid in duplicates if mid in soak.ambiguous_ids)
    both = delivered & dead
    return {
        "enqueued": len(enqueued),
        "delivered": len(delivered),
        "dead": len(dead),
        "dead_records": len(dead_raw),
        "dead_by_reason": dict(by_reason),
        "dead_by_reason_last_error": dict(by_detail),
        "dead_twice": sum(1 for n in dead_by_id.values() if n > 1),
        "delivered_and_dead": len(both),
        "delivered_and_dead_ids": sorted(both)[:20],
        "lost": len(lost),
        "lost_still_in_redis": len(lost - lost_nowhere),
        "lost_nowhere": len(lost_nowhere),
        "lost_ids": sorted(lost)[:50],
        "covered": delivered | dead >= enqueued,
        "not_enqueued_but_seen": len((delivered | dead) - enqueued),
        "unknown_visitors": len(unknown_visitors),
        "duplicates": len(duplicates),
        "duplicate_extra_2xx": sum(n - 1 for n in duplicates.values()),
        "duplicates_from_producer_retry": dup_ambiguous,
        "duplicates_sample": dict(sorted(duplicates.items())[:10]),
        "late_200_not_seen_by_client": len(late_ids),
        "left_in_redis": {k: len(v) for k, v in left.items()},
        "unconfirmed_enqueues": len(soak.unconfirmed),
    }


def diagnose(
    soak: Soak, lost_ids: list[str], seen: dict[str, list[int]], dead_raw: list[bytes]
) -> list[dict[str, Any]]:
    """What is known about each lost id: stand-in answers, producer retries, worker logs."""
    by_id = {mid: visitor for visitor, mid in soak.visitor_id.items()}
    logs = sorted(soak.tmp.glob("*worker*.log"))
    texts = {p.name: p.read_text(errors="replace") for p in logs}
    out = []
    for mid in lost_ids[:20]:
        visitor = by_id.get(mid, "?")
        mentions = [
            line[:300] for name, text in texts.items() for line in text.splitlines() if mid in line
        ]
        out.append(
            {
                "id": mid,
                "visitor": visitor,
                "enqueued_at_s": round(soak.enqueued.get(mid, math.nan), 2),
                "api_saw": seen.get(visitor, []),
                "in_retried_batch": mid in soak.retried_ids,
                "in_ambiguous_batch": mid in soak.ambiguous_ids,
                "dead_records_mentioning": sum(1 for raw in dead_raw if mid.encode() in raw),
                "worker_log_lines": mentions[:10],
                "nearby_events": [
                    e
                    for e in soak.events
                    if abs(e["t"] - soak.enqueued.get(mid, -1e9)) < soak.args.request_timeout + 30
                ],
            }
        )
    return out


def render(result: dict[str, Any]) -> str:
    rec, rss, cfg = result["reconcile"], result["rss"], result["config"]
    longest = rss.get("longest_lived") or {}

    def mb(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f} MB"

    rows = [
        ("run", f"{cfg['minutes']:g} min at {cfg['rate']:g} msg/s, appendfsync {cfg['fsync']}"),
        ("enqueued", rec["enqueued"]),
        ("delivered (2xx seen)", rec["delivered"]),
        ("dead-lettered (ids)", rec["dead"]),
        *[(f"  dead: {k}", v) for k, v in sorted(rec["dead_by_reason_last_error"].items())],
        ("delivered AND dead", rec["delivered_and_dead"]),
        ("LOST (enq - deliv - dead)", rec["lost"]),
        ("  of which still in Redis", rec["lost_still_in_redis"]),
        ("delivered + dead cover enqueued", rec["covered"]),
        ("seen but never enqueued", rec["not_enqueued_but_seen"]),
        ("duplicates (ids with >1 2xx)", rec["duplicates"]),
        ("  extra 2xx in all", rec["duplicate_extra_2xx"]),
        ("  in an ambiguous producer retry", rec["duplicates_from_producer_retry"]),
        ("late 200s (client had timed out)", rec["late_200_not_seen_by_client"]),
        ("producer: batches retried", result["producer"]["retried_batches"]),
        ("producer: possible double enqueues", result["producer"]["ambiguous_ids"]),
        ("producer: unconfirmed ids", rec["unconfirmed_enqueues"]),
        ("Redis restarts (SIGKILL)", result["redis_restarts"]),
        ("worker kills (SIGKILL)", result["worker_kills"]),
        ("unexpected worker exits", len(result["unexpected_exits"])),
        ("drained", f"{result['drain']['ok']} in {result['drain']['seconds']:.1f} s"),
        ("worker exit codes (SIGTERM)", result["final_exit_codes"]),
        ("API statuses", result["api_statuses"]),
        ("worker RSS first third (mean)", mb(rss["first_third_mb"])),
        ("worker RSS last third (mean)", mb(rss["last_third_mb"])),
        ("worker RSS peak / VmHWM", f"{mb(rss['peak_rss_mb'])} / {mb(rss['peak_hwm_mb'])}"),
        ("RSS flat (last <= first*1.05+2MB)", rss["flat"]),
        (
            "longest-lived worker",
            f"{longest.get('lived_s', '-')} s: {mb(longest.get('first_third_mb'))} -> "
            f"{mb(longest.get('last_third_mb'))} (flat {longest.get('flat')})",
        ),
        (
            "Redis / stand-in RSS at end",
            f"{mb(rss['redis_rss_last_mb'])} / {mb(rss['api_rss_last_mb'])}",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    lines = ["", "Soak summary", "-" * (width + 40)]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    verdict = "PASS" if rec["lost"] == 0 and rec["covered"] else "FAIL"
    lines += ["-" * (width + 40), f"{verdict}: lost {rec['lost']}"]
    return "\n".join(lines)


async def soak_main(args: argparse.Namespace) -> tuple[int, dict[str, Any] | None]:
    duration = args.minutes * 60
    tmp = Path(tempfile.mkdtemp(prefix="forwarder-soak-"))
    children = Children(tmp)
    server = RedisServer(tmp / "redis", appendonly=True, extra_args=("--appendfsync", args.fsync))
    keep = args.keep_logs
    soak: Soak | None = None
    control: SoakControl | None = None
    admin: redis.asyncio.Redis | None = None
    try:
        await asyncio.to_thread(server.start)
        api_argv = [PY, "-m", "bench.soak", "--serve-api", "--seed", str(args.seed)]
        api_argv += ["--p503", str(args.p503), "--p-drop", str(args.p_drop)]
        api_argv += ["--p-slow", str(args.p_slow), "--slow-ms", str(args.slow_ms)]
        api = children.start("api", api_argv, cwd=ROOT, stdout_pipe=True)
        assert api.proc.stdout is not None
        line = (await asyncio.to_thread(api.proc.stdout.readline)).decode().split()
        if len(line) != 2 or line[0] != "READY":
            raise RuntimeError(f"stand-in API did not start:\n{api.log_tail()}")
        control = SoakControl(int(line[1]))
        admin = redis.asyncio.Redis.from_url(
            server.url,
            socket_timeout=5,
            socket_connect_timeout=2,
            retry=redis.asyncio.retry.Retry(NoBackoff(), 0),
        )
        soak = Soak(
            args=args,
            tmp=tmp,
            children=children,
            server=server,
            api=api,
            control=control,
            admin=admin,
            rng=random.Random(args.seed),
        )
        soak.t0 = time.monotonic()
        soak.slots = [Slot(i + 1) for i in range(args.workers)]
        for slot in soak.slots:
            soak.start_worker(slot)
        deadline = time.monotonic() + 60
        while int(await admin.zcard(WORKERS_KEY)) < args.workers:
            if time.monotonic() > deadline:
                raise TimeoutError("workers did not register within 60 s")
            await asyncio.sleep(0.1)
        soak.t0 = time.monotonic()
        _progress(f"soak: {args.minutes:g} min, logs in {tmp}")

        stop = asyncio.Event()
        helpers = [
            asyncio.create_task(chaos_workers(soak, stop)),
            asyncio.create_task(chaos_redis(soak, stop, duration)),
            asyncio.create_task(watch_workers(soak, stop)),
        ]
        sampler_stop = asyncio.Event()
        sampler = asyncio.create_task(sample(soak, sampler_stop))
        progress = asyncio.create_task(report_progress(soak, sampler_stop))
        await produce(soak, duration)
        t_end = soak.now()
        soak.event("production_stopped", enqueued=len(soak.enqueued))
        stop.set()
        await asyncio.wait_for(asyncio.gather(*helpers), timeout=60)
        if not server.is_running():
            await _start_redis(soak)
        for slot in soak.slots:
            if slot.child is None or not slot.child.alive():
                soak.start_worker(slot)
        drained, drain_s, state = await drain(soak)
        soak.event("drained" if drained else "drain_timed_out", seconds=round(drain_s, 1))
        sampler_stop.set()
        await asyncio.gather(sampler, progress)
        live = [s.child for s in soak.slots if s.child is not None]
        codes = await asyncio.gather(*(asyncio.to_thread(children.stop, c, 30.0) for c in live))
        for slot in soak.slots:
            slot.child = None
        left = await leftovers(soak)
        dead_raw = [cast(bytes, raw) for raw in await admin.lrange(DEAD_KEY, 0, -1)]
        record = await asyncio.to_thread(control.record)
        seen: dict[str, list[int]] = record["visitors"]
        rec = reconcile(soak, seen, dead_raw, left)
        result: dict[str, Any] = {
            "machine": machine(),
            "config": {
                "minutes": args.minutes,
                "rate": args.rate,
                "fsync": args.fsync,
                "workers": args.workers,
                "seed": args.seed,
                "p503": args.p503,
                "p_drop": args.p_drop,
                "p_slow": args.p_slow,
                "slow_ms": args.slow_ms,
                "p_bad": args.p_bad,
                "retry_delays": args.retry_delays,
                "request_timeout": args.request_timeout,
                "kill_every": args.kill_every,
                "redis_kills": args.redis_kills,
            },
            "reconcile": rec,
            "redis_restarts": soak.redis_restarts,
            "worker_kills": soak.worker_kills,
            "unexpected_exits": soak.unexpected_exits,
            "events": soak.events,
            "producer": {
                "retried_batches": soak.retried_batches,
                "errors": dict(soak.producer_errors),
                "retried_ids": len(soak.retried_ids),
                "ambiguous_ids": len(soak.ambiguous_ids),
                "max_lag": soak.max_lag,
            },
            "drain": {"ok": drained, "seconds": drain_s, "state": state},
            "final_exit_codes": codes,
            "api_statuses": record["statuses"],
            "rss": rss_summary(soak, 0.0, t_end),
            "rss_samples": soak.rss,
        }
        if rec["lost"]:
            keep = True
            result["lost_diagnosis"] = diagnose(soak, rec["lost_ids"], seen, dead_raw)
        if not drained or soak.unexpected_exits:
            keep = True
        ok = rec["lost"] == 0 and rec["covered"]
        return (0 if ok else 1), result
    except BaseException:
        keep = True
        raise
    finally:
        if control is not None:
            control.close()
        children.stop_all()
        if admin is not None:
            with contextlib.suppress(Exception):
                await admin.aclose()
        server.stop()
        if keep:
            _progress(f"logs of the processes started are kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


async def _run_cancellable(args: argparse.Namespace) -> tuple[int, dict[str, Any] | None]:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    fired = False

    def cancel() -> None:
        nonlocal fired
        if not fired:  # once: a second Ctrl-C must not cut the clean-up short
            fired = True
            task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, cancel)
    try:
        return await soak_main(args)
    except asyncio.CancelledError:
        _progress("interrupted; everything started has been stopped")
        return 130, None


def _range(text: str) -> tuple[float, float]:
    low, _, high = text.partition(",")
    return float(low), float(high or low)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="about 3 minutes (--minutes 3)")
    parser.add_argument("--rate", type=float, default=300.0, help="msg/s enqueued")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument(
        "--fsync",
        choices=["always", "everysec"],
        default="always",
        help="Redis appendfsync (always: nothing acknowledged is lost, reconciliation exact)",
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: time)")
    parser.add_argument("--p503", type=float, default=0.05, help="share of calls answered 503")
    parser.add_argument("--p-drop", type=float, default=0.01, help="share of calls dropped")
    parser.add_argument("--p-slow", type=float, default=0.01, help="share answered after --slow-ms")
    parser.add_argument("--slow-ms", type=float, default=3000.0)
    parser.add_argument("--p-bad", type=float, default=0.005, help="share of bad- visitors (400)")
    parser.add_argument("--retry-delays", default="0.5,1,2")
    parser.add_argument("--request-timeout", type=float, default=2.0)
    parser.add_argument(
        "--kill-every", type=_range, default=(20.0, 60.0), help="seconds, e.g. 20,60"
    )
    parser.add_argument("--redis-kills", type=int, default=2)
    parser.add_argument("--rss-interval", type=float, default=3.0)
    parser.add_argument("--drain-timeout", type=float, default=120.0)
    parser.add_argument(
        "--push-deadline", type=float, default=60.0, help="seconds a batch is retried"
    )
    parser.add_argument("--keep-logs", action="store_true")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument("--serve-api", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes = 3.0
    if args.seed is None:
        args.seed = int(time.time())
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_api:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve_api(args))
        return 0
    code, result = asyncio.run(_run_cancellable(args))
    if result is None:
        return code
    if args.json is not None:
        args.json.write_text(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    print(render(result))
    if result.get("lost_diagnosis"):
        print("\nLost ids:")
        for entry in result["lost_diagnosis"]:
            print(orjson.dumps(entry, option=orjson.OPT_INDENT_2).decode())
    return code


if __name__ == "__main__":
    sys.exit(main())
