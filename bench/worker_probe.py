"""Run ``forwarder worker`` unchanged, with optional instrumentation or runtime tweaks.

``python -m bench.worker_probe [worker flags]`` is ``python -m forwarder worker``, except:

- ``BENCH_GC_OUT=FILE``: time every garbage collection (``gc.callbacks``) and write the
  totals per generation to FILE as JSON at exit;
- ``BENCH_GC_THRESHOLD=a,b,c``: the worker's ``tune_gc`` sets this threshold in place of
  its own (it still freezes the start-up objects first);
- ``BENCH_UVLOOP=1``: run the worker's event loop on uvloop.

The benchmark's experiments use it to size changes before anyone makes them in the core.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import time
from pathlib import Path
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
    return forwarder_main(["worker", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
