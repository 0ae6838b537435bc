"""Deltas in the SQLite backend: what an append costs, what a failed batch leaves, older databases.

An append must cost about the delta, not the record's snapshot: the snapshot's
row is never rewritten, only a row of `deltas` and one of `versions` are. The
cost is measured as the bytes the process hands to the kernel (`wchar` of
/proc/self/io) and as the growth of the database and its WAL.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from recoverable_state import StorageError
from recoverable_state.storage import (
    CHAIN_CONTENT_TYPE,
    DELTA_CONTENT_TYPE,
    RecordAppend,
    RecordRead,
    RecordWrite,
    StorageBackend,
    StoredRecord,
    WriteOutcome,
    open_backend,
    unpack_chain,
)
from recoverable_state.storage import _sqlite as sqlite_module
from recoverable_state.testing import FaultInjectingBackend

pytestmark = pytest.mark.anyio

JSON = "application/json"


def _delta(n: int, size: int = 2048) -> bytes:
    """A delta of about `size` bytes that sets `n` (JSON, though the backend stores opaque bytes)."""
    return json.dumps([{"n": 1, "pad": 1}, {"n": n, "pad": "x" * (size - 40)}]).encode()


def _io() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {name: int(value) for name, value in (line.split(":") for line in f)}


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


async def _one(backend: StorageBackend, read: RecordRead) -> StoredRecord:
    (record,) = await backend.read_batch([read])
    assert isinstance(record, StoredRecord), record
    return record


async def test_twenty_appends_to_a_5_mb_record_write_far_less_than_its_snapshot(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite3"
    url = f"sqlite:///{db}"
    snapshot = os.urandom(5 * 1024 * 1024)
    async with open_backend(url) as backend:
        store = await backend.open_store(name="big")
        await backend.write_batch([RecordWrite(store.id, "k", b"{}", JSON, 0)])
        await backend.read_batch([RecordRead(store.id, "k", claim=True)])
        # At version 3: SQLite keeps 0 and 1 in the row's header, a larger one after the value.
        assert await backend.write_batch([RecordWrite(store.id, "k", snapshot, JSON, 2)]) == [
            WriteOutcome(True, 3)
        ]
    # Closed: the WAL was copied back and removed, no checkpoint is left to run during the appends.
    async with open_backend(url) as backend:
        await backend.list_stores()  # the connection opened before the measure
        wal = db.with_name(db.name + "-wal")
        before, files_before = _io(), _size(db) + _size(wal)
        for n in range(1, 21):
            append = RecordAppend(store.id, "k", _delta(n), DELTA_CONTENT_TYPE, n + 2)
            assert await backend.write_batch([append]) == [WriteOutcome(True, n + 3)]
            if n == 1:  # the first reads the record's own version, past its snapshot
                first_read = _io()["rchar"] - before["rchar"]
        after, files_after = _io(), _size(db) + _size(wal)
        written, grown = after["wchar"] - before["wchar"], files_after - files_before
        print(
            f"20 appends of 2 KiB to a 5 MiB record: {written} bytes written by the process, "
            f"files grew {grown} bytes, {first_read} bytes read by the first, "
            f"{after['rchar'] - before['rchar'] - first_read} by the 19 others"
        )
        assert after["rchar"] - before["rchar"] - first_read < 1024 * 1024
        assert written < 1024 * 1024
        assert grown < 1024 * 1024
        record = await _one(backend, RecordRead(store.id, "k"))
        assert record.version == 23 and record.content_type == CHAIN_CONTENT_TYPE
        pieces = unpack_chain(record.value)
        assert pieces[0] == (snapshot, JSON)
        assert [json.loads(v)[1]["n"] for v, _ in pieces[1:]] == list(range(1, 21))


async def _write_and_claim(backend: StorageBackend, store_id: str, expected: dict[str, int | None]) -> None:
    """Write each key in one batch, at its expected version (0: new; None: any), claim them all, check."""
    stored = await backend.read_batch([RecordRead(store_id, key) for key in expected])
    now = {
        key: r.version if isinstance(r, StoredRecord) else 0 for key, r in zip(expected, stored, strict=True)
    }
    value = b'{"v":%d}' % len(now)
    writes = [RecordWrite(store_id, key, value, JSON, version) for key, version in expected.items()]
    assert await backend.write_batch(writes) == [WriteOutcome(True, now[key] + 1) for key in expected]
    claimed = await backend.read_batch([RecordRead(store_id, key, claim=True) for key in expected])
    assert [(r.value, r.content_type, r.version) for r in claimed if isinstance(r, StoredRecord)] == [
        (value, JSON, now[key] + 2) for key in expected
    ]


@pytest.mark.parametrize("deltas_in", ["none", "another store", "the same store"])
async def test_twenty_thousand_records_written_then_claimed(tmp_path: Path, deltas_in: str) -> None:
    """Correctness only: the batch paths (fast, planned) with deltas nowhere, elsewhere or among them."""
    keys = [f"r{i:05d}" for i in range(20_000)]
    async with open_backend(f"sqlite:///{tmp_path}/s.sqlite3") as backend:
        store = await backend.open_store(name="many")
        other = await backend.open_store(name="other")
        await _write_and_claim(backend, store.id, dict.fromkeys(keys, 0))  # new: the fast path
        chained = {"none": None, "another store": other.id, "the same store": store.id}[deltas_in]
        if chained == other.id:
            await backend.write_batch([RecordWrite(other.id, "r00007", b"{}", JSON, 0)])
        expected: dict[str, int | None] = dict.fromkeys(keys, 2)
        if chained is not None:
            at = 1 if chained == other.id else 2
            append = RecordAppend(chained, "r00007", _delta(1, 100), DELTA_CONTENT_TYPE, at)
            assert await backend.write_batch([append]) == [WriteOutcome(True, at + 1)]
            if chained == store.id:
                expected["r00007"] = 3
        await _write_and_claim(backend, store.id, expected)  # each at its version: the fast path
        if chained == store.id:  # its snapshot written over: the delta is gone
            record = await _one(backend, RecordRead(store.id, "r00007"))
            assert record.content_type == JSON
            append = RecordAppend(store.id, "r00007", _delta(2, 100), DELTA_CONTENT_TYPE, 5)
            assert await backend.write_batch([append]) == [WriteOutcome(True, 6)]
        await _write_and_claim(backend, store.id, dict.fromkeys(keys, None))  # no version: the planned path
        record = await _one(backend, RecordRead(store.id, "r00007"))
        assert record.content_type == JSON
        if chained == other.id:
            record = await _one(backend, RecordRead(other.id, "r00007"))
            assert record.content_type == CHAIN_CONTENT_TYPE and record.version == 2


# -- batches that fail ------------------------------------------------------------


async def _chained(backend: StorageBackend) -> str:
    """A store holding `k`: a snapshot and one delta, at version 2."""
    store = await backend.open_store(name="s")
    await backend.write_batch([RecordWrite(store.id, "k", b'{"n":0}', JSON, 0)])
    assert await backend.write_batch([RecordAppend(store.id, "k", _delta(1), DELTA_CONTENT_TYPE, 1)]) == [
        WriteOutcome(True, 2)
    ]
    return store.id


def _pieces_of(record: StoredRecord) -> int:
    return len(unpack_chain(record.value)) if record.content_type == CHAIN_CONTENT_TYPE else 1


async def test_an_append_failed_alone_or_with_its_batch_leaves_nothing(tmp_path: Path) -> None:
    faulty = FaultInjectingBackend(open_backend(f"sqlite:///{tmp_path}/s.sqlite3"))
    async with faulty:
        store_id = await _chained(faulty)
        batch = [
            RecordAppend(store_id, "k", _delta(2), DELTA_CONTENT_TYPE, 2),
            RecordWrite(store_id, "other", b"{}", JSON, 0),
        ]
        faulty.fail_next(when="requests", match=lambda op: isinstance(op, RecordAppend))
        failed, written = await faulty.write_batch(batch)
        assert isinstance(failed, StorageError) and written == WriteOutcome(True, 1)
        record = await _one(faulty, RecordRead(store_id, "k"))
        assert (record.version, _pieces_of(record)) == (2, 2)
        faulty.fail_next(when="before")
        with pytest.raises(StorageError):
            await faulty.write_batch(batch[:1])
        record = await _one(faulty, RecordRead(store_id, "k"))
        assert (record.version, _pieces_of(record)) == (2, 2)
        # The same append, now let through, goes on from the version it expects.
        assert await faulty.write_batch(batch[:1]) == [WriteOutcome(True, 3)]


async def test_a_database_failing_in_the_middle_of_a_batch_keeps_none_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deltas inserted, then SQLite fails (an I/O error): the whole transaction rolls back."""
    real = sqlite_module.append_deltas

    def append_then_fail(conn: sqlite3.Connection, *args: Any) -> int:
        real(conn, *args)
        raise sqlite3.OperationalError("disk I/O error")

    async with open_backend(f"sqlite:///{tmp_path}/s.sqlite3") as backend:
        store_id = await _chained(backend)
        batch = [
            RecordWrite(store_id, "other", b"{}", JSON, 0),
            RecordAppend(store_id, "k", _delta(2), DELTA_CONTENT_TYPE, 2),
        ]
        monkeypatch.setattr(sqlite_module, "append_deltas", append_then_fail)
        with pytest.raises(StorageError, match="disk I/O error"):
            await backend.write_batch(batch)
        monkeypatch.setattr(sqlite_module, "append_deltas", real)
        record, other = await backend.read_batch([RecordRead(store_id, "k"), RecordRead(store_id, "other")])
        assert other is None
        assert isinstance(record, StoredRecord) and (record.version, _pieces_of(record)) == (2, 2)
        assert await backend.write_batch(batch) == [WriteOutcome(True, 1), WriteOutcome(True, 3)]


_APPENDER = """
import sys, anyio
from recoverable_state.storage import open_backend, RecordWrite, RecordAppend, DELTA_CONTENT_TYPE

async def main(path):
    async with open_backend(f"sqlite:///{path}") as backend:
        store = await backend.open_store(name="s")
        await backend.write_batch([RecordWrite(store.id, "k", b"x" * 1_000_000, "application/json", 0)])
        version = 1
        while True:
            delta = b'[{"n":1},{"n":%d}]' % version + b" " * 3000
            append = RecordAppend(store.id, "k", delta, DELTA_CONTENT_TYPE, version)
            (outcome,) = await backend.write_batch([append])
            version = outcome.version
            print(version, flush=True)

anyio.run(main, sys.argv[1])
"""


def _kill_while_appending(path: Path) -> int:
    """Run a process appending to one record, SIGKILL it mid-way; the last version it was answered."""
    child = subprocess.Popen([sys.executable, "-c", _APPENDER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        for _ in range(30):  # a few acknowledged, one more under way when it dies
            acknowledged = int(child.stdout.readline())
    finally:
        child.kill()
        child.wait()
    return acknowledged


async def test_a_process_killed_while_appending_leaves_whole_deltas(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    acknowledged = _kill_while_appending(path)
    async with open_backend(f"sqlite:///{path}") as backend:
        store = await backend.open_store(name="s")
        record = await _one(backend, RecordRead(store.id, "k"))
        pieces = unpack_chain(record.value)
        assert record.version >= acknowledged and record.version == len(pieces)
        assert pieces[0] == (b"x" * 1_000_000, JSON)
        assert [json.loads(v)[1]["n"] for v, _ in pieces[1:]] == list(range(1, record.version))


# -- databases made before deltas --------------------------------------------------

_BEFORE_DELTAS = """
CREATE TABLE stores (id TEXT PRIMARY KEY, name TEXT UNIQUE);
CREATE TABLE records (store_id TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,
    content_type TEXT NOT NULL, updated_at REAL NOT NULL, {version}PRIMARY KEY (store_id, key));
CREATE TABLE versions (store_id TEXT NOT NULL, key TEXT NOT NULL, version INTEGER NOT NULL,
    PRIMARY KEY (store_id, key)) WITHOUT ROWID;
CREATE TABLE history (store_id TEXT NOT NULL, key TEXT NOT NULL, version INTEGER NOT NULL,
    value BLOB NOT NULL, content_type TEXT NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (store_id, key, version));
"""


@pytest.mark.parametrize("made_by", ["0.1", "0.2"])
async def test_a_database_made_before_deltas_reads_then_takes_appends(tmp_path: Path, made_by: str) -> None:
    """0.1 kept every version in `versions`; the release before deltas kept it on the record."""
    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript(
        _BEFORE_DELTAS.format(version="" if made_by == "0.1" else "version INTEGER NOT NULL DEFAULT 0, ")
    )
    conn.execute("INSERT INTO stores VALUES ('s1', 'jobs')")
    value = b'{"n": 0}'
    if made_by == "0.1":
        conn.execute("INSERT INTO records VALUES ('s1', 'k', ?, 'application/json', 1700000000.0)", (value,))
        conn.execute("INSERT INTO versions VALUES ('s1', 'k', 7)")
    else:
        conn.execute(
            "INSERT INTO records VALUES ('s1', 'k', ?, 'application/json', 1700000000.0, 7)", (value,)
        )
    conn.commit()
    conn.close()
    async with open_backend(f"sqlite:///{path}") as backend:
        record = await _one(backend, RecordRead("s1", "k"))
        assert (record.value, record.content_type, record.version) == (value, JSON, 7)
        assert await backend.write_batch([RecordAppend("s1", "k", _delta(1), DELTA_CONTENT_TYPE, 6)]) == [
            WriteOutcome(False, 7)
        ]
        assert await backend.write_batch([RecordAppend("s1", "k", _delta(1), DELTA_CONTENT_TYPE, 7)]) == [
            WriteOutcome(True, 8)
        ]
        [info] = await backend.list_records("s1")
        assert (info.key, info.version, info.size) == ("k", 8, len(value) + len(_delta(1)))
    async with open_backend(f"sqlite:///{path}") as backend:
        record = await _one(backend, RecordRead("s1", "k", claim=True))
        assert record.version == 9 and unpack_chain(record.value) == [
            (value, JSON),
            (_delta(1), DELTA_CONTENT_TYPE),
        ]
        assert await backend.write_batch([RecordWrite("s1", "k", b"{}", JSON, 9)]) == [WriteOutcome(True, 10)]
        record = await _one(backend, RecordRead("s1", "k"))
        assert (record.value, record.content_type, record.version) == (b"{}", JSON, 10)
