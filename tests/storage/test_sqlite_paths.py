"""SQLite whose file cannot be made: a StorageError naming the path, never a bare OSError."""

from __future__ import annotations

from pathlib import Path

import pytest

from recoverable_state import KeyValueStore, StorageError
from recoverable_state.storage import open_backend

pytestmark = pytest.mark.anyio


async def test_a_parent_that_is_a_file_is_a_storage_error_naming_the_path(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file where a directory should be")
    path = tmp_path / "blocker" / "sub" / "state.sqlite3"
    async with open_backend(f"sqlite:///{path}") as backend:
        with pytest.raises(StorageError, match="blocker") as caught:
            await KeyValueStore.open(name="jobs", storage=backend)
    assert not isinstance(caught.value, OSError)
