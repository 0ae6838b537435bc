"""The PostgreSQL backend through PgBouncer in transaction pooling mode, through the library.

Each transaction may get another server connection, so nothing the backend
keeps may live in a server session: no server-side prepared statements (psycopg
prepares a statement run five times on a connection), no session `SET`, no
session advisory lock. The shipped conformance suite runs against a backend
whose URL points at the session's PgBouncer; then a worker-shaped run: two
"processes" (two backends, each with its own pool, sharing PgBouncer's four
server connections) persist many states with history, one with its own
`synchronous_commit`, a claim through one fences the other, a reset clears a
record. Real servers, both loops.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from functools import partial

import anyio
import psycopg
import pytest
from pydantic import BaseModel

from recoverable_state import EventManager, KeyValueStore, RecoverableState, StateOwnershipLost
from recoverable_state.storage import StorageBackend, open_backend
from recoverable_state.testing import BackendConformance
from recoverable_state.testing.conformance import MakeBackend
from servers import flush_postgres

STATES = 12
STORE = "through-pgbouncer"

_TRIGGER = """
CREATE TABLE public.rs_bounced (key text, version bigint, setting text, app text);
CREATE FUNCTION public.rs_bounced_note() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO public.rs_bounced VALUES (
    NEW.key, NEW.version, current_setting('synchronous_commit'), current_setting('application_name'));
  RETURN NULL;
END $$;
CREATE TRIGGER rs_bounced_note AFTER INSERT OR UPDATE ON recoverable_state.records
  FOR EACH ROW EXECUTE FUNCTION public.rs_bounced_note();
"""


class TestPostgresThroughPgBouncer(BackendConformance):
    """Every conformance check, each statement and transaction passing through the pooler."""

    machine_examples = 8  # the direct PostgreSQL class runs the full 20 random runs

    @pytest.fixture
    def make_backend(self, pgbouncer_url: str, postgres_url: str) -> MakeBackend:
        flush_postgres(postgres_url)  # the same database, reached directly
        return lambda: open_backend(pgbouncer_url)


class Job(BaseModel):
    n: int = 0
    seen: list[int] = []


@pytest.fixture
def direct(postgres_url: str) -> Iterator[str]:
    """The PostgreSQL server behind PgBouncer, reached directly, without the backend's tables."""
    flush_postgres(postgres_url)
    yield postgres_url
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS recoverable_state CASCADE")
        conn.execute("DROP TABLE IF EXISTS public.rs_bounced")
        conn.execute("DROP FUNCTION IF EXISTS public.rs_bounced_note()")


def _jobs(manager: EventManager, backend: StorageBackend, keys: list[str]) -> list[RecoverableState[Job]]:
    async def store() -> KeyValueStore:
        return await KeyValueStore.open(name=STORE, storage=backend)

    return [
        RecoverableState(
            default_state=Job(),
            persist_state_key=key,
            persistence_enabled=True,
            persist_state_kvs_factory=store,
            event_manager=manager,
            history=3,
        )
        for key in keys
    ]


async def _rounds(manager: EventManager, count: int) -> None:
    """Wait until the manager has ended `count` more persist rounds."""
    target = manager.stats.persists + count
    with anyio.fail_after(20):
        while manager.stats.persists < target:
            await anyio.sleep(0.02)


@pytest.mark.anyio
async def test_two_workers_persist_fence_and_reset_through_pgbouncer(direct: str, pgbouncer_url: str) -> None:
    # Two "processes": backends with pools of their own (the URLs differ, as two hosts' would).
    a = open_backend(f"{pgbouncer_url}?application_name=worker-a&synchronous_commit=local")
    b = open_backend(f"{pgbouncer_url}?application_name=worker-b")
    keys = [f"job-{i}" for i in range(STATES)]
    try:
        await KeyValueStore.open(name=STORE, storage=a)  # makes the schema
        with psycopg.connect(direct, autocommit=True) as conn:
            conn.execute(_TRIGGER)
        async with EventManager(persist_state_interval=timedelta(milliseconds=50)) as manager:
            states = _jobs(manager, a, keys)
            await RecoverableState.initialize_many(states)
            for step in range(1, 9):  # eight changes, each persisted: far past prepare_threshold=5
                for state in states:
                    state.current_value.n = step
                    state.current_value.seen.append(step)
                await _rounds(manager, 2)
            assert manager.stats.persists_failed == {}

            # Process B takes job-0 over: its claim fences process A's state off.
            async with EventManager(persist_state_interval=3600) as other:
                (taken,) = _jobs(other, b, ["job-0"])
                assert (await taken.initialize()).n == 8
                taken.current_value.n = 100
                await taken.persist_state()
                states[0].current_value.n = 9
                with pytest.raises(StateOwnershipLost):
                    await states[0].persist_state()
                assert states[0].ownership_lost
                await taken.teardown()

            # A reset clears job-1's record; the rest of A's states go on.
            await states[1].reset()
            for state in states[2:]:
                state.current_value.n = 10
            await _rounds(manager, 2)
            assert not any(s.ownership_lost for s in states[1:])
            for state in states[1:]:
                await state.teardown()

        kvs = await KeyValueStore.open(name=STORE, storage=b)
        assert await kvs.get_value("job-0") == {"n": 100, "seen": list(range(1, 9))}
        assert await kvs.get_value("job-1") == {"n": 0, "seen": []}  # cleared, then its default saved
        # The reset took the record and its history away: the default is a new record.
        assert [r.version for r in await kvs.get_history("job-1")] == [1]
        for key in keys[2:]:
            assert await kvs.get_value(key) == {"n": 10, "seen": list(range(1, 9))}
        history = await kvs.get_history("job-5")
        assert [(r.version, json.loads(r.value)["n"]) for r in history] == [(9, 10), (8, 8), (7, 7)]
    finally:
        await a.aclose()
        await b.aclose()

    with psycopg.connect(direct) as conn:
        noted = conn.execute("SELECT key, version, setting, app FROM public.rs_bounced").fetchall()
    # Every write ran with its own backend's settings, whichever server connection it met.
    assert {(setting, app) for _, _, setting, app in noted} == {("local", "worker-a"), ("on", "worker-b")}
    # B's claim of job-0 (version 8 -> 9) and its write (10); A's write of 9 never landed.
    assert {(key, version) for key, version, _, app in noted if app == "worker-b"} == {
        ("job-0", 9),
        ("job-0", 10),
    }
    assert sorted(v for key, v, _, _ in noted if key == "job-0") == [*range(1, 9), 9, 10]
    assert sorted(v for key, v, _, _ in noted if key == "job-5") == list(range(1, 10))  # each persist once


@pytest.mark.anyio
@pytest.mark.parametrize("route", ["direct", "pgbouncer"])
async def test_a_first_user_that_waited_while_another_made_the_tables_goes_on(
    direct: str, route: str, request: pytest.FixtureRequest
) -> None:
    """The waiter's catalog caches still say "no schema" after the lock: IF NOT EXISTS fails once."""
    from recoverable_state.storage._postgres_sql import DDL, LOCK_ID

    url = direct if route == "direct" else str(request.getfixturevalue("pgbouncer_url"))
    backend = open_backend(url)
    try:
        with psycopg.connect(direct) as other:  # another first user, holding the lock
            other.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_ID,))
            async with anyio.create_task_group() as tg:
                tg.start_soon(partial(backend.open_store, name="raced"))

                def waiting() -> bool:
                    with psycopg.connect(direct, autocommit=True) as conn:
                        row = conn.execute(
                            "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'advisory'"
                        ).fetchone()
                    return row is not None and row[0] == 1

                with anyio.fail_after(5):
                    while not await anyio.to_thread.run_sync(waiting):
                        await anyio.sleep(0.01)
                for statement in DDL.split(";"):
                    if statement.strip():
                        other.execute(statement)
                other.commit()
        assert [s.name for s in await backend.list_stores()] == ["raced"]
    finally:
        await backend.aclose()
