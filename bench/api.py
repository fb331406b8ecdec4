"""Stand-in engagement APIs for the benchmark, each run in a process of its own.

``python -m bench.api --kind raw|aiohttp|standin [--port 0] [--uvloop]`` prints
``READY <port>`` once it listens on 127.0.0.1 and serves until SIGTERM/SIGINT.

Kinds:

- ``raw``: a minimal HTTP/1.1 keep-alive server on a bare ``asyncio.Protocol`` (no
  framework): parses the request line and ``Content-Length``, answers ``200`` with an
  empty body. The default: far cheaper per request than any framework server.
- ``aiohttp``: the same rules in a minimal ``aiohttp.web`` application.
- ``standin``: the project's own :class:`forwarder.standin.StandIn` (records every call).

Rules, by visitorId (the path segment after ``/visitors/``):

- ``flaky1-...``: ``503`` (LivePerson's "Loading account" entity) the first time a
  visitorId is seen, ``200`` afterwards; both arrival times are recorded.
- ``lat-...``: ``200``; the arrival time is recorded (latency mode).
- anything else: ``200``, counted only.

Control endpoints (never counted): ``POST /_bench/reset?target=N`` forgets everything and
notes the time the N-th update call arrives; ``GET /_bench/stats``; ``GET /_bench/events``.
Times are ``time.time()`` (the benchmark compares them with stamps from other processes
on the same machine).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import signal
import sys
import time
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import orjson

_VISITORS = "/visitors/"
_ENTITY_503 = b'{"time":0,"message":"Loading account","internalCode":20}'
_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


def _http(status: int, body: bytes, reason: str = "") -> bytes:
    head = (
        f"HTTP/1.1 {status} {reason or 'X'}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


_UNAVAILABLE = _http(503, _ENTITY_503, "Service Unavailable")


class State:
    """What the stand-in counts and records, shared by the ``raw`` and ``aiohttp`` kinds."""

    def __init__(self) -> None:
        self.reset(0)

    def reset(self, target: int) -> None:
        self.count = 0
        self.target = target
        self.first_at: float | None = None
        self.target_at: float | None = None
        self.last_at: float | None = None
        self.statuses: collections.Counter[int] = collections.Counter()
        self.lat: list[tuple[str, float]] = []
        self.fail: dict[str, float] = {}
        self.ok: dict[str, float] = {}
        self.flaky_calls: collections.Counter[str] = collections.Counter()

    def update(self, target: str) -> int:
        """Count one Update Session call to ``target`` (path and query); its status."""
        now = time.time()
        self.count += 1
        if self.first_at is None:
            self.first_at = now
        if self.count == self.target:
            self.target_at = now
        self.last_at = now
        status = 200
        start = target.find(_VISITORS)
        if start >= 0:
            start += len(_VISITORS)
            tag = target[start : start + 7]
            if tag == "flaky1-" or tag[:4] == "lat-":
                end = target.find("?", start)
                visitor = target[start : end if end >= 0 else len(target)]
                if tag == "flaky1-":
                    self.flaky_calls[visitor] += 1
                    if visitor not in self.fail:
                        self.fail[visitor] = now
                        status = 503
                    elif visitor not in self.ok:
                        self.ok[visitor] = now
                else:
                    self.lat.append((visitor, now))
        self.statuses[status] += 1
        return status

    def stats(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "target": self.target,
            "first_at": self.first_at,
            "target_at": self.target_at,
            "last_at": self.last_at,
            "statuses": {str(k): v for k, v in self.statuses.items()},
        }

    def events(self) -> dict[str, Any]:
        extra = sum(max(0, n - 2) for n in self.flaky_calls.values())
        return {"lat": self.lat, "fail": self.fail, "ok": self.ok, "flaky_extra_calls": extra}

    def control(self, method: str, target: str) -> tuple[int, bytes]:
        parts = urlsplit(target)
        if parts.path == "/_bench/reset" and method == "POST":
            self.reset(int(parse_qs(parts.query).get("target", ["0"])[0]))
            return 200, b"{}"
        if parts.path == "/_bench/stats":
            return 200, orjson.dumps(self.stats())
        if parts.path == "/_bench/events":
            return 200, orjson.dumps(self.events())
        return 404, b"{}"


def take_request(buf: bytearray) -> tuple[str, str] | None:
    """Cut one whole HTTP/1.1 request off ``buf``: its method and target, or None if
    the request is not complete yet (the body is skipped, by Content-Length)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end])
    length = 0
    at = head.lower().find(b"\r\ncontent-length:")
    if at >= 0:
        stop = head.find(b"\r\n", at + 2)
        length = int(head[at + 17 : stop if stop >= 0 else len(head)])
    total = end + 4 + length
    if len(buf) < total:
        return None
    del buf[:total]
    line = head[: head.find(b"\r\n")] if b"\r\n" in head else head
    method, target, _ = line.decode("latin-1").split(" ", 2)
    return method, target


class _RawConnection(asyncio.Protocol):
    """One keep-alive connection: requests in, one response each, in order."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        # Bounded by the bytes received: every pass consumes one whole request.
        while (request := take_request(self.buf)) is not None:
            method, target = request
            assert self.transport is not None
            if target.startswith("/_bench/"):
                status, body = self.state.control(method, target)
                self.transport.write(_http(status, body))
            elif self.state.update(target) == 200:
                self.transport.write(_OK)
            else:
                self.transport.write(_UNAVAILABLE)


async def _serve_raw(port: int) -> tuple[int, Any]:
    state = State()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _RawConnection(state), "127.0.0.1", port, backlog=1024
    )
    real_port = int(server.sockets[0].getsockname()[1])
    return real_port, server


async def _serve_aiohttp(port: int) -> tuple[int, Any]:
    from aiohttp import web

    state = State()

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        target = request.raw_path
        if target.startswith("/_bench/"):
            status, body = state.control(request.method, target)
            return web.Response(status=status, body=body, content_type="application/json")
        if state.update(target) == 200:
            return web.Response()
        return web.Response(status=503, body=_ENTITY_503, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
    await site.start()
    return int(runner.addresses[0][1]), runner


async def _serve_standin(port: int) -> tuple[int, Any]:
    from aiohttp import web

    from forwarder.standin import StandIn

    standin = StandIn()
    offset = time.time() - time.monotonic()
    target = 0

    async def control(request: web.Request) -> web.Response:
        nonlocal target
        calls = standin.requests
        if request.path == "/_bench/reset":
            standin.reset()
            target = int(request.query.get("target", "0"))
            return web.json_response({})
        if request.path == "/_bench/stats":
            n = len(calls)
            stats = {
                "count": n,
                "target": target,
                "first_at": calls[0].at + offset if n else None,
                "target_at": calls[target - 1].at + offset if 0 < target <= n else None,
                "last_at": calls[-1].at + offset if n else None,
                "statuses": {str(k): v for k, v in standin.counts.items()},
            }
            return web.Response(body=orjson.dumps(stats), content_type="application/json")
        lat = [(r.visitor_id, r.at + offset) for r in calls if r.visitor_id.startswith("lat-")]
        fail: dict[str, float] = {}
        ok: dict[str, float] = {}
        for r in calls:
            if r.visitor_id.startswith("flaky1-"):
                into = ok if 200 <= r.status < 300 else fail
                into.setdefault(r.visitor_id, r.at + offset)
        events = {"lat": lat, "fail": fail, "ok": ok, "flaky_extra_calls": 0}
        return web.Response(body=orjson.dumps(events), content_type="application/json")

    standin.app.router.add_route("*", "/_bench/{tail:.*}", control)
    url = await standin.start("127.0.0.1", port)
    return int(url.rsplit(":", 1)[1]), standin


async def _main(kind: str, port: int) -> None:
    serve = {"raw": _serve_raw, "aiohttp": _serve_aiohttp, "standin": _serve_standin}[kind]
    real_port, server = await serve(port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {real_port}", flush=True)
    await stop.wait()
    if kind == "raw":
        server.close()
    elif kind == "aiohttp":
        await server.cleanup()
    else:
        await server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--kind", choices=["raw", "aiohttp", "standin"], default="raw")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--uvloop", action="store_true", help="run under uvloop")
    args = parser.parse_args(argv)
    if args.uvloop:
        import uvloop

        runner: Any = uvloop.run
    else:
        runner = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(_main(args.kind, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
