"""The record contract under injected faults, on every store.

A fault-injecting wrapper fails chosen requests of a batch, fails the whole
batch before or after applying it, delays or hangs it. After every failure a
reload must see exactly what the callers were told (or, for a batch whose
outcome could not be told, one of the two possible states), and the next
write must land.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from recoverable_state import KeyValueStore, StorageError
from recoverable_state.storage import (
    RecordDelete,
    RecordRead,
    RecordWrite,
    StorageBackend,
    WriteOutcome,
    open_backend,
)
from recoverable_state.testing import FaultInjectingBackend

pytestmark = pytest.mark.anyio

T = "application/octet-stream"


@pytest.fixture
async def faulty(storage_url: str) -> AsyncIterator[FaultInjectingBackend]:
    async with FaultInjectingBackend(open_backend(storage_url)) as backend:
        yield backend


async def reopened(faulty: FaultInjectingBackend, storage_url: str, kvs: KeyValueStore) -> KeyValueStore:
    """The same store seen through a fresh backend (a restarted process), where the data is shared."""
    if storage_url.startswith("memory"):
        return await KeyValueStore.open(id=kvs.id, storage=faulty.inner)
    return await KeyValueStore.open(id=kvs.id, storage=open_backend(storage_url))


async def versions(kvs: KeyValueStore) -> dict[str, tuple[int, bytes]]:
    found = {}
    for info in await kvs.list_keys():
        record = await kvs.get_record(info.key)
        assert record is not None
        found[info.key] = (record.version, record.value)
    return found


async def test_requests_that_fail_alone_change_nothing_and_the_rest_lands(
    faulty: FaultInjectingBackend, storage_url: str
) -> None:
    kvs = await KeyValueStore.open(name="jobs", storage=faulty)
    await kvs.put_record("a", b"a1", T)
    await kvs.put_record("b", b"b1", T)
    faulty.fail_next(when="requests", match=lambda r: r.key == "b")
    outcomes = await KeyValueStore.put_together(
        [
            (kvs, kvs.prepare_put("a", b"a2", T, expected_version=1)),
            (kvs, kvs.prepare_put("b", b"b2", T, expected_version=1)),
            (kvs, kvs.prepare_put("c", b"c1", T, expected_version=0)),
        ]
    )
    assert outcomes[0] == WriteOutcome(True, 2)
    assert isinstance(outcomes[1], StorageError)
    assert outcomes[2] == WriteOutcome(True, 1)
    again = await reopened(faulty, storage_url, kvs)
    assert await versions(again) == {"a": (2, b"a2"), "b": (1, b"b1"), "c": (1, b"c1")}
    # What b's writer was told (nothing landed) is what it may rely on: its next write lands.
    assert await kvs.put_record("b", b"b2", T, expected_version=1) == WriteOutcome(True, 2)


async def test_a_batch_failing_before_it_is_applied_changes_nothing(
    faulty: FaultInjectingBackend, storage_url: str
) -> None:
    kvs = await KeyValueStore.open(name="jobs", storage=faulty)
    await kvs.put_record("a", b"a1", T)
    faulty.fail_next(when="before")
    with pytest.raises(StorageError, match="injected"):
        await kvs.put_record("a", b"a2", T, expected_version=1)
    again = await reopened(faulty, storage_url, kvs)
    assert await versions(again) == {"a": (1, b"a1")}
    assert await kvs.put_record("a", b"a2", T, expected_version=1) == WriteOutcome(True, 2)


async def test_a_batch_failing_after_it_is_applied_holds_the_whole_batch(
    faulty: FaultInjectingBackend, storage_url: str
) -> None:
    kvs = await KeyValueStore.open(name="jobs", storage=faulty)
    faulty.fail_next(when="after")
    with pytest.raises(StorageError):
        await KeyValueStore.put_together(
            [(kvs, kvs.prepare_put(k, k.encode(), T, expected_version=0)) for k in ("a", "b")]
        )
    again = await reopened(faulty, storage_url, kvs)
    # The caller could not be told; the store holds the whole batch, never half of it.
    assert await versions(again) == {"a": (1, b"a"), "b": (1, b"b")}


async def test_a_failed_claim_leaves_versions_as_they_were(
    faulty: FaultInjectingBackend, storage_url: str
) -> None:
    kvs = await KeyValueStore.open(name="jobs", storage=faulty)
    await kvs.put_record("a", b"a1", T)
    faulty.fail_next(on="read", when="before")
    with pytest.raises(StorageError):
        await kvs.get_record("a", claim=True)
    assert (await versions(await reopened(faulty, storage_url, kvs)))["a"][0] == 1
    record = await kvs.get_record("a", claim=True)
    assert record is not None and record.version == 2


async def test_a_hung_batch_is_cancelled_and_the_next_one_goes_through(
    faulty: FaultInjectingBackend, storage_url: str
) -> None:
    kvs = await KeyValueStore.open(name="jobs", storage=faulty)
    faulty.hang_next()
    with anyio.move_on_after(0.2) as scope:
        await kvs.put_record("a", b"a1", T)
    assert scope.cancelled_caught
    assert await versions(await reopened(faulty, storage_url, kvs)) == {}
    assert await kvs.put_record("a", b"a1", T, expected_version=0) == WriteOutcome(True, 1)


async def test_a_delayed_batch_gathers_the_writes_that_arrive_meanwhile(
    faulty: FaultInjectingBackend,
) -> None:
    kvs = await KeyValueStore.open(name="jobs", storage=faulty)
    seen: list[int] = []
    inner_write = faulty.inner.write_batch

    async def counting(writes: list[RecordWrite]) -> object:
        seen.append(len(writes))
        return await inner_write(writes)

    faulty.inner.write_batch = counting  # type: ignore[assignment,method-assign]
    faulty.delay_next(0.2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(kvs.put_record, "first", b"1", T)
        await anyio.sleep(0.05)
        for i in range(20):
            tg.start_soon(kvs.put_record, f"k{i}", b"x", T)
    assert seen == [1, 20]
    assert len(await kvs.list_keys()) == 21


async def test_reads_of_a_batch_fail_alone(faulty: FaultInjectingBackend) -> None:
    kvs = await KeyValueStore.open(name="jobs", storage=faulty)
    await kvs.put_record("a", b"a1", T)
    await kvs.put_record("b", b"b1", T)
    faulty.fail_next(on="read", when="requests", match=lambda r: r.key == "a")
    got = await KeyValueStore.get_together([(kvs, "a", True), (kvs, "b", True)])
    assert isinstance(got[0], StorageError)
    assert got[1] is not None and not isinstance(got[1], StorageError) and got[1].version == 2
    assert (await kvs.get_record("a")).version == 1  # type: ignore[union-attr]


async def test_every_backend_can_be_used_as_an_async_context_manager(storage_url: str) -> None:
    async with open_backend(storage_url) as backend:
        assert isinstance(backend, StorageBackend)
        kvs = await KeyValueStore.open(name="ctx", storage=backend)
        await kvs.set_value("k", 1)
        records = await backend.read_batch([RecordRead(kvs.id, "k")])
        assert records[0] is not None


async def test_a_delete_that_fails_alone_leaves_its_record_and_its_neighbours_land(
    faulty: FaultInjectingBackend, storage_url: str
) -> None:
    kvs = await KeyValueStore.open(name="jobs", storage=faulty)
    await kvs.put_record("a", b"a1", T)
    await kvs.put_record("b", b"b1", T)
    faulty.fail_next(when="requests", match=lambda r: isinstance(r, RecordDelete))
    outcomes = await faulty.write_batch(
        [RecordDelete(kvs.id, "a", 1), RecordWrite(kvs.id, "b", b"b2", T, 1), RecordDelete(kvs.id, "b")]
    )
    assert isinstance(outcomes[0], StorageError)
    assert isinstance(outcomes[2], StorageError)
    assert outcomes[1] == WriteOutcome(True, 2)
    assert await versions(await reopened(faulty, storage_url, kvs)) == {"a": (1, b"a1"), "b": (2, b"b2")}
    assert await kvs.delete_record("a", expected_version=1)
