"""The dead-letter store: what died and why, and taking records out of it safely.

Reading: records are read oldest first, a page at a time, from the old (right) end of
``{<queue>}:dead``. Workers push at the left, so their pushes never shift what a scan has
still to read; anything else that shifts it (a cap dropping old records, another
operator) is noticed by checking that the newest record already read is still where it
was, and re-finding it if not.

Moving: every move acts on a record by its exact bytes, one record in one atomic step
(a replay is a script that LREMs the record and pushes its message only if that removed
it), so an interruption at any point (Ctrl-C, SIGKILL, Redis restarting) leaves each
record either wholly moved or untouched. Callers that choose records in a first pass and
act in a second know them by :attr:`DeadLetter.digest`; :meth:`DeadLetters.pick` finds
exactly those again.

Bounding: workers enforce ``FORWARDER_DEAD_MAX_LEN`` / ``FORWARDER_DEAD_MAX_AGE`` with
:class:`Retention`, dropping the oldest records and logging their ids.

The ``forwarder dlq`` command line over this store is :mod:`forwarder.dlq`.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast, get_args

import msgspec
import orjson
import structlog

from forwarder.connections import AsyncRedis, finishing, raise_if_cancelled
from forwarder.model import BOOKKEEPING, DeadReason, iso_utc
from forwarder.queue import EXPECT_TYPE, Keys
from forwarder.settings import Settings

log = structlog.get_logger("forwarder.deadletters")

REASONS: tuple[str, ...] = get_args(DeadReason)
PAGE = 500
# Most records one enforcement of the caps drops: a lowered cap is reached over a few
# heartbeats instead of in one long script that would stall Redis.
TRIM_BUDGET = 1000

# KEYS: dead, queue. ARGV: the record's exact bytes, the message to enqueue.
# From the tail (count -1): a scan reads from there, so that is the copy it just saw.
# The queue's type is checked first (see EXPECT_TYPE).
_REPLAY = (
    EXPECT_TYPE
    + """
expect(KEYS[2], 'list')
if redis.call('LREM', KEYS[1], -1, ARGV[1]) == 0 then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[2])
return 1
"""
)

# KEYS: dead. ARGV: a record's exact bytes. Returns how many records lie from it to the
# old end, itself included; 0 if it is gone.
_LOCATE = """
local pos = redis.call('LPOS', KEYS[1], ARGV[1], 'RANK', -1)
if not pos then return 0 end
return redis.call('LLEN', KEYS[1]) - pos
"""

# KEYS: dead. ARGV: max length (0: none), oldest deadAt kept as YYYYMMDDhhmmss ('' : none),
# most records to drop. Drops from the old end; returns {ids dropped by length, by age},
# each oldest first.
# deadAt is compared as a number because Lua compares strings by the server's locale.
# A record that cannot be dated is dropped by the age cap rather than pinning it forever.
_TRIM = """
local function id_of(raw)
  local ok, rec = pcall(cjson.decode, raw)
  if ok and type(rec) == 'table' and type(rec.id) == 'string' then return rec.id end
  return ''
end
local function stamp(raw)
  local ok, rec = pcall(cjson.decode, raw)
  if not (ok and type(rec) == 'table' and type(rec.deadAt) == 'string') then return nil end
  local digits = string.gsub(rec.deadAt, '%D', '')
  if #digits < 14 then return nil end
  return tonumber(string.sub(digits, 1, 14))
end
local budget = tonumber(ARGV[3])
local by_len, by_age = {}, {}
local max_len = tonumber(ARGV[1])
if max_len > 0 then
  local over = math.min(redis.call('LLEN', KEYS[1]) - max_len, budget)
  if over > 0 then
    local oldest = redis.call('LRANGE', KEYS[1], -over, -1)
    for i = #oldest, 1, -1 do by_len[#by_len + 1] = id_of(oldest[i]) end
    redis.call('LTRIM', KEYS[1], 0, -over - 1)
  end
end
if ARGV[2] ~= '' then
  local cutoff = tonumber(ARGV[2])
  while #by_len + #by_age < budget do
    local raw = redis.call('LINDEX', KEYS[1], -1)
    if not raw then break end
    local at = stamp(raw)
    if at and at >= cutoff then break end
    redis.call('RPOP', KEYS[1])
    by_age[#by_age + 1] = id_of(raw)
  end
end
return {by_len, by_age}
"""


# --- records and filters --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record of the dead list: its exact bytes (what every move names) and its JSON."""

    raw: bytes
    data: dict[str, Any]

    @classmethod
    def parse(cls, raw: bytes) -> DeadLetter:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = None
        if isinstance(data, dict):
            return cls(raw, data)
        # Anything else in the list is still listed, shown, removable and exportable: its
        # text kept under "raw", as an invalid message's record keeps the message.
        return cls(raw, {"raw": raw.decode("utf-8", "replace")})

    @property
    def digest(self) -> bytes:
        return digest(self.raw)

    @property
    def id(self) -> str:
        return _text(self.data.get("id")) or "?"

    @property
    def reason(self) -> str | None:
        return _text(self.data.get("reason"))

    @property
    def status(self) -> int | None:
        return _int(self.data.get("status"))

    @property
    def attempts(self) -> int | None:
        return _int(self.data.get("attempts"))

    @property
    def internal_code(self) -> int | None:
        error = self.data.get("error")
        return _int(error.get("internalCode")) if isinstance(error, dict) else None

    @property
    def message(self) -> dict[str, Any] | None:
        message = self.data.get("message")
        return message if isinstance(message, dict) else None

    @property
    def account(self) -> str | None:
        return _text(self.message.get("accountId")) if self.message else None

    @property
    def dead_at_text(self) -> str | None:
        """``deadAt`` as stored (ISO-8601 UTC)."""
        return _text(self.data.get("deadAt"))

    @property
    def dead_at(self) -> float | None:
        """``deadAt`` as Unix seconds."""
        text = self.dead_at_text
        try:
            return datetime.fromisoformat(text).timestamp() if text else None
        except ValueError:
            return None

    def stored(self) -> dict[str, Any]:
        """:attr:`data` with each value as stored (its JSON text), for writing out."""
        return _as_stored(_raw_fields(self.raw), self.data)

    def stored_message(self) -> dict[str, Any] | None:
        """:attr:`message` with each value as stored (its JSON text)."""
        return self._stored_message(_raw_fields(self.raw))

    def _stored_message(self, fields: dict[str, msgspec.Raw] | None) -> dict[str, Any] | None:
        """:meth:`stored_message`, from the record's ``fields`` as :func:`_raw_fields` read
        them."""
        message = self.message
        if message is None or fields is None:
            return message
        return _as_stored(_raw_fields(fields["message"]), message)

    def replay_message(self) -> bytes | None:
        """The message to enqueue again: no attempts, one more replay, every other value
        as stored (the worker sends the body as the producer wrote it). None if there is
        no message."""
        message, stored = self.message, self.stored_message()
        if message is None or stored is None:
            return None
        again = {k: v for k, v in stored.items() if k not in BOOKKEEPING}
        again["replayed"] = (_int(message.get("replayed")) or 0) + 1
        return orjson.dumps(again)

    def redacted(self) -> dict[str, Any]:
        """The record without payload content: no message body, no raw queue element, and
        of the validation errors (whose texts may quote values) only their number."""
        fields = _raw_fields(self.raw)  # read once, for the record and its message
        out = {k: v for k, v in _as_stored(fields, self.data).items() if k not in ("raw", "errors")}
        message = self._stored_message(fields)
        if message is not None:
            out["message"] = {k: v for k, v in message.items() if k != "body"}
        errors = self.data.get("errors")
        if isinstance(errors, list):
            out["errorCount"] = len(errors)
        return out


@dataclass(frozen=True, slots=True)
class Filter:
    """Which records a command works on: each given criterion must hold (any of its values).

    ``statuses`` holds codes (``"400"``), classes (``"5xx"``) or ``"none"`` (no answer,
    or never sent: an invalid message has no status either, as ``dlq stats`` counts it);
    ages are in seconds before now, by ``deadAt``.
    """

    reasons: frozenset[str] = frozenset()
    statuses: frozenset[str] = frozenset()
    accounts: frozenset[str] = frozenset()
    internal_codes: frozenset[int] = frozenset()
    ids: frozenset[str] = frozenset()
    older_than: float | None = None
    newer_than: float | None = None

    def matches(self, record: DeadLetter, now: float) -> bool:
        return (
            _any_of(self.reasons, record.reason)
            and (not self.statuses or not self.statuses.isdisjoint(_status_keys(record.status)))
            and _any_of(self.accounts, record.account)
            and _any_of(self.internal_codes, record.internal_code)
            and _any_of(self.ids, record.id)
            and self._age_matches(record, now)
        )

    def _age_matches(self, record: DeadLetter, now: float) -> bool:
        if self.older_than is None and self.newer_than is None:
            return True
        dead_at = record.dead_at
        if dead_at is None:
            return False
        age = now - dead_at
        return (self.older_than is None or age >= self.older_than) and (
            self.newer_than is None or age <= self.newer_than
        )


def _any_of(allowed: frozenset[Any], value: object) -> bool:
    return not allowed or value in allowed


def _status_keys(status: int | None) -> set[str]:
    return {"none"} if status is None else {str(status), f"{status // 100}xx"}


# --- the store ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Cursor:
    """How far a scan got: records read and still at the old end, and the newest of them."""

    kept: int = 0
    anchor: bytes | None = None

    def passed(self, rows: list[bytes], taken: set[bytes]) -> None:
        """Step over ``rows`` (newest first), less the ones taken out while they were read."""
        left = [raw for raw in rows if raw not in taken]
        self.kept += len(left)
        if left:
            self.anchor = left[0]


class DeadLetters:
    """The dead list of one queue: scans it, and replays or removes records from it."""

    def __init__(self, redis: AsyncRedis, queue: str, *, page: int = PAGE) -> None:
        self.redis = redis
        self.keys = Keys(queue)
        self._page = page
        self._replay = redis.register_script(_REPLAY)
        self._locate = redis.register_script(_LOCATE)
        # What this handle took out of the list since the current page was read.
        self._taken: set[bytes] = set()

    async def pages(self) -> AsyncIterator[list[DeadLetter]]:
        """Every record, oldest first, a page at a time.

        Replay or remove records of a page (through this handle) before asking for the
        next one: the scan then knows the list's old end lost them.
        """
        cursor = _Cursor()
        # Digests of the records yielded: after a restart at the old end (see _next_rows)
        # the ones still there are passed over, not yielded again.
        read: set[bytes] = set()
        while rows := await self._next_rows(cursor):
            raise_if_cancelled()  # Ctrl-C: stop between pages
            self._taken.clear()
            page = [r for r in map(DeadLetter.parse, reversed(rows)) if r.digest not in read]
            read.update(r.digest for r in page)
            if page:
                yield page
            cursor.passed(rows, self._taken)

    async def select(
        self, wanted: Filter, offset: int = 0, limit: int | None = None
    ) -> AsyncIterator[list[DeadLetter]]:
        """The records ``wanted`` matches, oldest first, past ``offset``, at most ``limit``."""
        now = time.time()
        skip, left = offset, limit
        async for page in self.pages():
            chosen = [r for r in page if wanted.matches(r, now)]
            skipped, chosen = chosen[:skip], chosen[skip:]
            skip -= len(skipped)
            if left is not None:
                chosen = chosen[:left]
                left -= len(chosen)
            if chosen:
                yield chosen
            if left == 0:
                return

    async def pick(self, digests: set[bytes]) -> AsyncIterator[list[DeadLetter]]:
        """The records whose digests are in ``digests``, taking each found out of the set.

        What is left in ``digests`` at the end was no longer in the list.
        """
        async for page in self.pages():
            found = [r for r in page if r.digest in digests]
            digests.difference_update(r.digest for r in found)
            if found:
                yield found
            if not digests:
                return

    async def replay(self, record: DeadLetter, message: bytes) -> bool:
        """Move ``record`` to the queue as ``message``; False if it was no longer dead."""
        raise_if_cancelled()  # Ctrl-C: stop before the next record, not during it
        keys = [self.keys.dead, self.keys.queue]
        moved = bool(await finishing(self._replay(keys, [record.raw, message])))
        if moved:
            self._taken.add(record.raw)
        return moved

    async def remove(self, records: list[DeadLetter]) -> list[bool]:
        """Delete ``records``; for each, whether it was still there."""
        raise_if_cancelled()  # Ctrl-C: stop before the next page, not during it
        async with self.redis.pipeline(transaction=False) as pipe:
            for record in records:
                # redis-py types list values as str; bytes go out as they are.
                pipe.lrem(self.keys.dead, -1, record.raw)  # type: ignore[arg-type]
            removed = [bool(n) for n in await finishing(pipe.execute())]
        self._taken.update(r.raw for r, gone in zip(records, removed, strict=True) if gone)
        return removed

    async def _next_rows(self, cursor: _Cursor) -> list[bytes]:
        """The page after ``cursor``, newest first (re-finding its place if need be)."""
        dead = self.keys.dead
        while True:
            if cursor.anchor is None:
                return cast(list[bytes], await self.redis.lrange(dead, -self._page, -1))
            # One record more than a page: the anchor, to check nothing shifted.
            end = -cursor.kept
            rows = cast(list[bytes], await self.redis.lrange(dead, end - self._page, end))
            if rows and rows[-1] == cursor.anchor:
                return rows[:-1]
            cursor.kept = int(await self._locate([dead], [cursor.anchor]))
            if cursor.kept == 0:
                # The newest record read is gone (trimmed, or taken by someone else while
                # older ones read may still be there): start again at the old end.
                cursor.anchor = None


@dataclass(frozen=True, slots=True)
class Dropped:
    """Ids of the records one enforcement of the caps dropped, by cap."""

    by_len: tuple[str, ...] = ()
    by_age: tuple[str, ...] = ()


class Retention:
    """``FORWARDER_DEAD_MAX_LEN`` and ``FORWARDER_DEAD_MAX_AGE``, enforced by workers."""

    def __init__(self, redis: AsyncRedis, settings: Settings) -> None:
        self._dead = Keys(settings.queue).dead
        self._max_len = settings.dead_max_len
        self._max_age = settings.dead_max_age
        self._trim = redis.register_script(_TRIM)

    async def enforce(self) -> Dropped:
        """Drop the oldest records beyond the caps (up to :data:`TRIM_BUDGET`); log them."""
        if not self._max_len and self._max_age is None:
            return Dropped()
        cutoff = ""
        if self._max_age is not None:
            # deadAt is written by the workers' clocks, so the cut-off is taken by one too.
            cutoff = re.sub(r"\D", "", iso_utc(time.time() - self._max_age))
        by_len, by_age = cast(
            list[list[bytes]],
            await self._trim([self._dead], [self._max_len, cutoff, TRIM_BUDGET]),
        )
        dropped = Dropped(tuple(map(_decode, by_len)), tuple(map(_decode, by_age)))
        for cap, ids in (("max_len", dropped.by_len), ("max_age", dropped.by_age)):
            if ids:
                log.warning("dead_letters_dropped", cap=cap, count=len(ids), ids=list(ids))
        return dropped


# --- totals ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Totals:
    """What ``dlq stats`` counts."""

    total: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)
    by_status: Counter[str] = field(default_factory=Counter)
    by_internal_code: Counter[str] = field(default_factory=Counter)
    by_account: Counter[str] = field(default_factory=Counter)
    oldest: tuple[float, str] | None = None
    newest: tuple[float, str] | None = None

    def add(self, record: DeadLetter) -> None:
        self.total += 1
        self.by_reason[record.reason or "none"] += 1
        self.by_status[or_none(record.status)] += 1
        self.by_internal_code[or_none(record.internal_code)] += 1
        self.by_account[record.account or "none"] += 1
        dead_at = record.dead_at
        if dead_at is not None:
            stamp = (dead_at, str(record.data["deadAt"]))
            self.oldest = min(self.oldest or stamp, stamp)
            self.newest = max(self.newest or stamp, stamp)

    def as_json(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "byReason": dict(self.by_reason.most_common()),
            "byStatus": dict(self.by_status.most_common()),
            "byInternalCode": dict(self.by_internal_code.most_common()),
            "byAccount": dict(self.by_account.most_common()),
            "oldestDeadAt": self.oldest[1] if self.oldest else None,
            "newestDeadAt": self.newest[1] if self.newest else None,
        }


async def tally(store: DeadLetters, wanted: Filter | None = None) -> Totals:
    """Count the records ``wanted`` matches (all of them by default)."""
    totals = Totals()
    async for page in store.select(wanted or Filter()):
        for record in page:
            totals.add(record)
    return totals


# --- helpers --------------------------------------------------------------------------------


# A JSON object's values as their text: read back by orjson and written out again, a
# number can change (an integer past 64 bits rounded, 1e5 as 100000.0), a string's
# escapes too.
_RAW_FIELDS = msgspec.json.Decoder(dict[str, msgspec.Raw])


def _raw_fields(raw: bytes | msgspec.Raw) -> dict[str, msgspec.Raw] | None:
    """The object's values as their JSON text; None if it is no object msgspec reads."""
    try:
        return _RAW_FIELDS.decode(raw)
    except (msgspec.DecodeError, RecursionError):  # nested deeper than msgspec reads
        return None


def _as_stored(fields: dict[str, msgspec.Raw] | None, parsed: dict[str, Any]) -> dict[str, Any]:
    """``parsed`` (an object read) with its values as ``fields`` (the same object's values
    as text, by :func:`_raw_fields`) has them, which orjson writes out unchanged; as read
    where msgspec could not read the object (None)."""
    if fields is None:
        return parsed
    return {key: orjson.Fragment(bytes(value)) for key, value in fields.items()}


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def or_none(value: int | None) -> str:
    """A status or internalCode as a key or a cell: the number, or ``none``."""
    return "none" if value is None else str(value)


def digest(raw: bytes) -> bytes:
    """What a record is known by between passes and in an export file: a hash of its bytes."""
    return hashlib.blake2b(raw, digest_size=16).digest()


def _decode(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value
