"""Micro mode: µs per call of the per-message steps, on the example message.

``python -m bench.micro`` prints one JSON line ``{step: µs per call}``. Each step is
timed in isolation (best of 7 rounds of ``timeit``), so the figures say what a step costs
on its own, not its share of a run: use them to size a proposed change. A step whose
forwarder API has changed since this was written is reported as null, not as an error.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
import timeit
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import orjson
from yarl import URL

from bench.common import ACCOUNT, update
from forwarder.demo import DOCS_EXAMPLE_BODY


def _best_us(fn: Callable[[], object], number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=7)) / number * 1e6


def steps() -> dict[str, Callable[[], object]]:
    from forwarder import model, producer

    wire = producer.encode(update(7))[1]
    data = orjson.loads(wire)
    base = "http://127.0.0.1:8080"
    out: dict[str, Callable[[], object]] = {
        "worker: orjson.loads(raw)": lambda: orjson.loads(wire),
        "worker: orjson.dumps(parsed) (the duplicate-key guard's re-dump)": lambda: orjson.dumps(
            data
        ),
        "worker: SessionUpdate.model_validate(dict)": lambda: model.SessionUpdate.model_validate(
            data
        ),
        "worker: SessionUpdate.model_validate_json(raw)": lambda: (
            model.SessionUpdate.model_validate_json(wire)
        ),
        "worker: UpdateSessionBody.model_validate(body)": lambda: (
            model.UpdateSessionBody.model_validate(data["body"])
        ),
        "worker: validate_wire(dict) (verdict only, no model objects)": lambda: model.validate_wire(
            data
        ),
        "worker: orjson.dumps(body) (request body)": lambda: orjson.dumps(data["body"]),
        "worker: URL: 3x quote + yarl.URL(encoded=True)": lambda: URL(
            f"{base}/api/account/{quote(ACCOUNT, safe='')}/app/engagement/visitors/"
            f"{quote(data['visitorId'], safe='')}?v=1.0&sid={quote(data['sessionId'], safe='')}",
            encoded=True,
        ),
        "worker: URL: f-string only (no quote, no yarl)": lambda: (
            f"{base}/api/account/{ACCOUNT}/app/engagement/visitors/"
            f"{data['visitorId']}?v=1.0&sid={data['sessionId']}"
        ),
        "producer: uuid.uuid4().hex": lambda: uuid.uuid4().hex,
        "producer: os.urandom(16).hex() (alt id)": lambda: __import__("os").urandom(16).hex(),
        "producer: orjson.dumps(message)": lambda: orjson.dumps(data),
    }
    decode: Any = model.decode  # its signature has changed before: call it either way
    if len(inspect.signature(decode).parameters) == 2:
        out["worker: model.decode(raw) (whole step)"] = lambda: decode(wire, 1 << 20)
    else:
        out["worker: model.decode(raw) (whole step)"] = lambda: decode(wire)
    one = update(7)
    out["producer: encode(update) (whole step)"] = lambda: producer.encode(one)
    out["producer: SessionUpdate.model_validate(update)"] = lambda: (
        model.SessionUpdate.model_validate(one)
    )
    out["producer: validate_wire(update)"] = lambda: model.validate_wire(one)
    body = DOCS_EXAMPLE_BODY
    out["producer: make_update(...)"] = lambda: producer.make_update(ACCOUNT, "v", "s", body)
    return out


def task_spawn_us(count: int = 50_000) -> float:
    """µs per ``create_task`` of a trivial coroutine, run to completion with a callback."""

    async def nothing() -> None:
        return None

    async def main() -> float:
        loop = asyncio.get_running_loop()
        live: set[asyncio.Task[None]] = set()
        all_done = asyncio.Event()

        def finished(task: asyncio.Task[None]) -> None:
            live.discard(task)
            if not live:
                all_done.set()

        start = loop.time()
        for _ in range(count):
            task = asyncio.create_task(nothing())
            live.add(task)
            task.add_done_callback(finished)
        await all_done.wait()
        return (loop.time() - start) / count * 1e6

    return asyncio.run(main())


def run() -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, fn in steps().items():
        try:
            fn()
        except Exception as exc:  # the forwarder API moved: report, do not fail
            results[name] = None
            results[name + " (error)"] = f"{type(exc).__name__}: {exc}"[:200]
            continue
        results[name] = _best_us(fn, 2000)
    results["worker: asyncio.create_task + done callback (per message)"] = task_spawn_us()
    return results


def main() -> int:
    sys.stdout.write(orjson.dumps(run()).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
