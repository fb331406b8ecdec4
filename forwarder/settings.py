"""Every setting of the forwarder, in one place (env prefix ``FORWARDER_``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """Settings read from the environment; CLI flags override single fields."""

    model_config = SettingsConfigDict(env_prefix="FORWARDER_", extra="ignore")

    redis_url: str = "redis://localhost:6379/0"
    queue: str = Field(default="forwarder", min_length=1, pattern=r"^[^{}\s]+$")
    api_base_url: str | None = None
    domain_api_url: str = "https://api.liveperson.net"
    domain_cache_ttl: float = Field(default=3600.0, gt=0)
    api_scheme: Literal["https", "http"] = "https"
    concurrency: int = Field(default=64, ge=1, le=10_000)
    retry_delays: Annotated[tuple[float, ...], NoDecode] = (5.0, 10.0, 15.0)
    request_timeout: float = Field(default=10.0, gt=0)
    shutdown_grace: float = Field(default=20.0, ge=0)
    heartbeat_interval: float = Field(default=2.0, gt=0)
    worker_timeout: float = Field(default=15.0, gt=0)
    claim_batch: int = Field(default=64, ge=1, le=1000)
    log_level: str = "info"
    log_format: str = Field(default="auto", pattern=r"^(auto|json|console)$")

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
