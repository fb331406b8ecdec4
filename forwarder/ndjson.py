"""``forwarder enqueue``: NDJSON wire messages from a file or a pipe, onto the queue.

Each line is checked as the producer checks an update; valid ones go out in pipelined
``LPUSH`` batches. No line read is ever dropped: lines that come slowly down a pipe are
sent once the pipe goes quiet (or at the latest every :data:`FLUSH_EVERY` seconds), and on
SIGTERM or SIGINT everything read is sent before the command ends. When Redis refuses a
batch or stops answering, the report names the lines that did not land, or may not have.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from forwarder.connections import REDIS_FAILURES, SyncRedis
from forwarder.model import InvalidMessage, parse_object, whole_numbers
from forwarder.producer import InvalidUpdate, encode

ENQUEUE_BATCH = 1000
# Batches sent per pipeline round trip.
PIPELINE_DEPTH = 10
# Seconds read lines may wait to be sent: a pipe quiet this long, or a trickle of lines.
FLUSH_EVERY = 0.2
READ_SIZE = 1 << 16


@dataclass(slots=True)
class Report:
    enqueued: int
    invalid: int
    stopped: bool  # by SIGTERM or SIGINT; every line read was enqueued all the same


def enqueue_lines(fd: int, client: SyncRedis, key: str, max_bytes: int) -> Report:
    """Enqueue the valid lines read from ``fd`` to its end; invalid ones are named on
    stderr. Raises Redis' error, after naming the lines it leaves unsent."""
    sender = _Sender(client, key)
    invalid = number = 0
    with _StopOnSignal() as stop:
        try:
            for number, line in _read_lines(fd, stop, idle=sender.flush):
                if not line.strip():
                    continue
                raw = _valid_line(line, number, max_bytes)
                if raw is None:
                    invalid += 1
                    continue
                sender.add(raw, number)
                if sender.due():
                    sender.flush()
            # Read and checked: sent, also when stopped (SIGTERM, Ctrl-C) while reading.
            sender.flush()
        except REDIS_FAILURES:
            print(f"stopped after line {number}: any later lines were not read", file=sys.stderr)
            raise
        finally:
            print(f"enqueued {sender.enqueued}, invalid {invalid}", file=sys.stderr)
    return Report(sender.enqueued, invalid, stop.signalled)


class _Sender:
    """Valid lines, pushed in pipelined ``LPUSH`` batches; what did not land is named."""

    def __init__(self, client: SyncRedis, key: str) -> None:
        self._pipe = client.pipeline(transaction=False)
        self._key = key
        self._batch: list[bytes] = []
        self._lines = (0, 0)  # the batch's first and last line
        self._queued: list[tuple[int, int, int]] = []  # first line, last line, count
        self._sent_at = time.monotonic()
        self.enqueued = 0

    def add(self, raw: bytes, line: int) -> None:
        self._lines = (self._lines[0] if self._batch else line, line)
        self._batch.append(raw)
        if len(self._batch) >= ENQUEUE_BATCH:
            self._queue_batch()

    def due(self) -> bool:
        """A pipeline's worth waits, or a trickle's lines have waited long enough."""
        if len(self._queued) >= PIPELINE_DEPTH:
            return True
        waiting = bool(self._batch or self._queued)
        return waiting and time.monotonic() - self._sent_at >= FLUSH_EVERY

    def flush(self) -> None:
        """Send what waits; raise Redis' error, after naming the lines it leaves unsent."""
        self._queue_batch()
        self._sent_at = time.monotonic()
        queued, self._queued = self._queued, []
        if not queued:
            return
        try:
            results = self._pipe.execute(raise_on_error=False)
        except REDIS_FAILURES:
            # No answer (connection lost, timed out): some of these may have landed.
            first, last = queued[0][0], queued[-1][1]
            print(f"lines {first}-{last}: not known to be enqueued", file=sys.stderr)
            raise
        refused: list[Exception] = []
        for (first, last, count), result in zip(queued, results, strict=True):
            if isinstance(result, Exception):
                print(f"lines {first}-{last}: not enqueued", file=sys.stderr)
                refused.append(result)
            else:
                self.enqueued += count
        if refused:
            raise refused[0]

    def _queue_batch(self) -> None:
        if self._batch:
            self._pipe.lpush(self._key, *self._batch)
            self._queued.append((*self._lines, len(self._batch)))
            self._batch = []


class _StopOnSignal:
    """SIGTERM and SIGINT, noted, and made readable on :attr:`fd` (the signal wakeup fd)
    so that a wait for input ends at once. Nothing is raised from the handler: a line read
    or being sent is never cut off half-way."""

    def __init__(self) -> None:
        self.signalled = False
        self.fd = -1
        self._wake = -1
        self._previous: dict[int, Any] = {}
        self._previous_wake = -1

    def __enter__(self) -> _StopOnSignal:
        self.fd, self._wake = os.pipe()
        os.set_blocking(self._wake, False)
        self._previous_wake = signal.set_wakeup_fd(self._wake)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *_: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        signal.set_wakeup_fd(self._previous_wake)
        os.close(self.fd)
        os.close(self._wake)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signalled = True


def _read_lines(
    fd: int, stop: _StopOnSignal, *, idle: Callable[[], None]
) -> Iterator[tuple[int, bytes]]:
    """``fd``'s lines, numbered, until its end or a stop signal; ``idle`` is called when
    nothing has come for :data:`FLUSH_EVERY` seconds (a pipe gone quiet)."""
    number = 0
    for chunk in _chunks(fd, stop, idle):
        lines = chunk.split(b"\n")
        if chunk.endswith(b"\n"):
            lines.pop()  # what follows the last newline: nothing
        for line in lines:
            number += 1
            yield number, line
        if stop.signalled:
            return


def _chunks(fd: int, stop: _StopOnSignal, idle: Callable[[], None]) -> Iterator[bytes]:
    """Whole lines from ``fd``, as they come (the last may lack its newline), until its
    end or a stop signal; a line not yet whole then was never sent, and is not one."""
    partial = b""
    while True:
        ready, _, _ = select.select([fd, stop.fd], [], [], FLUSH_EVERY)
        if stop.signalled:
            return
        if not ready:
            idle()
            continue
        data = os.read(fd, READ_SIZE)
        if not data:
            if partial:
                yield partial
            return
        cut = data.rfind(b"\n") + 1
        if cut:
            yield partial + data[:cut]
            partial = data[cut:]
        else:
            partial += data


def _valid_line(line: bytes, number: int, max_bytes: int) -> bytes | None:
    """The line's wire message; None, with its errors on stderr, if it is invalid."""
    try:
        _, raw = encode(_parse_line(line), number, max_bytes)
    except InvalidUpdate as exc:
        for error in exc.errors:
            print(f"line {number}: {error}", file=sys.stderr)
        return None
    return raw


def _parse_line(line: bytes) -> dict[str, Any]:
    # Integers past 64 bits kept whole, for encode to refuse as the producer does.
    try:
        return whole_numbers(line, parse_object(line.strip()))
    except InvalidMessage as exc:
        raise InvalidUpdate(exc.errors) from None
