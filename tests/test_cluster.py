"""The worker, producer and queue scripts on a real three-master Redis Cluster.

Each queue's keys share the hash tag ``{queue}``, so every script and the blocking pop
touch one slot; these tests prove it on real nodes: each key is read straight from the
master that owns its slot, with a plain (non-cluster) client that follows no redirect.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis
import redis.asyncio

from forwarder import queue as queue_module
from forwarder.connections import sync_client
from forwarder.embedded import RedisServer, ServerNotFound, find_server_binary, free_port
from forwarder.metrics import Metrics, listening
from forwarder.producer import Producer, QueueUnavailable, SyncProducer, encode, make_update
from forwarder.queue import Keys, Queue
from forwarder.settings import Settings
from forwarder.standin import StandIn
from forwarder.worker import running
from tests.support import fast_settings, forwarder, run_busy_script, wait_until

BODY: dict[str, Any] = {"pageId": "p1", "engagementAttributes": [{"type": "searchInfo"}]}


def _require_binaries() -> None:
    try:
        find_server_binary()
    except ServerNotFound as exc:
        pytest.skip(str(exc))
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is not installed: it is what builds the cluster")


class Cluster:
    """Three cluster-enabled masters on free loopback ports, slots spread by redis-cli."""

    def __init__(self, root: Path) -> None:
        self.nodes = [
            RedisServer(
                root / f"node{i}",
                extra_args=[
                    *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
                    *("--cluster-node-timeout", "2000"),
                    # The default bus port (port + 10000) may be taken, or past 65535.
                    *("--cluster-port", str(free_port())),
                ],
            )
            for i in range(3)
        ]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        self.wait_ok()

    def wait_ok(self) -> None:
        deadline = time.monotonic() + 15
        while not all(self._ok(node) for node in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not reach cluster_state:ok in 15 s")
            time.sleep(0.05)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    @staticmethod
    def _ok(node: RedisServer) -> bool:
        client = redis.Redis(port=node.port)
        try:
            return bool(client.cluster("info").get("cluster_state") == "ok")
        finally:
            client.close()

    def owner(self, key: str) -> RedisServer:
        """The master serving ``key``'s slot, asked of the cluster itself."""
        client = redis.Redis(port=self.nodes[0].port)
        try:
            slot = int(client.cluster("keyslot", key))
            for start, end, primary, *_ in client.cluster("slots"):
                if start <= slot <= end:
                    return next(n for n in self.nodes if n.port == int(primary[1]))
        finally:
            client.close()
        raise AssertionError(f"no node serves {key}")

    def move(self, key: str, to: RedisServer) -> None:
        """Give ``key``'s slot, with no keys in it, to ``to``, as a resharding does."""
        source = self.owner(key)
        if source is to:
            return  # already there (a test that failed before its move, in its finally)
        clients = {node.port: redis.Redis(port=node.port) for node in self.nodes}
        try:
            slot = int(clients[to.port].cluster("keyslot", key))
            ids = {port: c.cluster("myid") for port, c in clients.items()}
            clients[to.port].cluster("setslot", slot, "importing", ids[source.port])
            clients[source.port].cluster("setslot", slot, "migrating", ids[to.port])
            for port in sorted(clients, key=lambda p: (p != to.port, p != source.port)):
                clients[port].cluster("setslot", slot, "node", ids[to.port])
        finally:
            for client in clients.values():
                client.close()

    @contextlib.contextmanager
    def migrating(self, key: str) -> Iterator[RedisServer]:
        """``key``'s slot half-way through a resharding to another node: its owner
        MIGRATING, the other IMPORTING (each key moves on its own); stable again after."""
        source = self.owner(key)
        to = next(node for node in self.nodes if node is not source)
        clients = {node.port: redis.Redis(port=node.port) for node in (source, to)}
        try:
            slot = int(clients[to.port].cluster("keyslot", key))
            ids = {port: c.cluster("myid") for port, c in clients.items()}
            clients[to.port].cluster("setslot", slot, "importing", ids[source.port])
            clients[source.port].cluster("setslot", slot, "migrating", ids[to.port])
            yield source
        finally:
            for client in clients.values():
                client.cluster("setslot", slot, "stable")
                client.close()

    def flush(self) -> None:
        for node in self.nodes:
            client = redis.Redis(port=node.port)
            try:
                client.flushall()
            finally:
                client.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    _require_binaries()
    running = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        running.start()
        yield running
    finally:
        running.stop()


@pytest.fixture
def fresh_cluster(cluster: Cluster) -> Cluster:
    cluster.flush()
    return cluster


def _direct(node: RedisServer) -> redis.asyncio.Redis:
    """A plain client on one node: a key it reads is stored on that very node."""
    return redis.asyncio.Redis(port=node.port)


async def _dead(cluster: Cluster, keys: Keys) -> list[dict[str, Any]]:
    client = _direct(cluster.owner(keys.dead))
    try:
        return [orjson.loads(r) for r in await client.lrange(keys.dead, 0, -1)]
    finally:
        await client.aclose()


async def _left_in(cluster: Cluster, keys: Keys) -> dict[str, int]:
    """What is still pending, waiting or in flight, read on the slot's owner."""
    client = _direct(cluster.owner(keys.queue))
    try:
        return {
            "queue": await client.llen(keys.queue),
            "delayed": await client.zcard(keys.delayed),
            "workers": await client.zcard(keys.workers),
            "inflight": len(await client.keys(keys.inflight_prefix + "*")),
            "held": len(await client.keys(keys.held_prefix + "*")),
            "sessions": await client.hlen(keys.sessions),
        }
    finally:
        await client.aclose()


DRAINED = {"queue": 0, "delayed": 0, "workers": 0, "inflight": 0, "held": 0, "sessions": 0}


async def test_delivered_dead_lettered_and_retried_on_a_cluster(
    fresh_cluster: Cluster, standin: StandIn
) -> None:
    keys = Keys("forwarder")
    producer = Producer.from_url(fresh_cluster.url, cluster=True)
    try:
        visitors = ["ok-1", "ok-2", "bad-1", "flaky1-1"]
        ids = await producer.enqueue_many(make_update("123", v, "s1", BODY) for v in visitors)
    finally:
        await producer.aclose()
    settings = fast_settings(fresh_cluster.url, standin, redis_cluster=True)
    async with running(settings):
        await standin.wait_for(lambda api: len(api.delivered) == 3, 10)
        await wait_until(lambda: _dead_is(fresh_cluster, keys, 1), 5, "a dead letter")
    delivered = sorted(r.visitor_id for r in standin.delivered)
    assert delivered == ["flaky1-1", "ok-1", "ok-2"]
    assert [r.status for r in standin.requests if r.visitor_id == "flaky1-1"] == [503, 200]
    [record] = await _dead(fresh_cluster, keys)
    assert (record["id"], record["reason"], record["status"]) == (ids[2], "client_error", 400)
    assert await _left_in(fresh_cluster, keys) == DRAINED


async def _registered(cluster: Cluster, keys: Keys) -> bool:
    return bool((await _left_in(cluster, keys))["workers"])


async def _dead_is(cluster: Cluster, keys: Keys, n: int) -> bool:
    return len(await _dead(cluster, keys)) >= n


def _queues_on_every_node(cluster: Cluster) -> list[str]:
    """One queue name per master, so the workers below really spread over the cluster."""
    by_port: dict[int, str] = {}
    for i in range(200):
        name = f"tenant{i}"
        by_port.setdefault(cluster.owner(Keys(name).queue).port, name)
        if len(by_port) == len(cluster.nodes):
            return list(by_port.values())
    raise AssertionError("200 names never covered every master")


async def test_queues_spread_over_the_masters_each_drained_on_its_own_node(
    fresh_cluster: Cluster, standin: StandIn
) -> None:
    names = _queues_on_every_node(fresh_cluster)
    # The blocking enqueue path (forwarder enqueue, SyncProducer) as well as the async one.
    for name in names:
        producer = SyncProducer.from_url(fresh_cluster.url, queue=name, cluster=True)
        try:
            producer.enqueue_many(
                make_update("123", f"ok-{name}-{i}", "s", BODY) for i in range(20)
            )
        finally:
            producer.close()
    owners = {fresh_cluster.owner(Keys(name).queue).port for name in names}
    assert len(owners) == 3
    for name in names:
        client = _direct(fresh_cluster.owner(Keys(name).queue))
        try:
            assert await client.llen(Keys(name).queue) == 20
        finally:
            await client.aclose()

    async with contextlib.AsyncExitStack() as workers:
        for name in names:
            settings = fast_settings(fresh_cluster.url, standin, redis_cluster=True, queue=name)
            await workers.enter_async_context(running(settings))
        await standin.wait_for(lambda api: len(api.delivered) == 60, 15)
    expected = sorted(f"ok-{name}-{i}" for name in names for i in range(20))
    assert sorted(r.visitor_id for r in standin.delivered) == expected
    for name in names:
        assert await _left_in(fresh_cluster, Keys(name)) == DRAINED


def _pings(node: RedisServer) -> int:
    client = redis.Redis(port=node.port)
    try:
        stats = client.info("commandstats").get("cmdstat_ping", {})
        return int(stats.get("calls", 0))
    finally:
        client.close()


async def test_readyz_pings_the_node_that_serves_the_queue(fresh_cluster: Cluster) -> None:
    client = redis.asyncio.RedisCluster.from_url(fresh_cluster.url)
    try:
        await client.initialize()
        default = client.get_default_node().port
        name = next(
            n
            for n in _queues_on_every_node(fresh_cluster)
            if fresh_cluster.owner(Keys(n).queue).port != default
        )
        owner = fresh_cluster.owner(Keys(name).queue)
        port = free_port()
        settings = Settings(
            redis_url=fresh_cluster.url,
            redis_cluster=True,
            queue=name,
            metrics_port=port,
            metrics_host="127.0.0.1",
        )
        before = _pings(owner)
        async with (
            listening(settings, Metrics(), client, lambda: None),
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/readyz") as resp,
        ):
            assert resp.status == 200
        # Its own PING, not the default node's: that one may be up while this is down.
        assert _pings(owner) > before
    finally:
        await client.aclose()


async def test_a_dead_workers_messages_are_given_back_by_the_heartbeat_script(
    fresh_cluster: Cluster, standin: StandIn
) -> None:
    # The heartbeat script builds the dead worker's key names from a prefix inside Lua,
    # so they are not declared in KEYS: this proves they still resolve on the slot's node.
    keys = Keys("forwarder")
    client = redis.asyncio.RedisCluster.from_url(fresh_cluster.url)
    try:
        wire = [orjson.dumps(make_update("123", f"ok-{i}", "s", BODY)) for i in range(5)]
        await client.lpush(keys.queue, *wire)
        crashed = Queue(client, "forwarder", "crashed-worker")
        assert len(await crashed.claim(5)) == 5
        owner = _direct(fresh_cluster.owner(keys.queue))
        try:
            assert await owner.hlen(keys.inflight("crashed-worker")) == 5
        finally:
            await owner.aclose()
        async with running(fast_settings(fresh_cluster.url, standin, redis_cluster=True)):
            await standin.wait_for(lambda api: len(api.delivered) == 5, 10)
    finally:
        await client.aclose()
    assert sorted(r.visitor_id for r in standin.delivered) == [f"ok-{i}" for i in range(5)]
    assert await _left_in(fresh_cluster, keys) == DRAINED


def test_the_blocking_client_pipelines_like_forwarder_enqueue(fresh_cluster: Cluster) -> None:
    # forwarder enqueue batches LPUSHes in a non-transactional pipeline.
    client = sync_client(fresh_cluster.url, cluster=True)
    try:
        with client.pipeline(transaction=False) as pipe:
            for name in _queues_on_every_node(fresh_cluster):
                pipe.lpush(Keys(name).queue, b"a", b"b")
            assert pipe.execute() == [2, 2, 2]
    finally:
        client.close()


async def test_session_ordering_keeps_its_turns_on_the_queues_node(
    fresh_cluster: Cluster, standin: StandIn
) -> None:
    # Ordered claims and settles also name keys inside Lua (the held list of a session).
    keys = Keys("forwarder")
    pages = [f"page-{i}" for i in range(5)]
    producer = Producer.from_url(fresh_cluster.url, cluster=True)
    try:
        await producer.enqueue_many(
            make_update("123", "flaky1-v", "s1", {**BODY, "pageId": page}) for page in pages
        )
    finally:
        await producer.aclose()
    settings = fast_settings(fresh_cluster.url, standin, redis_cluster=True, ordering="session")
    async with running(settings):
        await standin.wait_for(lambda api: len(api.delivered) == 5, 15)
    assert [r.body["pageId"] for r in standin.delivered] == pages
    assert len(standin.requests) == 10  # each page: one 503, then the 200
    assert await _left_in(fresh_cluster, keys) == DRAINED


async def test_a_large_batch_is_one_transaction_on_the_queues_node(
    fresh_cluster: Cluster,
) -> None:
    updates = [make_update("1", f"v{i}", "s", {"pageId": "p"}) for i in range(2500)]
    producer = Producer.from_url(fresh_cluster.url, cluster=True)
    try:
        ids = await producer.enqueue_many(updates)
    finally:
        await producer.aclose()
    sync = SyncProducer.from_url(fresh_cluster.url, cluster=True)
    try:
        ids += sync.enqueue_many(updates)
    finally:
        sync.close()
    client = sync_client(fresh_cluster.url, cluster=True)
    try:
        queued = [
            orjson.loads(r)["id"] for r in reversed(client.lrange(Keys("forwarder").queue, 0, -1))
        ]
    finally:
        client.close()
    assert queued == ids


async def test_a_batch_sent_to_a_moved_slots_old_owner_lands_nowhere_and_a_retry_lands(
    fresh_cluster: Cluster,
) -> None:
    key = Keys("forwarder").queue
    old = fresh_cluster.owner(key)
    new = next(node for node in fresh_cluster.nodes if node is not old)
    updates = [make_update("1", f"v{i}", "s", BODY) for i in range(1500)]  # several LPUSHes
    producer = Producer.from_url(fresh_cluster.url, cluster=True)
    sync = SyncProducer.from_url(fresh_cluster.url, cluster=True)
    try:
        await producer.client.initialize()  # both clients now hold the slot map
        fresh_cluster.move(key, new)
        with pytest.raises(QueueUnavailable) as caught:
            sync.enqueue_many(updates)
        assert isinstance(caught.value.__cause__, redis.exceptions.MovedError)
        with pytest.raises(QueueUnavailable):
            await producer.enqueue_many(updates)
        # The refusal refreshed each client's slot map: the retry goes to the new owner.
        ids = sync.enqueue_many(updates) + await producer.enqueue_many(updates)
        on_new, on_old = redis.Redis(port=new.port), redis.Redis(port=old.port)
        try:
            queued = [orjson.loads(r)["id"] for r in reversed(on_new.lrange(key, 0, -1))]
            assert on_old.dbsize() == 0
        finally:
            on_new.close()
            on_old.close()
        assert queued == ids
    finally:
        await producer.aclose()
        sync.close()
        fresh_cluster.flush()
        fresh_cluster.move(key, old)


@contextlib.contextmanager
def _uncovered(cluster: Cluster, key: str) -> Iterator[None]:
    """No master serves ``key``'s slot for the block (as after losing a master that had no
    replica), then its owner takes it back."""
    owner = cluster.owner(key)
    clients = [redis.Redis(port=node.port) for node in cluster.nodes]
    try:
        slot = int(clients[0].cluster("keyslot", key))
        for client in clients:
            client.cluster("delslots", slot)
        yield
    finally:
        redis.Redis(port=owner.port).cluster("addslots", slot)
        cluster.wait_ok()
        for client in clients:
            client.close()


async def test_a_slot_no_master_serves_is_an_outage_the_worker_rides_out(
    fresh_cluster: Cluster, standin: StandIn
) -> None:
    keys = Keys("forwarder")
    port = free_port()
    settings = fast_settings(fresh_cluster.url, standin, redis_cluster=True, metrics_port=port)
    readyz = f"http://127.0.0.1:{port}/readyz"
    async with running(settings) as worker, aiohttp.ClientSession() as session:
        await wait_until(lambda: _registered(fresh_cluster, keys), 5, "the worker's heartbeat")
        with _uncovered(fresh_cluster, keys.queue):
            # Claims, heartbeats and promotions fail: first CLUSTERDOWN, then, as the
            # client learns the layout again, RedisClusterException (no RedisError).
            await asyncio.sleep(1.5)
            assert not worker.stopping
            async with session.get(readyz) as resp:
                assert resp.status == 503
                assert (await resp.json())["reason"] == "redis_unavailable"
        producer = Producer.from_url(fresh_cluster.url, cluster=True)
        try:
            await producer.enqueue_many([make_update("123", "ok-after", "s1", BODY)])
        finally:
            await producer.aclose()
        await standin.wait_for(lambda api: len(api.delivered) == 1, 10)
        async with session.get(readyz) as resp:
            assert resp.status == 200
    assert not worker.failed


async def test_a_whole_cluster_down_is_an_outage_the_worker_rides_out(
    fresh_cluster: Cluster, standin: StandIn
) -> None:
    keys = Keys("forwarder")
    settings = fast_settings(fresh_cluster.url, standin, redis_cluster=True)
    async with running(settings) as worker:
        await wait_until(lambda: _registered(fresh_cluster, keys), 5, "the worker's heartbeat")
        producer = Producer.from_url(fresh_cluster.url, cluster=True)
        update = make_update("123", "ok-after", "s1", BODY)
        try:
            for node in fresh_cluster.nodes:
                node.stop()
            try:
                # No node answers: the client cannot learn the layout (RedisClusterException).
                await asyncio.sleep(1.5)
                assert not worker.stopping
                with pytest.raises(QueueUnavailable):
                    await producer.enqueue_many([update])
            finally:
                for node in fresh_cluster.nodes:
                    node.start()
            fresh_cluster.wait_ok()
            await producer.enqueue_many([update])
        finally:
            await producer.aclose()
        await standin.wait_for(lambda api: len(api.delivered) == 1, 15)
    assert not worker.failed


async def test_a_claim_while_the_queues_slot_migrates_loses_nothing(
    fresh_cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Mid-resharding, a script may not create a key on the slot's old owner (Redis
    # answers "non local key"), and a script's writes before an error stay done: a claim
    # that popped, then put back what passed its byte budget into the key the pop had
    # emptied, lost both.
    monkeypatch.setattr(queue_module, "CLAIM_BYTES", 10)
    keys = Keys("forwarder")
    client = _direct(fresh_cluster.owner(keys.queue))
    try:
        queue = Queue(client, "forwarder", "w1")
        await client.lpush(keys.queue, b"a")
        await queue.claim(1)  # the worker's keys now exist on the owner
        await client.lpush(keys.queue, b"x" * 8, b"y" * 8)  # over the budget together
        with fresh_cluster.migrating(keys.queue):
            assert [c.raw for c in await queue.claim(10)] == [b"x" * 8]
            assert await client.lrange(keys.queue, 0, -1) == [b"y" * 8]
    finally:
        await client.aclose()


async def test_an_ordered_claim_while_the_queues_slot_migrates_takes_nothing(
    fresh_cluster: Cluster,
) -> None:
    # The later updates of a session wait in a held list the claim creates: refused
    # mid-resharding, after the pop, that lost them. Now refused before it.
    keys = Keys("forwarder")
    client = _direct(fresh_cluster.owner(keys.queue))
    try:
        await client.lpush(
            keys.queue, *[encode(make_update("1", "v", "s", BODY))[1] for _ in range(3)]
        )
        queue = Queue(client, "forwarder", "w1", ordered=True)
        assert len(await queue.claim(1)) == 1  # takes the session's turn
        with fresh_cluster.migrating(keys.queue):
            with pytest.raises(redis.exceptions.ResponseError, match="non local key"):
                await queue.claim(10)
            assert await client.llen(keys.queue) == 2
    finally:
        await client.aclose()


def test_a_worker_without_the_cluster_flag_on_a_cluster_node_stops(
    fresh_cluster: Cluster,
) -> None:
    # A plain client follows no MOVED: waiting would last for ever.
    other = next(
        n for n in fresh_cluster.nodes if n is not fresh_cluster.owner(Keys("forwarder").queue)
    )
    result = forwarder("worker", FORWARDER_REDIS_URL=other.url, FORWARDER_METRICS_PORT="0")
    assert result.returncode == 1
    assert b"Redis refused: MovedError" in result.stderr


async def test_a_busy_node_while_the_producer_maps_the_cluster_is_queue_unavailable(
    fresh_cluster: Cluster,
) -> None:
    # redis-py says "Cluster mode is not enabled" of any error reply to CLUSTER SLOTS:
    # BUSY (another client's long script) was taken for a setting to fix.
    seed = fresh_cluster.nodes[0]
    admin = redis.Redis(port=seed.port)
    admin.config_set("busy-reply-threshold", 100)
    busy = asyncio.create_task(asyncio.to_thread(run_busy_script, seed.url))
    try:
        await asyncio.sleep(0.5)
        producer = Producer.from_url(fresh_cluster.url, cluster=True)
        try:
            with pytest.raises(QueueUnavailable, match="did not take the batch"):
                await producer.enqueue("1", "v", "s", BODY)
            await busy
            await producer.enqueue("1", "v", "s", BODY)
        finally:
            await producer.aclose()
    finally:
        await busy
        admin.config_set("busy-reply-threshold", 5000)
        admin.close()


def test_a_user_denied_the_cluster_layout_is_told_so(fresh_cluster: Cluster) -> None:
    # redis-py says "Cluster mode is not enabled" of any error reply to CLUSTER SLOTS: the
    # CLI said the cluster flag was wrong, where Redis' ACL said NOPERM.
    seed = fresh_cluster.nodes[0]
    admin = redis.Redis(port=seed.port)
    admin.acl_setuser(
        "nolayout", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-cluster"]
    )
    try:
        url = f"redis://nolayout:pw@127.0.0.1:{seed.port}/0"
        result = forwarder("stats", FORWARDER_REDIS_URL=url, FORWARDER_REDIS_CLUSTER="true")
    finally:
        admin.acl_deluser("nolayout")
        admin.close()
    assert result.returncode == 1
    assert b"Redis refused: NoPermissionError" in result.stderr


@pytest.mark.parametrize("ordering", ["none", "session"])
async def test_a_worker_waits_out_a_resharding_of_its_queues_slot(
    fresh_cluster: Cluster, standin: StandIn, ordering: str
) -> None:
    # Mid-resharding, settles meet TRYAGAIN until redis-py gives up (ClusterError), and
    # an ordered claim a held list the old owner may not create: each ended the worker.
    keys = Keys("forwarder")
    direct = _direct(fresh_cluster.owner(keys.queue))
    try:
        slow = [make_update("1", f"slow1500-v{i}", f"s{i}", BODY) for i in range(3)]
        await direct.lpush(keys.queue, *[encode(update)[1] for update in slow])
        settings = fast_settings(
            fresh_cluster.url,
            standin,
            redis_cluster=True,
            ordering=ordering,
            claim_batch=1,
            concurrency=1,
        )
        async with running(settings) as worker:
            await standin.wait_for(lambda api: len(api.requests) >= 1, 10)
            with fresh_cluster.migrating(keys.queue):
                later = [make_update("1", f"w{i}", f"t{i}", BODY) for i in range(3)]
                await direct.lpush(keys.queue, *[encode(update)[1] for update in later])
                await asyncio.sleep(4)
                assert not worker.stopping
            await standin.wait_for(lambda api: len(api.delivered) == 6, 30)
        assert not worker.failed
    finally:
        await direct.aclose()
