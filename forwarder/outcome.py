"""What becomes of a message after an attempt: ack, retry later, or dead letter.

Pure decisions, no I/O: the worker hands the result to :meth:`forwarder.queue.Queue.settle`,
which records it in the same atomic step that takes the message out of flight.

- 2xx: delivered (ack).
- 429: nothing is wrong with the request, the host asks us to slow down: the message is
  parked for the answer's Retry-After (capped), else the next delay, without spending an
  attempt. The one exception to "4xx → dead letter".
- other 4xx: the request is wrong; dead letter at once (``client_error``) with the error
  entity.
- anything else (5xx, an unexpected 1xx/3xx, timeout, connection error, failed domain
  lookup): retry after the next configured delay; after the last one, dead letter
  (``retries_exhausted``).

A parked message waits in the delayed set like a retry, but keeps its attempt count:
the worker parks messages for a host whose circuit breaker is open, too.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import orjson

from forwarder.client import Attempt
from forwarder.model import BOOKKEEPING, MAX_MESSAGE_BYTES, DeadReason, iso_utc
from forwarder.queue import Claimed, Settlement

# How much of an invalid element its dead letter keeps: escaped as JSON it may grow six
# times, and one of 100 MB would pass Redis' 512 MB cap on a request and stall every
# settle behind it.
RAW_KEPT = MAX_MESSAGE_BYTES

# The least a 429's Retry-After makes a message wait: 0, a date already past or a skewed
# clock would have it sent again at once, on every 429, spending no attempt.
MIN_RETRY_AFTER = 1.0


class Outcome(msgspec.Struct, gc=False):  # a Struct, as forwarder.queue.Claimed
    """A settlement, plus what reports it: a stable log event and its fields, and for the
    metrics the message and the attempt behind it (None where there is none)."""

    settlement: Settlement
    event: Literal["delivered", "retry_scheduled", "dead_lettered", "parked"]
    # The log line's fields; None for a delivery, whose fields are built only when its
    # line is written (a busy worker logs no ack lines: a dict each would be waste).
    details: dict[str, Any] | None
    message: dict[str, Any] | None = None
    attempt: Attempt | None = None

    @property
    def fields(self) -> dict[str, Any]:
        if self.details is not None:
            return self.details
        assert self.message is not None
        assert self.attempt is not None
        return _attempt_fields(self.message, self.attempt)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Seconds before each retry (its length is the number of retries), and the most a
    Retry-After may make a message wait."""

    delays: Sequence[float]
    max_retry_after: float

    def next_delay(self, attempts: int) -> float:
        return self.delays[min(attempts, len(self.delays) - 1)] if self.delays else 1.0


def after_attempt(
    claimed: Claimed, message: dict[str, Any], attempt: Attempt, policy: RetryPolicy
) -> Outcome:
    """Decide what to do with ``message`` (its parsed wire form) after ``attempt``."""
    status = attempt.status
    if status is not None and 200 <= status < 300:  # nearly every call: decided first
        return Outcome(Settlement("ack", claimed.token), "delivered", None, message, attempt)
    attempts = int(message.get("attempts", 0))
    if status == 429:
        after = attempt.retry_after
        wait = policy.next_delay(attempts) if after is None else max(after, MIN_RETRY_AFTER)
        return parked(
            claimed, message, min(wait, policy.max_retry_after), attempt.describe, attempt
        )
    number = attempts + 1
    fields = _attempt_fields(message, attempt)
    if status is not None and 400 <= status < 500:
        return _dead(claimed, message, attempt, number, "client_error", fields)
    fields["failure"] = attempt.describe
    if number > len(policy.delays):
        return _dead(claimed, message, attempt, number, "retries_exhausted", fields)
    delay = policy.delays[number - 1]
    retry = {**message, "attempts": number, "lastError": attempt.describe}
    fields["delay"] = delay
    settlement = Settlement("retry", claimed.token, orjson.dumps(retry), delay, time.monotonic())
    return Outcome(settlement, "retry_scheduled", fields, message, attempt)


def parked(
    claimed: Claimed,
    message: dict[str, Any],
    delay: float,
    why: str,
    attempt: Attempt | None = None,
) -> Outcome:
    """Wait ``delay`` seconds in the delayed set without spending an attempt.

    ``attempt`` is the request that led to it, if one was sent (a 429, a failed probe).
    """
    waiting = {**message, "lastError": why}
    fields: dict[str, Any] = {
        "id": message["id"],
        "account": message["accountId"],
        "why": why,
        "delay": delay,
    }
    if attempt is not None:
        fields["status"] = attempt.status
        fields["latency_ms"] = round(attempt.latency * 1000, 1)
    settlement = Settlement("retry", claimed.token, orjson.dumps(waiting), delay, time.monotonic())
    return Outcome(settlement, "parked", fields, message, attempt)


def invalid(claimed: Claimed, errors: list[str]) -> Outcome:
    """Dead-letter a queue element that is not a valid wire message."""
    record: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "reason": "invalid_message",
        "status": None,
        "error": None,
        "attempts": 0,
        "deadAt": iso_utc(time.time(), "milliseconds"),
        "message": None,
        "raw": claimed.raw[:RAW_KEPT].decode("utf-8", errors="backslashreplace"),
        "errors": errors,
    }
    if len(claimed.raw) > RAW_KEPT:
        record["rawBytes"] = len(claimed.raw)
    # Only the error paths are logged: the texts may quote the payload.
    fields = {"id": record["id"], "reason": "invalid_message", "errors": len(errors)}
    return Outcome(Settlement("dead", claimed.token, orjson.dumps(record)), "dead_lettered", fields)


def _dead(
    claimed: Claimed,
    message: dict[str, Any],
    attempt: Attempt,
    number: int,
    reason: DeadReason,
    fields: dict[str, Any],
) -> Outcome:
    error = attempt.error.as_json() if attempt.error else None
    record = {
        "id": message["id"],
        "reason": reason,
        "status": attempt.status,
        "error": error,
        "attempts": number,
        "deadAt": iso_utc(time.time(), "milliseconds"),
        "lastError": attempt.describe,
        "message": {k: v for k, v in message.items() if k not in BOOKKEEPING},
    }
    fields["reason"] = reason
    if error is not None:
        fields["internal_code"] = error["internalCode"]
    settlement = Settlement("dead", claimed.token, orjson.dumps(record))
    return Outcome(settlement, "dead_lettered", fields, message, attempt)


def _attempt_fields(message: dict[str, Any], attempt: Attempt) -> dict[str, Any]:
    return {
        "id": message["id"],
        "account": message["accountId"],
        "status": attempt.status,
        "attempt": int(message.get("attempts", 0)) + 1,
        "latency_ms": round(attempt.latency * 1000, 1),
        "enqueued_at": message.get("enqueuedAt"),
    }
