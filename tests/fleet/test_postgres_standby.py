"""A PostgreSQL primary with a streaming standby, checked with raw psycopg connections.

A synchronous standby has every commit the primary acknowledged; an asynchronous
one loses those it had not received when the primary died (made deterministic
here by stopping its walreceiver first). A multi-host URL with
`target_session_attrs=read-write` finds the new primary once it is promoted.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import psycopg.errors
import pytest

from fleet_servers import PostgresPrimaryStandby

TABLE = "fleet_test.acknowledged"
"""In the schema that the pair fixtures (tests/fleet/conftest.py) empty for each test."""


def _commit_rows(url: str, values: range) -> None:
    """One transaction (and so one acknowledged COMMIT) a row."""
    with psycopg.connect(url, autocommit=True) as conn:
        for value in values:
            conn.execute(f"INSERT INTO {TABLE} VALUES (%s)", (value,))


def _rows(url: str) -> list[int]:
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        return [row[0] for row in conn.execute(f"SELECT i FROM {TABLE} ORDER BY i")]


def _create_table(pair: PostgresPrimaryStandby) -> None:
    with psycopg.connect(pair.primary_url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {TABLE} (i int)")


@pytest.mark.parametrize(("which", "sync_state"), [("sync_pair", "sync"), ("async_pair", "async")])
def test_the_standby_streams_as_configured(
    request: pytest.FixtureRequest, which: str, sync_state: str
) -> None:
    pair: PostgresPrimaryStandby = request.getfixturevalue(which)
    found = pair.replication()
    assert found is not None and found.state == "streaming" and found.sync_state == sync_state
    with psycopg.connect(pair.primary_url, autocommit=True) as conn:
        names = conn.execute("SHOW synchronous_standby_names").fetchone()
        commit = conn.execute("SHOW synchronous_commit").fetchone()
    assert names == (pair.standby.name if sync_state == "sync" else "",)
    assert commit == ("on",)
    with psycopg.connect(pair.standby_url, autocommit=True) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)


@pytest.mark.slow
def test_a_synchronous_standby_has_every_acknowledged_commit_when_promoted(
    sync_pair: PostgresPrimaryStandby,
) -> None:
    _create_table(sync_pair)
    _commit_rows(sync_pair.url, range(50))
    sync_pair.kill_primary()
    # Before the promotion the multi-host URL finds no primary: one refused, one read-only.
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(sync_pair.url, connect_timeout=2)
    text = str(caught.value)
    assert caught.value.sqlstate is None
    assert "Connection refused" in text and "session is read-only" in text
    seconds = sync_pair.promote()
    assert seconds < 10
    with psycopg.connect(sync_pair.url, autocommit=True) as conn:
        assert conn.info.port == sync_pair.standby.port
    assert _rows(sync_pair.url) == list(range(50))


@pytest.mark.slow
def test_a_commit_waits_for_an_unreachable_synchronous_standby_beyond_statement_timeout(
    sync_pair: PostgresPrimaryStandby,
) -> None:
    """statement_timeout does not end the wait; a cancel ends it and reports success."""
    _create_table(sync_pair)
    sync_pair.pause_streaming()
    notices: list[tuple[Any, ...]] = []
    outcome: dict[str, Any] = {}

    def commit() -> None:
        with psycopg.connect(sync_pair.primary_url) as conn:
            # A Diagnostic is valid inside the handler only: keep its fields.
            conn.add_notice_handler(
                lambda d: notices.append((d.severity, d.sqlstate, d.message_primary, d.message_detail))
            )
            conn.execute("SELECT set_config('statement_timeout', '300', true)")
            row = conn.execute("SELECT txid_current(), pg_backend_pid()").fetchone()
            outcome["xid"], outcome["pid"] = row
            conn.execute(f"INSERT INTO {TABLE} VALUES (1)")
            conn.commit()
            outcome["committed"] = True

    thread = threading.Thread(target=commit, daemon=True)
    thread.start()
    thread.join(1.0)
    assert thread.is_alive()  # 1 s, past the 300 ms statement_timeout: still waiting
    with psycopg.connect(sync_pair.primary_url, autocommit=True) as conn:
        waiting = conn.execute("SELECT wait_event FROM pg_stat_activity WHERE pid = %s", (outcome["pid"],))
        assert waiting.fetchone() == ("SyncRep",)
        status = conn.execute("SELECT txid_status(%s)", (outcome["xid"],)).fetchone()
        assert status == ("in progress",)
        assert conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone() == (0,)
        conn.execute("SELECT pg_cancel_backend(%s)", (outcome["pid"],))
    thread.join(5)
    assert outcome.get("committed") is True  # the client was told: committed
    assert notices == [
        (
            "WARNING",
            "01000",
            "canceling wait for synchronous replication due to user request",
            "The transaction has already committed locally, "
            "but might not have been replicated to the standby.",
        )
    ]
    assert _rows(sync_pair.primary_url) == [1]
    assert _rows(sync_pair.standby_url) == []  # and the standby does not have it


@pytest.mark.slow
def test_synchronous_commit_local_does_not_wait_for_the_standby(sync_pair: PostgresPrimaryStandby) -> None:
    _create_table(sync_pair)
    sync_pair.pause_streaming()
    with psycopg.connect(sync_pair.primary_url) as conn:
        conn.execute("SELECT set_config('synchronous_commit', 'local', true)")  # this transaction only
        conn.execute(f"INSERT INTO {TABLE} VALUES (1)")
        began = time.monotonic()
        conn.commit()
        assert time.monotonic() - began < 1
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
        conn.rollback()
    sync_pair.resume_streaming()


@pytest.mark.slow
def test_an_asynchronous_standby_loses_the_commits_it_had_not_received(
    async_pair: PostgresPrimaryStandby,
) -> None:
    _create_table(async_pair)
    _commit_rows(async_pair.url, range(10))
    async_pair.wait_replayed()
    async_pair.pause_streaming()
    _commit_rows(async_pair.url, range(10, 13))  # acknowledged by the primary alone
    assert _rows(async_pair.primary_url) == list(range(13))
    async_pair.kill_primary()
    async_pair.promote()
    assert _rows(async_pair.url) == list(range(10))


@pytest.mark.slow
def test_paused_replay_shows_lag_but_the_promotion_replays_what_was_received(
    async_pair: PostgresPrimaryStandby,
) -> None:
    _create_table(async_pair)
    async_pair.wait_replayed()
    with psycopg.connect(async_pair.standby_url, autocommit=True) as conn:
        conn.execute("SELECT pg_wal_replay_pause()")
    _commit_rows(async_pair.url, range(5))

    def lagging() -> bool:
        found = async_pair.replication()
        return found is not None and found.flush_lsn == found.sent_lsn and bool(found.replay_lag_bytes)

    deadline = time.monotonic() + 10
    while not lagging():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert async_pair.standby_lag()["replay_paused"] is True
    assert _rows(async_pair.standby_url) == []
    async_pair.kill_primary()
    async_pair.promote()
    assert _rows(async_pair.url) == list(range(5))


@pytest.mark.slow
def test_a_promoted_lagging_standby_reuses_the_transaction_ids_it_never_saw(
    async_pair: PostgresPrimaryStandby,
) -> None:
    """txid_status() after a failover can say "committed" of a lost transaction."""
    _create_table(async_pair)
    async_pair.wait_replayed()
    async_pair.pause_streaming()
    with psycopg.connect(async_pair.primary_url) as conn:
        row = conn.execute("SELECT txid_current()").fetchone()
        assert row is not None
        lost = row[0]
        conn.execute(f"INSERT INTO {TABLE} VALUES (1)")
        conn.commit()
    async_pair.kill_primary()
    async_pair.promote()
    with (
        psycopg.connect(async_pair.url, autocommit=True) as conn,
        pytest.raises(psycopg.errors.InvalidParameterValue, match="is in the future"),
    ):
        conn.execute("SELECT txid_status(%s)", (lost,))
    with psycopg.connect(async_pair.url) as conn:
        for _ in range(100):
            row = conn.execute("SELECT txid_current()").fetchone()
            conn.execute(f"INSERT INTO {TABLE} VALUES (2)")
            conn.commit()
            assert row is not None
            if row[0] >= lost:
                break
    with psycopg.connect(async_pair.url, autocommit=True) as conn:
        assert conn.execute("SELECT txid_status(%s)", (lost,)).fetchone() == ("committed",)
    assert 1 not in _rows(async_pair.url)
