"""Per-host circuit breakers: stop sending to an API host that is failing.

With the plain 5/10/15 s policy a 40-second LivePerson outage would burn every message's
retries and dead-letter the whole queue. A breaker opens when most of a host's recent
attempts failed (5xx, timeouts, connection errors); while it is open the host's messages
wait in Redis without spending attempts ("parked"); after a cool-down one probe request
goes out: success closes the breaker, failure opens it again for twice as long (capped).

A 429 pauses the host for its Retry-After (or the next retry delay) instead: nothing is
wrong with the request, the host asked us to slow down. (Another answer's Retry-After,
a 503's, say, is not read: that message is retried on the schedule.)
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import structlog

log = structlog.get_logger("forwarder.breaker")

State = Literal["closed", "open", "half_open"]


@dataclass(frozen=True, slots=True)
class Admission:
    """Whether a request may go to a host now: ``wait`` seconds to park it, and ``why``
    (``circuit_open``, or ``host_throttled`` while it asked to slow down); or go."""

    wait: float | None
    probe: bool = False
    why: str = "circuit_open"


_GO = Admission(None)


@dataclass(slots=True)
class _Host:
    results: deque[bool]
    failures: int = 0  # of `results`, kept as they come: summing them is O(window)
    state: State = "closed"
    cooldown: float = 0.0
    reopen_at: float = 0.0
    paused_until: float = 0.0  # 0: not paused


class Breakers:
    """The breakers of every host this worker talks to."""

    def __init__(
        self,
        *,
        window: int,
        min_calls: int,
        failure_ratio: float,
        cooldown: float,
        max_cooldown: float,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, State], None] | None = None,
    ) -> None:
        self._window = window
        self._min_calls = min_calls
        self._ratio = failure_ratio
        self._cooldown = cooldown
        self._max_cooldown = max_cooldown
        self._clock = clock
        self._on_change = on_change
        self._hosts: dict[str, _Host] = {}

    def state(self, host: str) -> State:
        return self._get(host).state

    def admit(self, host: str) -> Admission:
        """May a request go to ``host`` now? At most one probe while half open."""
        h = self._hosts.get(host) or self._get(host)  # twice a message: no call if known
        if h.paused_until:
            now = self._clock()
            if h.paused_until > now:
                return Admission(h.paused_until - now + _jitter(1.0), why="host_throttled")
            h.paused_until = 0.0  # over: the common case below needs no clock
        if h.state == "closed":
            return _GO
        now = self._clock()
        if h.state == "open" and now >= h.reopen_at:
            self._set(host, h, "half_open")
            return Admission(None, probe=True)
        return Admission(self.parked_for(host))

    def parked_for(self, host: str) -> float:
        """How long to park a message for ``host`` while its breaker is not closed."""
        h = self._get(host)
        # Spread the parked messages over a cool-down so they don't return all at once.
        return max(h.reopen_at - self._clock(), 0.0) + _jitter(max(h.cooldown, 0.1))

    def record(self, host: str, failed: bool, *, probe: bool) -> None:
        """Count one attempt's result. Results of requests sent before the breaker
        opened are ignored while it is open: they say nothing new."""
        h = self._hosts.get(host) or self._get(host)
        if probe:
            if failed:
                self._open(host, h, min(h.cooldown * 2, self._max_cooldown))
            else:
                self._forget(h)
                self._set(host, h, "closed")
            return
        if h.state != "closed":
            return
        results = h.results
        if len(results) == results.maxlen:
            h.failures -= results[0]  # about to fall out of the window
        results.append(failed)
        # A success can only open the breaker as the one that reaches min_calls.
        if failed:
            h.failures += 1
        elif len(results) != self._min_calls:
            return
        if len(results) >= self._min_calls and h.failures >= self._ratio * len(results):
            self._open(host, h, self._cooldown)

    def pause(self, host: str, seconds: float) -> None:
        """The host asked us to wait (429 / Retry-After): send it nothing for ``seconds``."""
        h = self._get(host)
        until = self._clock() + seconds
        if until > h.paused_until:
            h.paused_until = until
            log.warning("host_throttled", host=host, seconds=round(seconds, 3))

    def _open(self, host: str, h: _Host, cooldown: float) -> None:
        h.cooldown = cooldown
        h.reopen_at = self._clock() + cooldown
        self._forget(h)
        self._set(host, h, "open")

    @staticmethod
    def _forget(h: _Host) -> None:
        h.results.clear()
        h.failures = 0

    def _set(self, host: str, h: _Host, state: State) -> None:
        if h.state == state and state != "open":
            return
        h.state = state
        report = log.info if state == "closed" else log.warning
        report("circuit_" + state, host=host, cooldown=h.cooldown)
        if self._on_change is not None:
            self._on_change(host, state)

    def _get(self, host: str) -> _Host:
        h = self._hosts.get(host)
        if h is None:
            h = self._hosts[host] = _Host(deque(maxlen=self._window))
        return h


def _jitter(span: float) -> float:
    return random.uniform(0, span)
