"""Workers on a real Sentinel group (a master, a replica, three sentinels), and a failover.

The master is SIGKILLed while workers deliver; the sentinels promote the replica, and the
workers, never restarted, go on against the new master: every message still reaches the
stand-in API at least once.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
import redis
import redis.asyncio
from pydantic import ValidationError

from forwarder.connections import SentinelTarget, async_client, parse_sentinel_url
from forwarder.embedded import HOST, RedisServer, ServerNotFound, find_server_binary, free_port
from forwarder.producer import Producer, make_update
from forwarder.queue import Keys
from forwarder.settings import Settings
from forwarder.standin import StandIn
from forwarder.worker import running
from tests.support import fast_settings, forwarder, wait_until

PASSWORD = "data-secret"
SENTINEL_PASSWORD = "sentinel-secret"
SERVICE = "mymaster"
BODY: dict[str, Any] = {"pageId": "p1", "engagementAttributes": [{"type": "searchInfo"}]}
KEYS = Keys("forwarder")


class SentinelProcess:
    """One ``redis-server --sentinel`` child with a config file of its own (it rewrites it)."""

    def __init__(self, binary: str, data_dir: Path) -> None:
        self.port = free_port()
        self.id = secrets.token_hex(20)
        self.data_dir = data_dir
        self.config = data_dir / "sentinel.conf"
        self.binary = binary
        self._proc: subprocess.Popen[bytes] | None = None

    def configure(self, master_port: int, replica_port: int, others: list[SentinelProcess]) -> None:
        """Write the config; the peers are listed up front so no hello round is awaited."""
        self.data_dir.mkdir(parents=True)
        known = [f"sentinel known-sentinel {SERVICE} {HOST} {o.port} {o.id}" for o in others]
        self.config.write_text(
            "\n".join(
                [
                    f"sentinel myid {self.id}",
                    f"port {self.port}",
                    f"bind {HOST}",
                    f"dir {self.data_dir}",
                    f"logfile {self.data_dir / 'sentinel.log'}",
                    f"requirepass {SENTINEL_PASSWORD}",
                    # Sentinels that require a password must present it to each other.
                    f"sentinel sentinel-pass {SENTINEL_PASSWORD}",
                    f"sentinel monitor {SERVICE} {HOST} {master_port} 2",
                    f"sentinel auth-pass {SERVICE} {PASSWORD}",
                    f"sentinel down-after-milliseconds {SERVICE} 1000",
                    f"sentinel failover-timeout {SERVICE} 3000",
                    f"sentinel parallel-syncs {SERVICE} 1",
                    f"sentinel known-replica {SERVICE} {HOST} {replica_port}",
                    *known,
                    "",
                ]
            )
        )

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [self.binary, str(self.config), "--sentinel"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.data_dir,
        )
        deadline = time.monotonic() + 10
        while not self._answers():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                log = (self.data_dir / "sentinel.log").read_text(errors="replace")
                raise RuntimeError(f"sentinel on {self.port} did not start:\n{log[-2000:]}")
            time.sleep(0.02)

    def _answers(self) -> bool:
        client = redis.Redis(port=self.port, password=SENTINEL_PASSWORD, socket_timeout=0.5)
        try:
            return bool(client.ping())
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None


class SentinelGroup:
    """A master and its replica (both password-protected) watched by three sentinels."""

    def __init__(self, root: Path) -> None:
        self.binary = find_server_binary()
        # Either node may be a replica after a failover, so both authenticate to a master;
        # and a master would wait 5 s for more replicas before each full sync.
        options = ["--masterauth", PASSWORD, "--repl-diskless-sync-delay", "0"]
        self.master = RedisServer(root / "master", password=PASSWORD, extra_args=options)
        self.replica = RedisServer(
            root / "replica",
            password=PASSWORD,
            extra_args=[*options, "--replicaof", HOST, str(self.master.port)],
        )
        self.sentinels = [SentinelProcess(self.binary, root / f"sentinel{i}") for i in range(3)]
        for one in self.sentinels:
            others = [s for s in self.sentinels if s is not one]
            one.configure(self.master.port, self.replica.port, others)

    @property
    def url(self) -> str:
        hosts = ",".join(f"{HOST}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://:{PASSWORD}@{hosts}/{SERVICE}/0"

    def start(self) -> None:
        self.master.start()
        self.replica.start()
        self._until(self._replica_in_sync, "the replica to sync with the master")
        for sentinel in self.sentinels:
            sentinel.start()
        self._until(self._sentinels_see_each_other, "the sentinels to discover each other")

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        self.replica.stop()
        self.master.stop()

    def master_port(self) -> int:
        """The master's port as the sentinels report it now."""
        client = self._sentinel_client()
        try:
            _, port = cast(tuple[str, int], client.sentinel_get_master_addr_by_name(SERVICE))
            return int(port)
        finally:
            client.close()

    def _sentinel_client(self) -> redis.Redis:
        return redis.Redis(port=self.sentinels[0].port, password=SENTINEL_PASSWORD)

    def _replica_in_sync(self) -> bool:
        client = redis.Redis(port=self.replica.port, password=PASSWORD)
        try:
            return client.info("replication").get("master_link_status") == "up"
        finally:
            client.close()

    def _sentinels_see_each_other(self) -> bool:
        client = self._sentinel_client()
        try:
            state = cast(dict[str, Any], client.sentinel_master(SERVICE))
            return bool(state["num-other-sentinels"] == 2 and state["num-slaves"] == 1)
        finally:
            client.close()

    @staticmethod
    def _until(predicate: Any, what: str, within: float = 15) -> None:
        deadline = time.monotonic() + within
        while not predicate():
            if time.monotonic() > deadline:
                raise RuntimeError(f"gave up after {within} s waiting for {what}")
            time.sleep(0.05)


@pytest.fixture
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    try:
        started = SentinelGroup(tmp_path)
    except ServerNotFound as exc:
        pytest.skip(str(exc))
    try:
        started.start()
    except RuntimeError as exc:
        started.stop()
        if "sentinel" in str(exc).lower() and "did not start" in str(exc):
            pytest.skip(f"this redis-server has no usable Sentinel mode: {exc}")
        raise
    try:
        yield started
    finally:
        started.stop()


def _settings(group: SentinelGroup, api: StandIn, **overrides: Any) -> Settings:
    return fast_settings(group.url, api, redis_sentinel_password=SENTINEL_PASSWORD, **overrides)


async def _enqueue(group: SentinelGroup, visitors: list[str]) -> list[str]:
    client = async_client(group.url, sentinel_password=SENTINEL_PASSWORD)
    producer = Producer(client)
    try:
        ids = await producer.enqueue_many(make_update("123", v, "s1", BODY) for v in visitors)
        # Acknowledged by the master is not yet safe from its crash: wait for the replica.
        assert await client.execute_command("WAIT", 1, 5000) == 1
        return ids
    finally:
        await producer.aclose()


async def _master(group: SentinelGroup) -> redis.asyncio.Redis:
    return redis.asyncio.Redis(port=group.master_port(), password=PASSWORD)


async def test_delivered_dead_lettered_and_retried_through_sentinel(
    group: SentinelGroup, standin: StandIn
) -> None:
    ids = await _enqueue(group, ["ok-1", "ok-2", "bad-1", "flaky1-1"])
    async with running(_settings(group, standin)):
        await standin.wait_for(lambda api: len(api.delivered) == 3, 10)
        master = await _master(group)
        try:
            await wait_until(lambda: _llen_is(master, KEYS.dead, 1), 5, "a dead letter")
        finally:
            await master.aclose()
    assert sorted(r.visitor_id for r in standin.delivered) == ["flaky1-1", "ok-1", "ok-2"]
    assert [r.status for r in standin.requests if r.visitor_id == "flaky1-1"] == [503, 200]
    master = await _master(group)
    try:
        [raw] = await master.lrange(KEYS.dead, 0, -1)
        record = orjson.loads(raw)
        assert (record["id"], record["reason"], record["status"]) == (ids[2], "client_error", 400)
        assert await master.llen(KEYS.queue) == 0
        assert await master.zcard(KEYS.workers) == 0
    finally:
        await master.aclose()


async def test_a_large_batch_lands_whole_on_the_master_sentinel_names(
    group: SentinelGroup,
) -> None:
    ids = await _enqueue(group, [f"v{i}" for i in range(1500)])  # several LPUSHes, one EXEC
    master = await _master(group)
    try:
        queued = [orjson.loads(r)["id"] for r in reversed(await master.lrange(KEYS.queue, 0, -1))]
    finally:
        await master.aclose()
    assert queued == ids


async def _llen_is(client: redis.asyncio.Redis, key: str, n: int) -> bool:
    return int(await client.llen(key)) >= n


async def test_workers_follow_a_failover_and_every_message_arrives(
    group: SentinelGroup, standin: StandIn
) -> None:
    count = 300
    visitors = [f"slow40-{i}" for i in range(count)]
    await _enqueue(group, visitors)
    old_master = group.master_port()
    settings = _settings(group, standin, concurrency=8)
    async with contextlib.AsyncExitStack() as workers:
        for _ in range(2):
            await workers.enter_async_context(running(settings))
        await standin.wait_for(lambda api: len(api.delivered) >= count // 5, 15)
        group.master.kill()
        killed_at = time.monotonic()
        await standin.wait_for(lambda api: _all_arrived(api, visitors), 40)
    assert group.master_port() == group.replica.port != old_master
    # Deliveries went on after the crash: the workers found the new master by themselves.
    assert any(r.at > killed_at + 1 for r in standin.delivered)


def _all_arrived(api: StandIn, visitors: list[str]) -> bool:
    return {r.visitor_id for r in api.delivered} >= set(visitors)


@pytest.mark.parametrize("command", [["worker"], ["dlq", "stats"]])
def test_a_sentinel_password_refused_is_a_setting_to_fix(
    group: SentinelGroup, command: list[str]
) -> None:
    # redis-py folds the sentinels' AuthenticationError into MasterNotFoundError's text:
    # a worker took it for a fail-over without a master, and waited for ever.
    result = forwarder(
        *command,
        FORWARDER_REDIS_URL=group.url,
        FORWARDER_REDIS_SENTINEL_PASSWORD="not-" + SENTINEL_PASSWORD,
        FORWARDER_METRICS_PORT="0",
    )
    assert result.returncode == 2
    assert b"Redis refused the credentials or the TLS settings" in result.stderr


def test_a_sentinel_url_names_the_sentinels_the_master_and_the_database() -> None:
    target = parse_sentinel_url("rediss+sentinel://app:p%40ss@s1,s2:26380,[::1]:5/my%20master/3")
    assert target == SentinelTarget(
        sentinels=(("s1", 26379), ("s2", 26380), ("::1", 5)),
        service="my master",
        db=3,
        username="app",
        password="p@ss",
        ssl=True,
    )


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({"redis_url": "redis+sentinel://s1:26379/"}, "master's name"),
        ({"redis_url": "redis+sentinel://s1:26379/m/x"}, "must be a number"),
        ({"redis_url": "redis+sentinel://s1:port/m"}, "bad sentinel address"),
        ({"redis_url": "redis+sentinel://s1/m?ssl=1"}, "no query string"),
        ({"redis_url": "redis+sentinel://s1/m", "redis_cluster": True}, "cannot use a Sentinel"),
        ({"redis_url": "redis+sentinel://:a@s1/m", "redis_password": "b"}, "both in the URL"),
        ({"redis_url": "redis://:a@h/0", "redis_password": "b"}, "both in the URL"),
        ({"redis_sentinel_password": "x"}, "needs a redis+sentinel:// URL"),
        ({"redis_url": "redis://h/2", "redis_cluster": True}, "only database 0"),
        ({"redis_url": "http://h/0"}, "unsupported Redis URL scheme"),
        # Read as database 0 by redis-py: another environment's queue, perhaps.
        ({"redis_url": "redis://h:6379/1x"}, "must be a database number"),
        ({"redis_url": "redis://h:6379/0/1"}, "must be a database number"),
        ({"redis_url": "redis://h/0?socket_timeout=abc"}, "Invalid value for 'socket_timeout'"),
        # Handed to the connection by redis-py: a traceback at the first connection.
        ({"redis_url": "redis://h/0?sockettimeout=2"}, "does not take: 'sockettimeout'"),
        ({"redis_url": "unix:///run/r.sock?db=1&x=1"}, "does not take: 'x'"),
        ({"redis_url": "redis://h/0?sslx=1", "redis_cluster": True}, "does not take: 'sslx'"),
    ],
)
def test_incoherent_redis_settings_are_refused_at_startup(
    values: dict[str, Any], error: str
) -> None:
    with pytest.raises(ValidationError, match=re.escape(error)):
        Settings(**values)


@pytest.mark.parametrize(
    "url", ["redis://:s3cr3t/pw@h:6379/0", "redis+sentinel://:s3cr3t/pw@s1:26379/m/0"]
)
def test_an_unreadable_redis_url_is_refused_without_quoting_its_password(url: str) -> None:
    # A password with an unencoded /: it was quoted in the error (the plain URL's
    # in a traceback, at the worker's first connection).
    with pytest.raises(ValidationError) as caught:
        Settings(redis_url=url)
    [error] = caught.value.errors()
    assert "percent-encode" in error["msg"]
    assert "s3cr3t" not in error["msg"]


def test_an_empty_password_variable_means_no_password() -> None:
    settings = Settings(redis_password="", redis_sentinel_password="")
    assert (settings.redis_password, settings.redis_sentinel_password) == (None, None)
