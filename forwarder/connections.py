"""Redis connections, built from the settings in one place: one server, Sentinel or Cluster.

``FORWARDER_REDIS_URL`` names the deployment:

- ``redis://[[user]:password@]host:6379/0`` (``rediss://`` for TLS): one server, or the
  seed node of a Redis Cluster when ``FORWARDER_REDIS_CLUSTER`` is true (db 0 only);
- ``redis+sentinel://[[user]:password@]host:26379[,host2:26379...]/<master name>[/db]``
  (``rediss+sentinel://`` for TLS to the sentinels and the master): a Sentinel set. The
  client asks the sentinels for the current master on every new connection, so workers
  follow a failover without a restart.

A password in the URL or in ``FORWARDER_REDIS_PASSWORD`` is the data nodes' password;
sentinels that require their own get ``FORWARDER_REDIS_SENTINEL_PASSWORD``.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar, cast
from urllib.parse import SplitResult, unquote, urlsplit

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.connection
import redis.exceptions
import redis.retry
import redis.sentinel
from pydantic import SecretStr
from redis.asyncio.cluster import ClusterNode
from redis.backoff import NoBackoff

if TYPE_CHECKING:
    from forwarder.settings import Settings

__all__ = [
    "CLUSTER_UNREACHABLE",
    "REDIS_CALL_FAILED",
    "REDIS_FAILURES",
    "UNREACHABLE",
    "AsyncRedis",
    "SentinelTarget",
    "SyncRedis",
    "async_client",
    "check_redis_url",
    "cluster_mode_disabled",
    "eviction_policy",
    "is_cluster",
    "node_answer",
    "parse_sentinel_url",
    "redis_client",
    "redis_outage",
    "setting_refused",
    "sync_client",
    "sync_redis_client",
]

# Where redis-py's cluster client cannot learn the cluster's layout (no node answers, a
# slot no master serves, nodes that disagree mid-resharding) it raises this, which is no
# RedisError: an outage, unless a node's refusal lies behind it (see redis_outage).
CLUSTER_UNREACHABLE = redis.exceptions.RedisClusterException
# Any failed Redis call: Redis' refusals and lost connections, and the cluster client's.
REDIS_FAILURES = (redis.exceptions.RedisError, CLUSTER_UNREACHABLE)
# The same, and what the asyncio client lets through unwrapped (a socket's OSError,
# asyncio's TimeoutError): for code that must survive any failed call.
REDIS_CALL_FAILED = (*REDIS_FAILURES, OSError)


def cluster_mode_disabled(exc: BaseException) -> bool:
    """Whether ``exc`` says the cluster's node is no cluster node: a misconfiguration
    (``FORWARDER_REDIS_CLUSTER`` against a lone Redis), never an outage to wait out."""
    # redis-py says "Cluster mode is not enabled" of any error reply to CLUSTER SLOTS
    # (BUSY, NOPERM too), raised from that reply: the node's own words tell.
    answer = node_answer(exc) if isinstance(exc, CLUSTER_UNREACHABLE) else None
    return answer is not None and "cluster support disabled" in str(answer)


def setting_refused(exc: BaseException) -> bool:
    """Whether ``exc`` says a setting is wrong: the credentials, the server's TLS
    certificate, or the cluster flag (see :func:`cluster_mode_disabled`). Waiting would
    not mend it: settings are read at start."""
    if cluster_mode_disabled(exc):
        return True
    if isinstance(exc, _NO_MASTER):
        # redis-py folds what each sentinel answered into the text, with no chain.
        return "AuthenticationError" in str(exc)
    return any(isinstance(cause, _SETTINGS_REFUSED) for cause in _causes(exc))


# Sentinel's "no master", of the blocking client and of the asyncio one.
_NO_MASTER = (redis.sentinel.MasterNotFoundError, redis.asyncio.sentinel.MasterNotFoundError)
# The node's refusal of the credentials (WRONGPASS, NOAUTH, and redis-py's own for an
# AUTH it may not send), and a certificate TLS could not verify (which redis-py wraps in
# a ConnectionError): errors of ConnectionError's family that no wait mends.
_SETTINGS_REFUSED = (
    redis.exceptions.AuthenticationError,
    redis.exceptions.AuthorizationError,
    ssl.SSLCertVerificationError,
)
# Redis not there, or not answering in time: unreachable or timed out (Sentinel's
# MasterNotFoundError is a ConnectionError), or the cluster client unable to learn the
# layout (no node answers, a slot no master serves). An outage, unless a setting is
# wrong (see setting_refused) or a node's refusal lies behind it.
UNREACHABLE = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    CLUSTER_UNREACHABLE,
    OSError,
)
# Error replies that pass: a fail-over (a master demoted behind the same address answers
# READONLY, or MASTERDOWN where it serves no stale data; a cluster CLUSTERDOWN or
# TRYAGAIN), a Redis out of memory under noeviction until the workers drain it.
_OUTAGE_REPLIES = (
    redis.exceptions.ReadOnlyError,
    redis.exceptions.ClusterDownError,  # MasterDownError too
    redis.exceptions.TryAgainError,
    redis.exceptions.OutOfMemoryError,
)
# The same, where redis-py has no class: BUSY while another client's script runs past
# busy-reply-threshold; NOREPLICAS while fewer replicas than min-replicas-to-write are
# in touch (one restarting, one still loading its first copy).
_PASSING_REPLIES = ("BUSY ", "NOREPLICAS ")


# A cluster's slot on its way between nodes: AskError (MOVED too, from a transaction),
# and redis-py's ClusterError once its redirects and retries are spent.
_SLOT_MOVING = (redis.exceptions.AskError, redis.exceptions.ClusterError)
_NON_LOCAL_KEY = "Script attempted to access a non local key"


def redis_outage(exc: BaseException, *, cluster: bool) -> bool:
    """Whether ``exc`` is an outage, which workers wait out and producers report as
    ``QueueUnavailable``, rather than a refusal to raise (``WRONGTYPE``, ``NOPERM``, a
    wrong setting). ``cluster``: it came from a cluster client."""
    if setting_refused(exc):
        return False
    answer = node_answer(exc) or exc
    # First: MASTERDOWN is a ClusterError to redis-py, and passes for any client.
    if isinstance(answer, _OUTAGE_REPLIES):
        return True
    reply = isinstance(answer, redis.exceptions.ResponseError)
    if reply and str(answer).startswith(_PASSING_REPLIES):
        return True
    if isinstance(answer, _SLOT_MOVING) or _NON_LOCAL_KEY in str(answer):
        # A cluster client follows redirects and waits out a resharding (ASK, MOVED,
        # TRYAGAIN until it gives up; a script may not create a key on the slot's old
        # owner meanwhile); a plain client follows none: it is pointed at a cluster.
        return cluster
    return not reply and isinstance(exc, UNREACHABLE)


def is_cluster(client: object) -> bool:
    """Whether ``client`` is redis-py's cluster client (blocking or asyncio)."""
    return isinstance(client, redis.RedisCluster | redis.asyncio.RedisCluster)


def node_answer(exc: BaseException) -> redis.exceptions.ResponseError | None:
    """The node's error reply behind ``exc``: itself, or where redis-py's cluster client
    raised its own exception from it."""
    if not isinstance(exc, CLUSTER_UNREACHABLE):
        return exc if isinstance(exc, redis.exceptions.ResponseError) else None
    for cause in _causes(exc):
        if isinstance(cause, redis.exceptions.ResponseError):
            return cause
    return None


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what redis-py raised it from or while handling, down to the first
    error not redis-py's (an OSError, an SSL error): past that lies the context of
    whoever called it, which says nothing of this call."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        yield cause
        if not isinstance(cause, REDIS_FAILURES):
            return
        context = None if cause.__suppress_context__ else cause.__context__
        cause = cause.__cause__ or context


AsyncRedis: TypeAlias = redis.asyncio.Redis | redis.asyncio.RedisCluster
SyncRedis: TypeAlias = redis.Redis | redis.RedisCluster
T = TypeVar("T")

# Longer than any blocking pop the worker makes, so a silent network shows as an error
# instead of a hang.
SOCKET_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0
SENTINEL_PORT = 26379
# maxmemory policies under which Redis, out of memory, may drop keys that never expire:
# the queue's, and the messages in them.
EVICTING_POLICIES = frozenset({"allkeys-lru", "allkeys-lfu", "allkeys-random"})
SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}
PLAIN_SCHEMES = {"redis", "rediss"}
_ENCODE_HINT = "(percent-encode any / ? # @ in the password)"
UNREADABLE = f"host:port expected {_ENCODE_HINT}"


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """A ``redis+sentinel://`` URL taken apart."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int
    username: str | None
    password: str | None
    ssl: bool


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Take a ``redis+sentinel://`` URL apart; ``ValueError`` says what is wrong with it."""
    parts = urlsplit(url)
    if parts.scheme not in SENTINEL_SCHEMES:
        raise ValueError(f"not a Sentinel URL (scheme {parts.scheme!r})")
    if parts.query or parts.fragment:
        raise ValueError("a Sentinel URL takes no query string or fragment")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    sentinels = tuple(_host_port(one) for one in hostlist.split(","))
    service, _, db = parts.path.lstrip("/").partition("/")
    if not service:
        raise ValueError("a Sentinel URL needs the master's name as its path: .../mymaster/0")
    if db and not db.isdigit():
        raise ValueError(f"the database after the master name must be a number, not {db!r}")
    return SentinelTarget(
        sentinels=sentinels,
        service=unquote(service),
        db=int(db or 0),
        username=unquote(username) or None,
        password=unquote(password) or None,
        ssl=SENTINEL_SCHEMES[parts.scheme],
    )


def has_address(parts: SplitResult) -> bool:
    """Whether ``parts`` has a host, and a port that is a number if any."""
    try:
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError:
        return False
    return bool(parts.hostname)


def _host_port(text: str) -> tuple[str, int]:
    # urlsplit's .hostname/.port cannot read a comma-separated host list, so each
    # entry is parsed as the authority of a URL of its own.
    # Never quoted in the error: a password with an unencoded / or ? ends up here.
    one = urlsplit(f"//{text}")
    try:
        port = one.port
    except ValueError:
        raise ValueError(f"bad sentinel address: {UNREADABLE}") from None
    if not one.hostname:
        raise ValueError(f"empty sentinel address: {UNREADABLE}")
    return one.hostname, port or SENTINEL_PORT


def check_redis_url(
    url: str, *, cluster: bool, password: bool, sentinel_password: bool, blocking: bool = False
) -> None:
    """Refuse combinations that would otherwise fail late or be silently ignored.

    ``password`` and ``sentinel_password`` say whether those settings are given;
    ``blocking``, that the URL is for redis-py's blocking client, not its asyncio one.
    """
    parts = urlsplit(url)
    if parts.scheme in SENTINEL_SCHEMES:
        target = parse_sentinel_url(url)
        if cluster:
            raise ValueError("Redis Cluster mode cannot use a Sentinel URL")
        if password and target.password:
            raise ValueError("the Redis password is given both in the URL and on its own")
        return
    if sentinel_password:
        raise ValueError("a sentinel password needs a redis+sentinel:// URL")
    if parts.scheme not in PLAIN_SCHEMES and not (parts.scheme == "unix" and not cluster):
        raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r}")
    if parts.scheme in PLAIN_SCHEMES:
        if not has_address(parts):
            raise ValueError(f"bad Redis address: {UNREADABLE}")
        db = parts.path.removeprefix("/")
        if db and not (db.isascii() and db.isdigit()):
            # redis-py ignores a path that is no number: that would be database 0.
            raise ValueError(f"the Redis URL's path must be a database number {_ENCODE_HINT}")
    try:
        # The query's values, checked as the client checks them when first used.
        redis.connection.parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    if password and parts.password:
        raise ValueError("the Redis password is given both in the URL and on its own")
    if cluster and parts.path.strip("/") not in ("", "0"):
        raise ValueError("Redis Cluster has only database 0")
    _check_options(url, cluster, blocking)


def _check_options(url: str, cluster: bool, blocking: bool) -> None:
    """Refuse a query option redis-py does not take: it hands each one to the connection
    (or the cluster client) as an argument, and would fail at the first connection."""
    pool = redis.ConnectionPool if blocking else redis.asyncio.ConnectionPool
    try:
        if cluster:
            # The asyncio class for both: the blocking one connects as it is built.
            redis.asyncio.RedisCluster.from_url(url)
        else:
            pool.from_url(url).make_connection()
    except TypeError as exc:
        # redis-py's words name the option ("unexpected keyword argument 'x'"), no value.
        name = re.search(r"argument ('[^']*')", str(exc))
        option = name[1] if name else str(exc)
        raise ValueError(f"the Redis URL has an option redis-py does not take: {option}") from None


def _common(password: str | None) -> dict[str, Any]:
    options: dict[str, Any] = {
        "decode_responses": False,
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_keepalive": True,
        "health_check_interval": 15,
    }
    if password is not None:
        options["password"] = password
    return options


class _AsyncSentinelRedis(redis.asyncio.Redis):
    """A master client that also closes its connections to the sentinels."""

    sentinels: redis.asyncio.sentinel.Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinels is not None:
            await self.sentinels.aclose()


class _SyncSentinelRedis(redis.Redis):
    """A master client that also closes its connections to the sentinels."""

    sentinels: redis.sentinel.Sentinel | None = None

    def close(self) -> None:
        super().close()
        if self.sentinels is not None:
            self.sentinels.close()


@dataclass(frozen=True, slots=True)
class _Family:
    """The redis-py classes of one flavour (asyncio or blocking); both build alike."""

    sentinel: Any
    sentinel_redis: Any
    cluster: Any
    plain: Any
    retry: Any


_ASYNC = _Family(
    redis.asyncio.sentinel.Sentinel,
    _AsyncSentinelRedis,
    redis.asyncio.RedisCluster,
    redis.asyncio.Redis,
    redis.asyncio.retry.Retry,
)
_SYNC = _Family(
    redis.sentinel.Sentinel, _SyncSentinelRedis, redis.RedisCluster, redis.Redis, redis.retry.Retry
)


def _client(
    family: _Family,
    url: str,
    cluster: bool,
    password: str | None,
    sentinel_password: str | None,
) -> Any:
    # Producers built from a URL get the settings' checks too: a wrong URL fails here,
    # not at the first enqueue (or never: a path that is no number would be database 0).
    check_redis_url(
        url,
        cluster=cluster,
        password=password is not None,
        sentinel_password=sentinel_password is not None,
        blocking=family is _SYNC,
    )
    if urlsplit(url).scheme in SENTINEL_SCHEMES:
        target = parse_sentinel_url(url)
        sentinel = family.sentinel(
            list(target.sentinels),
            sentinel_kwargs=_sentinel_options(target, sentinel_password),
            ssl=target.ssl,
            **_common(password or target.password),
        )
        master = sentinel.master_for(
            target.service,
            redis_class=family.sentinel_redis,
            db=target.db,
            username=target.username,
        )
        master.sentinels = sentinel
        return master
    if cluster:
        return family.cluster.from_url(url, **_common(password))
    # A master demoted behind the same address (a DNS name, a cloud primary endpoint)
    # answers READONLY: redis-py then drops that connection, as it does one that failed,
    # so the next finds the new master once the name points there. No retries, as by
    # default: a hung call would last twice as long. (Sentinel and Cluster clients follow
    # a fail-over themselves.)
    return family.plain.from_url(
        url,
        retry=family.retry(NoBackoff(), 0),
        retry_on_error=[redis.exceptions.ReadOnlyError],
        **_common(password),
    )


def async_client(
    url: str,
    *,
    cluster: bool = False,
    password: str | None = None,
    sentinel_password: str | None = None,
) -> AsyncRedis:
    """An asyncio client (bytes replies) for a URL of any form the module docstring lists."""
    return cast(AsyncRedis, _client(_ASYNC, url, cluster, password, sentinel_password))


def sync_client(
    url: str,
    *,
    cluster: bool = False,
    password: str | None = None,
    sentinel_password: str | None = None,
) -> SyncRedis:
    """The blocking twin of :func:`async_client`, for producers without an event loop."""
    return cast(SyncRedis, _client(_SYNC, url, cluster, password, sentinel_password))


def _sentinel_options(target: SentinelTarget, password: str | None) -> dict[str, Any]:
    # Sentinels get their own options: given any, redis-py stops copying the socket
    # timeouts from the master's, and the data nodes' password is not theirs.
    options: dict[str, Any] = {
        "socket_timeout": CONNECT_TIMEOUT,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "ssl": target.ssl,
    }
    if password is not None:
        options["password"] = password
    return options


def _secret(value: SecretStr | None) -> str | None:
    return None if value is None else value.get_secret_value()


def redis_client(settings: Settings) -> AsyncRedis:
    """The asyncio client for ``FORWARDER_REDIS_URL`` and the related settings."""
    return async_client(
        settings.redis_url,
        cluster=settings.redis_cluster,
        password=_secret(settings.redis_password),
        sentinel_password=_secret(settings.redis_sentinel_password),
    )


def sync_redis_client(settings: Settings) -> SyncRedis:
    """The blocking client for the same settings (``forwarder enqueue``)."""
    return sync_client(
        settings.redis_url,
        cluster=settings.redis_cluster,
        password=_secret(settings.redis_password),
        sentinel_password=_secret(settings.redis_sentinel_password),
    )


async def eviction_policy(client: AsyncRedis) -> str | None:
    """The server's ``maxmemory-policy`` (from ``INFO memory``); None where it does not say.

    On a cluster this asks one node: a cluster's nodes normally share their settings.
    """
    info = await client.info("memory")
    policy = info.get("maxmemory_policy") if isinstance(info, dict) else None
    return policy if isinstance(policy, str) else None


async def cluster_node(client: redis.asyncio.RedisCluster, key: str) -> ClusterNode:
    """The master serving ``key``'s slot, the layout learnt first if need be."""
    await client.initialize()
    return cast(ClusterNode, slot_owner(client, key))


def slot_owner(client: redis.RedisCluster | redis.asyncio.RedisCluster, key: str) -> Any:
    """The master serving ``key``'s slot, as ``client`` last learnt the cluster's layout;
    SlotNotCoveredError (one of the :data:`CLUSTER_UNREACHABLE`) if none does."""
    node = client.get_node_from_key(key)
    if node is None:  # the client raises instead; its signature allows None
        raise redis.exceptions.SlotNotCoveredError(f"no cluster node serves {key}'s slot")
    return node


async def ping(client: AsyncRedis, key: str) -> None:
    """PING the server holding ``key``: on a cluster its slot's master, where a plain PING
    would go to the client's default node, which may be up while the key's is down."""
    if isinstance(client, redis.asyncio.RedisCluster):
        await client.execute_command("PING", target_nodes=await cluster_node(client, key))
    else:
        await client.ping()


async def finishing(call: Awaitable[T]) -> T:
    """``call``'s result, even if this task is cancelled (a Ctrl-C) meanwhile.

    A command cancelled while its reply is awaited may still have run in Redis: the
    caller would not know, and could not report, what it did. Here it is awaited to its
    end; the cancellation stays requested, for :func:`raise_if_cancelled` to honour
    before the next step. A second cancellation stops the wait.
    """
    step = asyncio.ensure_future(call)
    try:
        return await asyncio.shield(step)
    except asyncio.CancelledError:
        return await step


def raise_if_cancelled() -> None:
    """Honour a cancellation (Ctrl-C, a stop) that redis-py swallowed.

    A cancel that lands in a command can come out of redis-py as a connection error, which
    its retry then absorbs: the command succeeds and the task goes on as if never
    cancelled (seen in a few percent of Ctrl-Cs during a replay). The request stays
    recorded on the task; call this after Redis calls in loops that must stop.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
