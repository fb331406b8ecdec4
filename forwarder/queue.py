"""The queue in Redis: key layout, and the scripts that move a message between keys.

Every move a message makes — pending → in flight → (done | delayed | dead), delayed →
pending, a dead worker's in-flight → pending — is one Lua script, so a message is always
in exactly one key and never only in a worker's memory.

All keys of one queue share the hash tag ``{<queue>}``, so each script touches one slot
and runs unchanged on Redis Cluster. Time inside scripts is Redis' own ``TIME``, so the
workers' clocks never need to agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, cast

from redis.asyncio import Redis

Op = Literal["ack", "retry", "dead"]

# Shared by the scripts below. A worker's in-flight record is a hash (claim number →
# message: an ack of many is one HDEL) plus a staging list that its blocking pop moves
# into. give_back returns both to the consuming (right) end of the queue, oldest
# rightmost, so they are taken again in the order they were first taken.
_LIB = """
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function give_back(inflight, staging, dst)
  local staged = redis.call('LRANGE', staging, 0, -1)
  if #staged > 0 then
    redis.call('RPUSH', dst, unpack(staged))
    redis.call('DEL', staging)
  end
  local flat = redis.call('HGETALL', inflight)
  if #flat == 0 then return #staged end
  local entries = {}
  for i = 1, #flat, 2 do entries[#entries + 1] = {tonumber(flat[i]), flat[i + 1]} end
  table.sort(entries, function(a, b) return a[1] > b[1] end)
  local values = {}
  for i, e in ipairs(entries) do values[i] = e[2] end
  redis.call('RPUSH', dst, unpack(values))
  redis.call('DEL', inflight)
  return #staged + #values
end
"""

# KEYS: queue, staging, inflight, workers. ARGV: worker id, max count, claim number base.
# Claiming also refreshes the worker's heartbeat: whoever holds in-flight messages is
# always registered, so a crash right after a claim is still recovered. Returns the
# messages oldest first; the i-th is recorded under claim number base + i.
_CLAIM = (
    _LIB
    + """
redis.call('ZADD', KEYS[4], now(), ARGV[1])
local out = {}
local staged = redis.call('LRANGE', KEYS[2], 0, -1)
for i = #staged, 1, -1 do out[#out + 1] = staged[i] end
if #staged > 0 then redis.call('DEL', KEYS[2]) end
local n = tonumber(ARGV[2]) - #out
if n > 0 then
  local more = redis.call('LRANGE', KEYS[1], -n, -1)
  if #more > 0 then
    redis.call('LTRIM', KEYS[1], 0, -#more - 1)
    for i = #more, 1, -1 do out[#out + 1] = more[i] end
  end
end
if #out == 0 then return out end
local base = tonumber(ARGV[3])
local args = {}
for i, raw in ipairs(out) do
  args[#args + 1] = base + i
  args[#args + 1] = raw
end
redis.call('HSET', KEYS[3], unpack(args))
return out
"""
)

# KEYS: inflight, delayed, dead. ARGV: ack count A, A claim numbers, then repeated
# (op, claim number, payload, delay) for retries and dead letters.
# A retry or dead letter whose message is no longer in flight was given back by a
# worker that took this one for dead: it is dropped (0) so the message is not doubled.
# Returns {acks recorded, 1 or 0 per other outcome}.
_SETTLE = (
    _LIB
    + """
local t = now()
local acks = tonumber(ARGV[1])
local out = {0}
if acks > 0 then out[1] = redis.call('HDEL', KEYS[1], unpack(ARGV, 2, acks + 1)) end
local retries, dead = {}, {}
for i = acks + 2, #ARGV, 4 do
  local kept = redis.call('HDEL', KEYS[1], ARGV[i + 1])
  if kept == 1 and ARGV[i] == 'retry' then
    retries[#retries + 1] = t + tonumber(ARGV[i + 3])
    retries[#retries + 1] = ARGV[i + 2]
  elseif kept == 1 then
    dead[#dead + 1] = ARGV[i + 2]
  end
  out[#out + 1] = kept
end
if #retries > 0 then redis.call('ZADD', KEYS[2], unpack(retries)) end
if #dead > 0 then redis.call('LPUSH', KEYS[3], unpack(dead)) end
return out
"""
)

# KEYS: delayed, queue. ARGV: max count.
# Due retries go to the consuming end: they have already waited their turn once.
# Returns {moved, redis now, next due or -1}.
_PROMOTE = (
    _LIB
    + """
local t = now()
local due = redis.call('ZRANGE', KEYS[1], '-inf', t, 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[1]))
if #due > 0 then
  redis.call('ZREM', KEYS[1], unpack(due))
  redis.call('RPUSH', KEYS[2], unpack(due))
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local next_due = -1
if #nxt > 0 then next_due = nxt[2] end
return {#due, tostring(t), tostring(next_due)}
"""
)

# KEYS: workers, queue. ARGV: worker id, seconds of silence that mean dead, in-flight
# key prefix, staging key prefix. Heartbeats this worker and gives back the messages of
# every worker silent for longer. Returns {dead worker id, count, ...}.
_HEARTBEAT = (
    _LIB
    + """
local t = now()
redis.call('ZADD', KEYS[1], t, ARGV[1])
local dead = redis.call('ZRANGE', KEYS[1], '-inf', t - tonumber(ARGV[2]), 'BYSCORE')
local out = {}
for _, id in ipairs(dead) do
  out[#out + 1] = id
  out[#out + 1] = give_back(ARGV[3] .. id, ARGV[4] .. id, KEYS[2])
  redis.call('ZREM', KEYS[1], id)
end
return out
"""
)

# KEYS: inflight, staging, queue, workers. ARGV: worker id. A clean stop: what is still
# in flight goes back to the queue and the worker leaves no key of its own behind.
_RELEASE = (
    _LIB
    + """
local n = give_back(KEYS[1], KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[1])
return n
"""
)


@dataclass(frozen=True, slots=True)
class Keys:
    """The Redis key names of one queue (see the README's key layout)."""

    name: str

    @property
    def tag(self) -> str:
        return "{" + self.name + "}"

    @property
    def queue(self) -> str:
        return f"{self.tag}:queue"

    @property
    def delayed(self) -> str:
        return f"{self.tag}:delayed"

    @property
    def dead(self) -> str:
        return f"{self.tag}:dead"

    @property
    def workers(self) -> str:
        return f"{self.tag}:workers"

    @property
    def inflight_prefix(self) -> str:
        return f"{self.tag}:inflight:"

    @property
    def staging_prefix(self) -> str:
        return f"{self.tag}:claiming:"

    def inflight(self, worker_id: str) -> str:
        """HASH of a worker's in-flight messages, by claim number."""
        return self.inflight_prefix + worker_id

    def staging(self, worker_id: str) -> str:
        """LIST a worker's blocking pop moves into, claimed at once after."""
        return self.staging_prefix + worker_id


@dataclass(frozen=True, slots=True)
class Claimed:
    """A message taken into flight: its claim number and the queue element as pushed."""

    token: int
    raw: bytes


@dataclass(frozen=True, slots=True)
class Settlement:
    """The recorded outcome of one in-flight message (by its claim number).

    ``payload`` is the re-enqueued message for a retry, the dead-letter record for a
    dead letter, and empty for an ack.
    """

    op: Op
    token: int
    payload: bytes = b""
    delay: float = 0.0


@dataclass(frozen=True, slots=True)
class Promoted:
    """What one promotion pass did, in Redis' clock."""

    moved: int
    now: float
    next_due: float | None


class Queue:
    """One worker's handle on a queue: claim, settle, promote, heartbeat, release."""

    def __init__(self, redis: Redis, name: str, worker_id: str) -> None:
        self.redis = redis
        self.keys = Keys(name)
        self.worker_id = worker_id
        self._inflight = self.keys.inflight(worker_id)
        self._staging = self.keys.staging(worker_id)
        self._claimed = 0
        self._claim = redis.register_script(_CLAIM)
        self._settle = redis.register_script(_SETTLE)
        self._promote = redis.register_script(_PROMOTE)
        self._heartbeat = redis.register_script(_HEARTBEAT)
        self._release = redis.register_script(_RELEASE)

    async def claim(self, count: int) -> list[Claimed]:
        """Take up to ``count`` pending messages, oldest first, without blocking."""
        keys = [self.keys.queue, self._staging, self._inflight, self.keys.workers]
        base = self._claimed
        raws = cast(list[bytes], await self._claim(keys, [self.worker_id, count, base]))
        self._claimed += len(raws)
        return [Claimed(base + i, raw) for i, raw in enumerate(raws, start=1)]

    async def wait(self, seconds: int) -> bool:
        """Block up to ``seconds`` until a message is pending (no polling).

        The message is moved into this worker's staging list, so it is never only in
        the reply; the next :meth:`claim` takes it. True if one arrived.
        """
        moved = await self.redis.blmove(self.keys.queue, self._staging, seconds, "RIGHT", "LEFT")
        return moved is not None

    async def settle(self, settlements: Sequence[Settlement]) -> tuple[int, list[bool]]:
        """Record outcomes atomically.

        Returns how many acks were recorded, and for each retry or dead letter whether
        it was (False: the message had been given back meanwhile, so it is not doubled).
        """
        acks = [s.token for s in settlements if s.op == "ack"]
        args: list[bytes | str | float] = [len(acks), *acks]
        for s in settlements:
            if s.op != "ack":
                args += [s.op, s.token, s.payload, s.delay]
        keys = [self._inflight, self.keys.delayed, self.keys.dead]
        acked, *others = cast(list[int], await self._settle(keys, args))
        return acked, [bool(o) for o in others]

    async def promote(self, limit: int = 1000) -> Promoted:
        """Move due retries back to the queue."""
        moved, now, next_due = cast(
            list[bytes | int],
            await self._promote([self.keys.delayed, self.keys.queue], [limit]),
        )
        nxt = float(next_due)
        return Promoted(int(moved), float(now), None if nxt < 0 else nxt)

    async def heartbeat(self, dead_after: float) -> dict[str, int]:
        """Mark this worker alive; give back dead workers' messages. Returns those."""
        prefixes = [self.keys.inflight_prefix, self.keys.staging_prefix]
        args: list[str | float] = [self.worker_id, dead_after, *prefixes]
        out = cast(
            list[bytes | int],
            await self._heartbeat([self.keys.workers, self.keys.queue], args),
        )
        pairs = zip(out[::2], out[1::2], strict=True)
        return {_text(worker): int(count) for worker, count in pairs}

    async def release(self) -> int:
        """Give back everything still in flight and deregister. Returns the count."""
        keys = [self._inflight, self._staging, self.keys.queue, self.keys.workers]
        return int(await self._release(keys, [self.worker_id]))


def _text(value: bytes | int | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
