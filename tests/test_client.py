"""The request each message makes: built ahead of sending, with or without its host."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from forwarder.client import EngagementClient
from forwarder.domain import DomainResolver
from tests.support import serving

MESSAGE = {"accountId": "12345678", "visitorId": "v/1", "sessionId": "s 1"}


@pytest.mark.parametrize("base", ["http://api.test:8080/gateway", "http://api.test:8080/gateway/"])
async def test_a_fixed_base_url_is_in_the_request_built_ahead(base: str) -> None:
    async with aiohttp.ClientSession() as session:
        client = EngagementClient(session, timeout=1, base_url=base)

        put = client.prepare(MESSAGE, b"{}")

    assert put.url == URL(
        "http://api.test:8080/gateway/api/account/12345678/app/engagement/visitors/v%2F1"
        "?v=1.0&sid=s%201",
        encoded=True,
    )


async def test_with_domain_lookups_the_host_is_left_for_sending() -> None:
    async with aiohttp.ClientSession() as session:
        domains = DomainResolver(session, "http://domains.test", ttl=60, timeout=1)
        client = EngagementClient(session, timeout=1, domains=domains)

        put = client.prepare(MESSAGE, b"{}")

    assert put.url is None
    assert put.path == "/api/account/12345678/app/engagement/visitors/v%2F1"
    assert put.query == "v=1.0&sid=s%201"


def _api(hits: list[str]) -> web.Application:
    """An API answering every PUT with an empty 200, recording its path and query."""

    async def answer(request: web.Request) -> web.Response:
        hits.append(request.path_qs)
        return web.Response()

    app = web.Application()
    app.router.add_put("/{tail:.*}", answer)
    return app


async def test_a_request_built_ahead_goes_to_the_host_it_is_sent_to() -> None:
    fixed: list[str] = []
    other: list[str] = []
    async with (
        serving(_api(fixed)) as fixed_base,
        serving(_api(other)) as other_base,
        aiohttp.ClientSession() as session,
    ):
        client = EngagementClient(session, timeout=5, base_url=fixed_base)
        put = client.prepare(MESSAGE, b"{}")

        attempt = await client.update_session(other_base, put)

    assert attempt.status == 200
    assert fixed == []
    assert other == ["/api/account/12345678/app/engagement/visitors/v%2F1?v=1.0&sid=s%201"]
