"""The SQLite file deleted or replaced under a running worker: a clear error, never a silent loss.

Until now every write went on into the file the process still held open, which
no one would read again: the worker saw its persists succeed while the data was
gone. Each transaction now checks that the file at the path is the one opened.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from pydantic import BaseModel

from recoverable_state import EventManager, KeyValueStore, RecoverableState, StorageError
from recoverable_state.storage import open_backend

pytestmark = pytest.mark.anyio


class Progress(BaseModel):
    done: int = 0


def remove_database(db: Path) -> None:
    for part in db.parent.glob(db.name + "*"):  # the -wal and -shm too, as `rm state.sqlite3*` does
        part.unlink()


def move_database(source: Path, target: Path) -> None:
    target.mkdir(exist_ok=True)
    for part in source.glob("state.sqlite3*"):
        shutil.move(part, target / part.name)


async def test_a_persist_after_the_file_was_deleted_fails_naming_it(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite3"
    backend = open_backend(f"sqlite:///{db}")
    async with EventManager(persist_state_interval=3600) as manager:
        state = RecoverableState(
            default_state=Progress(),
            persist_state_key="progress",
            persistence_enabled=True,
            event_manager=manager,
            persist_state_kvs_factory=lambda: KeyValueStore.open(name="jobs", storage=backend),
        )
        (await state.initialize()).done = 1
        await state.persist_state()
        remove_database(db)
        state.current_value.done = 2
        with pytest.raises(StorageError, match=r"state\.sqlite3' was deleted while this process had it open"):
            await state.persist_state()
        assert state.current_value.done == 2  # kept in memory
        with pytest.raises(StorageError, match="was deleted"):
            await state.teardown()
    await backend.aclose()


async def test_a_file_replaced_by_another_is_refused_and_the_new_file_is_left_whole(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite3"
    backup = tmp_path / "backup.sqlite3"
    async with open_backend(f"sqlite:///{db}") as first:
        kvs = await KeyValueStore.open(name="jobs", storage=first)
        await kvs.set_value("k", "before the backup")
        async with open_backend(f"sqlite:///{backup}") as other:
            await (await KeyValueStore.open(name="jobs", storage=other)).set_value("k", "in the backup")
        remove_database(db)  # a backup restored over the file in use (its -wal and -shm removed)
        os.replace(backup, db)
        with pytest.raises(StorageError, match="was replaced by another file"):
            await kvs.set_value("k", "after the restore")
        with pytest.raises(StorageError, match="was replaced by another file"):
            await kvs.get_value("k")
        # Another process uses the restored file meanwhile: its WAL sits at the same path.
        second = open_backend(f"sqlite:///{db}")
        await (await KeyValueStore.open(name="jobs", storage=second)).set_value("k2", "the new file's")
    # The first backend is closed now; closing it must not have removed the new file's WAL,
    # which holds what the second one wrote (not yet copied into the file: it is still open).
    try:
        async with open_backend(f"sqlite:///{db}") as reader:
            kvs = await KeyValueStore.open(name="jobs", storage=reader)
            assert await kvs.get_value("k") == "in the backup"
            assert await kvs.get_value("k2") == "the new file's"
    finally:
        await second.aclose()


async def test_a_database_moved_back_in_place_is_used_again(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite3"
    async with open_backend(f"sqlite:///{db}") as backend:
        kvs = await KeyValueStore.open(name="jobs", storage=backend)
        await kvs.set_value("k", 1)
        move_database(tmp_path, tmp_path / "aside")
        with pytest.raises(StorageError, match="was deleted"):
            await kvs.set_value("k", 2)
        move_database(tmp_path / "aside", tmp_path)
        await kvs.set_value("k", 3)  # the very file it opened is back: nothing was lost
        assert await kvs.get_value("k") == 3
