"""The PostgreSQL backend's durability: `synchronous_commit` per store URL, and what the server says.

`?synchronous_commit=on|off|local|remote_write|remote_apply` in a store's URL is
set in each of its mutating transactions with `set_config(..., true)` (SET LOCAL),
never for the session: behind PgBouncer's transaction pooling a session setting
would stay on the server connection for the next client. libpq refuses the
parameter in a URL, so it is taken out before psycopg sees the URL.

At open (the backend's first connection) the server is asked `synchronous_commit`,
`synchronous_standby_names`, `fsync` and its standbys (`pg_stat_replication`: a role
without `pg_monitor` sees their rows with `state` and `sync_state` NULL). One INFO
line reports them, a WARNING when an acknowledged commit can be lost on a crash.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import psycopg

from .._errors import StorageError
from ._backend import Durability
from ._url import redact_url

_log = logging.getLogger("recoverable_state.storage")

SYNCHRONOUS_COMMIT = ("on", "off", "local", "remote_write", "remote_apply")
"""The values `synchronous_commit` takes (PostgreSQL also takes true/false/yes/no/1/0 for on/off)."""

SET_SYNCHRONOUS_COMMIT = "SELECT set_config('synchronous_commit', %s, true)"

_SETTINGS = (
    "SELECT current_setting('synchronous_commit'), current_setting('synchronous_standby_names'), "
    "current_setting('fsync')"
)
_STANDBYS = "SELECT application_name, state, sync_state FROM pg_stat_replication ORDER BY application_name"


def synchronous_commit_option(url: str, given: str | None) -> tuple[str | None, str]:
    """The store's `synchronous_commit` (URL query or argument; both must agree) and the URL without it."""
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    from_url = [v for k, v in pairs if k == "synchronous_commit"]
    shown = redact_url(url.split("?", 1)[0])
    value = given if given is not None else (from_url[-1] if from_url else None)
    if given is not None and from_url and from_url[-1] != given:
        raise StorageError(
            f"storage URL {shown!r}: synchronous_commit is {from_url[-1]!r} in the URL "
            f"and {given!r} as an argument"
        )
    if value is not None and value not in SYNCHRONOUS_COMMIT:
        raise StorageError(
            f"storage URL {shown!r}: synchronous_commit={value!r} is not one of "
            f"{', '.join(SYNCHRONOUS_COMMIT)}"
        )
    if not from_url:
        return value, url
    # Cut out as written: the other parameters keep their spelling (libpq reads no '+' as a space).
    base, query = url.split("?", 1)
    kept = [
        part for part in query.split("&") if part and unquote(part.split("=", 1)[0]) != "synchronous_commit"
    ]
    return value, base + ("?" + "&".join(kept) if kept else "")


def read_settings(conn: psycopg.Connection[Any]) -> dict[str, str]:
    """The server's durability settings and standbys (readable by every role; without `pg_monitor`
    a standby's `state` and `sync_state` read NULL, shown as hidden)."""
    settings = conn.execute(_SETTINGS)
    standbys = conn.execute(_STANDBYS)
    row = settings.fetchone()
    assert row is not None
    found = dict(
        zip(("synchronous_commit", "synchronous_standby_names", "fsync"), map(str, row), strict=True)
    )
    found["standbys"] = ", ".join(
        f"{name or '?'} ({state or 'state hidden'}, {sync or 'sync_state hidden'})"
        for name, state, sync in standbys.fetchall()
    )
    return found


def describe(settings: dict[str, str], option: str | None) -> Durability:
    """The Durability of a PostgreSQL backend: the server's settings, the store's `synchronous_commit`."""
    effective = option or settings.get("synchronous_commit", "?")
    details = dict(settings)
    details["store_synchronous_commit"] = option or "(the server's)"
    standbys = settings.get("standbys") or "none"
    if settings.get("fsync") == "off":
        return Durability(
            "postgresql", False, "a commit can be lost at a crash: the server runs with fsync=off", details
        )
    if effective in ("off", "false", "no", "0"):
        return Durability(
            "postgresql",
            False,
            "a commit can be lost at a server crash: synchronous_commit=off (up to 3 x wal_writer_delay)",
            details,
        )
    if effective == "?":
        return Durability(
            "postgresql", None, "unknown: the server did not say its synchronous_commit", details
        )
    sync_names = settings.get("synchronous_standby_names", "")
    if sync_names and effective in ("on", "remote_write", "remote_apply"):
        summary = (
            "durable on commit: flushed to the WAL and confirmed by a synchronous standby "
            f"(synchronous_commit={effective}; standbys: {standbys})"
        )
    else:
        lag = (
            f"; standbys: {standbys}, asynchronous: a failover can lose the last commits"
            if settings.get("standbys")
            else ""
        )
        summary = f"durable on commit: flushed to the primary's WAL (synchronous_commit={effective}){lag}"
    return Durability("postgresql", True, summary, details)


def report_at_open(url: str, settings: dict[str, str], option: str | None) -> None:
    """One INFO line of the settings; a WARNING when an acknowledged commit can be lost on a crash."""
    durability = describe(settings, option)
    shown = ", ".join(f"{k}={v!r}" for k, v in durability.details.items())
    _log.info("PostgreSQL server %s: %s (%s)", url, durability.summary, shown)
    if durability.durable_on_ack is False:
        _log.warning("PostgreSQL server %s: %s", url, durability.summary)
