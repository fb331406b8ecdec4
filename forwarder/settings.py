"""Every setting of the forwarder, in one place (env prefix ``FORWARDER_``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """Settings read from the environment; CLI flags override single fields."""

    model_config = SettingsConfigDict(env_prefix="FORWARDER_", extra="ignore")

    redis_url: str = Field(
        default="redis://localhost:6379/0",
        description="redis:// or rediss:// (TLS) URL, with password and db",
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
        "no domain lookup",
    )
    domain_api_url: str = Field(
        default="https://api.liveperson.net",
        description="LivePerson Domain API, for the `msdkgw` host of each account",
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
    claim_batch: int = Field(
        default=64, ge=1, le=1000, description="most messages taken per claim round trip"
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

    @field_validator("retry_delays", mode="before")
    @classmethod
    def _parse_delays(cls, value: object) -> object:
        # The env form is "5,10,15"; an empty string means "never retry".
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",") if p.strip()]
            return tuple(float(p) for p in parts)
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
