"""``forwarder worker --processes N``: N worker processes under one parent.

Each child is a plain ``forwarder worker`` with the same settings (the parent's flags
passed on as environment variables) and its own metrics port (the base port + its
index). SIGTERM or SIGINT to the parent reaches every child, which stops as one worker
does; the parent exits when all have, with the worst exit code (a child killed by a
signal counts as 128 + its number; one that this SIGTERM killed while it was still
starting took nothing: a clean stop). A child that exits on its own stops the others
too: the orchestrator, not this parent, restarts workers. A parent killed outright
(SIGKILL) takes its children with it, on Linux: they get SIGTERM and stop cleanly,
rather than go on unsupervised beside a restarted parent's.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from types import FrameType

import structlog

from forwarder.signals import StopAsked

log = structlog.get_logger("forwarder.processes")


def supervise(count: int, env: Mapping[str, str], metrics_port: int) -> int:
    """Run ``count`` worker processes until they stop; return the worst exit code."""
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    stopping = stopping or StopAsked.asked_yet()  # asked before forward was in place
    for index in range(count):
        if stopping:
            break
        child = _spawn(index, env, metrics_port)
        children.append(child)
        if stopping:  # asked while it was being started, before forward could see it
            child.send_signal(signal.SIGTERM)
    if children:
        log.info("workers_started", processes=count, pids=[c.pid for c in children])
    while any(c.poll() is None for c in children):
        exited = [c for c in children if c.poll() is not None]
        if exited and not stopping:
            log.error("worker_process_exited", pid=exited[0].pid, code=exited[0].returncode)
            forward(signal.SIGTERM, None)
        time.sleep(0.1)
    return max((_exit_code(c.returncode, stopping) for c in children), default=0)


def _exit_code(returncode: int, stopping: bool) -> int:
    # A child that the SIGTERM we sent killed before it could handle it was still
    # starting: it had taken nothing, so that is a clean stop, not a failure.
    if stopping and returncode == -signal.SIGTERM:
        return 0
    # Killed by a signal: reported as a shell does (137 for an OOM kill's SIGKILL), not
    # as the bare signal number, which reads as an exit code of the worker's own.
    return 128 - returncode if returncode < 0 else returncode


def _spawn(index: int, env: Mapping[str, str], metrics_port: int) -> subprocess.Popen[bytes]:
    child_env = {**os.environ, **env}
    if metrics_port:
        child_env["FORWARDER_METRICS_PORT"] = str(metrics_port + index)
    return subprocess.Popen(
        [sys.executable, "-m", "forwarder", "worker", "--processes", "1"],
        env=child_env,
        # The parent runs no threads: a function between fork and exec is safe here.
        preexec_fn=_term_with_parent if sys.platform == "linux" else None,
    )


_PR_SET_PDEATHSIG = 1


def _term_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux prctl)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
