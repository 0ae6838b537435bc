"""A PostgreSQL primary killed under a running worker, its standby promoted: through the library.

The backend's URL names both servers (`host1:port1,host2:port2`, with
`target_session_attrs=read-write`), so psycopg finds whichever is the primary.
With a synchronous standby every persist the worker was told succeeded is on the
new primary, and the rounds resume within the retry budget. With an
asynchronous standby that had not received the last commits, the worker meets
records older than the ones it wrote: it writes them again with a WARNING, never
takes them for a takeover; a record another process has since moved past its
version still fences it off. Both loops.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import psycopg
import pytest
from pydantic import BaseModel

from fleet_servers import PostgresPrimaryStandby
from recoverable_state import EventManager, KeyValueStore, RecoverableState, StateOwnershipLost
from recoverable_state.storage import RecordWrite, StorageBackend, WriteOutcome, open_backend
from servers import flush_postgres

pytestmark = [pytest.mark.anyio]

STORE = "failover"
STATES = 20
BUDGET = 5.0
"""The backend's `retry_timeout`: the failover (kill, 0.5 s, promote) must fit in it."""


class Counter(BaseModel):
    n: int = 0


@pytest.fixture
def pair_sync(sync_pair: PostgresPrimaryStandby) -> PostgresPrimaryStandby:
    flush_postgres(sync_pair.primary_url)
    return sync_pair


@pytest.fixture
def pair_async(async_pair: PostgresPrimaryStandby) -> PostgresPrimaryStandby:
    flush_postgres(async_pair.primary_url)
    return async_pair


def _recording(backend: StorageBackend, acked: dict[str, int]) -> None:
    """Note, per key, the highest version a write batch answered as applied (what the worker was told)."""
    original = backend.write_batch

    async def write_batch(ops: Sequence[Any]) -> list[Any]:
        outcomes = await original(ops)
        for op, outcome in zip(ops, outcomes, strict=True):
            if isinstance(op, RecordWrite) and isinstance(outcome, WriteOutcome) and outcome.applied:
                acked[op.key] = max(acked.get(op.key, 0), outcome.version)
        return outcomes

    backend.write_batch = write_batch  # type: ignore[method-assign]


def _states(manager: EventManager | None, backend: StorageBackend, keys: list[str]) -> list[Any]:
    async def store() -> KeyValueStore:
        return await KeyValueStore.open(name=STORE, storage=backend)

    return [
        RecoverableState(
            default_state=Counter(),
            persist_state_key=key,
            persistence_enabled=True if manager is not None else "explicit_only",
            persist_state_kvs_factory=store,
            event_manager=manager,
        )
        for key in keys
    ]


def _versions(url: str) -> dict[str, int]:
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        return dict(conn.execute("SELECT key, version FROM recoverable_state.records").fetchall())  # type: ignore[arg-type]


def _standby_replayed(pair: PostgresPrimaryStandby) -> dict[str, int]:
    """What the standby holds once it has replayed all the WAL it received (the primary dead)."""
    deadline = time.monotonic() + 10
    while True:
        lag = pair.standby_lag()
        if lag["received_lsn"] == lag["replayed_lsn"]:
            return _versions(pair.standby_url)
        assert time.monotonic() < deadline
        time.sleep(0.02)


def _lost_writes(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "the server lost writes" in r.getMessage()
    ]


@pytest.mark.slow
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_with_a_synchronous_standby_no_acknowledged_persist_is_lost_and_the_worker_goes_on(
    pair_sync: PostgresPrimaryStandby, anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    pair = pair_sync
    backend = open_backend(pair.url, retry_timeout=BUDGET)
    acked: dict[str, int] = {}
    _recording(backend, acked)
    keys = [f"worker-{i}" for i in range(STATES)]
    running = True
    caplog.set_level(logging.WARNING, logger="recoverable_state")
    async with EventManager(persist_state_interval=timedelta(milliseconds=100)) as manager:
        states = _states(manager, backend, keys)
        await RecoverableState.initialize_many(states)

        async def work() -> None:
            while running:
                for state in states:
                    state.current_value.n += 1
                await anyio.sleep(0.01)

        async with anyio.create_task_group() as tg:
            tg.start_soon(work)
            await anyio.sleep(0.6)
            at_kill = dict(acked)
            await anyio.to_thread.run_sync(pair.kill_primary)
            killed_at = datetime.now(UTC)
            began = time.monotonic()
            held = await anyio.to_thread.run_sync(_standby_replayed, pair)
            await anyio.sleep(0.5)  # the worker meets the dead primary and a read-only standby
            await anyio.to_thread.run_sync(pair.promote)
            with anyio.fail_after(BUDGET):  # a round that saved every state, begun after the kill
                while (manager.stats.last_success_at or killed_at) <= killed_at:
                    await anyio.sleep(0.02)
            resumed = time.monotonic() - began
            await anyio.sleep(0.5)
            running = False
        for state in states:
            await state.teardown()
    await backend.aclose()
    print(f"persists resumed {resumed:.2f} s after the kill")
    assert len(at_kill) == STATES and min(at_kill.values()) >= 3
    # Every persist acknowledged before the kill is on the standby, before it is even promoted.
    assert {k: v for k, v in at_kill.items() if held.get(k, 0) < v} == {}
    # And at the end the new primary holds each state's last acknowledged write, nothing lost.
    assert _versions(pair.url) == acked
    assert resumed < BUDGET
    assert dict(manager.stats.persists_failed) == {}  # every wait was retried within the budget
    assert manager.stats.ownership_losses == 0
    assert not any(s.ownership_lost for s in states)
    assert _lost_writes(caplog) == []


@pytest.mark.slow
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_after_a_failover_that_lost_commits_the_worker_writes_again_and_a_newer_record_fences(
    pair_async: PostgresPrimaryStandby, anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    pair = pair_async
    worker = open_backend(pair.url, retry_timeout=BUDGET)
    successor = open_backend(pair.url + "&application_name=successor", retry_timeout=BUDGET)
    keys = [f"job-{i}" for i in range(5)]
    try:
        states = _states(None, worker, keys)
        await RecoverableState.initialize_many(states)
        for n in (1, 2, 3):
            for state in states:
                state.current_value.n = n
            await RecoverableState.persist_many(states)
        await anyio.to_thread.run_sync(pair.wait_replayed)
        await anyio.to_thread.run_sync(pair.pause_streaming)  # the standby gets nothing from here
        for n in (4, 5):  # acknowledged by the primary alone
            for state in states:
                state.current_value.n = n
            await RecoverableState.persist_many(states)
        await anyio.to_thread.run_sync(pair.kill_primary)
        await anyio.to_thread.run_sync(pair.promote)
        assert await anyio.to_thread.run_sync(_versions, pair.url) == dict.fromkeys(keys, 3)

        # Another process takes job-4 over on the new primary and moves it past version 5.
        theirs = await KeyValueStore.open(name=STORE, storage=successor)
        claimed = await theirs.get_record("job-4", claim=True)
        assert claimed is not None and claimed.version == 4
        version = claimed.version
        for value in (b'{"n":100}', b'{"n":101}'):
            outcome = await theirs.put_record("job-4", value, "application/json", expected_version=version)
            assert outcome.applied
            version = outcome.version
        assert version == 6

        for state in states:
            state.current_value.n = 6
        with caplog.at_level(logging.WARNING, logger="recoverable_state"), pytest.raises(StateOwnershipLost):
            await RecoverableState.persist_many(states)
        assert [s.ownership_lost for s in states] == [False] * 4 + [True]
        lost = _lost_writes(caplog)
        assert len(lost) == 4
        for key, message in zip(keys, sorted(lost), strict=False):
            assert f"store '{STORE}', key '{key}': the store holds version 3, older than version 5" in message
        assert not any("job-4" in m for m in lost)
        ours = await KeyValueStore.open(name=STORE, storage=successor)
        assert [await ours.get_value(k) for k in keys] == [{"n": 6}] * 4 + [{"n": 101}]
        assert await anyio.to_thread.run_sync(_versions, pair.url) == {
            **dict.fromkeys(keys[:4], 4),
            "job-4": 6,
        }
        for state in states:
            await state.teardown()
    finally:
        await worker.aclose()
        await successor.aclose()
