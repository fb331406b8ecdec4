"""TLS: certificates are verified, for Redis (rediss://) and for the engagement API."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import orjson
import pytest
import redis
import trustme
from aiohttp import web
from redis.asyncio import Redis

from forwarder.embedded import RedisServer, free_port
from forwarder.producer import Producer, make_update
from forwarder.queue import Keys
from forwarder.standin import StandIn
from forwarder.worker import running
from tests.support import fast_settings, forwarder, serving, wait_until

KEYS = Keys("forwarder")


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_redis(ca: trustme.CA, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A TLS-only redis-server with a certificate from a private CA; yields (port, CA file)."""
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    port = free_port()
    tls = ["--tls-port", str(port), "--tls-auth-clients", "no"]
    files = ["--tls-cert-file", str(cert_file), "--tls-key-file", str(key_file)]
    server = RedisServer(
        tmp_path / "redis",
        free_port(),
        extra_args=[*tls, *files, "--tls-ca-cert-file", str(ca_file)],
    )
    with server:
        yield port, ca_file


async def test_a_worker_speaks_tls_to_redis_with_a_trusted_ca(
    tls_redis: tuple[int, Path], standin: StandIn
) -> None:
    port, ca_file = tls_redis
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca_file}"
    producer = Producer.from_url(url)
    try:
        await producer.enqueue("123", "ok-tls", "s", {"pageId": "p"})
    finally:
        await producer.aclose()
    async with running(fast_settings(url, standin)):
        await standin.wait_for(lambda api: len(api.delivered) == 1, 10)


async def test_redis_tls_refuses_an_untrusted_certificate(tls_redis: tuple[int, Path]) -> None:
    port, _ = tls_redis
    client = Redis.from_url(f"rediss://127.0.0.1:{port}/0", retry=None)
    try:
        with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
            await client.ping()
    finally:
        await client.aclose()


def test_a_redis_certificate_not_trusted_is_a_setting_to_fix(tls_redis: tuple[int, Path]) -> None:
    # redis-py wraps the handshake's failure in a ConnectionError: a worker took it for an
    # outage and waited for ever.
    port, _ = tls_redis
    url = f"rediss://127.0.0.1:{port}/0"
    result = forwarder("worker", FORWARDER_REDIS_URL=url, FORWARDER_METRICS_PORT="0")
    assert result.returncode == 2
    assert b"Redis refused the credentials or the TLS settings" in result.stderr
    assert b"CERTIFICATE_VERIFY_FAILED" in result.stderr


async def test_a_producer_raises_an_untrusted_redis_certificate_as_it_came(
    tls_redis: tuple[int, Path],
) -> None:
    # A setting to fix: QueueUnavailable would have the caller retry for ever.
    port, _ = tls_redis
    producer = Producer.from_url(f"rediss://127.0.0.1:{port}/0")
    try:
        with pytest.raises(redis.exceptions.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            await producer.enqueue("123", "v", "s", {"pageId": "p"})
    finally:
        await producer.aclose()


@pytest.fixture
async def tls_api(ca: trustme.CA) -> AsyncIterator[tuple[str, list[str]]]:
    """An HTTPS endpoint with a certificate our client does not trust; records calls."""
    calls: list[str] = []

    async def update(request: web.Request) -> web.Response:
        calls.append(request.path)
        return web.Response()

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    app = web.Application()
    app.router.add_put("/api/account/{a}/app/engagement/visitors/{v}", update)
    async with serving(app, ssl_context=context) as base:
        yield base, calls


async def test_the_api_certificate_is_verified(
    tls_api: tuple[str, list[str]], redis_url: str, redis_client: Redis, standin: StandIn
) -> None:
    base, calls = tls_api
    producer = Producer.from_url(redis_url)
    try:
        await producer.enqueue_many([make_update("123", "v", "s", {"pageId": "p"})])
    finally:
        await producer.aclose()
    settings = fast_settings(redis_url, standin, api_base_url=base, retry_delays=())
    async with running(settings):
        await wait_until(lambda: _dead(redis_client), 10, "a dead letter")
    [record] = [orjson.loads(r) for r in await redis_client.lrange(KEYS.dead, 0, -1)]
    assert (record["reason"], record["lastError"]) == ("retries_exhausted", "connect")
    assert calls == []  # the request was never sent to the untrusted host


async def _dead(redis: Redis) -> bool:
    return int(await redis.llen(KEYS.dead)) == 1
