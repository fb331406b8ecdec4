"""Every setting of the forwarder, in one place (env prefix ``FORWARDER_``)."""

from __future__ import annotations

import re
from typing import Annotated, Literal, cast
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from forwarder.connections import check_redis_url, has_address
from forwarder.model import MAX_MESSAGE_BYTES


class Settings(BaseSettings):
    """Settings read from the environment; CLI flags override single fields."""

    # No NaN or infinity anywhere: a NaN retry delay made the settle script fail after it
    # had taken the message out of flight (lost); an infinite one parked it for good.
    model_config = SettingsConfigDict(env_prefix="FORWARDER_", extra="ignore", allow_inf_nan=False)

    redis_url: str = Field(
        default="redis://localhost:6379/0",
        description="redis:// or rediss:// (TLS) URL, with password and db; "
        "redis+sentinel://host:26379,host2:26379/mymaster/0 for a Sentinel set",
    )
    redis_password: SecretStr | None = Field(
        default=None,
        description="password of the Redis data nodes, when it is not in the URL",
    )
    redis_sentinel_password: SecretStr | None = Field(
        default=None, description="password of the sentinels themselves, if they have one"
    )
    redis_cluster: bool = Field(
        default=False,
        description="the URL is a seed node of a Redis Cluster (db 0 only)",
    )
    queue: str = Field(
        default="forwarder",
        min_length=1,
        pattern=r"^[^{}\s]+$",
        description="queue name; every key is `{<queue>}:...`",
    )
    api_base_url: str | None = Field(
        default=None,
        description="when set (e.g. `http://127.0.0.1:8080`), every request goes there, "
        "no domain lookup; an absolute `http(s)` URL without credentials; empty = unset",
    )
    domain_api_url: str = Field(
        default="https://api.liveperson.net",
        description="LivePerson Domain API, for the `msdkgw` host of each account; an "
        "absolute `http(s)` URL without credentials",
    )
    domain_cache_ttl: float = Field(
        default=3600.0, gt=0, description="seconds a looked-up host is cached per account"
    )
    api_scheme: Literal["https", "http"] = Field(
        default="https",
        description="scheme for hosts from the Domain API (`http` only for local stand-ins)",
    )
    concurrency: int = Field(
        default=64, ge=1, le=10_000, description="requests in flight per worker process"
    )
    retry_delays: Annotated[tuple[float, ...], NoDecode] = Field(
        default=(5.0, 10.0, 15.0),
        description="seconds before each retry; its length is the number of retries",
    )
    request_timeout: float = Field(
        default=10.0, gt=0, description="seconds for one PUT, whole (connect to last byte)"
    )
    shutdown_grace: float = Field(
        default=20.0,
        ge=0,
        description="seconds a stopping worker lets in-flight PUTs finish; the rest go back "
        "to the queue",
    )
    heartbeat_interval: float = Field(
        default=2.0, gt=0, description="seconds between a worker's heartbeats"
    )
    worker_timeout: float = Field(
        default=15.0,
        gt=0,
        description="seconds without a heartbeat after which a worker counts as dead and "
        "its in-flight messages go back to the queue",
    )
    # 64 rather than 256: a busy worker spent about 5 % less CPU a message (bench/,
    # 2026-11-30: 0.87 of the ceiling against 0.85), for 0.18 Redis commands a message
    # (Lua's own calls included).
    claim_batch: int = Field(
        default=64,
        ge=1,
        le=1000,
        description="most messages taken per claim round trip (and at most 4 MB of them); "
        "a worker holds at most `FORWARDER_CONCURRENCY` + twice this many",
    )
    ordering: Literal["none", "session"] = Field(
        default="none",
        description="`session`: one update in flight per (account, visitor, session), in "
        "enqueue order; see *Ordering*",
    )
    turn_timeout: float = Field(
        default=600.0,
        gt=0,
        description="seconds after which a session's turn, untouched, may be taken over",
    )
    max_message_bytes: int = Field(
        default=MAX_MESSAGE_BYTES,
        ge=1024,
        description="largest wire message; larger ones are refused by the producer and "
        "dead-lettered by the worker",
    )
    max_retry_after: float = Field(
        default=300.0,
        gt=0,
        description="most seconds a 429's Retry-After may make a message (and its host) wait",
    )
    breaker_window: int = Field(
        default=20, ge=1, description="recent attempts per API host the circuit breaker weighs"
    )
    breaker_min_calls: int = Field(
        default=10,
        ge=1,
        description="attempts in the window before the breaker may open (at most the window)",
    )
    breaker_failure_ratio: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="share of failed attempts (5xx, timeout, connection) that opens it",
    )
    breaker_cooldown: float = Field(
        default=1.0, gt=0, description="seconds open before the first probe request"
    )
    breaker_max_cooldown: float = Field(
        default=5.0,
        gt=0,
        description="cap of the cool-down, which doubles after each failed probe",
    )
    log_level: str = Field(
        default="info",
        pattern=r"^(?i:debug|info|warning|error)$",
        description="debug, info, warning or error",
    )
    log_format: str = Field(
        default="auto",
        pattern=r"^(auto|json|console)$",
        description="`json`, `console`, or `auto` (JSON unless stderr is a terminal)",
    )
    dead_max_len: int = Field(
        default=100_000,
        ge=0,
        description="most dead letters kept; workers drop the oldest beyond it (logged and "
        "counted); 0 = no cap",
    )
    dead_max_age: float | None = Field(
        default=None,
        gt=0,
        description="oldest dead letter kept, in seconds or a duration (`12h`, `7d`); workers "
        "drop older ones (logged and counted); unset or 0 = no cap",
    )
    metrics_host: str | None = Field(
        default=None,
        description="address the metrics and health listener binds; unset or empty = every "
        "interface, IPv4 and IPv6 (probes on an IPv6-only cluster reach it too)",
    )
    metrics_port: int = Field(
        default=9108,
        ge=0,
        le=65535,
        description="port of a worker's `/metrics`, `/healthz` and `/readyz`; 0 = no listener",
    )

    @field_validator("retry_delays", mode="before")
    @classmethod
    def _parse_delays(cls, value: object) -> object:
        # The env form is "5,10,15"; an empty string means "never retry".
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",") if p.strip()]
            return tuple(float(p) for p in parts)
        return value

    @field_validator("dead_max_age", mode="before")
    @classmethod
    def _parse_age(cls, value: object) -> object:
        if isinstance(value, str):
            value = parse_duration(value) if value.strip() else None
        return None if value == 0 else value

    @field_validator(
        "redis_password", "redis_sentinel_password", "api_base_url", "domain_api_url", mode="before"
    )
    @classmethod
    def _empty_is_default(cls, value: object, info: ValidationInfo) -> object:
        # An env file or a Secret often carries the variable with nothing in it: unset
        # (None) where that is the default.
        return cls.model_fields[cast(str, info.field_name)].default if value == "" else value

    @field_validator("api_base_url", "domain_api_url")
    @classmethod
    def _absolute_base(cls, value: str | None) -> str | None:
        if value is None:
            return None
        url = urlsplit(value)
        if url.scheme not in ("http", "https") or not has_address(url):
            raise ValueError("must be an absolute http(s) URL with a host, e.g. http://host:8080")
        if url.username is not None or url.password is not None:
            # The host is a key in the breaker's log lines: credentials would be logged.
            raise ValueError("must not carry credentials")
        return value

    @field_validator("retry_delays")
    @classmethod
    def _positive_delays(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(d < 0 for d in value):
            raise ValueError("retry delays must be >= 0 seconds")
        return value

    @model_validator(mode="after")
    def _timeout_above_heartbeat(self) -> Settings:
        # A worker must be able to miss a heartbeat or two before others take its work.
        if self.worker_timeout < 2 * self.heartbeat_interval:
            raise ValueError("worker_timeout must be at least twice heartbeat_interval")
        return self

    @model_validator(mode="after")
    def _breaker_can_open(self) -> Settings:
        # More calls than the window holds would never be seen: the breaker never opens.
        if self.breaker_min_calls > self.breaker_window:
            raise ValueError("breaker_min_calls must be at most breaker_window")
        # A cap below the first cool-down would shorten it after a failed probe.
        if self.breaker_cooldown > self.breaker_max_cooldown:
            raise ValueError("breaker_cooldown must be at most breaker_max_cooldown")
        return self

    @model_validator(mode="after")
    def _turns_outlast_waits(self) -> Settings:
        # A turn's holder waiting out a retry, a Retry-After or an open breaker leaves its
        # turn untouched: were that longer than the turn timeout, the session's next
        # update would take the turn over and go first. Twice, for the queue in between.
        if self.ordering != "session":
            return self
        waits = (*self.retry_delays, self.max_retry_after, self.breaker_max_cooldown)
        if self.turn_timeout < 2 * max(*waits, self.request_timeout, self.worker_timeout):
            raise ValueError(
                "turn_timeout must be at least twice the longest retry delay, "
                "max_retry_after, breaker_max_cooldown, request_timeout and worker_timeout"
            )
        return self

    @model_validator(mode="after")
    def _coherent_redis(self) -> Settings:
        check_redis_url(
            self.redis_url,
            cluster=self.redis_cluster,
            password=self.redis_password is not None,
            sentinel_password=self.redis_sentinel_password is not None,
        )
        return self


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds in ``text``: plain (``90``) or with a unit (``30s``, ``30m``, ``2h``, ``1d``)."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(
            f"bad duration {text!r}: use seconds or a number with s, m, h or d (90, 30m, 2h, 1d)"
        )
    return float(match[1]) * _UNIT_SECONDS[match[2]]
