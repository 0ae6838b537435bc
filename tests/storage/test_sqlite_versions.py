"""SQLite databases written by 0.1, which kept every version in the `versions` table.

Since then a record keeps its own version and `versions` holds only claims;
a record's version is the larger of the two. A 0.1 database must open with
every version, history and fence as it was, and go on from there.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from recoverable_state import RecoverableState
from recoverable_state.storage import KeyValueStore, RecordRead, RecordWrite, WriteOutcome, open_backend
from recoverable_state.storage import _sqlite as sqlite_module

pytestmark = pytest.mark.anyio

_SCHEMA_0_1 = """
CREATE TABLE stores (id TEXT PRIMARY KEY, name TEXT UNIQUE);
CREATE TABLE records (store_id TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,
    content_type TEXT NOT NULL, updated_at REAL NOT NULL, PRIMARY KEY (store_id, key));
CREATE TABLE versions (store_id TEXT NOT NULL, key TEXT NOT NULL, version INTEGER NOT NULL,
    PRIMARY KEY (store_id, key)) WITHOUT ROWID;
CREATE TABLE history (store_id TEXT NOT NULL, key TEXT NOT NULL, version INTEGER NOT NULL,
    value BLOB NOT NULL, content_type TEXT NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (store_id, key, version));
"""


def _write_0_1_database(path: Path) -> None:
    """A database as 0.1 left it: store `jobs`, `progress` at version 7 with two snapshots kept."""
    conn = sqlite3.connect(path)
    conn.executescript(_SCHEMA_0_1)
    conn.execute("INSERT INTO stores VALUES ('s1', 'jobs')")
    conn.execute(
        "INSERT INTO records VALUES ('s1', 'progress', ?, 'application/json', 1700000000.0)",
        (b'{"done": 41}',),
    )
    conn.execute("INSERT INTO versions VALUES ('s1', 'progress', 7)")
    for version, done in ((7, 41), (6, 40)):
        conn.execute(
            "INSERT INTO history VALUES ('s1', 'progress', ?, ?, 'application/json', 1700000000.0)",
            (version, f'{{"done": {done}}}'.encode()),
        )
    conn.commit()
    conn.close()


async def test_a_0_1_database_keeps_its_versions_history_and_fences(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    _write_0_1_database(path)
    async with open_backend(f"sqlite:///{path}") as backend:
        kvs = await KeyValueStore.open(name="jobs", storage=backend)
        record = await kvs.get_record("progress")
        assert record is not None and (record.value, record.version) == (b'{"done": 41}', 7)
        assert [h.version for h in await kvs.get_history("progress")] == [7, 6]
        assert [(i.key, i.version) for i in await kvs.list_keys()] == [("progress", 7)]
        # A writer still at 6 is fenced off; one at 7 goes on to 8.
        stale = await kvs.put_record("progress", b'{"done": 0}', "application/json", expected_version=6)
        assert stale == WriteOutcome(False, 7)
        moved = await kvs.put_record("progress", b'{"done": 42}', "application/json", expected_version=7)
        assert moved == WriteOutcome(True, 8)
        # A claim fences the writer at 8 off.
        (claimed,) = await backend.read_batch([RecordRead(kvs.id, "progress", True)])
        assert claimed is not None and not isinstance(claimed, Exception) and claimed.version == 9
        (refused,) = await backend.write_batch(
            [RecordWrite(kvs.id, "progress", b"{}", "application/json", 8)]
        )
        assert refused == WriteOutcome(False, 9)
    async with open_backend(f"sqlite:///{path}") as backend:  # the same after reopening
        kvs = await KeyValueStore.open(name="jobs", storage=backend)
        record = await kvs.get_record("progress")
        assert record is not None and (record.value, record.version) == (b'{"done": 42}', 9)
        assert await kvs.delete_record("progress", expected_version=8) is False
        assert await kvs.delete_record("progress", expected_version=9) is True


async def test_big_values_in_a_0_1_database_are_fenced_kept_in_history_and_read_back_whole(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.sqlite3"
    _write_0_1_database(path)
    big, bigger = os.urandom(3 * 1024 * 1024 + 1), os.urandom(5 * 1024 * 1024 + 3)
    async with open_backend(f"sqlite:///{path}") as backend:
        kvs = await KeyValueStore.open(name="jobs", storage=backend)
        stale = await kvs.put_record("progress", bigger, "application/octet-stream", expected_version=6)
        assert stale == WriteOutcome(False, 7)
        moved = await kvs.put_record(
            "progress", big, "application/octet-stream", expected_version=7, keep_history=2
        )
        assert moved == WriteOutcome(True, 8)
        made = await kvs.put_record("new", bigger, "application/octet-stream", expected_version=0)
        assert made == WriteOutcome(True, 1)
        assert await kvs.put_record("new", big, "application/octet-stream") == WriteOutcome(True, 2)
    async with open_backend(f"sqlite:///{path}") as backend:
        kvs = await KeyValueStore.open(name="jobs", storage=backend)
        assert (await kvs.get_value("progress"), await kvs.get_value("new")) == (big, big)
        assert [h.value for h in await kvs.get_history("progress")][:1] == [big]


async def test_a_state_resumes_from_a_0_1_database_and_takes_it_over(tmp_path: Path) -> None:
    from pydantic import BaseModel

    class Progress(BaseModel):
        done: int = 0

    path = tmp_path / "old.sqlite3"
    _write_0_1_database(path)
    async with open_backend(f"sqlite:///{path}") as backend:
        kvs = await KeyValueStore.open(name="jobs", storage=backend)
        first = RecoverableState(
            default_state=Progress(),
            persist_state_key="progress",
            persistence_enabled="explicit_only",
            persist_state_kvs_factory=lambda: _same(kvs),
        )
        value = await first.initialize()
        assert value.done == 41
        value.done += 1
        await first.persist_state()
        second = RecoverableState(
            default_state=Progress(),
            persist_state_key="progress",
            persistence_enabled="explicit_only",
            persist_state_kvs_factory=lambda: _same(kvs),
        )
        await first.teardown()
        # `first` claimed 7 -> 8 and wrote 9; `second` claims 9 -> 10.
        assert (await second.initialize()).done == 42
        stale = await kvs.put_record("progress", b'{"done": 1}', "application/json", expected_version=9)
        assert stale == WriteOutcome(False, 10)
        await second.teardown()


async def _same(kvs: KeyValueStore) -> KeyValueStore:
    return kvs


def test_processes_opening_a_0_1_database_together_all_see_every_version(tmp_path: Path) -> None:
    """The column is added once, also when several processes open the old file at the same moment."""
    path = tmp_path / "old.sqlite3"
    _write_0_1_database(path)
    script = textwrap.dedent(
        f"""
        import anyio
        from recoverable_state.storage import KeyValueStore, open_backend

        async def main():
            async with open_backend("sqlite:///{path}") as backend:
                kvs = await KeyValueStore.open(name="jobs", storage=backend)
                record = await kvs.get_record("progress")
                print(record.version)

        anyio.run(main)
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
        assert out.decode().strip() == "7"


async def test_claims_land_also_on_a_sqlite_without_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SQLite built without JSON claims with a statement per record, with the same outcome."""
    real_connect = sqlite_module.SQLiteBackend._connect

    def without_json(self: sqlite_module.SQLiteBackend) -> object:
        conn = real_connect(self)
        self._json = False
        return conn

    monkeypatch.setattr(sqlite_module.SQLiteBackend, "_connect", without_json)
    async with open_backend(f"sqlite:///{tmp_path / 'state.sqlite3'}") as backend:
        kvs = await KeyValueStore.open(name="plain", storage=backend)
        keys = ["a", 'quote " and \\ slash', "emoji 🙂"]
        for key in keys:
            await kvs.set_value(key, 1)
        records = await KeyValueStore.get_together([(kvs, key, True) for key in keys])
        assert [getattr(r, "version", None) for r in records] == [2, 2, 2]
        for key in keys:
            assert (await kvs.put_record(key, b"1", "application/json", expected_version=1)).applied is False
