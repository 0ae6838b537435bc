"""PgBouncer in transaction pooling mode, checked with raw psycopg connections.

A client holds a server connection for one transaction only, so anything kept in
the server's session outlives the transaction on a connection another client
gets next: server-side prepared statements (psycopg prepares a query run
`prepare_threshold` = 5 times), `SET` without LOCAL, session advisory locks. And
the backend pid psycopg reports is PgBouncer's, not a server process'.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import psycopg.errors
import pytest

from fleet_servers import PgBouncerServer
from servers import PostgresServer, start_or_skip

QUERY = "SELECT %s::int + 1"


@pytest.fixture(scope="module")
def bouncer(server_dir: Path, postgres_server: PostgresServer) -> Iterator[PgBouncerServer]:
    """A PgBouncer of this module's own (these tests leave state on its server connections)."""
    server = start_or_skip(
        lambda: PgBouncerServer(server_dir / "pgbouncer-breakage", postgres_server, pool_size=3)
    )
    yield server
    server.stop()


def test_pgbouncer_pools_in_transaction_mode(pgbouncer: PgBouncerServer) -> None:
    with psycopg.connect(pgbouncer.admin_url, autocommit=True, cursor_factory=psycopg.ClientCursor) as admin:
        config = {row[0]: row[1] for row in admin.execute("SHOW CONFIG")}
    assert config["pool_mode"] == "transaction"
    with psycopg.connect(pgbouncer.url, prepare_threshold=None) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("rs_test",)


def _prepared_then_moved(bouncer: PgBouncerServer, **options: Any) -> None:
    """Run QUERY often enough to be prepared, then once more while its server connection is taken.

    PgBouncer hands out the server connection released last, so all runs of
    `client` go to one server connection until `other` holds it in a transaction.
    """
    with (
        psycopg.connect(bouncer.url, autocommit=True, **options) as client,
        psycopg.connect(bouncer.url, **options) as other,
    ):
        for i in range(6):
            assert client.execute(QUERY, (i,)).fetchone() == (i + 1,)
        other.execute("SELECT 1")  # a transaction: it keeps the server connection client used
        assert client.execute(QUERY, (7,)).fetchone() == (8,)
        other.rollback()


def test_server_side_prepared_statements_break_with_psycopgs_default_prepare_threshold(
    bouncer: PgBouncerServer,
) -> None:
    missing = 'prepared statement "_pg3_0" does not exist'
    with pytest.raises(psycopg.errors.InvalidSqlStatementName, match=missing):
        _prepared_then_moved(bouncer)


def test_prepare_threshold_none_works_across_server_connections(bouncer: PgBouncerServer) -> None:
    _prepared_then_moved(bouncer, prepare_threshold=None)
    # The backend's shape of transaction: pipeline mode, settings local to the transaction.
    with psycopg.connect(bouncer.url, prepare_threshold=None) as conn:
        for _ in range(10):
            with conn.pipeline():
                conn.execute(
                    "SELECT set_config('lock_timeout', '1000', true), "
                    "set_config('statement_timeout', '1100', true)"
                )
                xid = conn.execute("SELECT txid_current()")
                timeout = conn.execute("SHOW statement_timeout")
                conn.execute("SELECT pg_advisory_xact_lock(42)")
            assert xid.fetchone() is not None
            assert timeout.fetchone() == ("1100ms",)
            conn.commit()


def test_a_set_without_local_stays_on_the_server_connection_for_the_next_client(
    bouncer: PgBouncerServer,
) -> None:
    with psycopg.connect(bouncer.url, autocommit=True, prepare_threshold=None) as first:
        first.execute("SET statement_timeout = '4321ms'")
    with psycopg.connect(bouncer.url, autocommit=True, prepare_threshold=None) as second:
        assert second.execute("SHOW statement_timeout").fetchone() == ("4321ms",)  # leaked
        second.execute("RESET statement_timeout")
    with psycopg.connect(bouncer.url, prepare_threshold=None) as first:
        first.execute("SET LOCAL statement_timeout = '1234ms'")
        first.commit()
    with psycopg.connect(bouncer.url, autocommit=True, prepare_threshold=None) as second:
        assert second.execute("SHOW statement_timeout").fetchone() == ("0",)  # LOCAL ended with COMMIT


def test_the_backend_pid_psycopg_reports_is_not_the_server_process(
    bouncer: PgBouncerServer, postgres_server: PostgresServer
) -> None:
    with psycopg.connect(bouncer.url, autocommit=True, prepare_threshold=None) as conn:
        reported = conn.info.backend_pid  # from BackendKeyData, which PgBouncer makes up
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None and row[0] != reported
    with psycopg.connect(postgres_server.url, autocommit=True) as direct:
        found = direct.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (reported,)).fetchone()
        assert found == (0,)  # pg_terminate_backend(reported) would end nothing
        row = direct.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None and row[0] == direct.info.backend_pid  # direct, they agree


def test_a_session_advisory_lock_outlives_the_client_that_took_it(
    bouncer: PgBouncerServer, postgres_server: PostgresServer
) -> None:
    with psycopg.connect(bouncer.url, autocommit=True, prepare_threshold=None) as client:
        row = client.execute("SELECT pg_advisory_lock(4242), pg_backend_pid()").fetchone()
        assert row is not None
        holder = row[1]
    # The client is gone, its server connection (and the lock) stays in the pool.
    with psycopg.connect(postgres_server.url, autocommit=True) as direct:
        assert direct.execute("SELECT pg_try_advisory_lock(4242)").fetchone() == (False,)
        direct.execute("SELECT pg_terminate_backend(%s)", (holder,))


def test_startup_options_are_refused(bouncer: PgBouncerServer) -> None:
    with pytest.raises(psycopg.OperationalError, match="unsupported startup parameter: options"):
        psycopg.connect(bouncer.url, options="-c statement_timeout=1000")


@pytest.mark.slow
def test_a_postgresql_down_behind_pgbouncer_takes_logins_and_answers_queries_late(server_dir: Path) -> None:
    """PgBouncer accepts the client; a query waits `query_wait_timeout` (120 s by default)
    for a server connection, then fails with a protocol violation (08P01)."""
    upstream = start_or_skip(lambda: PostgresServer(server_dir / "pgbouncer-down-upstream"))
    bouncer = start_or_skip(
        lambda: PgBouncerServer(server_dir / "pgbouncer-down", upstream, settings={"query_wait_timeout": "2"})
    )
    try:
        upstream.kill()
        with psycopg.connect(bouncer.url, autocommit=True, prepare_threshold=None, connect_timeout=3) as conn:
            began = time.monotonic()
            with pytest.raises(psycopg.OperationalError) as caught:
                conn.execute("SELECT 1")
        assert time.monotonic() - began >= 1.9
        assert caught.value.sqlstate == "08P01"
        assert str(caught.value) == "query_wait_timeout"
    finally:
        bouncer.stop()
        upstream.stop()
