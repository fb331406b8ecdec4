"""The stand-in engagement API, driven over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from forwarder.embedded import free_port
from forwarder.standin import DROPPED, Received, StandIn, serve

ACCOUNT = "12345678"
BODY = {"pageId": "4743822558", "engagementAttributes": []}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain aiohttp client session."""
    async with aiohttp.ClientSession() as session:
        yield session


async def put(
    http: aiohttp.ClientSession,
    standin: StandIn,
    visitor: str,
    *,
    body: Any = BODY,
    params: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """One Update Session call; returns (status, raw body)."""
    url = f"{standin.base_url}/api/account/{ACCOUNT}/app/engagement/visitors/{visitor}"
    query = {"v": "1.0", "sid": "s1"} if params is None else params
    async with http.put(url, params=query, json=body) as resp:
        return resp.status, await resp.read()


def assert_entity(raw: bytes, internal_code: int, message: str | None = None) -> None:
    """``raw`` is LivePerson's error entity with this internalCode."""
    entity = json.loads(raw)
    assert set(entity) == {"time", "message", "internalCode"}
    assert entity["internalCode"] == internal_code
    assert abs(entity["time"] - time.time() * 1000) < 60_000
    if message is not None:
        assert entity["message"] == message


async def test_ok_is_200_with_empty_body(http: aiohttp.ClientSession, standin: StandIn) -> None:
    assert await put(http, standin, "ok-1") == (200, b"")
    assert await put(http, standin, "plainvisitor") == (200, b"")
    assert await put(http, standin, "unknown-prefix") == (200, b"")


async def test_requests_recorded(http: aiohttp.ClientSession, standin: StandIn) -> None:
    await put(http, standin, "ok-1")
    await put(http, standin, "bad-2")
    first, second = standin.requests
    assert first == Received(
        method="PUT",
        account_id=ACCOUNT,
        visitor_id="ok-1",
        session_id="s1",
        version="1.0",
        body=BODY,
        content_type="application/json",
        status=200,
        at=first.at,
    )
    assert second.status == 400
    assert second.at >= first.at
    assert standin.delivered == [first]
    assert standin.counts == {200: 1, 400: 1}


async def test_bad_is_400_entity(http: aiohttp.ClientSession, standin: StandIn) -> None:
    status, raw = await put(http, standin, "bad-1")
    assert status == 400
    assert_entity(raw, 5, "request data missing or invalid")


async def test_gone_is_404_entity(http: aiohttp.ClientSession, standin: StandIn) -> None:
    status, raw = await put(http, standin, "gone-1")
    assert status == 404
    assert_entity(raw, 37, "invalid visitorId")


async def test_flaky2_fails_twice_per_key(http: aiohttp.ClientSession, standin: StandIn) -> None:
    statuses = [(await put(http, standin, "flaky2-a"))[0] for _ in range(4)]
    assert statuses == [503, 503, 200, 200]
    # Another session of the same visitor is another key.
    other = await put(http, standin, "flaky2-a", params={"v": "1.0", "sid": "s2"})
    assert other[0] == 503
    assert_entity(other[1], 20)


async def test_down_is_always_503(http: aiohttp.ClientSession, standin: StandIn) -> None:
    statuses = [(await put(http, standin, "down-x"))[0] for _ in range(3)]
    assert statuses == [503, 503, 503]


async def test_slow_delays(http: aiohttp.ClientSession, standin: StandIn) -> None:
    started = time.monotonic()
    assert (await put(http, standin, "slow300-x"))[0] == 200
    assert time.monotonic() - started >= 0.3


async def test_drop_closes_without_response(http: aiohttp.ClientSession, standin: StandIn) -> None:
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await put(http, standin, "drop-x")
    # aiohttp resends an idempotent PUT once on a dropped connection (RFC 9112
    # retry), so the stand-in may see the call twice.
    assert {r.status for r in standin.requests} == {DROPPED}
    assert 1 <= len(standin.requests) <= 2
    # The server is fine afterwards.
    assert (await put(http, standin, "ok-after"))[0] == 200


@pytest.mark.parametrize(
    ("params", "body", "code", "message"),
    [
        ({"v": "2.0", "sid": "s1"}, BODY, 33, "Illegal Version"),
        ({"sid": "s1"}, BODY, 33, "Illegal Version"),
        ({"v": "1.0"}, BODY, 5, None),
        ({"v": "1.0", "sid": "s1"}, {"impAttributes": []}, 5, None),
        ({"v": "1.0", "sid": "s1"}, ["not", "an", "object"], 5, None),
    ],
)
async def test_validation(
    http: aiohttp.ClientSession,
    standin: StandIn,
    params: dict[str, str],
    body: Any,
    code: int,
    message: str | None,
) -> None:
    status, raw = await put(http, standin, "ok-1", params=params, body=body)
    assert status == 400
    assert_entity(raw, code, message)


async def test_invalid_json_is_400(http: aiohttp.ClientSession, standin: StandIn) -> None:
    url = f"{standin.base_url}/api/account/{ACCOUNT}/app/engagement/visitors/ok-1"
    async with http.put(url, params={"v": "1.0", "sid": "s"}, data=b"{nope") as resp:
        assert resp.status == 400
    assert standin.requests[0].body is None


async def test_domain_lookup_returns_own_host(
    http: aiohttp.ClientSession, standin: StandIn
) -> None:
    url = f"{standin.base_url}/api/account/{ACCOUNT}/service/msdkgw/baseURI.json"
    async with http.get(url, params={"version": "1.0"}) as resp:
        assert resp.status == 200
        data = await resp.json()
    assert data == {
        "service": "msdkgw",
        "account": ACCOUNT,
        "baseURI": standin.base_url.removeprefix("http://"),
    }
    assert standin.domain_requests == [ACCOUNT]
    # The answer is usable: an Update Session call to that host works.
    base = f"http://{data['baseURI']}"
    target = f"{base}/api/account/{ACCOUNT}/app/engagement/visitors/ok-1"
    async with http.put(target, params={"v": "1.0", "sid": "s"}, json=BODY) as resp:
        assert resp.status == 200


async def test_domain_lookup_failure(http: aiohttp.ClientSession) -> None:
    async with StandIn(domain_fail_accounts={"broken"}) as api:
        url = f"{api.base_url}/api/account/broken/service/msdkgw/baseURI.json"
        async with http.get(url, params={"version": "1.0"}) as resp:
            assert resp.status == 500


async def test_override_hook(http: aiohttp.ClientSession, standin: StandIn) -> None:
    seen: list[Received] = []

    async def unavailable(rec: Received) -> web.StreamResponse | None:
        seen.append(rec)
        return web.Response(status=503) if rec.visitor_id != "ok-pass" else None

    standin.override = unavailable
    assert (await put(http, standin, "ok-1"))[0] == 503
    assert (await put(http, standin, "ok-pass"))[0] == 200
    standin.override = None
    assert (await put(http, standin, "ok-1"))[0] == 200
    assert [r.visitor_id for r in seen] == ["ok-1", "ok-pass"]
    assert [r.status for r in standin.requests] == [503, 200, 200]


async def test_wait_for(http: aiohttp.ClientSession, standin: StandIn) -> None:
    async def later() -> None:
        await asyncio.sleep(0.1)
        await put(http, standin, "ok-1")

    task = asyncio.create_task(later())
    await standin.wait_for(lambda s: len(s.delivered) == 1, timeout=5)
    await task
    with pytest.raises(TimeoutError, match="1 update calls"):
        await standin.wait_for(lambda s: len(s.delivered) == 2, timeout=0.1)


async def test_reset(http: aiohttp.ClientSession, standin: StandIn) -> None:
    await put(http, standin, "flaky1-a")
    standin.reset()
    assert standin.requests == []
    assert not standin.counts
    assert (await put(http, standin, "flaky1-a"))[0] == 503


async def test_serve_runs_until_cancelled(http: aiohttp.ClientSession) -> None:
    port = free_port()
    task = asyncio.create_task(serve("127.0.0.1", port))
    url = f"http://127.0.0.1:{port}/api/account/a/app/engagement/visitors/ok-1"
    for _ in range(200):
        with contextlib.suppress(aiohttp.ClientConnectionError):
            async with http.put(url, params={"v": "1.0", "sid": "s"}, json=BODY) as resp:
                assert resp.status == 200
                break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("serve() never answered")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(aiohttp.ClientConnectionError):
        await http.put(url, params={"v": "1.0", "sid": "s"}, json=BODY)


async def test_restart_on_same_port(http: aiohttp.ClientSession) -> None:
    """A test can take the API away and bring it back at the same address."""
    api = StandIn()
    first = await api.start()
    await api.stop()
    port = int(first.rsplit(":", 1)[1])
    try:
        assert await api.start(port=port) == first
        assert (await put(http, api, "ok-1"))[0] == 200
    finally:
        await api.stop()


async def test_a_long_running_stand_in_remembers_a_bounded_number_of_calls(
    http: aiohttp.ClientSession,
) -> None:
    # forwarder standin-api serves staging for days: every call kept grew it without end.
    async with StandIn(keep=5) as standin:
        for i in range(30):
            await put(http, standin, f"flaky1-{i}")
        assert sum(standin.counts.values()) == 30
        assert 5 <= len(standin.requests) <= 10
        assert standin.requests[-1].visitor_id == "flaky1-29"
        assert len(standin._flaky_served) <= 5
