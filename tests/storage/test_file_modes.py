"""Files and directories the library makes are private: 0600 and 0700, whatever the umask."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from recoverable_state import KeyValueStore
from recoverable_state.storage import open_backend

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def umask_022() -> Iterator[None]:
    """The usual umask, which leaves what is made with the default modes readable by everyone."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


async def test_sqlite_makes_its_database_wal_shm_and_directories_private(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    db = tmp_path / "made" / "here" / "state.sqlite3"
    async with open_backend(f"sqlite:///{db}") as backend:
        kvs = await KeyValueStore.open(name="jobs", storage=backend)
        await kvs.set_value("k", {"secret": "value"})
        # While the backend is open, its write-ahead log and shared-memory index exist.
        files = {p.name: mode(p) for p in db.parent.iterdir()}
        assert files == {"state.sqlite3": 0o600, "state.sqlite3-wal": 0o600, "state.sqlite3-shm": 0o600}
    assert mode(db.parent) == 0o700
    assert mode(db.parent.parent) == 0o700
    assert mode(tmp_path) == 0o755  # a directory that was there is left as it was


async def test_sqlite_leaves_the_mode_of_a_database_that_exists(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite3"
    async with open_backend(f"sqlite:///{db}") as backend:
        await (await KeyValueStore.open(name="jobs", storage=backend)).set_value("k", 1)
    os.chmod(db, 0o640)  # the user's choice
    async with open_backend(f"sqlite:///{db}") as backend:
        kvs = await KeyValueStore.open(name="jobs", storage=backend)
        await kvs.set_value("k", 2)
        assert mode(db) == 0o640
        assert await kvs.get_value("k") == 2


async def test_the_file_store_makes_its_root_lock_stores_and_records_private(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    root = tmp_path / "made" / "root"
    async with open_backend(f"file://{root}") as backend:
        kvs = await KeyValueStore.open(name="jobs", storage=backend)
        await kvs.set_value("k", {"secret": "value"})
        made = [root.parent, root, *root.rglob("*")]
    assert made[2:], "the store made files"
    for path in made:
        expected = 0o700 if stat.S_ISDIR(os.lstat(path).st_mode) else 0o600
        assert (path.relative_to(tmp_path), mode(path)) == (path.relative_to(tmp_path), expected)
    assert mode(tmp_path) == 0o755
