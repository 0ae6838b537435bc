"""Configuration: defaults and their parsing in one place, each also from the environment."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from ._services import Service


def _seconds(value: Any) -> Any:
    """Read a bare number (or numeric string, as environment variables are) as seconds."""
    if isinstance(value, str):
        try:
            return timedelta(seconds=float(value))
        except ValueError:
            return value  # let pydantic try ISO 8601 ("PT1M") and report the error
    if isinstance(value, int | float) and not isinstance(value, bool):
        return timedelta(seconds=value)
    return value


def as_timedelta(value: timedelta | float, *, name: str) -> timedelta:
    """A duration argument given as a timedelta or seconds, checked to be a number of seconds >= 0.

    Raises:
        TypeError: `value` is neither a timedelta nor a number (the message names `name`).
        ValueError: `value` is negative.
    """
    if isinstance(value, timedelta):
        duration = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        duration = timedelta(seconds=value)
    else:
        raise TypeError(f"{name} must be a timedelta or a number of seconds, not {value!r}")
    if duration < timedelta(0):
        raise ValueError(f"{name} must not be negative, got {value!r}")
    return duration


Seconds = Annotated[timedelta, BeforeValidator(_seconds)]
"""A duration given as a timedelta, a number of seconds, or an ISO 8601 duration."""


def _blank_is_none(value: Any) -> Any:
    """An empty (or all-blank) environment variable means "not set"."""
    if isinstance(value, str) and not value.strip():
        return None
    return value


class Configuration(BaseSettings):
    """Settings of recoverable-state; each is read from `RECOVERABLE_STATE_<NAME>` too."""

    model_config = SettingsConfigDict(
        env_prefix="RECOVERABLE_STATE_", validate_assignment=True, extra="ignore"
    )

    storage_url: str = "sqlite:///./storage/state.sqlite3"
    """Where stores live: `sqlite:///rel/path`, `sqlite:////abs/path`, `file:///abs/dir`,
    `memory://`, `redis://host:port/db`, `postgresql://user@host:port/db`."""

    persist_state_interval: Seconds = timedelta(seconds=60)
    """How often the event manager emits PERSIST_STATE on its own."""

    shutdown_timeout: Seconds = timedelta(seconds=25)
    """How long the last persist on a shutdown or migration signal may take."""

    purge_on_start: bool = False
    """Empty the default store when the first store of the process is opened, as Crawlee does
    (`RECOVERABLE_STATE_PURGE_ON_START=1`): a worker then starts from its default state instead
    of the last run's. Only the default store is emptied, never a named one, and only once per
    storage backend: its records and their history go, the store stays."""

    storage_pool_size: int = Field(default=4, ge=1)
    """Connections a Redis or PostgreSQL backend keeps (worker threads use them)."""

    storage_retry_timeout: Seconds = timedelta(seconds=10)
    """How long a Redis or PostgreSQL backend retries an unreachable server before failing."""

    encryption_keys: Annotated[SecretStr | None, BeforeValidator(_blank_is_none)] = None
    """A key ring, `id:base64key,id:base64key,...`: records of the default storage are sealed
    (AES-GCM) with the first key and opened with any of them (the `[crypto]` extra). Unset: records
    are stored in clear, each with a checksum. Never printed: it is a secret."""

    preemption_notice_url: Annotated[str | None, BeforeValidator(_blank_is_none)] = None
    """Poll this cloud metadata URL for a preemption notice (off when unset): `aws`, `gcp`,
    or a URL such as `http://169.254.169.254/latest/meta-data/spot/instance-action`."""

    preemption_notice_kind: Literal["auto", "aws", "gcp"] = "auto"
    """The metadata service behind `preemption_notice_url`; `auto` tells it from the URL."""

    preemption_poll_interval: Seconds = Field(default=timedelta(seconds=5), gt=timedelta(0))
    """How often the preemption notice URL is polled."""


configuration_service: Service[Configuration] = Service("Configuration", Configuration)
"""The process's configuration: the one set (`service_locator.set_configuration`), or read
from the environment on first use."""
