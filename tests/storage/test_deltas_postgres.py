"""PostgreSQL deltas: an append costs the delta, a failed batch tears nothing, old databases work."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator

import anyio
import psycopg
import pytest

from recoverable_state import StorageError
from recoverable_state.storage import (
    CHAIN_CONTENT_TYPE,
    DELTA_CONTENT_TYPE,
    RecordAppend,
    RecordRead,
    RecordWrite,
    StorageBackend,
    StoredRecord,
    WriteOutcome,
    open_backend,
    unpack_chain,
)
from recoverable_state.storage._postgres import PostgresBackend
from recoverable_state.testing import FaultInjectingBackend
from servers import flush_postgres

BYTES = "application/octet-stream"
pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    if request.param == "trio":
        pytest.importorskip("trio")
    return str(request.param)


@pytest.fixture
async def backend(postgres_url: str) -> AsyncIterator[StorageBackend]:
    flush_postgres(postgres_url)
    b = open_backend(postgres_url)
    try:
        yield b
    finally:
        await b.aclose()


def _delta(n: int) -> bytes:
    return json.dumps([{"n": 1}, {"n": n}]).encode()


def _records_size(url: str) -> int:
    """The records table with its TOAST and indexes, in bytes."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_total_relation_size('recoverable_state.records')").fetchone()
        assert row is not None
        return int(row[0])


async def _one(backend: StorageBackend, store_id: str, key: str) -> StoredRecord:
    (record,) = await backend.read_batch([RecordRead(store_id, key)])
    assert isinstance(record, StoredRecord)
    return record


async def test_an_append_to_a_big_record_costs_the_delta(backend: StorageBackend, postgres_url: str) -> None:
    store = await backend.open_store(name="big")
    snapshot = os.urandom(5 * 1024 * 1024)  # incompressible: stored out of line (TOAST) as it is
    assert await backend.write_batch([RecordWrite(store.id, "k", snapshot, BYTES, 0)]) == [
        WriteOutcome(True, 1)
    ]
    before = _records_size(postgres_url)
    for v in range(1, 21):
        outcome = await backend.write_batch([RecordAppend(store.id, "k", _delta(v), DELTA_CONTENT_TYPE, v)])
        assert outcome == [WriteOutcome(True, v + 1)]
    grown = _records_size(postgres_url) - before
    assert grown < 512 * 1024, f"records grew by {grown} bytes over 20 appends"
    record = await _one(backend, store.id, "k")
    assert record.content_type == CHAIN_CONTENT_TYPE and record.version == 21
    pieces = unpack_chain(record.value)
    assert pieces[0] == (snapshot, BYTES)
    assert [json.loads(v)[1]["n"] for v, _ in pieces[1:]] == list(range(1, 21))


async def test_a_failed_batch_with_appends_leaves_nothing_torn(backend: StorageBackend) -> None:
    store = await backend.open_store(name="faults")
    await backend.write_batch([RecordWrite(store.id, k, b"{}", BYTES, 0) for k in ("a", "b")])
    faulty = FaultInjectingBackend(backend)
    faulty.fail_next(when="before")
    batch = [RecordAppend(store.id, k, _delta(1), DELTA_CONTENT_TYPE, 1) for k in ("a", "b")]
    with pytest.raises(StorageError):
        await faulty.write_batch(batch)
    assert [(r.version, r.content_type) for r in [await _one(backend, store.id, k) for k in "ab"]] == [
        (1, BYTES),
        (1, BYTES),
    ]
    faulty.fail_next(when="requests", match=lambda op: getattr(op, "key", None) == "a")
    outcomes = await faulty.write_batch(batch)
    assert isinstance(outcomes[0], StorageError) and outcomes[1] == WriteOutcome(True, 2)
    a, b = await _one(backend, store.id, "a"), await _one(backend, store.id, "b")
    assert (a.version, a.content_type) == (1, BYTES)
    assert b.version == 2 and len(unpack_chain(b.value)) == 2


async def test_a_transaction_failing_on_the_server_appends_nothing(
    backend: StorageBackend, postgres_url: str
) -> None:
    """A row lock held elsewhere makes the batch time out on the server: rolled back whole."""
    store = await backend.open_store(name="locked")
    await backend.write_batch([RecordWrite(store.id, k, b"{}", BYTES, 0) for k in ("a", "b")])
    impatient = PostgresBackend(postgres_url, retry_timeout=1.0)
    try:
        with psycopg.connect(postgres_url) as holder:
            holder.execute(
                "SELECT 1 FROM recoverable_state.records WHERE store_id = %s AND key = 'b' FOR UPDATE",
                (store.id,),
            )
            batch = [RecordAppend(store.id, k, _delta(1), DELTA_CONTENT_TYPE, 1) for k in ("a", "b")]
            with pytest.raises(StorageError):
                await impatient.write_batch(batch)
            holder.rollback()
        for k in "ab":
            record = await _one(backend, store.id, k)
            assert (record.version, record.content_type, record.value) == (1, BYTES, b"{}")
    finally:
        await impatient.aclose()


async def test_a_database_made_before_deltas_opens_and_appends(postgres_url: str) -> None:
    flush_postgres(postgres_url)
    first = open_backend(postgres_url)
    try:
        store = await first.open_store(name="old")
        await first.write_batch([RecordWrite(store.id, "k", b'{"n":0}', BYTES, 0)])
    finally:
        await first.aclose()
    with psycopg.connect(postgres_url, autocommit=True) as conn:  # as the code before deltas left it
        conn.execute("DROP TABLE recoverable_state.deltas")
    second = open_backend(postgres_url)
    try:
        store = await second.open_store(name="old")
        assert (await _one(second, store.id, "k")).value == b'{"n":0}'
        assert await second.write_batch([RecordAppend(store.id, "k", _delta(1), DELTA_CONTENT_TYPE, 1)]) == [
            WriteOutcome(True, 2)
        ]
        record = await _one(second, store.id, "k")
        assert unpack_chain(record.value) == [(b'{"n":0}', BYTES), (_delta(1), DELTA_CONTENT_TYPE)]
    finally:
        await second.aclose()


async def test_fencing_holds_across_two_backends(backend: StorageBackend, postgres_url: str) -> None:
    store = await backend.open_store(name="fenced")
    await backend.write_batch([RecordWrite(store.id, "k", b"{}", BYTES, 0)])
    other = open_backend(postgres_url)
    try:
        (mine,) = await backend.read_batch([RecordRead(store.id, "k", claim=True)])
        assert isinstance(mine, StoredRecord) and mine.version == 2
        (theirs,) = await other.read_batch([RecordRead(store.id, "k", claim=True)])
        assert isinstance(theirs, StoredRecord) and theirs.version == 3

        async def append(b: StorageBackend, version: int) -> list[object]:
            return list(
                await b.write_batch(
                    [RecordAppend(store.id, "k", _delta(version), DELTA_CONTENT_TYPE, version)]
                )
            )

        assert await append(backend, 2) == [WriteOutcome(False, 3)]
        async with anyio.create_task_group() as tg:  # the new owner appends while the old one retries
            tg.start_soon(append, other, 3)
            tg.start_soon(append, backend, 3)
        record = await _one(backend, store.id, "k")
        assert record.version == 4 and len(unpack_chain(record.value)) == 2  # one of the two, not both
    finally:
        await other.aclose()
