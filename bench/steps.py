"""Instructions per message of the forwarder's own per-message work, without I/O.

``python -m bench.steps`` (needs valgrind, about two minutes) runs the steps a worker
takes for each delivered message, minus the HTTP call and the Redis round trips, over the
example message, under callgrind: decoding and validating it (``model.decode``), then
the rest (request and URL, breaker, attempt, outcome, settle arguments, metrics).
Each is counted at two message counts and differenced, so start-up cancels out. Set
against ``--mode instructions``, the figures say how much of the worker's gap to the
ceiling is this work, and how much anything else.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp

from bench.common import update
from bench.harness import ROOT
from bench.instructions import callgrind, total_instructions

STEPS = ("none", "decode", "all")


async def _work(step: str, n: int) -> None:
    """Make ``n`` wire messages; with ``step`` other than none, take each through it."""
    from forwarder import model, outcome
    from forwarder.breaker import Breakers
    from forwarder.client import Attempt, EngagementClient
    from forwarder.metrics import Metrics
    from forwarder.producer import encode_many
    from forwarder.queue import Claimed
    from forwarder.worker import SETTLE_BATCH, tune_gc

    host = "http://127.0.0.1:8080"
    claimed = [Claimed(i, raw) for i, raw in enumerate(encode_many(map(update, range(n)))[1])]
    breakers = Breakers(window=100, min_calls=20, failure_ratio=0.5, cooldown=5, max_cooldown=60)
    policy = outcome.RetryPolicy((5, 10, 15), 60)
    metrics = Metrics()
    async with aiohttp.ClientSession() as session:
        client = EngagementClient(session, timeout=10, base_url=host)
        tune_gc()
        if step == "none":
            return
        results: list[outcome.Outcome] = []
        for one in claimed:
            decoded = model.decode(one.raw, model.MAX_MESSAGE_BYTES)
            if step == "decode":
                continue
            client.prepare(decoded.message, decoded.body)  # its URL too: the host is fixed
            breakers.admit(host)
            attempt = Attempt(200, 0.001)
            breakers.record(host, attempt.failed, probe=False)
            results.append(outcome.after_attempt(one, decoded.message, attempt, policy))
            if len(results) == SETTLE_BATCH:
                # Queue.settle's argument of acked claim numbers, built as it builds it.
                " ".join([str(r.settlement.token) for r in results if r.settlement.op == "ack"])
                metrics.observe(results)
                results = []


def _count(step: str, n: int, out: Path) -> int:
    argv = [*callgrind(out), sys.executable, "-m", "bench.steps", "--inner", step, str(n)]
    subprocess.run(argv, check=True, cwd=ROOT)
    return total_instructions(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="instructions per message of each step")
    parser.add_argument("--small", type=int, default=2000)
    parser.add_argument("--large", type=int, default=10000)
    parser.add_argument("--inner", nargs=2, metavar=("STEP", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inner:
        step, n = args.inner
        asyncio.run(_work(step, int(n)))
        return 0
    per_msg: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="forwarder-steps-") as tmp:
        for step in STEPS:
            small, large = (
                _count(step, n, Path(tmp) / f"{step}.{n}") for n in (args.small, args.large)
            )
            per_msg[step] = (large - small) / (args.large - args.small)
    rows = {
        "decode and validate": per_msg["decode"] - per_msg["none"],
        "the rest of the worker's": per_msg["all"] - per_msg["decode"],
    }
    for label, count in rows.items():
        print(f"{label:25s} {count:9,.0f} instructions a message")
    return 0


if __name__ == "__main__":
    sys.exit(main())
