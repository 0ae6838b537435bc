"""Group commit: writes that arrive together travel together; cancellation never loses track.

Each backend has one batcher, found in a table that holds the backend weakly.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Sequence

import anyio
import pytest

from recoverable_state import KeyValueStore, StorageError
from recoverable_state.storage import MemoryBackend, WriteOp, WriteOutcome, _batching, batcher_of

pytestmark = pytest.mark.anyio

BYTES = "application/octet-stream"


class GatedMemory(MemoryBackend):
    """A memory backend whose batches wait for the test to let them through."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[str]] = []
        self.release = anyio.Event()
        self.entered = anyio.Event()

    async def write_batch(self, writes: Sequence[WriteOp]) -> list[WriteOutcome | StorageError]:
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


async def test_a_leader_cancelled_in_flight_leaves_at_once_and_its_batch_is_cancelled() -> None:
    """A hung backend never holds a cancelled caller: cancellation reaches the flush."""
    backend = GatedMemory()
    kvs = await KeyValueStore.open(storage=backend)

    async def follower() -> None:
        await kvs.put_record("joined", b"v", BYTES)

    async with anyio.create_task_group() as tg:
        with anyio.CancelScope() as scope:
            tg.start_soon(kvs.put_record, "first", b"v", BYTES)  # leads the first batch
            await backend.entered.wait()
            tg.start_soon(follower)
            await anyio.sleep(0.02)
            backend.entered = anyio.Event()
            scope.cancel()
        tg.cancel_scope.cancel()  # the leader task: cancelled while its flush waits
    assert not await kvs.record_exists("first")


async def test_a_caller_in_someone_elses_batch_leaves_at_once_and_the_batch_lands() -> None:
    backend = GatedMemory()
    kvs = await KeyValueStore.open(storage=backend)
    left: list[str] = []
    release_first = anyio.Event()

    async def joined() -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            await kvs.put_record("joined", b"v", BYTES)
        left.append("cancelled" if scope.cancelled_caught else "done")

    scopes: list[anyio.CancelScope] = []
    backend.release = release_first
    async with anyio.create_task_group() as tg:
        tg.start_soon(kvs.put_record, "first", b"v", BYTES)
        await backend.entered.wait()
        tg.start_soon(kvs.put_record, "leader-2", b"v", BYTES)  # will lead the second batch
        await anyio.sleep(0.01)
        tg.start_soon(joined)  # travels in the second batch, led by another caller
        await anyio.sleep(0.01)
        gate = anyio.Event()
        backend.release = gate
        release_first.set()
        while len(backend.batches) < 2:
            await anyio.sleep(0.001)
        scopes[0].cancel()
        await anyio.sleep(0.02)
        assert left == ["cancelled"]
        gate.set()
    assert await kvs.record_exists("joined")  # the batch went on without its caller


async def test_a_failing_batch_fails_every_write_in_it_and_the_next_batch_runs() -> None:
    class FailOnce(MemoryBackend):
        failed = False
        entered = anyio.Event()  # the failing batch is on its way to the store

        async def write_batch(self, writes: Sequence[WriteOp]) -> list[WriteOutcome | StorageError]:
            if not self.failed:
                self.failed = True
                self.entered.set()
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
        await backend.entered.wait()  # "a" travels alone: "b" can only join the next batch
        tg.start_soon(write, "b")
    assert errors == ["a: store 'default': disk full"]
    assert await kvs.get_value("b") == b"x"


# -- the one batcher of a backend ------------------------------------------------------


async def test_the_batcher_of_a_backend_writes_nothing_onto_it() -> None:
    backend = MemoryBackend()
    before = dict(vars(backend))
    kvs = await KeyValueStore.open(name="jobs", storage=backend)
    await kvs.set_value("k", 1)
    assert batcher_of(backend) is batcher_of(backend)
    assert vars(backend).keys() == before.keys()


async def test_a_backend_nobody_holds_is_forgotten_with_its_batcher() -> None:
    backend = MemoryBackend()
    kvs = await KeyValueStore.open(name="jobs", storage=backend)
    await kvs.set_value("k", 1)
    gone = weakref.ref(backend)
    batcher = weakref.ref(batcher_of(backend))
    key = id(backend)
    del backend, kvs
    gc.collect()
    assert gone() is None
    assert batcher() is None
    assert key not in _batching._batchers


async def test_a_backend_that_is_not_hashable_is_served_too() -> None:
    class Unhashable(MemoryBackend):
        __hash__ = None  # type: ignore[assignment]  # as a dataclass with eq=True makes it

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Unhashable)

    backend = Unhashable()
    kvs = await KeyValueStore.open(name="jobs", storage=backend)
    await kvs.set_value("k", 1)
    assert await kvs.get_value("k") == 1
    assert batcher_of(backend) is not batcher_of(Unhashable())
