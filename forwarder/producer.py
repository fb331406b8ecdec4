"""Enqueue session updates from Python services (async and sync).

Every update is validated before anything is enqueued, and a batch lands all or
nothing: a small one as one ``LPUSH``, a large one as one MULTI/EXEC whose ``LPUSH``es
go out while the rest is still being encoded (:mod:`forwarder.transaction`), so memory
stays flat whatever the batch's size. Non-Python producers push the same JSON with a
plain ``LPUSH {forwarder}:queue '<message>'``.

    producer = Producer.from_url("redis://localhost:6379/0")
    message_id = await producer.enqueue("12345678", "visitor-1", "session-1", body)
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ClassVar, Generic, Self, TypeVar

import orjson

from forwarder.connections import (
    REDIS_FAILURES,
    AsyncRedis,
    SyncRedis,
    async_client,
    is_cluster,
    redis_outage,
    sync_client,
)
from forwarder.model import (
    MAX_MESSAGE_BYTES,
    PASSTHROUGH,
    InvalidMessage,
    SessionUpdate,
    UpdateSessionBody,
    non_finite_at,
    too_large,
    validate_wire,
    wire_form,
)
from forwarder.queue import Keys
from forwarder.transaction import async_transaction, transaction

Update = SessionUpdate | Mapping[str, Any]
# An LPUSH's worth of encoded updates. Past some 128 kB of them alive at once, glibc
# gives freed memory back to the kernel and takes it again, page by page: keeping 1,000
# updates (700 kB) per LPUSH made encoding 40 % slower on the development VM.
PUSH_BYTES = 64 * 1024


class QueueUnavailable(ConnectionError):
    """Redis did not take the batch (unreachable, timed out, failing over, full).

    Nothing of the batch is known to be enqueued: an ``LPUSH`` whose reply was lost may
    have landed, so retrying can enqueue it twice (delivery is at least once anyway).
    """


@contextlib.contextmanager
def _taken_or_unavailable(client: AsyncRedis | SyncRedis) -> Iterator[None]:
    """Raise an outage (see redis_outage) met while pushing a batch as QueueUnavailable;
    a refusal (WRONGTYPE, NOPERM, a wrong setting) as Redis raised it."""
    try:
        yield
    except REDIS_FAILURES as exc:
        if not redis_outage(exc, cluster=is_cluster(client)):
            raise
        raise QueueUnavailable(f"Redis did not take the batch: {exc}") from exc


class InvalidUpdate(ValueError):
    """An update failed validation; nothing of its batch was enqueued.

    ``errors`` are ``"<field path>: <reason>"`` strings; ``index`` is the update's
    position in its batch.
    """

    def __init__(self, errors: list[str], index: int = 0) -> None:
        self.errors = errors
        self.index = index
        super().__init__(f"update #{index} is invalid: " + "; ".join(errors))


def encode(
    update: Update,
    index: int = 0,
    max_bytes: int = MAX_MESSAGE_BYTES,
    enqueued_at: float | None = None,
) -> tuple[str, bytes]:
    """Validate one update and give its id and wire bytes (id and enqueuedAt filled in)."""
    data = _wire_form(update, index)
    if data.get("id") is None:
        # 128 random bits, as uuid4 has, at a fifth of its cost.
        data["id"] = os.urandom(16).hex()
    if data.get("enqueuedAt", data.get("enqueued_at")) is None:
        data.pop("enqueued_at", None)  # the models take it under its Python name too
        data["enqueuedAt"] = time.time() if enqueued_at is None else enqueued_at
    try:
        raw = orjson.dumps(data, option=PASSTHROUGH)
    except orjson.JSONEncodeError as exc:
        _validate(data, index, None)
        # Integers past 64 bits, nesting past 254 levels: not sendable as JSON here.
        raise InvalidUpdate([f"(root): cannot be encoded as JSON ({exc})"], index) from None
    checked = _validate(data, index, raw)
    if checked is not None:
        # The models judged it (a field under its Python name, or a NaN orjson wrote as
        # null, which they take where a field takes any value: impExpanded's).
        if b"null" in raw and (where := non_finite_at(data)) is not None:
            raise InvalidUpdate([f"{where}: Input should be a finite number"], index)
        # The queue gets wire names.
        raw = orjson.dumps(wire_form(checked))
    if len(raw) > max_bytes:
        raise InvalidUpdate([too_large(len(raw), max_bytes)], index)
    return data["id"], raw


def _wire_form(update: Update, index: int) -> dict[str, Any]:
    """A new dict of ``update``'s wire fields: the caller's mapping is never written into."""
    if isinstance(update, SessionUpdate):
        return wire_form(update)
    try:
        return dict(update)
    except (TypeError, ValueError):
        kind = type(update).__name__
        error = f"(root): an update must be a mapping or a SessionUpdate, not {kind}"
        raise InvalidUpdate([error], index) from None


def _validate(data: dict[str, Any], index: int, raw: bytes | None) -> SessionUpdate | None:
    """Raise :class:`InvalidUpdate` unless ``data`` is valid; see :func:`validate_wire`.

    A SessionUpdate's wire form is checked too: its fields can be set after it was built.
    """
    try:
        return validate_wire(data, raw)
    except InvalidMessage as exc:
        raise InvalidUpdate(exc.errors, index) from None


def encode_many(
    updates: Iterable[Update], max_bytes: int = MAX_MESSAGE_BYTES
) -> tuple[list[str], list[bytes]]:
    """Validate all (raising on the first invalid one); their ids and wire bytes."""
    ids: list[str] = []
    wire = [raw for chunk in _encoded(updates, ids, max_bytes) for raw in chunk]
    return ids, wire


def _encoded(updates: Iterable[Update], ids: list[str], max_bytes: int) -> Iterator[list[bytes]]:
    """Wire bytes, validated, in chunks of about :data:`PUSH_BYTES`; ids go to ``ids``."""
    now = time.time()
    chunk: list[bytes] = []
    size = 0
    for index, update in enumerate(updates):
        message_id, raw = encode(update, index, max_bytes, now)
        ids.append(message_id)
        chunk.append(raw)
        size += len(raw)
        if size >= PUSH_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _head(chunks: Iterator[list[bytes]]) -> list[list[bytes]]:
    """The first two chunks (fewer if there are fewer): is the batch one LPUSH or more?"""
    return list(itertools.islice(chunks, 2))


def make_update(
    account_id: str,
    visitor_id: str,
    session_id: str,
    body: UpdateSessionBody | Mapping[str, Any],
    *,
    id: str | None = None,
) -> dict[str, Any]:
    """The wire form of one update, from its parts (validated later, by :func:`encode`)."""
    if isinstance(body, UpdateSessionBody):
        body = wire_form(body)
    update: dict[str, Any] = {
        "accountId": account_id,
        "visitorId": visitor_id,
        "sessionId": session_id,
        "body": dict(body),
    }
    if id is not None:
        update["id"] = id
    return update


ClientT = TypeVar("ClientT", AsyncRedis, SyncRedis)


class _Producer(Generic[ClientT]):
    """What both producers hold: a Redis client, the queue's key, the size cap."""

    _connect: ClassVar[Callable[..., Any]]  # the URL's client, async or not

    def __init__(
        self,
        client: ClientT,
        queue: str = "forwarder",
        *,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self.client: ClientT = client
        self.key = Keys(queue).queue
        # The workers' FORWARDER_MAX_MESSAGE_BYTES: what they would dead-letter is refused.
        self.max_message_bytes = max_message_bytes

    @classmethod
    def from_url(
        cls,
        url: str,
        queue: str = "forwarder",
        *,
        cluster: bool = False,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> Self:
        """A producer for a URL of any form :mod:`forwarder.connections` takes."""
        client = cls._connect(url, cluster=cluster)
        return cls(client, queue, max_message_bytes=max_message_bytes)


class Producer(_Producer[AsyncRedis]):
    """Async producer over a ``redis.asyncio.Redis`` client."""

    _connect = staticmethod(async_client)

    async def enqueue(
        self,
        account_id: str,
        visitor_id: str,
        session_id: str,
        body: UpdateSessionBody | Mapping[str, Any],
        *,
        id: str | None = None,
    ) -> str:
        """Enqueue one update; returns its message id."""
        update = make_update(account_id, visitor_id, session_id, body, id=id)
        return (await self.enqueue_many([update]))[0]

    async def enqueue_many(self, updates: Iterable[Update]) -> list[str]:
        """Validate and enqueue all, all or nothing; returns their ids in order."""
        ids: list[str] = []
        chunks = _encoded(updates, ids, self.max_message_bytes)
        head = _head(chunks)
        with _taken_or_unavailable(self.client):
            if len(head) > 1:
                async with async_transaction(self.client, self.key) as send:
                    for chunk in itertools.chain(head, chunks):
                        await send("LPUSH", self.key, *chunk)
            elif head:
                await self.client.lpush(self.key, *head[0])
        return ids

    async def aclose(self) -> None:
        await self.client.aclose()


class SyncProducer(_Producer[SyncRedis]):
    """The same as :class:`Producer`, for code without an event loop."""

    _connect = staticmethod(sync_client)

    def enqueue(
        self,
        account_id: str,
        visitor_id: str,
        session_id: str,
        body: UpdateSessionBody | Mapping[str, Any],
        *,
        id: str | None = None,
    ) -> str:
        """Enqueue one update; returns its message id."""
        update = make_update(account_id, visitor_id, session_id, body, id=id)
        return self.enqueue_many([update])[0]

    def enqueue_many(self, updates: Iterable[Update]) -> list[str]:
        """Validate and enqueue all, all or nothing; returns their ids in order."""
        ids: list[str] = []
        chunks = _encoded(updates, ids, self.max_message_bytes)
        head = _head(chunks)
        with _taken_or_unavailable(self.client):
            if len(head) > 1:
                with transaction(self.client, self.key) as send:
                    for chunk in itertools.chain(head, chunks):
                        send("LPUSH", self.key, *chunk)
            elif head:
                self.client.lpush(self.key, *head[0])
        return ids

    def close(self) -> None:
        self.client.close()
