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

# Shared by the scripts below. give_back moves a whole list to the consuming (right)
# end of another, oldest claimed last, so a recovered batch is taken again in the order
# it was first taken.
_LIB = """
local function give_back(src, dst)
  local items = redis.call('LRANGE', src, 0, -1)
  if #items > 0 then
    redis.call('RPUSH', dst, unpack(items))
    redis.call('DEL', src)
  end
  return #items
end
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""

# KEYS: queue, inflight, workers. ARGV: worker id, max count.
# Claiming also refreshes the worker's heartbeat: whoever holds in-flight messages is
# always registered, so a crash right after a claim is still recovered.
_CLAIM = (
    _LIB
    + """
redis.call('ZADD', KEYS[3], now(), ARGV[1])
local n = tonumber(ARGV[2])
local items = redis.call('LRANGE', KEYS[1], -n, -1)
if #items == 0 then return items end
redis.call('LTRIM', KEYS[1], 0, -#items - 1)
redis.call('LPUSH', KEYS[2], unpack(items))
return items
"""
)

# KEYS: inflight, delayed, dead. ARGV: repeated (op, raw, payload, delay).
# An element no longer in flight was given back by a worker that took this one for
# dead; its outcome is dropped (returns 0) so the message is not doubled.
_SETTLE = (
    _LIB
    + """
local t = now()
local done = {}
for i = 1, #ARGV, 4 do
  local removed = redis.call('LREM', KEYS[1], 1, ARGV[i + 1])
  if removed == 1 then
    local op = ARGV[i]
    if op == 'retry' then
      redis.call('ZADD', KEYS[2], t + tonumber(ARGV[i + 3]), ARGV[i + 2])
    elseif op == 'dead' then
      redis.call('LPUSH', KEYS[3], ARGV[i + 2])
    end
  end
  done[#done + 1] = removed
end
return done
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

# KEYS: workers, queue. ARGV: worker id, timeout seconds, in-flight key prefix.
# Heartbeats this worker and gives back the in-flight messages of every worker silent
# for longer than the timeout. Returns {dead worker id, count, ...}.
_HEARTBEAT = (
    _LIB
    + """
local t = now()
redis.call('ZADD', KEYS[1], t, ARGV[1])
local dead = redis.call('ZRANGE', KEYS[1], '-inf', t - tonumber(ARGV[2]), 'BYSCORE')
local out = {}
for _, id in ipairs(dead) do
  out[#out + 1] = id
  out[#out + 1] = give_back(ARGV[3] .. id, KEYS[2])
  redis.call('ZREM', KEYS[1], id)
end
return out
"""
)

# KEYS: inflight, queue, workers. ARGV: worker id. A clean stop: what is still in
# flight goes back to the queue and the worker leaves no key of its own behind.
_RELEASE = (
    _LIB
    + """
local n = give_back(KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
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

    def inflight(self, worker_id: str) -> str:
        return self.inflight_prefix + worker_id


@dataclass(frozen=True, slots=True)
class Settlement:
    """The recorded outcome of one in-flight element.

    ``payload`` is the re-enqueued message for a retry, the dead-letter record for a
    dead letter, and empty for an ack.
    """

    op: Op
    raw: bytes
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
        self._claim = redis.register_script(_CLAIM)
        self._settle = redis.register_script(_SETTLE)
        self._promote = redis.register_script(_PROMOTE)
        self._heartbeat = redis.register_script(_HEARTBEAT)
        self._release = redis.register_script(_RELEASE)

    async def claim(self, count: int) -> list[bytes]:
        """Take up to ``count`` pending messages, oldest first, without blocking."""
        keys = [self.keys.queue, self._inflight, self.keys.workers]
        items = cast(list[bytes], await self._claim(keys, [self.worker_id, count]))
        items.reverse()
        return items

    async def claim_blocking(self, seconds: int) -> bytes | None:
        """Wait up to ``seconds`` for one pending message (a blocking pop, no polling)."""
        raw = await self.redis.blmove(self.keys.queue, self._inflight, seconds, "RIGHT", "LEFT")
        return cast(bytes | None, raw)

    async def settle(self, settlements: Sequence[Settlement]) -> list[bool]:
        """Record outcomes atomically; False where the element was no longer ours."""
        args: list[bytes | str | float] = []
        for s in settlements:
            args += [s.op, s.raw, s.payload, s.delay]
        keys = [self._inflight, self.keys.delayed, self.keys.dead]
        done = cast(list[int], await self._settle(keys, args))
        return [bool(d) for d in done]

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
        out = cast(
            list[bytes | int],
            await self._heartbeat(
                [self.keys.workers, self.keys.queue],
                [self.worker_id, dead_after, self.keys.inflight_prefix],
            ),
        )
        pairs = zip(out[::2], out[1::2], strict=True)
        return {_text(worker): int(count) for worker, count in pairs}

    async def release(self) -> int:
        """Give back everything still in flight and deregister. Returns the count."""
        keys = [self._inflight, self.keys.queue, self.keys.workers]
        return int(await self._release(keys, [self.worker_id]))


def _text(value: bytes | int | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
