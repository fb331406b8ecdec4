"""Terminal output shared by the commands: a console that lets a closed pipe be judged,
and short human-readable durations."""

from __future__ import annotations

import os
import sys

from rich.console import Console


class PipeConsole(Console):
    """stdout, whose closing (``... | head``) raises BrokenPipeError for the command to
    judge, as print's does (rich's own handling exits with 1)."""

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError


def silence_stdout() -> None:
    """Point a closed stdout at /dev/null, so that the flush at exit cannot fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def human_age(seconds: float | None) -> str:
    """``0.4s``, ``12s``, ``4m05s``, ``2h03m``, ``3d04h``; ``-`` for none."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60)):
        if whole >= size:
            return f"{whole // size}{unit}{whole % size // sub_size:02d}{sub}"
    if whole >= 60:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole}s"
