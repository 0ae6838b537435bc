"""PostgreSQL: a big batch goes in several transactions, each within the retry budget.

The budget (`retry_timeout`, 10 s by default) bounds each transaction. A persist
of 100,000 states in one transaction took 6-9 s on a 2-core machine, so a server
half as fast failed every one of them, for good. Here the server is made slow on
purpose (a trigger that sleeps for each row written), so that 25,000 records in one
transaction cannot finish within the budget and 10,000 can. Also: a batch whose
second transaction fails leaves each of its states in doubt, and a persist
afterwards settles them all.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pydantic import BaseModel

from recoverable_state import EventManager, RecoverableState, StorageError
from recoverable_state.storage import KeyValueStore, _postgres, open_backend
from servers import PostgresServer, flush_postgres, start_or_skip

pytestmark = pytest.mark.anyio

ITEMS = 250  # records per transaction here (TRANSACTION_ITEMS is 10,000)
N = 4 * ITEMS  # four transactions
ROW_SECONDS = 0.001  # what the trigger sleeps for each row written (pg_sleep's finest step)
BUDGET = 1.5  # seconds: one transaction's 250 rows (about 0.55 s) fit, N's 1,000 (2.2 s) do not


@pytest.fixture(autouse=True)
def small_transactions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_postgres, "TRANSACTION_ITEMS", ITEMS)


@pytest.fixture(scope="module")
def slow_server(server_dir: Path) -> Iterator[PostgresServer]:
    server = start_or_skip(lambda: PostgresServer(server_dir / "slow-postgres"))
    yield server
    server.stop()


def slow_down(url: str, row_seconds: float) -> None:
    """Every row written to the records table waits `row_seconds` on the server."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE OR REPLACE FUNCTION recoverable_state.slow_row() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN PERFORM pg_sleep({row_seconds}); RETURN NEW; END $$"
        )
        conn.execute(
            "CREATE OR REPLACE TRIGGER slow BEFORE INSERT OR UPDATE ON recoverable_state.records "
            "FOR EACH ROW EXECUTE FUNCTION recoverable_state.slow_row()"
        )


def refuse_after(url: str, rows: int) -> None:
    """The `rows`+1-th row written from now on fails (an error the server answers with)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE SEQUENCE IF NOT EXISTS recoverable_state.written")
        conn.execute(
            "CREATE OR REPLACE FUNCTION recoverable_state.slow_row() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN IF nextval('recoverable_state.written') > {rows} THEN "
            "RAISE EXCEPTION 'refused by the test'; END IF; RETURN NEW; END $$"
        )


async def test_a_batch_too_slow_for_one_transaction_lands_in_several(slow_server: PostgresServer) -> None:
    flush_postgres(slow_server.url)
    async with open_backend(slow_server.url, retry_timeout=BUDGET) as backend:
        kvs = await KeyValueStore.open(name="big", storage=backend)
        slow_down(slow_server.url, ROW_SECONDS)
        puts = [(kvs, kvs.prepare_put(f"k{i}", b"%d" % i, "application/json")) for i in range(N)]
        outcomes = await KeyValueStore.put_together(puts)
        assert not [o for o in outcomes if isinstance(o, Exception)]
        assert [o.version for o in outcomes] == [1] * N
        back = await KeyValueStore.get_together([(kvs, f"k{i}", False) for i in range(0, N, 997)])
        assert [r.value for r in back if r is not None and not isinstance(r, Exception)] == [
            b"%d" % i for i in range(0, N, 997)
        ]


async def stored(backend: Any, n: int) -> list[Any]:
    kvs = await KeyValueStore.open(name="states", storage=backend)
    records = await KeyValueStore.get_together([(kvs, f"s{i}", False) for i in range(n)])
    return [None if r is None else json.loads(r.value) for r in records]  # type: ignore[union-attr]


class Count(BaseModel):
    n: int = 0


async def test_a_batch_failing_in_its_second_transaction_leaves_states_that_a_persist_settles(
    slow_server: PostgresServer,
) -> None:
    flush_postgres(slow_server.url)
    async with open_backend(slow_server.url, retry_timeout=30) as backend:
        await KeyValueStore.open(name="states", storage=backend)  # the schema, before the trigger
        slow_down(slow_server.url, 0)
        async with EventManager(persist_state_interval=3600) as manager:
            states = [
                RecoverableState(
                    default_state=Count(),
                    persist_state_key=f"s{i}",
                    persistence_enabled="explicit_only",
                    persist_state_kvs_factory=lambda: KeyValueStore.open(name="states", storage=backend),
                    event_manager=manager,
                )
                for i in range(ITEMS + 10)
            ]
            await RecoverableState.initialize_many(states)
            for s in states:
                s.current_value.n = 1
            refuse_after(slow_server.url, ITEMS)  # the first transaction lands, the next fails
            with pytest.raises(StorageError, match="refused by the test"):
                await RecoverableState.persist_many(states)
            assert await stored(backend, len(states)) == [{"n": 1}] * ITEMS + [None] * 10  # the first landed
            refuse_after(slow_server.url, 10**9)
            for s in states:
                s.current_value.n = 2
            await RecoverableState.persist_many(states)  # each state in doubt is checked, then written
            assert await stored(backend, len(states)) == [{"n": 2}] * len(states)
            for s in states:
                await s.teardown()
