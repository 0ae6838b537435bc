"""Group commit: writes that arrive together travel together; cancellation never loses track."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import pytest

from recoverable_state import KeyValueStore, StorageError
from recoverable_state.storage import MemoryBackend, RecordWrite, WriteOutcome

pytestmark = pytest.mark.anyio

BYTES = "application/octet-stream"


class GatedMemory(MemoryBackend):
    """A memory backend whose batches wait for the test to let them through."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[str]] = []
        self.release = anyio.Event()
        self.entered = anyio.Event()

    async def write_batch(self, writes: Sequence[RecordWrite]) -> list[WriteOutcome | StorageError]:
        self.batches.append([w.key for w in writes])
        self.entered.set()
        await self.release.wait()
        return await super().write_batch(writes)


async def test_writes_arriving_during_a_batch_form_the_next_one() -> None:
    backend = GatedMemory()
    kvs = await KeyValueStore.open(storage=backend)
    async with anyio.create_task_group() as tg:
        tg.start_soon(kvs.set_value, "first", b"1")
        await backend.entered.wait()
        for i in range(50):
            tg.start_soon(kvs.set_value, f"k{i}", b"x")
        await anyio.sleep(0.05)
        backend.release.set()
    assert backend.batches[0] == ["first"]
    assert sorted(backend.batches[1]) == sorted(f"k{i}" for i in range(50))
    assert len(backend.batches) == 2
    assert await kvs.get_value("k49") == b"x"


async def test_a_write_cancelled_while_queued_is_withdrawn() -> None:
    backend = GatedMemory()
    kvs = await KeyValueStore.open(storage=backend)
    async with anyio.create_task_group() as tg:
        tg.start_soon(kvs.set_value, "first", b"1")
        await backend.entered.wait()
        with anyio.move_on_after(0.05) as scope:
            await kvs.set_value("withdrawn", b"2")
        assert scope.cancelled_caught
        backend.release.set()
    assert backend.batches == [["first"]]
    assert not await kvs.record_exists("withdrawn")


async def test_a_write_cancelled_in_flight_is_seen_through_before_the_caller_leaves() -> None:
    backend = GatedMemory()
    kvs = await KeyValueStore.open(storage=backend)
    finished: list[str] = []

    async def writer() -> None:
        with anyio.CancelScope() as scope:
            cancel_scopes.append(scope)
            await kvs.put_record("in-flight", b"v", BYTES)
        finished.append("cancelled" if scope.cancelled_caught else "done")

    cancel_scopes: list[anyio.CancelScope] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(writer)
        await backend.entered.wait()
        cancel_scopes[0].cancel()
        await anyio.sleep(0.02)
        assert finished == []  # the caller waits for the write it started
        backend.release.set()
    record = await kvs.get_record("in-flight")
    assert record is not None and record.version == 1
    assert len(finished) == 1  # it left only once the write it started was durable


async def test_a_failing_batch_fails_every_write_in_it_and_the_next_batch_runs() -> None:
    class FailOnce(MemoryBackend):
        failed = False

        async def write_batch(self, writes: Sequence[RecordWrite]) -> list[WriteOutcome | StorageError]:
            if not self.failed:
                self.failed = True
                await anyio.sleep(0.02)
                raise StorageError("disk full", store="default")
            return await super().write_batch(writes)

    backend = FailOnce()
    kvs = await KeyValueStore.open(storage=backend)
    errors: list[str] = []

    async def write(key: str) -> None:
        try:
            await kvs.set_value(key, b"x")
        except StorageError as exc:
            errors.append(key + ": " + str(exc))

    async with anyio.create_task_group() as tg:
        tg.start_soon(write, "a")
        await anyio.sleep(0.005)
        tg.start_soon(write, "b")
    assert errors == ["a: store 'default': disk full"]
    assert await kvs.get_value("b") == b"x"
