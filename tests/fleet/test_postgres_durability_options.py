"""PostgreSQL durability you choose and see: `synchronous_commit` per store URL, the standbys at open.

Real servers: the session's PostgreSQL (direct and through PgBouncer in transaction
pooling), and a primary with a synchronous standby; both loops. The setting is seen
from inside the writing transaction (a trigger notes `current_setting`), never leaks
to the next client of a pooled server connection, and decides whether a commit waits
for an absent synchronous standby.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import psycopg
import pytest

from fleet_servers import PostgresPrimaryStandby
from recoverable_state import StorageError, StorageUnavailableError
from recoverable_state.storage import RecordWrite, open_backend
from servers import flush_postgres

pytestmark = pytest.mark.anyio

_TRIGGER = """
CREATE TABLE public.rs_seen (key text, setting text);
CREATE FUNCTION public.rs_note() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO public.rs_seen VALUES (NEW.key, current_setting('synchronous_commit'));
  RETURN NULL;
END $$;
CREATE TRIGGER rs_note AFTER INSERT OR UPDATE ON recoverable_state.records
  FOR EACH ROW EXECUTE FUNCTION public.rs_note();
"""


@pytest.fixture
def direct_url(postgres_url: str) -> Iterator[str]:
    flush_postgres(postgres_url)
    yield postgres_url
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS public.rs_seen")
        conn.execute("DROP SCHEMA IF EXISTS recoverable_state CASCADE")
        conn.execute("DROP FUNCTION IF EXISTS public.rs_note()")


@pytest.mark.parametrize("route", ["direct", "pgbouncer"])
async def test_synchronous_commit_is_set_in_each_writing_transaction_only(
    direct_url: str, route: str, request: pytest.FixtureRequest
) -> None:
    url = direct_url if route == "direct" else str(request.getfixturevalue("pgbouncer_url"))
    local = open_backend(url + "?synchronous_commit=local", pool_size=1)
    plain = open_backend(url, pool_size=1)
    try:
        store = await local.open_store(name="sc")
        assert (await plain.open_store(name="sc")).id == store.id
        with psycopg.connect(direct_url, autocommit=True) as conn:
            conn.execute(_TRIGGER)
        for backend, key in ((local, "a"), (plain, "b"), (local, "c"), (plain, "d")):
            (outcome,) = await backend.write_batch([RecordWrite(store.id, key, b"1", "text/plain")])
            assert outcome == (True, 1)
        with psycopg.connect(direct_url) as conn:
            seen = dict(conn.execute("SELECT key, setting FROM public.rs_seen").fetchall())
        assert seen == {"a": "local", "b": "on", "c": "local", "d": "on"}
        assert (await local.describe_durability()).details["store_synchronous_commit"] == "local"
    finally:
        await local.aclose()
        await plain.aclose()


async def test_the_other_parameters_reach_libpq_as_written(
    direct_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    backend = open_backend(direct_url + "?application_name=rs%20durability&synchronous_commit=off")
    try:
        with caplog.at_level(logging.WARNING, logger="recoverable_state"):
            await backend.open_store(name="named")
            await backend.open_store(name="other")
            durability = await backend.describe_durability()
        with psycopg.connect(direct_url) as conn:
            names = {row[0] for row in conn.execute("SELECT application_name FROM pg_stat_activity")}
    finally:
        await backend.aclose()
    assert "rs durability" in names
    assert durability.details["store_synchronous_commit"] == "off"
    assert durability.durable_on_ack is False
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "a commit can be lost at a server crash: synchronous_commit=off" in warning


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("synchronous_commit=sometimes", "synchronous_commit='sometimes' is not one of on, off, local"),
        ("synchronous_comit=on", "query parameter 'synchronous_comit' that postgresql:// does not accept"),
    ],
)
def test_a_bad_synchronous_commit_fails_when_the_url_is_opened(query: str, words: str) -> None:
    with pytest.raises(StorageError) as caught:
        open_backend(f"postgresql://u:sekrit@127.0.0.1:1/db?{query}")
    assert words in str(caught.value)
    assert "sekrit" not in str(caught.value)


def test_synchronous_commit_is_listed_among_the_accepted_parameters() -> None:
    with pytest.raises(StorageError, match="synchronous_commit"):
        open_backend("postgresql://u@127.0.0.1:1/db?nope=1")
    backend = open_backend("postgresql://u@127.0.0.1:1/db?sslmode=disable&synchronous_commit=remote_apply")
    assert backend.describe_durability is not None
    assert backend.synchronous_commit == "remote_apply"  # type: ignore[attr-defined]


@pytest.fixture
def pair_url(sync_pair: PostgresPrimaryStandby) -> Iterator[str]:
    flush_postgres(sync_pair.primary_url)
    yield sync_pair.url
    if sync_pair.replication() is None:
        sync_pair.resume_streaming()
    flush_postgres(sync_pair.primary_url)


async def test_the_synchronous_standby_is_reported_at_open(
    pair_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="recoverable_state"):
        backend = open_backend(pair_url)
        await backend.open_store(name="seen")
        durability = await backend.describe_durability()
        await backend.aclose()
    assert durability.store_kind == "postgresql"
    assert durability.durable_on_ack is True
    assert durability.details["synchronous_standby_names"] == "standby"
    assert durability.details["standbys"] == "standby (streaming, sync)"
    assert "confirmed by a synchronous standby" in durability.summary
    (line,) = [
        r.getMessage() for r in caplog.records if "synchronous_standby_names='standby'" in r.getMessage()
    ]
    assert line.startswith("PostgreSQL server postgresql://postgres@127.0.0.1:")


async def test_a_role_without_pg_monitor_sees_the_standby_but_not_its_state(
    pair_url: str, sync_pair: PostgresPrimaryStandby
) -> None:
    with psycopg.connect(sync_pair.primary_url, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS rs_plain")
        conn.execute("CREATE ROLE rs_plain LOGIN")
        conn.execute("GRANT CREATE ON DATABASE rs_test TO rs_plain")
    backend = open_backend(pair_url.replace("postgres@", "rs_plain@"))
    try:
        await backend.open_store(name="plain")
        durability = await backend.describe_durability()
    finally:
        await backend.aclose()
        flush_postgres(sync_pair.primary_url)
        with psycopg.connect(sync_pair.primary_url, autocommit=True) as conn:
            conn.execute("REVOKE CREATE ON DATABASE rs_test FROM rs_plain")
            conn.execute("DROP ROLE rs_plain")
    assert durability.details["standbys"] == "standby (state hidden, sync_state hidden)"
    assert durability.details["synchronous_standby_names"] == "standby"
    assert durability.durable_on_ack is True


@pytest.mark.slow
async def test_synchronous_commit_local_persists_while_the_synchronous_standby_is_away(
    pair_url: str, sync_pair: PostgresPrimaryStandby
) -> None:
    local = open_backend(pair_url + "&synchronous_commit=local", retry_timeout=5)
    plain = open_backend(pair_url, retry_timeout=1)
    try:
        store = await local.open_store(name="away")
        await plain.open_store(name="away")  # the schema and the store exist before the standby leaves
        sync_pair.pause_streaming()
        began = time.monotonic()
        (outcome,) = await local.write_batch([RecordWrite(store.id, "k", b"1", "text/plain")])
        assert outcome == (True, 1)
        assert time.monotonic() - began < 2
        with pytest.raises(StorageUnavailableError):  # its COMMIT waits for the standby
            await plain.write_batch([RecordWrite(store.id, "other", b"1", "text/plain")])
    finally:
        sync_pair.resume_streaming()
        await local.aclose()
        await plain.aclose()
