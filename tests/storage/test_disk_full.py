"""A disk that fills up mid-batch, on a real small file system (tmpfs, mounted when root).

What every state was told must be what the store holds: a record that was
written is reported as written, one that was not changes nothing, and no state
is ever told another process took it over.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel
from small_disk import small_tmpfs

from recoverable_state import KeyValueStore, RecoverableState, StorageError
from recoverable_state.storage import RecordDelete, RecordWrite, WriteOutcome, open_backend

pytestmark = pytest.mark.anyio


class Blob(BaseModel):
    data: str = ""


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs."""
    with small_tmpfs(tmp_path, "1m") as mount:
        yield mount


def make_states(kvs: KeyValueStore) -> tuple[RecoverableState[Blob], RecoverableState[Blob]]:
    async def factory() -> KeyValueStore:
        return kvs

    return tuple(  # type: ignore[return-value]
        RecoverableState(
            default_state=Blob(),
            persist_state_key=key,
            persistence_enabled="explicit_only",
            persist_state_kvs_factory=factory,
        )
        for key in ("small", "big")
    )


@pytest.mark.parametrize("kind", ["file", "sqlite"])
async def test_a_disk_filling_up_mid_batch_is_told_truthfully(small_disk: Path, kind: str) -> None:
    url = f"file://{small_disk}/files" if kind == "file" else f"sqlite:///{small_disk}/s.sqlite3"
    backend = open_backend(url)
    kvs = await KeyValueStore.open(name="jobs", storage=backend)
    small, big = make_states(kvs)
    await RecoverableState.initialize_many([small, big])
    small.current_value.data = "a" * 100
    big.current_value.data = "b" * (2 * 1024 * 1024)  # more than the disk holds

    with pytest.raises((StorageError, ExceptionGroup)):
        await RecoverableState.persist_many([small, big])
    assert not small.ownership_lost and not big.ownership_lost

    reader = open_backend(url)
    stored = await (await KeyValueStore.open(id=kvs.id, storage=reader)).get_value("small")
    if kind == "file":
        assert stored == {"data": "a" * 100}  # written, and told so
    else:
        assert stored is None  # one transaction: nothing of the batch was written, and told so
    assert await (await KeyValueStore.open(id=kvs.id, storage=reader)).get_value("big") is None

    # The worker goes on: the next persist of each lands, and nobody claims the states were taken.
    small.current_value.data = "c" * 100
    big.current_value.data = "d" * 100
    await RecoverableState.persist_many([small, big])
    assert not small.ownership_lost and not big.ownership_lost
    again = await KeyValueStore.open(id=kvs.id, storage=open_backend(url))
    assert await again.get_value("small") == {"data": "c" * 100}
    assert await again.get_value("big") == {"data": "d" * 100}
    for state in (small, big):
        await state.teardown()
    await backend.aclose()
    await reader.aclose()


@pytest.mark.parametrize("kind", ["file", "sqlite"])
async def test_a_delete_beside_a_write_the_full_disk_refuses_is_told_truthfully(
    small_disk: Path, kind: str
) -> None:
    url = f"file://{small_disk}/files" if kind == "file" else f"sqlite:///{small_disk}/s.sqlite3"
    async with open_backend(url) as backend:
        kvs = await KeyValueStore.open(name="jobs", storage=backend)
        await kvs.set_value("gone", "x" * 100)
        ops = [
            RecordDelete(kvs.id, "gone", 1),
            RecordWrite(kvs.id, "big", b"b" * (2 * 1024 * 1024), "text/plain"),
        ]
        try:
            outcomes: list[object] | None = list(await backend.write_batch(ops))
        except StorageError:
            outcomes = None  # the whole batch failed: SQLite's one transaction
    async with open_backend(url) as reader:
        again = await KeyValueStore.open(id=kvs.id, storage=reader)
        if outcomes is None:
            assert kind == "sqlite"
            assert await again.get_value("gone") == "x" * 100  # rolled back: nothing of the batch landed
        else:
            assert outcomes[0] == WriteOutcome(True, 0)  # the delete landed, and was told so
            assert isinstance(outcomes[1], StorageError)
            assert await again.get_record("gone") is None
        assert await again.get_record("big") is None
