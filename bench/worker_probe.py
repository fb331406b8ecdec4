"""Run ``forwarder worker`` unchanged, with optional instrumentation or runtime tweaks.

``python -m bench.worker_probe [worker flags]`` is ``python -m forwarder worker``, except:

- ``BENCH_GC_OUT=FILE``: time every garbage collection (``gc.callbacks``) and write the
  totals per generation to FILE as JSON at exit;
- ``BENCH_GC_THRESHOLD=a,b,c``: the worker's ``tune_gc`` sets this threshold in place of
  its own (it still freezes the start-up objects first);
- ``BENCH_UVLOOP=1``: run the worker's event loop on uvloop.
- ``BENCH_FLOOR=1``: the worker with its per-message checks and decisions taken out
  (never for use: it sends whatever is queued). A message is only parsed (orjson) and
  its body written back; no breaker is asked or told; every answer counts as delivered.
  What is left is the queue's machinery (claim, hand-over, request, ack), so its ratio
  to the ceiling bounds what any speed-up of the forwarder's own per-message work can
  reach.

The benchmark's experiments use it to size changes before anyone makes them in the core.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson


def _gc_recorder(out: Path) -> None:
    totals: dict[str, dict[str, float]] = {
        str(g): {"collections": 0, "seconds": 0.0, "collected": 0} for g in range(3)
    }
    started: list[float] = [0.0]

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        entry = totals[str(info["generation"])]
        entry["collections"] += 1
        entry["seconds"] += time.perf_counter() - started[0]
        entry["collected"] += info.get("collected", 0)

    gc.callbacks.append(callback)

    def dump() -> None:
        cpu = time.process_time()
        out.write_bytes(orjson.dumps({"generations": totals, "process_cpu": cpu}))

    atexit.register(dump)


def main() -> int:
    gc_out = os.environ.get("BENCH_GC_OUT")
    if gc_out:
        _gc_recorder(Path(gc_out))
    if os.environ.get("BENCH_UVLOOP") == "1":
        import asyncio

        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    import forwarder.worker
    from forwarder.cli import main as forwarder_main

    threshold = os.environ.get("BENCH_GC_THRESHOLD")
    if threshold:
        # The worker command calls tune_gc after start-up: a threshold set here, before
        # it, would be overwritten.
        a, b, c = (int(x) for x in threshold.split(","))
        own = forwarder.worker.tune_gc

        def tune_gc() -> None:
            own()  # the freeze, as ever
            gc.set_threshold(a, b, c)

        forwarder.worker.tune_gc = tune_gc
    if os.environ.get("BENCH_FLOOR") == "1":
        _floor(forwarder.worker)
    return forwarder_main(["worker", *sys.argv[1:]])


def _floor(module: ModuleType) -> None:
    from forwarder.breaker import Admission, Breakers
    from forwarder.model import Decoded
    from forwarder.outcome import Outcome
    from forwarder.queue import Settlement

    go = Admission(None)

    def decode(raw: bytes, max_bytes: int) -> Decoded:
        message = orjson.loads(raw)
        body = orjson.dumps(message["body"])
        message["body"] = orjson.Fragment(body)
        return Decoded(message, body)

    def admit(self: Any, host: str) -> Admission:
        return go

    def after(self: Any, job: Any, host: str, attempt: Any) -> Outcome:
        ack = Settlement("ack", job.claimed.token)
        return Outcome(ack, "delivered", None, job.message, attempt)

    module.decode = decode  # type: ignore[attr-defined]
    Breakers.admit = admit  # type: ignore[method-assign]
    module.Worker._after = after


if __name__ == "__main__":
    sys.exit(main())
