"""The App Engagement API client: one Update Session ``PUT`` per message."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from yarl import URL

from forwarder.domain import DomainLookupError, DomainResolver
from forwarder.model import SessionUpdate

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


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one delivery attempt came to.

    ``status`` is the HTTP status when the API answered; otherwise ``failure`` names
    what went wrong (``timeout``, ``connection``, ``domain_lookup``).
    """

    status: int | None
    latency: float
    error: ErrorEntity | None = None
    failure: str | None = None

    @property
    def describe(self) -> str:
        return f"http_{self.status}" if self.status is not None else str(self.failure)


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

    async def update_session(self, message: SessionUpdate, body: Any) -> Attempt:
        """PUT ``body`` (the message's body, as the producer wrote it) to its session."""
        started = time.perf_counter()
        try:
            url = await self._url(message)
            async with self._session.put(
                url,
                data=orjson.dumps(body),
                headers=_HEADERS,
                timeout=self._timeout,
                allow_redirects=False,
            ) as resp:
                # Read even an empty body so the connection goes back to the pool.
                data = await resp.read()
                error = None if resp.status < 400 else _error_entity(data)
                return Attempt(resp.status, time.perf_counter() - started, error)
        except DomainLookupError:
            return Attempt(None, time.perf_counter() - started, failure="domain_lookup")
        except TimeoutError:
            return Attempt(None, time.perf_counter() - started, failure="timeout")
        except aiohttp.ClientError:
            return Attempt(None, time.perf_counter() - started, failure="connection")

    async def _url(self, message: SessionUpdate) -> URL:
        if self._domains is not None:
            base = f"{self._scheme}://{await self._domains.host(message.account_id)}"
        else:
            base = self._base
        # Path parts are percent-encoded with no safe characters: a visitor id can never
        # add a path segment or a query.
        path = (
            f"/api/account/{quote(message.account_id, safe='')}"
            f"/app/engagement/visitors/{quote(message.visitor_id, safe='')}"
        )
        query = f"?v={API_VERSION}&sid={quote(message.session_id, safe='')}"
        return URL(base + path + query, encoded=True)


def _error_entity(data: bytes) -> ErrorEntity | None:
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
