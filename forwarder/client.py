"""The App Engagement API client: one Update Session ``PUT`` per message."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import aiohttp
import msgspec
import orjson
from yarl import URL

from forwarder.answers import read_at_most
from forwarder.domain import DomainResolver

API_VERSION = "1.0"
_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}


@dataclass(frozen=True, slots=True)
class ErrorEntity:
    """LivePerson's error body: ``{time, message, internalCode}``."""

    time: int | None
    message: str | None
    internal_code: int | None

    def as_json(self) -> dict[str, Any]:
        return {"time": self.time, "message": self.message, "internalCode": self.internal_code}


class Attempt(msgspec.Struct, gc=False):  # a Struct, as forwarder.queue.Claimed
    """What one delivery attempt came to.

    ``status`` is the HTTP status when the API answered; otherwise ``failure`` names
    what went wrong: ``connect`` (never sent: no connection could be made, even on an
    immediate second try), ``connection`` (sent, then the connection failed),
    ``timeout``, ``domain_lookup``. ``retry_after`` is the answer's Retry-After, in
    seconds.
    """

    status: int | None
    latency: float
    error: ErrorEntity | None = None
    failure: str | None = None
    retry_after: float | None = None
    # When the answer came (time.perf_counter), for the time from enqueue to delivery:
    # the outcome is recorded up to a settle batch's linger later. None: no answer.
    answered: float | None = None

    @property
    def describe(self) -> str:
        return f"http_{self.status}" if self.status is not None else str(self.failure)

    @property
    def failed(self) -> bool:
        """Did the host fail (as opposed to answering, even with a 4xx)?"""
        return self.status is None or self.status >= 500


class Put(msgspec.Struct, gc=False):  # a Struct, as forwarder.queue.Claimed
    """One Update Session call, built ahead of sending: all of it but the host, and with
    the host too where the base URL is fixed."""

    path: str  # percent-encoded
    query: str  # percent-encoded
    body: bytes
    # The whole URL, where its host is known as the call is built (a fixed base URL):
    # built with the rest of a claimed batch, while yarl's code is in the CPU's caches.
    url: URL | None = None


class EngagementClient:
    """Sends Update Session calls over one keep-alive connection pool."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        timeout: float,
        base_url: str | None = None,
        domains: DomainResolver | None = None,
        scheme: str = "https",
    ) -> None:
        if base_url is None and domains is None:
            raise ValueError("either a fixed base_url or a DomainResolver is needed")
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        # A fixed base URL wins: no Domain API lookups at all.
        self._base = (base_url or "").rstrip("/")
        self._domains = None if base_url else domains
        self._scheme = scheme
        # scheme, authority and path prefix (no trailing /) of each base URL, parsed once.
        self._bases: dict[str, tuple[str, str, str]] = {}

    @property
    def fixed_base_url(self) -> str | None:
        """The one base URL of every account, if fixed (no lookup, nothing to await)."""
        return None if self._domains else self._base

    async def base_url(self, account_id: str) -> str:
        """``scheme://host`` serving ``account_id``; raises DomainLookupError."""
        if self._domains is None:
            return self._base
        return f"{self._scheme}://{await self._domains.host(account_id)}"

    def prepare(self, message: dict[str, Any], body: bytes) -> Put:
        """The Update Session call of ``message`` (a validated wire message) with ``body``
        (its body, as the producer wrote it); its URL where the base URL is fixed."""
        # Path parts are percent-encoded with no safe characters: a visitor id can never
        # add a path segment or a query.
        put = Put(
            # An account id is [A-Za-z0-9_]: never escaped (the envelope is always checked).
            f"/api/account/{message['accountId']}"
            f"/app/engagement/visitors/{_quote(message['visitorId'])}",
            f"v={API_VERSION}&sid={_quote(message['sessionId'])}",
            body,
        )
        if self._domains is None:
            put.url = self._url(self._base, put)
        return put

    async def update_session(self, base: str, put: Put) -> Attempt:
        """Send ``put`` to the API at ``base``; never raises for a failed call."""
        # One coroutine, no helper awaited while the request waits: every resumption
        # (several per request) passes through each coroutine frame between the task and
        # aiohttp's, at a cost per frame. (read_at_most does not suspend on an answer whose
        # body came with its headers, as the API's empty 200 does.)
        url = put.url if put.url is not None and base == self._base else self._url(base, put)
        started = time.perf_counter()
        retried = False
        while True:
            try:
                async with self._session.put(
                    url,
                    data=put.body,
                    headers=_HEADERS,
                    timeout=self._timeout,
                    allow_redirects=False,
                ) as resp:
                    # The API's 200 has no body: then no helper coroutine and no header.
                    empty = resp.content.at_eof()
                    payload = await resp.read() if empty else await read_at_most(resp)
                    answered = time.perf_counter()
                    return _answered(resp, payload, answered - started, answered)
            except aiohttp.ClientConnectorError:
                if retried:
                    return Attempt(None, time.perf_counter() - started, failure="connect")
                # Nothing was sent, so an immediate second try cannot double the update.
                retried = True
            except TimeoutError:
                return Attempt(None, time.perf_counter() - started, failure="timeout")
            except aiohttp.ClientError:
                return Attempt(None, time.perf_counter() - started, failure="connection")

    def _url(self, base: str, put: Put) -> URL:
        parts = self._bases.get(base)
        if parts is None:
            parsed = URL(base)
            prefix = parsed.raw_path.rstrip("/")
            parts = self._bases[base] = (parsed.scheme, parsed.raw_authority, prefix)
        scheme, authority, prefix = parts
        # Built from parts: parsing the whole URL again costs twice as much per message.
        return URL.build(
            scheme=scheme,
            authority=authority,
            path=prefix + put.path,
            query_string=put.query,
            encoded=True,
        )


def _answered(
    resp: aiohttp.ClientResponse, payload: bytes | None, latency: float, answered: float
) -> Attempt:
    if resp.status < 400:
        return Attempt(resp.status, latency, answered=answered)
    retry_after = _retry_after(resp.headers.get("Retry-After"))
    return Attempt(resp.status, latency, _error_entity(payload), retry_after=retry_after)


_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]*")


def _quote(part: str) -> str:
    # Most ids need no escaping: ASCII letters and digits pass on two string methods,
    # the rest of the unreserved characters on a regex, a tenth of quote()'s cost.
    if (part.isascii() and part.isalnum()) or _UNRESERVED.fullmatch(part):
        return part
    return quote(part, safe="")


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date."""
    if value is None:
        return None
    value = value.strip()
    # ASCII only: str.isdigit also takes '²' or '①', which float() refuses.
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        # asctime and "-0000" name no zone; an HTTP date is always GMT (RFC 9110, 5.6.7).
        when = when.replace(tzinfo=UTC)
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)


def _error_entity(data: bytes | None) -> ErrorEntity | None:
    if data is None:  # too long to be one
        return None
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(parsed, dict):
        return None
    time_ = parsed.get("time")
    message = parsed.get("message")
    code = parsed.get("internalCode")
    return ErrorEntity(
        time=time_ if isinstance(time_, int) else None,
        message=message if isinstance(message, str) else None,
        internal_code=code if isinstance(code, int) else None,
    )
