"""The shipped conformance suite (`recoverable_state.testing`), run from the package against every store.

Each class below is what a third-party package writes to prove its backend: a
subclass of `BackendConformance` with a `make_backend` fixture. The stores are
memory, SQLite, files, Redis and PostgreSQL (real servers on loopback, from
tests/conftest.py), and the fault-injecting wrapper around SQLite with no fault
injected. A few checks of this repository's own follow (the facade's key
rules, group commit, the cut batches of the server backends).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from recoverable_state import InvalidKeyError
from recoverable_state.storage import (
    JSON_CONTENT_TYPE,
    KeyValueStore,
    MemoryBackend,
    RecordRead,
    RecordWrite,
    StorageBackend,
    WriteOutcome,
    batcher_of,
    open_backend,
)
from recoverable_state.testing import BackendConformance, FaultInjectingBackend
from recoverable_state.testing.conformance import MakeBackend, check_random_batches
from servers import flush_postgres, flush_redis

BYTES = "application/octet-stream"


class TestMemory(BackendConformance):
    durable = False
    shared = False

    @pytest.fixture
    def make_backend(self) -> MakeBackend:
        return MemoryBackend


class TestSQLite(BackendConformance):
    @pytest.fixture
    def make_backend(self, tmp_path: Path) -> MakeBackend:
        return lambda: open_backend(f"sqlite:///{tmp_path}/s.sqlite3")


class TestFiles(BackendConformance):
    @pytest.fixture
    def make_backend(self, tmp_path: Path) -> MakeBackend:
        return lambda: open_backend(f"file://{tmp_path}/files")


class CutBatches:
    """Server backends cut a batch into script calls or statements of 64 MiB; cut often, nothing changes."""

    @pytest.mark.anyio
    async def test_random_batches_cut_into_many_calls_answer_as_the_planner(
        self, backend: StorageBackend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from recoverable_state.storage import _contract

        monkeypatch.setattr(_contract, "BATCH_BYTES", 3000)
        await check_random_batches(backend, f"{type(self).__name__}-cut", keeps_history=True)


class TestRedis(CutBatches, BackendConformance):
    @pytest.fixture
    def make_backend(self, redis_url: str) -> MakeBackend:
        flush_redis(redis_url)
        return lambda: open_backend(redis_url)


class TestPostgres(CutBatches, BackendConformance):
    @pytest.fixture
    def make_backend(self, postgres_url: str) -> MakeBackend:
        flush_postgres(postgres_url)
        return lambda: open_backend(postgres_url)


class TestFaultInjectingWrapper(BackendConformance):
    """With no fault injected, the wrapper is a conforming backend itself."""

    @pytest.fixture
    def make_backend(self, tmp_path: Path) -> MakeBackend:
        return lambda: FaultInjectingBackend(open_backend(f"sqlite:///{tmp_path}/s.sqlite3"))


# -- this repository's own checks, on every store ---------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("key", "shown"),
    [
        ("", "''"),
        ("nul\x00inside", "nul"),
        ("tab\there", "tab"),
        ("line\nbreak", "line"),
        ("x" * 1025, "xxxxxxxxxx"),
    ],
    ids=["empty", "nul", "tab", "newline", "too-long"],
)
async def test_invalid_keys_are_refused_naming_store_and_key(
    backend: StorageBackend, key: str, shown: str
) -> None:
    kvs = await KeyValueStore.open(name="strict-store", storage=backend)
    attempts: list[Callable[[], Awaitable[object]]] = [
        lambda: kvs.set_value(key, 1),
        lambda: kvs.get_value(key),
        lambda: kvs.delete_value(key),
        lambda: kvs.record_exists(key),
        lambda: kvs.put_record(key, b"v", BYTES),
        lambda: kvs.get_record(key, claim=True),
        lambda: kvs.delete_record(key, expected_version=1),
        lambda: kvs.get_history(key),
    ]
    for attempt in attempts:
        with pytest.raises(InvalidKeyError) as caught:
            await attempt()
        assert "strict-store" in str(caught.value)
        assert shown in str(caught.value)
        assert caught.value.store == "strict-store"
    assert await kvs.list_keys() == []


@pytest.mark.anyio
async def test_concurrent_writes_and_deletes_arrive_in_few_batches(
    storage_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    probe = open_backend(storage_url)
    await probe.aclose()
    batch_sizes: list[int] = []
    original = type(probe).write_batch

    async def counting(self: StorageBackend, ops: Sequence[RecordWrite]) -> Any:
        batch_sizes.append(len(ops))
        return await original(self, ops)

    monkeypatch.setattr(type(probe), "write_batch", counting)
    backend = open_backend(storage_url)
    try:
        kvs = await KeyValueStore.open(name="many", storage=backend)
        outcomes: dict[int, WriteOutcome] = {}

        async def write(i: int) -> None:
            value = f'{{"n": {i}, "pad": "{"x" * (i % 50)}"}}'.encode()
            outcomes[i] = await batcher_of(backend).write(
                RecordWrite(kvs.id, f"state-{i:04d}", value, JSON_CONTENT_TYPE)
            )

        async with anyio.create_task_group() as tg:
            for i in range(2000):
                tg.start_soon(write, i)
        assert sum(batch_sizes) == 2000
        assert len(batch_sizes) <= 20, batch_sizes
        assert all(outcomes[i] == WriteOutcome(True, 1) for i in range(2000))

        batch_sizes.clear()
        async with anyio.create_task_group() as tg:
            for i in range(0, 2000, 2):
                tg.start_soon(kvs.delete_value, f"state-{i:04d}")
            for i in range(1, 2000, 2):
                tg.start_soon(write, i)
        assert sum(batch_sizes) == 2000
        assert len(batch_sizes) <= 20, batch_sizes  # deletes travel with the writes
        assert [i.key for i in await kvs.list_keys()] == [f"state-{i:04d}" for i in range(1, 2000, 2)]
        records = await backend.read_batch([RecordRead(kvs.id, f"state-{i:04d}") for i in range(1, 2000, 2)])
        for i, record in zip(range(1, 2000, 2), records, strict=True):
            assert record is not None and not isinstance(record, Exception)
            assert json.loads(record.value) == {"n": i, "pad": "x" * (i % 50)}
            assert record.version == 2
    finally:
        await backend.aclose()
