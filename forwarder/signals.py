"""SIGTERM and SIGINT caught from a worker command's first moment.

As PID 1 in a container, as the image runs it, a signal with no handler is dropped: one
sent in the second or so that start-up takes (imports, connections) would be ignored,
and the stop would wait out the orchestrator's grace period, then a SIGKILL. This module
imports nothing heavy, so ``python -m forwarder worker`` catches them before the rest.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import ClassVar


class StopAsked:
    """Whether SIGTERM or SIGINT came before the worker (or its supervisor) took signals
    in hand; they replace these handlers with their own."""

    _current: ClassVar[StopAsked | None] = None

    def __init__(self) -> None:
        self.asked = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._ask)

    @classmethod
    def catch(cls) -> None:
        """Catch them in this process from now on (if not already)."""
        if cls._current is None:
            cls._current = cls()

    @classmethod
    def asked_yet(cls) -> bool:
        """Whether one came since :meth:`catch`."""
        return cls._current is not None and cls._current.asked

    def _ask(self, _signum: int, _frame: FrameType | None) -> None:
        self.asked = True
