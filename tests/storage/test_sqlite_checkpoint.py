"""SQLite copies its WAL back into the database file in a thread of its own, after the commit.

A commit is durable once the WAL is synced; copying the pages back (a checkpoint)
used to happen inside the commit that took the WAL past 1,000 pages. These tests
hold what moving it out must keep: the copy happens without a close, the thread
ends with the store, and a failing or missing database never harms a write.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import anyio
import pytest

from recoverable_state import StorageError
from recoverable_state.storage import (
    KeyValueStore,
    SQLiteBackend,
    _sqlite_checkpoint,
    _sqlite_schema,
    open_backend,
)

pytestmark = pytest.mark.anyio

_VALUE = b"x" * 64 * 1024  # 64 records of 64 KiB: past the 4 MiB that wakes the checkpointer


def _checkpointers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("recoverable-state checkpoint")]


def _size(path: Path, suffix: str = "") -> int:
    """The size of the database file (or of its `-wal`), 0 when there is none."""
    file = Path(f"{path}{suffix}")
    return file.stat().st_size if file.exists() else 0


def _make_dir(path: Path) -> Path:
    path.mkdir()
    return path


def _remove_database(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink()


async def _fill(kvs: KeyValueStore, n: int = 64) -> None:
    puts = [(kvs, kvs.prepare_put(f"k{i}", _VALUE, "application/octet-stream")) for i in range(n)]
    await KeyValueStore.put_together(puts)


async def _wait_for(condition: object, seconds: float = 10.0) -> None:
    assert callable(condition)
    with anyio.fail_after(seconds):
        while not condition():
            await anyio.sleep(0.02)


async def test_the_wal_is_copied_back_while_the_store_stays_open(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    async with open_backend(f"sqlite:///{path}") as backend:
        kvs = await KeyValueStore.open(name="big", storage=backend)
        await _fill(kvs)
        # The records' pages reach the database file itself, not only the WAL.
        await _wait_for(lambda: _size(path) > 64 * len(_VALUE))
        assert await kvs.get_value("k63") == _VALUE
    assert not _checkpointers()


async def test_a_path_with_uri_characters_is_checkpointed_too(tmp_path: Path) -> None:
    """The thread opens the database by URI: `?`, `#`, `%` and spaces in the path are quoted."""
    path = _make_dir(tmp_path / "we?ird #dir %20 ü") / "state;x=1.sqlite3"
    async with SQLiteBackend(path) as backend:
        kvs = await KeyValueStore.open(name="big", storage=backend)
        await _fill(kvs)
        await _wait_for(lambda: _size(path) > 64 * len(_VALUE))
    assert not _checkpointers()


async def test_closing_ends_the_thread_and_removes_the_wal(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    async with open_backend(f"sqlite:///{path}") as backend:
        kvs = await KeyValueStore.open(name="big", storage=backend)
        await _fill(kvs)
        assert _checkpointers()
    assert not _checkpointers()
    assert not _size(path, "-wal")
    # Reopened, everything is there, and the store checkpoints again.
    async with open_backend(f"sqlite:///{path}") as backend:
        kvs = await KeyValueStore.open(name="big", storage=backend)
        assert await kvs.get_value("k0") == _VALUE
        await _fill(kvs)
        assert _checkpointers()
    assert not _checkpointers()


async def test_the_thread_ends_when_idle_and_comes_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_sqlite_checkpoint, "CHECKPOINTER_IDLE", 0.05)
    path = tmp_path / "state.sqlite3"
    async with open_backend(f"sqlite:///{path}") as backend:
        kvs = await KeyValueStore.open(name="big", storage=backend)
        await _fill(kvs)
        await _wait_for(lambda: not _checkpointers())
        await _fill(kvs)
        await _wait_for(lambda: _size(path) > 64 * len(_VALUE))
        await _wait_for(lambda: not _checkpointers())


async def test_small_writes_leave_the_wal_alone(tmp_path: Path) -> None:
    async with open_backend(f"sqlite:///{tmp_path / 'state.sqlite3'}") as backend:
        kvs = await KeyValueStore.open(name="small", storage=backend)
        for i in range(20):
            await kvs.set_value(f"k{i}", {"i": i})
        assert not _checkpointers()


async def test_a_database_gone_from_its_path_is_not_made_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.sqlite3"
    async with open_backend(f"sqlite:///{path}") as backend:
        kvs = await KeyValueStore.open(name="big", storage=backend)
        await kvs.set_value("first", {"ok": True})
        _remove_database(path)
        with pytest.raises(StorageError, match="was deleted"):
            await _fill(kvs)  # refused: the open connection would write to the unlinked file
        with caplog.at_level(logging.DEBUG, logger="recoverable_state.storage"):
            # Commits that landed just before the file went wake the checkpointer after.
            backend._checkpointer.committed(_sqlite_checkpoint.CHECKPOINT_BYTES)
            await _wait_for(lambda: "background checkpoint failed" in caplog.text)
    assert not _size(path)


async def test_a_stalled_checkpointer_leaves_writes_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the thread held up, commits past the limit copy the WAL back themselves."""
    release = threading.Event()
    started = threading.Event()
    real_work = _sqlite_checkpoint.Checkpointer._work

    def stalled(self: _sqlite_checkpoint.Checkpointer) -> None:
        started.set()
        release.wait(30)
        real_work(self)

    monkeypatch.setattr(_sqlite_checkpoint.Checkpointer, "_work", stalled)
    monkeypatch.setattr(_sqlite_schema, "SELF_CHECKPOINT_PAGES", 1000)
    path = tmp_path / "state.sqlite3"
    try:
        async with open_backend(f"sqlite:///{path}") as backend:
            kvs = await KeyValueStore.open(name="big", storage=backend)
            for _ in range(3):
                await _fill(kvs)
            assert started.is_set()
            # 12 MiB were written; the WAL was restarted by commits, not grown by each.
            assert _size(path, "-wal") < 10 * 1024 * 1024
            assert _size(path) > 64 * len(_VALUE)
            release.set()
    finally:
        release.set()
    assert not _checkpointers()


async def test_a_big_record_written_again_goes_to_the_wal_once(tmp_path: Path) -> None:
    """A record rewritten whole costs its own size in the WAL, not twice it.

    Debian's SQLite zeroes every page it frees (secure_delete), which wrote the old
    value's pages as well as the new ones: a 6 MB rewrite put 12 MB in the WAL.
    """
    path = tmp_path / "state.sqlite3"
    first, second = b"a" * 6_000_000, b"b" * 6_000_017  # another length: every page is new
    async with open_backend(f"sqlite:///{path}") as backend:
        kvs = await KeyValueStore.open(name="big", storage=backend)
        await kvs.set_value("big", first, "application/octet-stream")
    assert not _size(path, "-wal")  # closing copied it back and removed it: the next one starts empty
    async with open_backend(f"sqlite:///{path}") as backend:
        kvs = await KeyValueStore.open(name="big", storage=backend)
        await kvs.set_value("big", second, "application/octet-stream")
        assert _size(path, "-wal") < 1.25 * len(second)
        assert await kvs.get_value("big") == second


async def test_the_wal_file_shrinks_back_after_a_big_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a big batch is copied back, a later commit cuts the WAL file to its limit.

    Small commits keep coming meanwhile, as a worker's do: the copy often runs while
    one is under way, and the WAL used to keep growing from its biggest size for good.
    """
    for module in (_sqlite_schema, _sqlite_checkpoint):
        monkeypatch.setattr(module, "WAL_KEPT_BYTES", 1024 * 1024)
    path = tmp_path / "state.sqlite3"
    async with open_backend(f"sqlite:///{path}") as backend:
        kvs = await KeyValueStore.open(name="big", storage=backend)
        await _fill(kvs, 96)  # 6 MiB in one batch
        assert _size(path, "-wal") > 6 * 1024 * 1024
        small = iter(range(10**6))

        async def one_small_write() -> bool:
            await kvs.set_value("small", {"i": next(small)})
            return _size(path, "-wal") <= 1024 * 1024 + 64 * 1024

        with anyio.fail_after(15):
            while not await one_small_write():
                await anyio.sleep(0.05)
        assert await kvs.get_value("k95") == _VALUE
