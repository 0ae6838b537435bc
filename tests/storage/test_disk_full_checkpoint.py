"""A disk that fills up while the WAL is copied back into the database: nothing committed is lost.

The background checkpointer copies committed pages from the WAL into the
database file; on a full disk that copy fails halfway. The WAL still holds
every committed transaction, so every record reads back, in this process, after
closing, and in a new one; once there is room again, writes and checkpoints go on.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from small_disk import small_tmpfs

from recoverable_state import KeyValueStore
from recoverable_state.storage import open_backend

pytestmark = pytest.mark.anyio

VALUE = bytes(range(256)) * 256  # 64 KiB
COUNT = 72  # 4.5 MiB: past the 4 MiB that wakes the checkpointer; WAL + copy overflow 8 MiB


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs."""
    with small_tmpfs(tmp_path, "8m") as mount:
        yield mount


def grow(mount: Path) -> None:
    subprocess.run(["mount", "-o", "remount,size=32m", str(mount)], check=True)


async def all_read_back(kvs: KeyValueStore) -> bool:
    return all([await kvs.get_value(f"k{i}") == VALUE for i in range(COUNT)])


async def test_a_checkpoint_the_full_disk_stops_loses_nothing(
    small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{small_disk / 'state.sqlite3'}"
    with caplog.at_level(logging.DEBUG, logger="recoverable_state.storage"):
        async with open_backend(url) as backend:
            kvs = await KeyValueStore.open(name="big", storage=backend)
            puts = [(kvs, kvs.prepare_put(f"k{i}", VALUE, "application/octet-stream")) for i in range(COUNT)]
            outcomes = await KeyValueStore.put_together(puts)
            assert all(not isinstance(o, Exception) for o in outcomes), outcomes
            with anyio.fail_after(20):
                while "background checkpoint failed: database or disk is full" not in caplog.text:
                    await anyio.sleep(0.05)
            assert await all_read_back(kvs)
        # Closing tries the copy again, fails again, and keeps the WAL.
    async with open_backend(url) as backend:
        assert await all_read_back(await KeyValueStore.open(name="big", storage=backend))
    grow(small_disk)  # room again
    async with open_backend(url) as backend:
        kvs = await KeyValueStore.open(name="big", storage=backend)
        await kvs.set_value("after", "room again")
        assert await all_read_back(kvs)
    # Closed with room: the WAL was copied back whole and removed.
    assert not (small_disk / "state.sqlite3-wal").exists()
    async with open_backend(url) as backend:
        kvs = await KeyValueStore.open(name="big", storage=backend)
        assert await all_read_back(kvs)
        assert await kvs.get_value("after") == "room again"
