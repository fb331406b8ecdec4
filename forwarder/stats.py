"""Live state of a queue: ``forwarder stats``, and the depth gauges of ``/metrics``.

One script reads every count in one step, so the numbers add up even while workers move
messages between keys, and every age is measured on Redis' clock (the one heartbeats and
retry times are written in), so the reader's own clock does not matter.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import sys
from dataclasses import dataclass
from typing import Any, cast

import orjson
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from forwarder.connections import AsyncRedis, raise_if_cancelled, redis_client
from forwarder.model import iso_utc
from forwarder.output import PipeConsole, human_age, silence_stdout
from forwarder.queue import Keys
from forwarder.settings import Settings

# KEYS: queue, delayed, dead, workers, sessions. ARGV: in-flight key prefix, held-list
# prefix, most sessions whose held lists are counted.
# Returns {now, pending, delayed, dead, next retry due or -1, oldest pending enqueuedAt
# or -1, busy sessions, held messages, 1 if held counts only some sessions' lists else 0,
# then (worker id, last heartbeat, in flight) per registered worker}.
# Only the oldest message's enqueuedAt leaves Redis, never its payload.
# Held lists are found through the sessions hash (each busy session's held list is the
# held-list prefix .. its field; a session with none held has no list), never by scanning
# the keyspace. Past the cap, HKEYS would still copy every field before the count could
# stop, so a capped count takes that many distinct fields with HRANDFIELD instead.
_SNAPSHOT = """
local t = redis.call('TIME')
local out = {tostring(tonumber(t[1]) + tonumber(t[2]) / 1000000)}
out[2] = redis.call('LLEN', KEYS[1])
out[3] = redis.call('ZCARD', KEYS[2])
out[4] = redis.call('LLEN', KEYS[3])
local nxt = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
out[5] = nxt[2] or '-1'
out[6] = '-1'
local oldest = redis.call('LINDEX', KEYS[1], -1)
if oldest then
  local ok, msg = pcall(cjson.decode, oldest)
  if ok and type(msg) == 'table' and type(msg.enqueuedAt) == 'number' then
    out[6] = tostring(msg.enqueuedAt)
  end
end
local busy = redis.call('HLEN', KEYS[5])
local cap = tonumber(ARGV[3])
local sessions = {}
if busy > cap then
  sessions = redis.call('HRANDFIELD', KEYS[5], cap)
elseif busy > 0 then
  sessions = redis.call('HKEYS', KEYS[5])
end
local held = 0
for _, session in ipairs(sessions) do
  held = held + redis.call('LLEN', ARGV[2] .. session)
end
out[7] = busy
out[8] = held
out[9] = busy > cap and 1 or 0
local workers = redis.call('ZRANGE', KEYS[4], 0, -1, 'WITHSCORES')
for i = 1, #workers, 2 do
  out[#out + 1] = workers[i]
  out[#out + 1] = workers[i + 1]
  out[#out + 1] = redis.call('HLEN', ARGV[1] .. workers[i])
end
return out
"""

WATCH_INTERVAL = 1.0
# Most busy sessions whose held lists one snapshot counts (session ordering): past it,
# ``held`` is a lower bound and ``held_capped`` is set.
HELD_COUNT_CAP = 10_000


@dataclass(frozen=True, slots=True)
class WorkerState:
    """One registered worker; ``live`` while its heartbeat is younger than the timeout."""

    id: str
    heartbeat_age: float
    inflight: int
    live: bool


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Counts of one queue at one moment (``at``, Unix seconds on Redis' clock)."""

    at: float
    pending: int
    delayed: int
    dead: int
    next_retry_in: float | None
    oldest_pending_age: float | None
    workers: tuple[WorkerState, ...]
    # Session ordering: sessions whose turn a message holds (in flight, waiting for a
    # retry, or released to the queue), and their later messages held back meanwhile.
    busy_sessions: int
    held: int
    held_capped: bool

    @property
    def inflight(self) -> int:
        """Messages taken by workers."""
        return sum(w.inflight for w in self.workers)

    @property
    def live_workers(self) -> int:
        return sum(w.live for w in self.workers)

    def as_json(self) -> dict[str, Any]:
        return {
            "at": iso_utc(self.at),
            "pending": self.pending,
            "oldestPendingAgeSeconds": _round(self.oldest_pending_age),
            "delayed": self.delayed,
            "nextRetryInSeconds": _round(self.next_retry_in),
            "inflight": self.inflight,
            "dead": self.dead,
            "busySessions": self.busy_sessions,
            "held": self.held,
            "heldCapped": self.held_capped,
            "liveWorkers": self.live_workers,
            "workers": [
                {
                    "id": w.id,
                    "heartbeatAgeSeconds": round(w.heartbeat_age, 3),
                    "inflight": w.inflight,
                    "live": w.live,
                }
                for w in self.workers
            ],
        }


class QueueState:
    """Reads :class:`Snapshot` s of one queue."""

    def __init__(self, redis: AsyncRedis, queue: str, worker_timeout: float) -> None:
        self.keys = Keys(queue)
        self.worker_timeout = worker_timeout
        self._script = redis.register_script(_SNAPSHOT)

    async def read(self) -> Snapshot:
        keys = self.keys
        reply = cast(
            list[bytes | int],
            await self._script(
                [keys.queue, keys.delayed, keys.dead, keys.workers, keys.sessions],
                [keys.inflight_prefix, keys.held_prefix, HELD_COUNT_CAP],
            ),
        )
        raise_if_cancelled()  # a Ctrl-C that redis-py swallowed still ends a watch
        now = float(reply[0])
        next_due, enqueued = float(reply[4]), float(reply[5])
        if not math.isfinite(enqueued):
            enqueued = -1.0  # Lua's JSON reads NaN and Infinity, which date nothing
        return Snapshot(
            at=now,
            pending=int(reply[1]),
            delayed=int(reply[2]),
            dead=int(reply[3]),
            next_retry_in=None if next_due < 0 else max(next_due - now, 0.0),
            # A producer's clock may run ahead of Redis'.
            oldest_pending_age=None if enqueued < 0 else max(now - enqueued, 0.0),
            workers=tuple(self._workers(now, reply[9:])),
            busy_sessions=int(reply[6]),
            held=int(reply[7]),
            held_capped=bool(reply[8]),
        )

    def _workers(self, now: float, flat: list[bytes | int]) -> list[WorkerState]:
        states = []
        for i in range(0, len(flat), 3):
            worker, beat, inflight = flat[i : i + 3]
            age = max(now - float(beat), 0.0)
            states.append(
                WorkerState(
                    id=bytes(cast(bytes, worker)).decode(errors="replace"),
                    heartbeat_age=age,
                    inflight=int(inflight),
                    live=age <= self.worker_timeout,
                )
            )
        return states


def render(snapshot: Snapshot, queue: str, *, ordered: bool = False) -> Group:
    """The snapshot as a heading and two tables: the counts, then the workers.

    Held messages and busy sessions are shown when there are any or ``ordered`` (the
    queue is worked in session order).
    """
    counts = Table()
    counts.add_column("state")
    counts.add_column("messages", justify="right")
    counts.add_column("")
    counts.add_row(
        "pending", str(snapshot.pending), f"oldest {human_age(snapshot.oldest_pending_age)}"
    )
    counts.add_row(
        "delayed", str(snapshot.delayed), f"next retry in {human_age(snapshot.next_retry_in)}"
    )
    counts.add_row("in flight", str(snapshot.inflight), "")
    if ordered or snapshot.busy_sessions or snapshot.held:
        counts.add_row("held", *_held_cells(snapshot))
    counts.add_row("dead", str(snapshot.dead), "")
    silent = len(snapshot.workers) - snapshot.live_workers
    parts: list[RenderableType] = [
        Text(f"queue {queue!r} at {iso_utc(snapshot.at)}"),  # a name is never rich markup
        counts,
        f"workers: {snapshot.live_workers} live, {silent} silent",
    ]
    if snapshot.workers:
        parts.append(_workers_table(snapshot.workers))
    return Group(*parts)


def _held_cells(snapshot: Snapshot) -> tuple[str, str]:
    detail = f"busy sessions {snapshot.busy_sessions}"
    if snapshot.held_capped:
        return f"{snapshot.held}+", f"{detail} (held lists of {HELD_COUNT_CAP} counted)"
    return str(snapshot.held), detail


def _workers_table(states: tuple[WorkerState, ...]) -> Table:
    workers = Table()
    for name in ("worker", "last heartbeat", "in flight", ""):
        workers.add_column(name, justify="left" if name == "worker" else "right")
    for w in states:
        workers.add_row(
            Text(w.id),
            f"{human_age(w.heartbeat_age)} ago",
            str(w.inflight),
            "" if w.live else "silent",
        )
    return workers


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Add ``forwarder stats`` to the CLI's subcommands."""
    stats = sub.add_parser(
        "stats", parents=parents, help="queue depth, retries, in flight, dead, live workers"
    )
    stats.add_argument("--json", action="store_true", help="JSON (one line per refresh)")
    stats.add_argument(
        "--watch", action="store_true", help=f"refresh every {WATCH_INTERVAL:g} s until Ctrl-C"
    )
    stats.set_defaults(func=_cmd_stats)


def _cmd_stats(args: argparse.Namespace, settings: Settings) -> int:
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_stats(settings, as_json=args.json, watch=args.watch))
    except BrokenPipeError:
        silence_stdout()  # the reader has what it wanted (``stats --watch | head -1``)
    return 0


async def _stats(settings: Settings, *, as_json: bool, watch: bool) -> None:
    redis = redis_client(settings)
    state = QueueState(redis, settings.queue, settings.worker_timeout)
    ordered = settings.ordering == "session"
    console = PipeConsole()
    try:
        if watch and console.is_terminal and not as_json:
            await _watch_in_place(state, settings.queue, console, ordered=ordered)
            return
        while True:
            snapshot = await state.read()
            if as_json:
                sys.stdout.buffer.write(orjson.dumps(snapshot.as_json()) + b"\n")
                sys.stdout.flush()
            else:
                console.print(render(snapshot, settings.queue, ordered=ordered))
            if not watch:
                return
            await asyncio.sleep(WATCH_INTERVAL)
    finally:
        await redis.aclose()


async def _watch_in_place(
    state: QueueState, queue: str, console: Console, *, ordered: bool
) -> None:
    with Live(console=console, auto_refresh=False) as live:
        while True:
            live.update(render(await state.read(), queue, ordered=ordered), refresh=True)
            await asyncio.sleep(WATCH_INTERVAL)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
