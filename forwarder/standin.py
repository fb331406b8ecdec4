"""A stand-in for LivePerson's App Engagement API (Update Session + Domain API).

The visitorId of an Update Session call chooses the answer, so a demo or a
black-box test picks each message's fate without extra wiring:

==================  =======================================================
visitorId prefix    answer
==================  =======================================================
``ok-`` / other     200, empty body
``bad-``            400 ``{"time", "message", "internalCode": 5}``
``gone-``           404 ``{"time", "message": "invalid visitorId", "internalCode": 37}``
``flaky<N>-``       503 (``internalCode`` 20) for the first N calls of one
                    (visitorId, sid, pageId), then 200
``down-``           503 with an empty body, always
``slow<MS>-``       200 after MS milliseconds
``drop-``           connection closed without any response
==================  =======================================================

Requests are validated like the real API first (``v=1.0``, ``sid``, a JSON
object body with a string ``pageId``).
"""

from __future__ import annotations

import asyncio
import collections
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Final

import orjson
import structlog
from aiohttp import web

__all__ = ["DROPPED", "Override", "Received", "StandIn", "error_response", "serve"]

DROPPED: Final = 0
"""The ``status`` recorded for a call answered by closing the connection."""

_UPDATE_PATH = "/api/account/{account_id}/app/engagement/visitors/{visitor_id}"
_DOMAIN_PATH = "/api/account/{account_id}/service/msdkgw/baseURI.json"
_COUNTED_PREFIX = re.compile(r"(flaky|slow)(\d+)$")
_PORT_SUFFIX = re.compile(r":\d+$")


@dataclass(frozen=True, slots=True)
class Received:
    """One Update Session call as the stand-in saw it, and what it answered."""

    method: str
    account_id: str
    visitor_id: str
    session_id: str | None
    version: str | None
    body: Any
    """The parsed JSON body, or None if it was absent or not JSON."""
    content_type: str
    status: int
    """The HTTP status answered; :data:`DROPPED` for a dropped connection."""
    at: float
    """``time.monotonic()`` when the request arrived."""


Override = Callable[[Received], Awaitable[web.StreamResponse | None]]
"""A test hook: return a response to answer with it, or None for the normal rules."""


def error_response(status: int, internal_code: int | None, message: str) -> web.Response:
    """A response carrying LivePerson's error entity ``{time, message, internalCode}``."""
    entity: dict[str, Any] = {"time": int(time.time() * 1000), "message": message}
    if internal_code is not None:
        entity["internalCode"] = internal_code
    return web.Response(status=status, body=orjson.dumps(entity), content_type="application/json")


class StandIn:
    """The stand-in API: an ``aiohttp.web.Application`` plus what it has seen.

    ``requests`` holds every Update Session call (failed ones included),
    ``counts`` the answers per status. ``override``, when set, is consulted
    before validation and the prefix rules.
    """

    def __init__(
        self, *, domain_fail_accounts: Iterable[str] = (), keep: int | None = None
    ) -> None:
        """Build the application; call :meth:`start` (or ``async with``) to serve it.

        ``keep``: remember only about the last this many calls (and flaky visitors), for
        a long-running stand-in; by default every one, as tests and the demo need.
        """
        self.requests: list[Received] = []
        self._keep = keep
        self.counts: collections.Counter[int] = collections.Counter()
        self.override: Override | None = None
        self.domain_fail_accounts: set[str] = set(domain_fail_accounts)
        self.domain_requests: list[str] = []
        """Account ids of the Domain API calls, in arrival order."""
        self._flaky_served: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._base_url: str | None = None
        self.app = web.Application()
        self.app.router.add_put(_UPDATE_PATH, self._update_session)
        self.app.router.add_get(_DOMAIN_PATH, self._domain)

    @property
    def delivered(self) -> list[Received]:
        """The Update Session calls answered with a 2xx."""
        return [r for r in self.requests if 200 <= r.status < 300]

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` of the running server."""
        if self._base_url is None:
            raise RuntimeError("the stand-in API is not started")
        return self._base_url

    def reset(self) -> None:
        """Forget recorded calls, counts and flaky progress (keeps ``override``)."""
        self.requests.clear()
        self.counts.clear()
        self.domain_requests.clear()
        self._flaky_served.clear()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on ``host:port`` (0: any free port); return the base URL."""
        if self._base_url is not None:
            return self._base_url
        # access_log=None: no per-request logging (the stand-in is also
        # driven by a throughput benchmark, and must print nothing).
        runner = web.AppRunner(self.app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        real_port = runner.addresses[0][1]
        self._base_url = f"http://{_url_host(host)}:{real_port}"
        return self._base_url

    async def stop(self) -> None:
        """Stop serving (idempotent)."""
        runner, self._runner, self._base_url = self._runner, None, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> StandIn:
        """Start on a free loopback port."""
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop serving."""
        await self.stop()

    # The timeout parameter is this helper's documented interface, hence ASYNC109.
    async def wait_for(
        self,
        predicate: Callable[[StandIn], bool],
        timeout: float,  # noqa: ASYNC109
    ) -> None:
        """Return once ``predicate(self)`` holds; raise TimeoutError after ``timeout`` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(self):
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(self._timeout_message(predicate, timeout))
            self._changed.clear()
            # Woken by each answered call; the short cap re-checks predicates
            # that also look at things outside the stand-in.
            try:
                async with asyncio.timeout(min(remaining, 0.05)):
                    await self._changed.wait()
            except TimeoutError:
                pass

    def _timeout_message(self, predicate: Callable[[StandIn], bool], timeout: float) -> str:
        """Describe what the stand-in had seen when a wait timed out."""
        name = getattr(predicate, "__qualname__", repr(predicate))
        last = self.requests[-3:]
        return (
            f"stand-in: {name} not true after {timeout}s; {len(self.requests)} update calls, "
            f"statuses {dict(self.counts)}, last {last}"
        )

    async def _update_session(self, request: web.Request) -> web.StreamResponse:
        """Handle PUT .../visitors/{visitorId}?v=1.0&sid=..."""
        received = await _receive(request)
        response = await self._answer(received)
        status = DROPPED if response is None else response.status
        self.requests.append(replace(received, status=status))
        self.counts[status] += 1
        if self._keep is not None and len(self.requests) > 2 * self._keep:
            del self.requests[: -self._keep]  # a slice at a time: O(1) a call, amortized
        self._changed.set()
        if response is None:
            # Closing the transport before returning makes aiohttp's write a
            # no-op: the client sees the connection end with no response.
            if request.transport is not None:
                request.transport.close()
            return web.Response()
        return response

    async def _answer(self, rec: Received) -> web.StreamResponse | None:
        """The response for ``rec``; None means drop the connection."""
        if self.override is not None:
            custom = await self.override(rec)
            if custom is not None:
                return custom
        invalid = _validate(rec)
        if invalid is not None:
            return invalid
        return await self._by_prefix(rec)

    async def _by_prefix(self, rec: Received) -> web.StreamResponse | None:
        """Apply the visitorId prefix rule (see the module docstring)."""
        prefix, dash, _ = rec.visitor_id.partition("-")
        if prefix == "ok" or not dash:
            return web.Response()
        if prefix == "drop":
            return None
        fixed = _FIXED_RULES.get(prefix)
        if fixed is not None:
            return fixed()
        counted = _COUNTED_PREFIX.fullmatch(prefix)
        if counted is None:
            return web.Response()
        kind, number = counted.group(1), int(counted.group(2))
        if kind == "slow":
            await asyncio.sleep(number / 1000)
            return web.Response()
        return self._flaky(rec, number)

    def _flaky(self, rec: Received, failures: int) -> web.Response:
        """503 for the first ``failures`` calls of one (visitorId, sid, pageId), then 200."""
        key = (rec.visitor_id, rec.session_id or "", str(rec.body["pageId"]))
        if self._flaky_served[key] >= failures:
            return web.Response()
        self._flaky_served[key] += 1
        if self._keep is not None and len(self._flaky_served) > self._keep:
            del self._flaky_served[next(iter(self._flaky_served))]  # the oldest seen
        return error_response(503, 20, "Loading account")

    async def _domain(self, request: web.Request) -> web.Response:
        """Handle the Domain API: this very server is the account's msdkgw host."""
        account_id = request.match_info["account_id"]
        self.domain_requests.append(account_id)
        if request.query.get("version") != "1.0":
            return error_response(400, 33, "Illegal Version")
        if account_id in self.domain_fail_accounts:
            return error_response(500, None, "Internal Server Error")
        payload = {"service": "msdkgw", "account": account_id, "baseURI": _authority(request)}
        return web.Response(body=orjson.dumps(payload), content_type="application/json")


async def _receive(request: web.Request) -> Received:
    """Record the call's parts; ``status`` is filled in once answered."""
    arrived = time.monotonic()
    raw = await request.read()
    try:
        body: Any = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        body = None
    query = request.query
    return Received(
        method=request.method,
        account_id=request.match_info["account_id"],
        visitor_id=request.match_info["visitor_id"],
        session_id=query.get("sid"),
        version=query.get("v"),
        body=body,
        content_type=request.content_type,
        status=DROPPED,
        at=arrived,
    )


def _validate(rec: Received) -> web.Response | None:
    """The real API's 400s (version, sid, pageId), or None if the call is valid."""
    if rec.version != "1.0":
        return error_response(400, 33, "Illegal Version")
    if not rec.session_id:
        return error_response(400, 5, "sessionId (sid) is missing")
    body = rec.body
    if not isinstance(body, dict) or not isinstance(body.get("pageId"), str):
        return error_response(400, 5, "request data missing or invalid")
    return None


_FIXED_RULES: Final[dict[str, Callable[[], web.Response]]] = {
    "bad": lambda: error_response(400, 5, "request data missing or invalid"),
    "gone": lambda: error_response(404, 37, "invalid visitorId"),
    # An empty 503 (unlike flaky's entity) so clients meet both shapes.
    "down": lambda: web.Response(status=503),
}


def _url_host(host: str) -> str:
    """``host`` as it goes into a URL (IPv6 in brackets; wildcard as loopback)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _authority(request: web.Request) -> str:
    """``host:port`` this server was reached at, port always explicit."""
    host = request.host
    if _PORT_SUFFIX.search(host):
        return host
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    port = sockname[1] if sockname else 80
    return f"{host}:{port}"


STAGING_KEEP = 10_000


async def serve(host: str, port: int) -> None:
    """Run the stand-in API on ``host:port`` until cancelled (``forwarder standin-api``)."""
    # Long-running (staging): what it remembers must not grow with every call.
    standin = StandIn(keep=STAGING_KEEP)
    await standin.start(host, port)
    try:
        real_port = int(standin.base_url.rsplit(":", 1)[1])
        structlog.get_logger().info("standin_listening", host=host, port=real_port)
        await asyncio.Event().wait()
    finally:
        await standin.stop()
