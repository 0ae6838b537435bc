"""The file store: keys never escape the store's directory; damage is reported, not hidden."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from recoverable_state import InvalidKeyError, KeyValueStore, RecordCorruptError
from recoverable_state.storage import open_backend

pytestmark = pytest.mark.anyio

ESCAPING_KEYS = [
    "../x",
    "../../etc/passwd",
    "/etc/passwd",
    "..",
    ".",
    ".hidden",
    "a/b/c",
    "back\\slash",
    "~",
    "%2E%2E",
    "k" * 1000,
    "ключ-日本語-🙂",
    "CON",
    " spaces ",
]


def all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


async def test_escaping_keys_stay_inside_the_store(tmp_path: Path) -> None:
    root = tmp_path / "files"
    backend = open_backend(f"file://{root}")
    kvs = await KeyValueStore.open(name="jobs", storage=backend)
    for i, key in enumerate(ESCAPING_KEYS):
        await kvs.set_value(key, {"i": i})
    store_dir = root / kvs.id
    for path in all_files(tmp_path):
        assert store_dir in path.parents or path.parent == store_dir or path.parent == root, path
        assert len(path.name.encode()) <= 255
    assert not (tmp_path / "x").exists()
    for i, key in enumerate(ESCAPING_KEYS):
        assert await kvs.get_value(key) == {"i": i}
    assert sorted(r.key for r in await kvs.list_keys()) == sorted(ESCAPING_KEYS)
    await backend.aclose()


@pytest.mark.parametrize("key", ["", "nul\x00byte", "new\nline", "k" * 1025])
async def test_invalid_keys_are_refused_with_store_and_key(tmp_path: Path, key: str) -> None:
    backend = open_backend(f"file://{tmp_path}")
    kvs = await KeyValueStore.open(name="jobs", storage=backend)
    with pytest.raises(InvalidKeyError, match="store 'jobs'"):
        await kvs.set_value(key, 1)
    assert await kvs.list_keys() == []
    await backend.aclose()


async def test_a_damaged_record_file_names_the_store_and_file(tmp_path: Path) -> None:
    backend = open_backend(f"file://{tmp_path}")
    kvs = await KeyValueStore.open(storage=backend)
    await kvs.set_value("good", {"a": 1})
    await kvs.set_value("bad", {"a": 2})
    (tmp_path / kvs.id / "bad.rec").write_bytes(b"\x00\x01 torn")
    with pytest.raises(RecordCorruptError, match=r"bad\.rec"):
        await kvs.get_value("bad")
    assert await kvs.get_value("good") == {"a": 1}
    await backend.aclose()


async def test_leftover_temporary_files_are_not_records(tmp_path: Path) -> None:
    backend = open_backend(f"file://{tmp_path}")
    kvs = await KeyValueStore.open(storage=backend)
    await kvs.set_value("k", "v")
    (tmp_path / kvs.id / ".tmp-deadbeef").write_bytes(b"half a rec")
    assert [r.key for r in await kvs.list_keys()] == ["k"]
    assert await kvs.get_value("k") == "v"
    await backend.aclose()


async def test_a_write_replaces_the_file_whole(tmp_path: Path) -> None:
    backend = open_backend(f"file://{tmp_path}")
    kvs = await KeyValueStore.open(storage=backend)
    await kvs.set_value("k", "x" * 10_000)
    inode = os.stat(tmp_path / kvs.id / "k.rec").st_ino
    await kvs.set_value("k", "y")
    # A new file was renamed over the old one (never rewritten in place).
    assert os.stat(tmp_path / kvs.id / "k.rec").st_ino != inode
    assert await kvs.get_value("k") == "y"
    await backend.aclose()
