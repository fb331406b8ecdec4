"""One MULTI/EXEC whose commands go out as they are made, on one pinned connection.

redis-py's pipelines hold a whole transaction and pack it at once: a producer pushing
100,000 updates would keep all of them (some 70 MB) alive until the end, and on a VM
the page faults for that memory cost as much as the encoding. Here each command is sent
when it is made and Redis queues it; EXEC then applies all of them or none.

Anything that goes wrong before EXEC is sent (a bad update found half way, an error
reply, Ctrl-C, a lost connection) closes the connection, and Redis discards the
transaction of a client that is gone: nothing lands. Once EXEC is sent, Redis applies
the whole transaction even if its reply is never read: an error then (a lost reply,
Ctrl-C) may mean all of it landed, never part. Commands are packed by hiredis, as
redis-py's blocking client does; its asyncio client packs in Python, at a microsecond a
value.

The connection's health is checked once, before MULTI, and not again until EXEC's
reply: redis-py checks it on a send when its interval has passed since the last reply,
and a PING sent inside the transaction reads MULTI's reply instead of its own (and,
with a client that retries on connection errors, the reconnect would send the rest
outside any transaction). A batch may take longer to stream than that interval.

    with transaction(client, key) as send:
        for chunk in chunks:
            send("LPUSH", key, *chunk)

MULTI's own reply is read before any command is sent (one round trip): refused (an ACL
without ``+multi``), the commands would each be applied on their own, as they arrive.

A cluster client's transaction runs on the node serving ``key``; a reply saying the
slot has moved refreshes the client's slot map before it is raised, so a retry goes to
the new owner.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Protocol, cast

import hiredis
import redis
import redis.asyncio
import redis.asyncio.connection
import redis.exceptions

from forwarder.connections import AsyncRedis, SyncRedis, cluster_node, slot_owner

Send = Callable[..., None]
AsyncSend = Callable[..., Awaitable[None]]
AsyncConnection = redis.asyncio.connection.AbstractConnection


class _Connection(Protocol):
    """What is used here of redis-py's blocking connection (untyped there)."""

    def send_command(self, *args: Any, check_health: bool = True) -> None: ...
    def send_packed_command(self, command: list[bytes], check_health: bool = True) -> None: ...
    def check_health(self) -> None: ...
    def read_response(self) -> Any: ...
    def disconnect(self) -> None: ...


@contextmanager
def transaction(client: SyncRedis, key: str) -> Iterator[Send]:
    """``send(*command)`` for one transaction on ``key``'s node, applied on a clean exit."""
    target = _sync_node(client, key)
    pool = target.connection_pool
    conn = cast(_Connection, pool.get_connection())
    try:
        conn.check_health()
        conn.send_command("MULTI", check_health=False)
        conn.read_response()  # refused: raises before any command goes out
        sent = 0

        def send(*command: Any) -> None:
            nonlocal sent
            conn.send_packed_command([hiredis.pack_command(command)], check_health=False)
            sent += 1

        yield send
        conn.send_command("EXEC", check_health=False)
        for _ in range(sent):  # QUEUED each (an error reply raises)
            conn.read_response()
        _raise_any(conn.read_response())
    except BaseException as exc:
        conn.disconnect()
        if isinstance(exc, redis.exceptions.AskError) and isinstance(client, redis.RedisCluster):
            client.nodes_manager.initialize()
        raise
    finally:
        pool.release(conn)  # type: ignore[arg-type]


@asynccontextmanager
async def async_transaction(client: AsyncRedis, key: str) -> AsyncIterator[AsyncSend]:
    """The asyncio twin of :func:`transaction`."""
    acquire, release = await _async_node(client, key)
    conn = await acquire()
    try:
        await conn.check_health()  # type: ignore[no-untyped-call]
        await conn.send_command("MULTI", check_health=False)
        await conn.read_response()  # refused: raises before any command goes out
        sent = 0

        async def send(*command: Any) -> None:
            nonlocal sent
            await conn.send_packed_command([hiredis.pack_command(command)], check_health=False)
            sent += 1

        yield send
        await conn.send_command("EXEC", check_health=False)
        for _ in range(sent):
            await conn.read_response()
        _raise_any(await conn.read_response())
    except BaseException as exc:
        await conn.disconnect()
        if isinstance(exc, redis.exceptions.AskError) and isinstance(
            client, redis.asyncio.RedisCluster
        ):
            await client.nodes_manager.initialize()
        raise
    finally:
        await release(conn)


def _raise_any(results: list[Any]) -> None:
    """Raise the first error among EXEC's results (one per command, errors not raised)."""
    for result in results:
        if isinstance(result, Exception):
            raise result


def _sync_node(client: SyncRedis, key: str) -> redis.Redis:
    if isinstance(client, redis.RedisCluster):
        return cast(redis.Redis, slot_owner(client, key).redis_connection)
    return client


async def _async_node(
    client: AsyncRedis, key: str
) -> tuple[Callable[[], Awaitable[AsyncConnection]], Callable[[AsyncConnection], Awaitable[None]]]:
    """How to take a connection to ``key``'s node and give it back."""
    if isinstance(client, redis.asyncio.RedisCluster):
        node = await cluster_node(client, key)

        async def take() -> AsyncConnection:
            return node.acquire_connection()

        async def give(conn: AsyncConnection) -> None:
            node.release(conn)  # type: ignore[arg-type]  # a cluster node's own Connection

        return take, give
    pool = client.connection_pool
    return pool.get_connection, pool.release
