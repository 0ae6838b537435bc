"""Redis and PostgreSQL backends when their server refuses us or keeps us waiting.

Private servers that require a password play a server refusing credentials;
the session's PostgreSQL, locks and statements held by another connection.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from recoverable_state import StorageAuthenticationError, StorageError, StorageUnavailableError
from recoverable_state.storage import KeyValueStore, WriteOutcome, open_backend
from recoverable_state.storage._postgres import PostgresBackend
from recoverable_state.storage._redis import RedisBackend
from servers import (
    PG_DATABASE,
    REJECTED_ROLE,
    PostgresServer,
    RedisServer,
    flush_postgres,
    free_port,
    start_or_skip,
)

pytestmark = pytest.mark.anyio

BYTES = "application/octet-stream"

Server = RedisServer | PostgresServer

SECRET = "s3cret-Pw"
"""The password of the private servers that require one."""

SLACK = 3.0
"""Seconds past a budget a failure may take on a loaded machine."""


def _url(kind: str, port: int, user: str = "postgres", password: str | None = None) -> str:
    auth = f":{password}@" if password else "@"
    if kind == "redis":
        return f"redis://{auth if password else ''}127.0.0.1:{port}/0"
    return f"postgresql://{user}{auth}127.0.0.1:{port}/{PG_DATABASE}"


@pytest.mark.parametrize(
    ("cls", "url"),
    [
        (RedisBackend, "redis://:s3cret@127.0.0.1:{port}/0"),
        (RedisBackend, "redis://admin:s3cret@127.0.0.1:{port}/0"),
        (PostgresBackend, "postgresql://postgres:s3cret@127.0.0.1:{port}/db"),
        (PostgresBackend, "postgresql://postgres@127.0.0.1:{port}/db?password=s3cret"),
    ],
    ids=["redis-no-user", "redis-user", "postgres-userinfo", "postgres-query"],
)
async def test_unreachable_server_error_hides_the_password(
    cls: type[RedisBackend] | type[PostgresBackend], url: str
) -> None:
    port = free_port()  # nothing listens there
    backend = cls(url.format(port=port), retry_timeout=0.3)
    try:
        assert "s3cret" not in backend.url
        assert f"127.0.0.1:{port}" in backend.url
        with pytest.raises(StorageUnavailableError) as caught:
            await KeyValueStore.open(name="nowhere", storage=backend)
        assert "s3cret" not in str(caught.value)
        assert f"127.0.0.1:{port}" in str(caught.value)
        assert "nowhere" in str(caught.value)
    finally:
        await backend.aclose()


# -- credentials the server refuses ------------------------------------------------


@pytest.fixture(scope="module")
def redis_with_password(server_dir: Path) -> Iterator[RedisServer]:
    server = start_or_skip(lambda: RedisServer(server_dir / "auth-redis", password=SECRET))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def postgres_with_password(server_dir: Path) -> Iterator[PostgresServer]:
    server = start_or_skip(lambda: PostgresServer(server_dir / "auth-postgres", password=SECRET))
    yield server
    server.stop()


async def test_right_passwords_are_accepted(
    redis_with_password: RedisServer, postgres_with_password: PostgresServer
) -> None:
    for url in (redis_with_password.url, postgres_with_password.url):
        backend = open_backend(url, retry_timeout=5)
        try:
            kvs = await KeyValueStore.open(name="let-in", storage=backend)
            await kvs.set_value("k", 1)
            assert await kvs.get_value("k") == 1
        finally:
            await backend.aclose()


@pytest.mark.parametrize(
    ("kind", "user", "password"),
    [
        ("redis", "", "wrong-pw"),
        ("redis", "", None),
        ("postgresql", "postgres", "wrong-pw"),
        ("postgresql", "postgres", None),
        ("postgresql", "nobody", SECRET),
        ("postgresql", REJECTED_ROLE, SECRET),
    ],
    ids=["redis-wrong", "redis-none", "pg-wrong", "pg-none", "pg-no-such-user", "pg-hba-rejects"],
)
async def test_refused_credentials_fail_at_once_and_say_authentication(
    kind: str, user: str, password: str | None, request: pytest.FixtureRequest
) -> None:
    server: Server = request.getfixturevalue(
        "redis_with_password" if kind == "redis" else "postgres_with_password"
    )
    backend = open_backend(_url(kind, server.port, user, password), retry_timeout=30)
    try:
        started = time.monotonic()
        with anyio.fail_after(15), pytest.raises(StorageAuthenticationError) as caught:
            await KeyValueStore.open(name="locked-out", storage=backend)
        assert time.monotonic() - started < SLACK  # no retries: the budget is 30 s
    finally:
        await backend.aclose()
    message = str(caught.value)
    assert "authentication failed" in message
    assert "unreachable" not in message
    assert f"127.0.0.1:{server.port}" in message
    assert caught.value.store == "locked-out"
    assert "wrong-pw" not in message
    assert SECRET not in message
    assert not isinstance(caught.value, StorageUnavailableError)  # not worth retrying


async def test_missing_postgres_database_fails_at_once(postgres_url: str) -> None:
    backend = open_backend(postgres_url.replace(PG_DATABASE, "no_such_db"), retry_timeout=30)
    try:
        started = time.monotonic()
        with anyio.fail_after(15), pytest.raises(StorageError) as caught:
            await KeyValueStore.open(name="nowhere", storage=backend)
        assert time.monotonic() - started < SLACK
    finally:
        await backend.aclose()
    assert 'database "no_such_db" does not exist' in str(caught.value)
    assert not isinstance(caught.value, StorageUnavailableError | StorageAuthenticationError)


# -- PostgreSQL waits on the server: locks and long statements ---------------------


async def test_postgres_write_waiting_on_a_row_lock_ends_within_the_budget(
    postgres_url: str,
) -> None:
    import psycopg

    flush_postgres(postgres_url)
    backend = open_backend(postgres_url, retry_timeout=1.5)
    try:
        kvs = await KeyValueStore.open(name="row-locked", storage=backend)
        await kvs.put_record("k", b"v1", BYTES)
        with psycopg.connect(postgres_url) as holder:
            holder.execute("SELECT * FROM recoverable_state.records FOR UPDATE").fetchall()
            started = time.monotonic()
            with anyio.fail_after(20), pytest.raises(StorageUnavailableError) as caught:
                await kvs.put_record("k", b"v2", BYTES)
            assert time.monotonic() - started < 1.5 + SLACK
            holder.rollback()
        message = str(caught.value)
        assert "lock held by another connection" in message
        assert "did not finish within 1.5 s" in message
        assert caught.value.store == "row-locked"

        with anyio.fail_after(20):  # the lock is gone: the same backend writes again
            record = await kvs.get_record("k")
            assert record is not None
            assert (record.value, record.version) == (b"v1", 1)  # the refused write left nothing
            assert await kvs.put_record("k", b"v3", BYTES, expected_version=1) == WriteOutcome(True, 2)
    finally:
        await backend.aclose()


async def test_postgres_statement_that_runs_too_long_is_cancelled_on_the_server(
    postgres_url: str,
) -> None:
    import psycopg

    flush_postgres(postgres_url)
    backend = open_backend(postgres_url, retry_timeout=1.5)
    try:
        kvs = await KeyValueStore.open(name="slow-statements", storage=backend)
        await kvs.put_record("k", b"v1", BYTES)
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(
                "CREATE FUNCTION recoverable_state.slow() RETURNS trigger AS "
                "$$ BEGIN PERFORM pg_sleep(60); RETURN NEW; END $$ LANGUAGE plpgsql"
            )
            admin.execute(
                "CREATE TRIGGER slow BEFORE UPDATE ON recoverable_state.records "
                "FOR EACH ROW EXECUTE FUNCTION recoverable_state.slow()"
            )
            started = time.monotonic()
            with anyio.fail_after(20), pytest.raises(StorageUnavailableError) as caught:
                await kvs.put_record("k", b"v2", BYTES)
            assert time.monotonic() - started < 1.5 + SLACK
            # The server ended the statement itself: nothing of ours still sleeps there.
            sleeping = admin.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE state = 'active' AND query LIKE '%%records%%' AND pid <> pg_backend_pid()"
            ).fetchone()
            assert sleeping == (0,)
            admin.execute("DROP TRIGGER slow ON recoverable_state.records")
        message = str(caught.value)
        assert "statement" in message
        assert "did not finish within 1.5 s" in message
        assert caught.value.store == "slow-statements"
        assert await kvs.get_value("k") == b"v1"
    finally:
        await backend.aclose()
