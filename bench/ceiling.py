"""The ceiling: a bare aiohttp client PUTting N bodies at a fixed concurrency, no Redis.

``python -m bench.ceiling --base http://127.0.0.1:PORT --n 50000 --concurrency 64``

One process, one ``ClientSession``, ``TCPConnector(limit=concurrency)``, ``concurrency``
consumer tasks taking the next message from a shared counter. URLs and body bytes are
built before the clock starts: this is the most any forwarder in Python can do here.
Prints one JSON line: elapsed wall and CPU seconds of the send loop, statuses, VmHWM.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import time
from pathlib import Path

import aiohttp
import orjson
from yarl import URL

from bench.common import BODY_BYTES, update_path

_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}


async def run(base: str, n: int, concurrency: int) -> dict[str, object]:
    urls = [URL(base + update_path(i), encoded=True) for i in range(n)]
    statuses: collections.Counter[int] = collections.Counter()
    connector = aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=30)
    timeout = aiohttp.ClientTimeout(total=10)
    next_index = iter(range(n))
    async with aiohttp.ClientSession(connector=connector) as session:

        async def consumer() -> None:
            for i in next_index:
                # The same call as forwarder.client's.
                async with session.put(
                    urls[i],
                    data=BODY_BYTES,
                    headers=_HEADERS,
                    timeout=timeout,
                    allow_redirects=False,
                ) as resp:
                    await resp.read()
                    statuses[resp.status] += 1

        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(consumer() for _ in range(concurrency)))
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {
        "elapsed": wall,
        "cpu": cpu,
        "statuses": {str(k): v for k, v in statuses.items()},
        "hwm_kb": _hwm_kb(),
    }


def _hwm_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="bare aiohttp PUT ceiling")
    parser.add_argument("--base", required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args(argv)
    coro = run(args.base, args.n, args.concurrency)
    if args.uvloop:
        import uvloop

        result = uvloop.run(coro)
    else:
        result = asyncio.run(coro)
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
