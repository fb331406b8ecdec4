"""Which host serves an account: LivePerson's Domain API (service ``msdkgw``), cached."""

from __future__ import annotations

import asyncio
import re
import time
from urllib.parse import quote

import aiohttp
import orjson
import structlog

from forwarder.answers import MAX_ANSWER_BYTES, read_at_most

log = structlog.get_logger("forwarder.domain")

SERVICE = "msdkgw"
# How long a host whose refresh failed is used before the Domain API is asked again.
STALE_RETRY = 30.0


class DomainLookupError(Exception):
    """The Domain API did not give a host for an account; retried like a 5xx."""


class DomainResolver:
    """Looks up and caches the ``msdkgw`` base URI per account.

    Concurrent lookups for one account share a single request, so a burst of messages
    for a cold account costs one call to the Domain API, not one per message. A host past
    its TTL is refreshed in the background and stays in use, also when the refresh fails
    (the domain rarely changes): a Domain API outage must neither delay nor spend the
    retries of accounts whose host is known.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        domain_api_url: str,
        *,
        ttl: float,
        timeout: float,
    ) -> None:
        self._session = session
        self._api = domain_api_url.rstrip("/")
        self._ttl = ttl
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._cache: dict[str, tuple[str, float]] = {}
        self._pending: dict[str, asyncio.Future[str]] = {}

    async def host(self, account_id: str) -> str:
        """The API host (``name[:port]``) for ``account_id``."""
        cached = self._cache.get(account_id)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        pending = self._pending.get(account_id) or self._start_lookup(account_id)
        if cached is not None:
            # Expired: refreshed in the background, the known host used meanwhile. A Domain
            # API that hangs would otherwise hold the account's messages for the timeout.
            return cached[0]
        # shield: one waiter's cancellation must not cancel the others' shared lookup.
        return await asyncio.shield(pending)

    def _start_lookup(self, account_id: str) -> asyncio.Future[str]:
        pending = asyncio.ensure_future(self._lookup(account_id))
        self._pending[account_id] = pending
        pending.add_done_callback(lambda done: self._lookup_done(account_id, done))
        return pending

    def _lookup_done(self, account_id: str, done: asyncio.Future[str]) -> None:
        self._pending.pop(account_id, None)
        if not done.cancelled():
            done.exception()  # a refresh no one awaited: its failure was logged, not lost

    async def _lookup(self, account_id: str) -> str:
        try:
            host = await self._fetch(account_id)
        except DomainLookupError as exc:
            known = self._cache.get(account_id)
            if known is None:
                # Said once a lookup, not once a message waiting on it: the attempts and
                # dead letters record only that the lookup failed, not why.
                log.warning("domain_lookup_failed", account=account_id, error=str(exc))
                raise
            log.warning("domain_refresh_failed", account=account_id, error=str(exc))
            host, ttl = known[0], min(self._ttl, STALE_RETRY)
        else:
            ttl = self._ttl
        self._cache[account_id] = (host, time.monotonic() + ttl)
        return host

    async def _fetch(self, account_id: str) -> str:
        url = f"{self._api}/api/account/{quote(account_id, safe='')}/service/{SERVICE}/baseURI.json"
        try:
            async with self._session.get(
                url, params={"version": "1.0"}, timeout=self._timeout, allow_redirects=False
            ) as resp:
                if resp.status != 200:
                    raise DomainLookupError(f"domain API answered {resp.status}")
                payload = await read_at_most(resp)
            if payload is None:
                raise DomainLookupError(f"domain API answer over {MAX_ANSWER_BYTES} bytes")
            data = orjson.loads(payload)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise DomainLookupError(f"domain API unreachable: {type(exc).__name__}") from exc
        host = data.get("baseURI") if isinstance(data, dict) else None
        if not isinstance(host, str) or not _valid_host(host):
            raise DomainLookupError("domain API answer has no valid baseURI")
        return host


# The answer becomes part of a URL: a bare ASCII host[:port], nothing that could add a
# path, credentials or another scheme, nor fail to build a URL (cached, that would fail
# every message of the account until the TTL ran out).
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::([0-9]{1,5}))?")


def _valid_host(host: str) -> bool:
    match = _HOST.fullmatch(host)
    return match is not None and int(match[1] or 0) <= 65535
