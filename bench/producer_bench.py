"""Producer mode: how fast ``Producer.enqueue_many`` and ``SyncProducer.enqueue_many`` go.

``python -m bench.producer_bench --redis-url URL [--n 100000] [--batch 1000]
[--profile-dir DIR]`` prints one JSON line of figures. Each variant enqueues N copies of
the example update (distinct visitor/session ids), in batches of ``--batch`` and as one
batch; the list of update dicts is built before the clock starts, the queue is emptied
after each variant (not timed). ``encode_many`` alone (validation + JSON, no Redis) is
timed too, to split the cost. With ``--profile-dir`` it also writes a cProfile and, if
installed, a pyinstrument profile of one ``encode_many`` of N updates.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import pstats
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from bench.common import update
from forwarder.producer import Producer, SyncProducer, encode_many

QUEUE = "forwarder"


def _updates(n: int) -> list[dict[str, Any]]:
    return [update(i) for i in range(n)]


def _batches(items: list[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _timed(fn: Callable[[], object]) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(url: str, n: int, batch: int) -> dict[str, Any]:
    results: dict[str, Any] = {"n": n, "batch": batch}
    sync = SyncProducer.from_url(url, QUEUE)
    items = _updates(n)

    def record(name: str, seconds: float) -> None:
        results[name] = {"seconds": seconds, "msgs_per_s": n / seconds}

    # Validation + JSON only, no Redis.
    record("encode_many", _timed(lambda: encode_many(items)))

    for label, size in ((f"batch{batch}", batch), ("one_batch", n)):
        chunks = _batches(items, size)

        def sync_all(chunks: list[list[dict[str, Any]]] = chunks) -> None:
            for chunk in chunks:
                sync.enqueue_many(chunk)

        record(f"sync_{label}", _timed(sync_all))
        assert sync.client.llen(sync.key) == n
        sync.client.delete(sync.key)

        async def async_all(chunks: list[list[dict[str, Any]]] = chunks) -> float:
            producer = Producer.from_url(url, QUEUE)
            try:
                await producer.client.ping()  # connect before the clock starts
                gc.collect()
                start = time.perf_counter()
                for chunk in chunks:
                    await producer.enqueue_many(chunk)
                return time.perf_counter() - start
            finally:
                await producer.aclose()

        record(f"async_{label}", asyncio.run(async_all()))
        assert sync.client.llen(sync.key) == n
        sync.client.delete(sync.key)
    sync.close()
    return results


def profile(n: int, out_dir: Path) -> dict[str, str]:
    """cProfile (and pyinstrument, if installed) of ``encode_many`` over ``n`` updates."""
    out_dir.mkdir(parents=True, exist_ok=True)
    items = _updates(n)
    written: dict[str, str] = {}
    prof = cProfile.Profile()
    prof.enable()
    encode_many(items)
    prof.disable()
    raw = out_dir / "producer-encode_many.prof"
    prof.dump_stats(raw)
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(25)
    summary = out_dir / "producer-encode_many-cprofile.txt"
    summary.write_text(text.getvalue())
    written["cprofile"] = str(raw)
    written["cprofile_text"] = str(summary)
    try:
        from pyinstrument import Profiler
    except ImportError:
        return written
    profiler = Profiler(interval=0.0002)
    profiler.start()
    encode_many(items)
    profiler.stop()
    pyi = out_dir / "producer-encode_many-pyinstrument.txt"
    pyi.write_text(profiler.output_text(unicode=True, color=False, show_all=False))
    html = out_dir / "producer-encode_many-pyinstrument.html"
    html.write_text(profiler.output_html())
    written["pyinstrument_text"] = str(pyi)
    written["pyinstrument_html"] = str(html)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="time the producers' enqueue_many")
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--profile-dir", type=Path)
    args = parser.parse_args(argv)
    result = run(args.redis_url, args.n, args.batch)
    if args.profile_dir is not None:
        result["profiles"] = profile(args.n, args.profile_dir)
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
