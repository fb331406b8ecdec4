"""Redis connections, built from the settings in one place."""

from __future__ import annotations

from redis.asyncio import Redis

from forwarder.settings import Settings

# Longer than any blocking pop the worker makes, so a silent network shows as an error
# instead of a hang.
SOCKET_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0


def redis_client(settings: Settings) -> Redis:
    """An asyncio client (bytes replies) for ``FORWARDER_REDIS_URL``."""
    return Redis.from_url(
        settings.redis_url,
        decode_responses=False,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=CONNECT_TIMEOUT,
        socket_keepalive=True,
        health_check_interval=15,
    )
