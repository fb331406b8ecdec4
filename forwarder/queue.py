"""The queue in Redis: key layout, and the scripts that move a message between keys.

Every move a message makes — pending → in flight → (done | delayed | dead), delayed →
pending, a dead worker's in-flight → pending — is one Lua script, so a message is always
in exactly one key and never only in a worker's memory.

All keys of one queue share the hash tag ``{<queue>}``, so each script touches one slot
and runs unchanged on Redis Cluster. Time inside scripts is Redis' own ``TIME``, so the
workers' clocks never need to agree.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, cast

import msgspec
from redis.exceptions import ResponseError

from forwarder.connections import AsyncRedis

Op = Literal["ack", "retry", "dead"]

# A script's writes before an error stay done: one that takes a message out of a key
# checks first that the keys it then writes it into hold their own type, or nothing (a
# name clash, a producer's SET), else that write's WRONGTYPE would lose the message.
EXPECT_TYPE = """
-- name: what the error calls the key (a held list's name holds a visitor's ids).
local function expect(key, kind, name)
  local held = redis.call('TYPE', key).ok
  if held ~= kind and held ~= 'none' then
    error({err = 'WRONGTYPE ' .. (name or key) .. ' holds a ' .. held .. ', not a ' .. kind})
  end
end
"""

# Shared by the scripts below. A worker's in-flight record is a hash (claim number →
# message: an ack of many is one HDEL). give_back returns it to the consuming (right)
# end of the queue, oldest rightmost, so it is taken again in the order first taken.
_LIB = (
    EXPECT_TYPE
    + """
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
-- A member of the delayed set is the message it holds. One that a later version writes
-- may carry a NUL (which JSON text never holds) and more after the message, to keep two
-- identical messages apart: promote moves the message alone, so that version can roll
-- out over this one (an older promote would push the whole member, no message at all).
local function delayed_message(member)
  local cut = string.find(member, '\0', 1, true)
  if cut then return string.sub(member, 1, cut - 1) end
  return member
end
-- entries: {claim number, message}; the oldest claimed goes rightmost.
local function push_back(dst, entries)
  table.sort(entries, function(a, b) return a[1] > b[1] end)
  local values = {}
  for i, e in ipairs(entries) do values[i] = e[2] end
  -- unpack takes fewer than 8,000 values; a worker may hold more (its concurrency plus
  -- two claim batches), so they go in slices, in the same order.
  for i = 1, #values, 1000 do
    redis.call('RPUSH', dst, unpack(values, i, math.min(i + 999, #values)))
  end
  return #values
end
local function give_back(inflight, dst)
  expect(dst, 'list')  -- it writes before it deletes; checked for an error that names it
  local flat = redis.call('HGETALL', inflight)
  if #flat == 0 then return 0 end
  local entries = {}
  for i = 1, #flat, 2 do entries[#entries + 1] = {tonumber(flat[i]), flat[i + 1]} end
  local n = push_back(dst, entries)
  redis.call('DEL', inflight)
  return n
end
-- Up to n messages from the queue's consuming end, oldest first, and no more than fit in
-- budget bytes (one at least). Only read: see take.
local function peek(queue, n, budget)
  local tail = redis.call('LRANGE', queue, -n, -1)  -- the oldest last
  local items, size = {}, 0
  for i = #tail, 1, -1 do
    size = size + #tail[i]
    if #items > 0 and size > budget then break end
    items[#items + 1] = tail[i]
  end
  return items
end
-- Takes what peek returned off the queue. Peeked first and taken once every check has
-- passed, nothing is ever put back: a put-back could fail after the pop (a slot being
-- migrated refuses a key the pop emptied), and lose what was popped.
local function take(queue, items)
  if #items > 0 then redis.call('LTRIM', queue, 0, -#items - 1) end
end
-- The keys a claim writes (KEYS: queue, inflight, workers, claims[, sessions]).
local function expect_claim_keys(keys)
  expect(keys[2], 'hash')
  expect(keys[3], 'zset')
  expect(keys[4], 'hash')
  if keys[5] then expect(keys[5], 'hash') end
end
-- The keys a settle writes retries and dead letters into (KEYS: inflight, delayed, dead),
-- checked after its acks: those write nowhere else, so a refused retry cannot undo them.
local function expect_outcome_keys(keys)
  expect(keys[2], 'zset')
  expect(keys[3], 'list')
end
-- Records claimed messages under claim numbers base + 1, base + 2, ...; returns
-- {number, message, ...}.
local function record(inflight, base, items)
  local pairs_ = {}
  for i, raw in ipairs(items) do
    pairs_[#pairs_ + 1] = base + i
    pairs_[#pairs_ + 1] = raw
  end
  if #pairs_ > 0 then redis.call('HSET', inflight, unpack(pairs_)) end
  return pairs_
end
-- The claim numbers in a space-separated list (one argument: packing each number as an
-- argument of its own cost the client more than the rest of a settle).
local function numbers(list)
  local out = {}
  for n in string.gmatch(list, '%d+') do out[#out + 1] = n end
  return out
end
-- A claim is sent again with the same numbers when its reply was lost (by the client's
-- retry or the worker's), and a copy delayed in the network may even run after the
-- worker has claimed again. Each worker's next unused claim number is kept in the
-- claims hash: a claim below it has run before, and gets what is still in flight
-- under its numbers, never a second batch written over them. Returns true if fresh.
local function fresh(claims, worker, base)
  return base >= tonumber(redis.call('HGET', claims, worker) or '0')
end
local function recorded(inflight, base, n)
  local pairs_ = {}
  for i = 1, n do
    local raw = redis.call('HGET', inflight, base + i)
    if raw then
      pairs_[#pairs_ + 1] = base + i
      pairs_[#pairs_ + 1] = raw
    end
  end
  return pairs_
end
"""
)

# Session ordering (FORWARDER_ORDERING=session). A session (account, visitor, session)
# has a *turn*: `{q}:sessions` maps its key to the SHA-1 of the one message allowed in
# flight or waiting for a retry, and when the turn was last passed. A claimed message
# whose session's turn is another message's waits, in enqueue order, in the session's
# held list; settling the turn's holder passes the turn on (a retry keeps it, under the
# retried bytes; an ack or dead letter releases the oldest held message to the front of
# the queue, already holding the turn). A recovered message keeps its bytes, so it keeps
# its turn. A turn untouched for longer than the turn timeout is taken over, so a holder
# lost outside the forwarder (a manual DEL, a Redis crash) cannot block its session.
_TURNS = """
local function session_of(raw)
  local ok, m = pcall(cjson.decode, raw)
  if not ok or type(m) ~= 'table' then return nil end
  -- Under the wire names or, as the models also take them, the Python ones.
  local a = m.accountId or m.account_id
  local v = m.visitorId or m.visitor_id
  local s = m.sessionId or m.session_id
  if type(a) ~= 'string' or type(v) ~= 'string' or type(s) ~= 'string' then return nil end
  return a .. '\\n' .. v .. '\\n' .. s
end
local function holds_turn(sessions, key, raw, t, timeout)
  local turn = redis.call('HGET', sessions, key)
  local digest = redis.sha1hex(raw)
  if turn and string.sub(turn, 1, 40) ~= digest
     and tonumber(string.sub(turn, 42)) >= t - timeout then
    return false
  end
  redis.call('HSET', sessions, key, digest .. '|' .. t)
  return true
end
-- The oldest held message of the session gets its turn, at the front of the queue.
-- False if none is held.
local function release_next(sessions, held_prefix, queue, key, t)
  local nxt = redis.call('LPOP', held_prefix .. key)
  if not nxt then return false end
  redis.call('HSET', sessions, key, redis.sha1hex(nxt) .. '|' .. t)
  redis.call('RPUSH', queue, nxt)
  return true
end
local function pass_turn(sessions, held_prefix, queue, raw, op, payload, t)
  local key = session_of(raw)
  if not key then return end
  local turn = redis.call('HGET', sessions, key)
  if not turn or string.sub(turn, 1, 40) ~= redis.sha1hex(raw) then return end
  if op == 'retry' then
    redis.call('HSET', sessions, key, redis.sha1hex(payload) .. '|' .. t)
    return
  end
  if not release_next(sessions, held_prefix, queue, key, t) then
    redis.call('HDEL', sessions, key)
  end
end
"""

# KEYS: queue, inflight, workers, claims. ARGV: worker id, max count, claim number base,
# most bytes (CLAIM_BYTES).
# Claiming also refreshes the worker's heartbeat: whoever holds in-flight messages is
# always registered, so a crash right after a claim is still recovered. Returns
# {claim number, message, ...}, oldest first.
# The queue is trimmed before anything is written: a Redis out of memory (noeviction)
# refuses a script whose first write may grow it, and claiming is what frees memory.
_CLAIM = (
    _LIB
    + """
local base, n = tonumber(ARGV[3]), tonumber(ARGV[2])
expect_claim_keys(KEYS)
if not fresh(KEYS[4], ARGV[1], base) then
  redis.call('ZADD', KEYS[3], now(), ARGV[1])
  return recorded(KEYS[2], base, n)
end
local items = peek(KEYS[1], n, tonumber(ARGV[4]))
take(KEYS[1], items)
redis.call('ZADD', KEYS[3], now(), ARGV[1])
redis.call('HSET', KEYS[4], ARGV[1], base + n)
return record(KEYS[2], base, items)
"""
)

# The same, in session-ordering mode. KEYS: also sessions. ARGV: then held-list prefix,
# turn timeout. A message whose session's turn is another's goes to the held list.
_CLAIM_ORDERED = (
    _LIB
    + _TURNS
    + """
local t = now()
local base, n = tonumber(ARGV[3]), tonumber(ARGV[2])
expect_claim_keys(KEYS)
if not fresh(KEYS[4], ARGV[1], base) then
  redis.call('ZADD', KEYS[3], t, ARGV[1])
  return recorded(KEYS[2], base, n)
end
local items = peek(KEYS[1], n, tonumber(ARGV[4]))
local sessions = {}
for i, raw in ipairs(items) do
  sessions[i] = session_of(raw) or false
  if sessions[i] then expect(ARGV[5] .. sessions[i], 'list', 'a held list') end
end
take(KEYS[1], items)
redis.call('ZADD', KEYS[3], t, ARGV[1])
redis.call('HSET', KEYS[4], ARGV[1], base + n)
local timeout = tonumber(ARGV[6])
local out = {}
for i, raw in ipairs(items) do
  local key = sessions[i]
  if not key or holds_turn(KEYS[5], key, raw, t, timeout) then
    out[#out + 1] = raw
  else
    redis.call('RPUSH', ARGV[5] .. key, raw)
  end
end
return record(KEYS[2], base, out)
"""
)

# KEYS: inflight, delayed, dead. ARGV: the acked claim numbers, space-separated, then
# repeated (op, claim number, payload, delay) for retries and dead letters.
# A retry or dead letter whose message is no longer in flight was given back by a
# worker that took this one for dead: it is dropped (0) so the message is not doubled.
# Returns {acks recorded, 1 or 0 per other outcome}.
_SETTLE = (
    _LIB
    + """
local acks = numbers(ARGV[1])
local out = {0}
if #acks > 0 then out[1] = redis.call('HDEL', KEYS[1], unpack(acks)) end
if #ARGV > 1 then expect_outcome_keys(KEYS) end
local t = (#ARGV > 1) and now() or 0
local retries, dead = {}, {}
for i = 2, #ARGV, 4 do
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

# The same, in session-ordering mode, one message at a time so each passes its
# session's turn on. KEYS: also sessions, queue. ARGV: held-list prefix, then as above.
_SETTLE_ORDERED = (
    _LIB
    + _TURNS
    + """
expect(KEYS[5], 'list')  -- an ack passes the turn on: the next update goes there
local t = now()
local out = {0}
local function settle(op, token, payload, delay)
  local raw = redis.call('HGET', KEYS[1], token)
  if not raw then return 0 end
  redis.call('HDEL', KEYS[1], token)
  if op == 'retry' then
    redis.call('ZADD', KEYS[2], t + tonumber(delay), payload)
  elseif op == 'dead' then
    redis.call('LPUSH', KEYS[3], payload)
  end
  pass_turn(KEYS[4], ARGV[1], KEYS[5], raw, op, payload, t)
  return 1
end
for _, token in ipairs(numbers(ARGV[2])) do out[1] = out[1] + settle('ack', token, '', 0) end
if #ARGV > 2 then expect_outcome_keys(KEYS) end
for i = 3, #ARGV, 4 do
  out[#out + 1] = settle(ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3])
end
return out
"""
)

# KEYS: delayed, queue. ARGV: max count.
# Due retries go to the consuming end: they have already waited their turn once.
# Returns {moved, redis now, next due or -1}.
_PROMOTE = (
    _LIB
    + """
expect(KEYS[1], 'zset')  -- checked first, for an error that names it
local t = now()
local due = redis.call('ZRANGE', KEYS[1], '-inf', t, 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[1]))
if #due > 0 then
  expect(KEYS[2], 'list')
  local messages = {}
  for i, member in ipairs(due) do messages[i] = delayed_message(member) end
  redis.call('ZREM', KEYS[1], unpack(due))
  redis.call('RPUSH', KEYS[2], unpack(messages))
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local next_due = -1
if #nxt > 0 then next_due = nxt[2] end
return {#due, tostring(t), tostring(next_due)}
"""
)

# KEYS: sessions, queue. ARGV: held-list prefix, turn timeout, HSCAN cursor. Session
# ordering: a turn untouched for longer than the timeout whose session has held messages
# (its holder lost outside the forwarder) is passed to the oldest of them. A page of
# sessions a call. Returns {messages released, next cursor}.
_TAKE_OVER_TURNS = (
    _LIB
    + _TURNS
    + """
expect(KEYS[2], 'list')
local t = now()
local stale = t - tonumber(ARGV[2])
local page = redis.call('HSCAN', KEYS[1], ARGV[3], 'COUNT', 1000)
local turns, released = page[2], 0
for i = 1, #turns, 2 do
  if tonumber(string.sub(turns[i + 1], 42)) < stale
     and release_next(KEYS[1], ARGV[1], KEYS[2], turns[i], t) then
    released = released + 1
  end
end
return {released, page[1]}
"""
)

# KEYS: workers, queue, claims, reaped. ARGV: worker id, seconds of silence that mean
# dead, in-flight key prefix, this worker's previous heartbeat (Redis time; 0: none
# yet), since when it has heartbeated without such a silence of its own, and how long a
# reaped worker's claim record is kept. Heartbeats this worker and gives back the
# messages of every worker silent for longer, unless this worker was silent as long
# itself or has only just started (Redis down or stalled, this worker frozen, or a new
# one started as Redis came back): the others may have been unable to heartbeat too, so
# it judges nobody until it has been in touch for a whole timeout. Returns {Redis time,
# steady since, dead worker id, count, ...}.
# A reaped worker's claim record stays: if it was only stalled, a delayed copy of one of
# its claims, taken for fresh, would write a batch under numbers it still acks. It goes
# once no such copy can still run (and the worker has not come back).
_HEARTBEAT = (
    _LIB
    + """
expect(KEYS[1], 'zset')  -- checked first, for an error that names it
expect(KEYS[3], 'hash')
expect(KEYS[4], 'zset')
local t = now()
local timeout, prev, since = tonumber(ARGV[2]), tonumber(ARGV[4]), tonumber(ARGV[5])
if prev == 0 or t - prev > timeout then since = t end
redis.call('ZADD', KEYS[1], t, ARGV[1])
local gone = redis.call('ZRANGE', KEYS[4], '-inf', t - ARGV[6], 'BYSCORE', 'LIMIT', 0, 100)
for _, id in ipairs(gone) do
  if not redis.call('ZSCORE', KEYS[1], id) then redis.call('HDEL', KEYS[3], id) end
  redis.call('ZREM', KEYS[4], id)
end
local out = {tostring(t), tostring(since)}
if t - since < timeout then return out end
local dead = redis.call('ZRANGE', KEYS[1], '-inf', t - timeout, 'BYSCORE')
for _, id in ipairs(dead) do
  out[#out + 1] = id
  out[#out + 1] = give_back(ARGV[3] .. id, KEYS[2])
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZADD', KEYS[4], t, id)
end
return out
"""
)

# KEYS: inflight, queue, workers, claims. ARGV: worker id. A clean stop: what is still
# in flight goes back to the queue and the worker leaves nothing of its own behind. (A
# claim of its that runs later still, delayed in the network, registers it again: it is
# then taken for dead and what that claim took is given back.)
_RELEASE = (
    _LIB
    + """
expect(KEYS[3], 'zset')  -- checked first, for an error that names it
expect(KEYS[4], 'hash')
local n = give_back(KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
return n
"""
)


# Seconds a request may be held up in the network and still run: TCP gives up
# retransmitting after about 15 minutes (Linux' default tcp_retries2).
CLAIM_COPY_LIFETIME = 3600.0


# KEYS: inflight, queue. ARGV: claim numbers the worker no longer holds. Messages left
# in a live worker's in-flight hash after their outcome was recorded: Redis lost that
# write (a restart that did not persist its last second, a fail-over to a replica that
# had not received it). Nothing else would ever take them out. Returns the count.
_GIVE_BACK_STRAYS = (
    _LIB
    + """
expect(KEYS[2], 'list')
local entries = {}
for _, n in ipairs(ARGV) do
  local raw = redis.call('HGET', KEYS[1], n)
  if raw then
    redis.call('HDEL', KEYS[1], n)
    entries[#entries + 1] = {tonumber(n), raw}
  end
end
return push_back(KEYS[2], entries)
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
    def claims(self) -> str:
        """HASH of each live worker's next unused claim number."""
        return f"{self.tag}:claims"

    @property
    def reaped(self) -> str:
        """ZSET of workers taken for dead, by when: their claim records are kept a while."""
        return f"{self.tag}:reaped"

    @property
    def inflight_prefix(self) -> str:
        return f"{self.tag}:inflight:"

    @property
    def sessions(self) -> str:
        """HASH of session turns (session ordering mode)."""
        return f"{self.tag}:sessions"

    @property
    def held_prefix(self) -> str:
        return f"{self.tag}:held:"

    def inflight(self, worker_id: str) -> str:
        """HASH of a worker's in-flight messages, by claim number."""
        return self.inflight_prefix + worker_id


# Most bytes of messages (as pushed) one claim takes, one message at least: a claim batch
# of messages near the size cap (up to 1,000 x 256 kB) would make a worker's memory follow
# its messages' size rather than stay bounded.
CLAIM_BYTES = 4 * 1024 * 1024


# A msgspec Struct, not a dataclass, for each record built for every message: its
# __init__ is C, a quarter of a dataclass' time (the garbage collector does not track
# them: they hold no cycle).
class Claimed(msgspec.Struct, gc=False):
    """A message taken into flight: its claim number and the queue element as pushed."""

    token: int
    raw: bytes


class Settlement(msgspec.Struct, gc=False):  # a Struct, as Claimed
    """The recorded outcome of one in-flight message (by its claim number).

    ``payload`` is the re-enqueued message for a retry, the dead-letter record for a
    dead letter, and empty for an ack. A retry is due ``delay`` seconds after
    ``decided`` (``time.monotonic()`` when the outcome was decided; None: when
    recorded), however long the worker took to record it.
    """

    op: Op
    token: int
    payload: bytes = b""
    delay: float = 0.0
    decided: float | None = None


@dataclass(frozen=True, slots=True)
class Promoted:
    """What one promotion pass did, in Redis' clock."""

    moved: int
    now: float
    next_due: float | None


class Queue:
    """One worker's handle on a queue: claim, settle, promote, heartbeat, release."""

    def __init__(
        self,
        redis: AsyncRedis,
        name: str,
        worker_id: str,
        *,
        ordered: bool = False,
        turn_timeout: float = 600.0,
    ) -> None:
        self.redis = redis
        self.keys = Keys(name)
        self.worker_id = worker_id
        self._inflight = self.keys.inflight(worker_id)
        self._claimed = 0
        self._unanswered: int | None = None
        # Claim numbers handed to this worker whose outcome is not recorded yet.
        self._held: set[int] = set()
        # Redis time of this worker's last heartbeat, and of the first one after its last
        # silence longer than the timeout (0.0: none), for the heartbeat script to judge by.
        self._last_beat = 0.0
        self._steady_since = 0.0
        self._ordered = ordered
        self._turn_timeout = turn_timeout
        self._claim = redis.register_script(_CLAIM_ORDERED if ordered else _CLAIM)
        self._settle = redis.register_script(_SETTLE_ORDERED if ordered else _SETTLE)
        self._promote = redis.register_script(_PROMOTE)
        self._heartbeat = redis.register_script(_HEARTBEAT)
        self._release = redis.register_script(_RELEASE)
        self._take_over = redis.register_script(_TAKE_OVER_TURNS)
        self._give_back_strays = redis.register_script(_GIVE_BACK_STRAYS)
        self._turns_cursor = 0

    async def claim(self, count: int) -> list[Claimed]:
        """Take up to ``count`` pending messages, oldest first, without blocking; fewer
        where more would pass :data:`CLAIM_BYTES`.

        After a failed call the next one repeats it (same numbers, same count), so a
        batch whose reply was lost is handed over then, never left in flight unseen.
        """
        if self._unanswered is not None:
            count = self._unanswered
        keys = [self.keys.queue, self._inflight, self.keys.workers, self.keys.claims]
        args: list[str | float] = [self.worker_id, count, self._claimed, CLAIM_BYTES]
        if self._ordered:
            keys.append(self.keys.sessions)
            args += [self.keys.held_prefix, self._turn_timeout]
        self._unanswered = count
        flat = cast(list[int | bytes], await self._claim(keys, args))
        self._unanswered = None
        self._claimed += count
        claimed = [
            Claimed(int(n), cast(bytes, raw)) for n, raw in zip(flat[::2], flat[1::2], strict=True)
        ]
        self._held.update([c.token for c in claimed])
        return claimed

    async def wait(self, seconds: int) -> bool:
        """Block up to ``seconds`` until a message is pending (no polling); True if one is.

        The blocking pop moves the oldest message from the queue's end back to that same
        end: the queue is unchanged, so no message is ever only in a reply, and the next
        :meth:`claim` takes it in order with the rest (session ordering depends on that).
        """
        try:
            moved = await self.redis.blmove(
                self.keys.queue, self.keys.queue, seconds, "RIGHT", "RIGHT"
            )
        except ResponseError as exc:
            # The server turned replica (a fail-over) under the blocked pop: look again,
            # and the next claim meets the fail-over as an outage (READONLY).
            if str(exc).startswith("UNBLOCKED"):
                return False
            raise
        return moved is not None

    async def settle(self, settlements: Sequence[Settlement]) -> tuple[int, list[bool]]:
        """Record outcomes atomically.

        Returns how many acks were recorded, and for each retry or dead letter whether
        it was (False: the message had been given back meanwhile, so it is not doubled).
        """
        acks = " ".join([str(s.token) for s in settlements if s.op == "ack"])
        args: list[bytes | str | float] = [acks]
        now = time.monotonic()
        for s in settlements:
            if s.op != "ack":
                # Outcomes wait to be recorded in batches (and through a Redis outage):
                # that wait comes off the delay, so a retry fires when it was due.
                waited = 0.0 if s.decided is None else now - s.decided
                args += [s.op, s.token, s.payload, max(s.delay - waited, 0.0)]
        keys = [self._inflight, self.keys.delayed, self.keys.dead]
        if self._ordered:
            keys += [self.keys.sessions, self.keys.queue]
            args.insert(0, self.keys.held_prefix)
        acked, *others = cast(list[int], await self._settle(keys, args))
        self._held.difference_update([s.token for s in settlements])
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
        """Mark this worker alive; give back the messages of workers silent for longer
        than ``dead_after`` seconds (unless this one was too). Returns those counts."""
        args: list[str | float] = [self.worker_id, dead_after, self.keys.inflight_prefix]
        args += [self._last_beat, self._steady_since, CLAIM_COPY_LIFETIME]
        keys = [self.keys.workers, self.keys.queue, self.keys.claims, self.keys.reaped]
        now, since, *out = cast(list[bytes | int], await self._heartbeat(keys, args))
        self._last_beat, self._steady_since = float(now), float(since)
        pairs = zip(out[::2], out[1::2], strict=True)
        return {_text(worker): int(count) for worker, count in pairs}

    async def give_back_strays(self) -> int:
        """Return to the queue what this worker's in-flight hash holds that the worker
        does not (see the script). Returns the count."""
        # Taken before the read: an outcome recorded after it was already in the hash
        # when read, and a claim answered after it has numbers above this mark.
        mark, held = self._claimed, set(self._held)
        present = cast(list[bytes], await self.redis.hkeys(self._inflight))
        strays = [n for n in map(int, present) if n <= mark and n not in held]
        if not strays:
            return 0
        return int(await self._give_back_strays([self._inflight, self.keys.queue], strays))

    @property
    def ordered(self) -> bool:
        return self._ordered

    async def take_over_turns(self) -> int:
        """Session ordering: pass on turns held too long (see the script), a page of
        sessions a call. Returns how many held messages went to the queue."""
        keys = [self.keys.sessions, self.keys.queue]
        args: list[str | float] = [self.keys.held_prefix, self._turn_timeout, self._turns_cursor]
        released, cursor = cast(list[int | bytes], await self._take_over(keys, args))
        self._turns_cursor = int(cursor)
        return int(released)

    async def release(self) -> int:
        """Give back everything still in flight and deregister. Returns the count."""
        keys = [self._inflight, self.keys.queue, self.keys.workers, self.keys.claims]
        return int(await self._release(keys, [self.worker_id]))


def _text(value: bytes | int | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
