"""What becomes of a message after an attempt: ack, retry later, or dead letter.

Pure decisions, no I/O: the worker hands the result to :meth:`forwarder.queue.Queue.settle`,
which records it in the same atomic step that takes the message out of flight.

- 2xx: delivered (ack).
- 4xx: the request is wrong; dead letter at once (``client_error``) with the error entity.
- anything else (5xx, an unexpected 1xx/3xx, timeout, connection error, failed domain
  lookup): retry after the next configured delay; after the last one, dead letter
  (``retries_exhausted``).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from forwarder.client import Attempt
from forwarder.queue import Claimed, Settlement

Reason = Literal["client_error", "retries_exhausted", "invalid_message"]

# Fields the forwarder keeps on a message between attempts; a dead-letter record
# carries them at its top level instead, so its `message` is what the producer sent.
BOOKKEEPING = ("attempts", "lastError")


@dataclass(frozen=True, slots=True)
class Outcome:
    """A settlement plus the stable log event (and its fields) that reports it."""

    settlement: Settlement
    event: Literal["delivered", "retry_scheduled", "dead_lettered"]
    fields: dict[str, Any]


def after_attempt(
    claimed: Claimed, message: dict[str, Any], attempt: Attempt, delays: Sequence[float]
) -> Outcome:
    """Decide what to do with ``message`` (its parsed wire form) after ``attempt``."""
    number = int(message.get("attempts", 0)) + 1
    fields: dict[str, Any] = {
        "id": message["id"],
        "account": message["accountId"],
        "status": attempt.status,
        "attempt": number,
        "latency_ms": round(attempt.latency * 1000, 1),
        "enqueued_at": message.get("enqueuedAt"),
    }
    status = attempt.status
    if status is not None and 200 <= status < 300:
        return Outcome(Settlement("ack", claimed.token), "delivered", fields)
    if status is not None and 400 <= status < 500:
        return _dead(claimed, message, attempt, number, "client_error", fields)
    fields["failure"] = attempt.describe
    if number > len(delays):
        return _dead(claimed, message, attempt, number, "retries_exhausted", fields)
    delay = delays[number - 1]
    retry = {**message, "attempts": number, "lastError": attempt.describe}
    fields["delay"] = delay
    return Outcome(
        Settlement("retry", claimed.token, orjson.dumps(retry), delay), "retry_scheduled", fields
    )


def invalid(claimed: Claimed, errors: list[str]) -> Outcome:
    """Dead-letter a queue element that is not a valid wire message."""
    record = {
        "id": uuid.uuid4().hex,
        "reason": "invalid_message",
        "status": None,
        "error": None,
        "attempts": 0,
        "deadAt": _now_iso(),
        "message": None,
        "raw": claimed.raw.decode("utf-8", errors="backslashreplace"),
        "errors": errors,
    }
    # Only the error paths are logged: the texts may quote the payload.
    fields = {"id": record["id"], "reason": "invalid_message", "errors": len(errors)}
    return Outcome(Settlement("dead", claimed.token, orjson.dumps(record)), "dead_lettered", fields)


def _dead(
    claimed: Claimed,
    message: dict[str, Any],
    attempt: Attempt,
    number: int,
    reason: Reason,
    fields: dict[str, Any],
) -> Outcome:
    error = attempt.error.as_json() if attempt.error else None
    record = {
        "id": message["id"],
        "reason": reason,
        "status": attempt.status,
        "error": error,
        "attempts": number,
        "deadAt": _now_iso(),
        "lastError": attempt.describe,
        "message": {k: v for k, v in message.items() if k not in BOOKKEEPING},
    }
    fields["reason"] = reason
    if error is not None:
        fields["internal_code"] = error["internalCode"]
    return Outcome(Settlement("dead", claimed.token, orjson.dumps(record)), "dead_lettered", fields)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
