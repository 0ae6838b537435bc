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
from collections.abc import Callable
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
    return json.dumps([["s", ["n"], n], ["s", ["pad"], "x" * (size - 40)]]).encode()


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
        assert await backend.write_batch([RecordWrite(store.id, "k", snapshot, JSON, 0)]) == [
            WriteOutcome(True, 1)
        ]
    # Closed: the WAL was copied back and removed, no checkpoint is left to run during the appends.
    async with open_backend(url) as backend:
        await backend.list_stores()  # the connection opened before the measure
        wal = db.with_name(db.name + "-wal")
        before, files_before = _io(), _size(db) + _size(wal)
        for n in range(1, 21):
            append = RecordAppend(store.id, "k", _delta(n), DELTA_CONTENT_TYPE, n)
            assert await backend.write_batch([append]) == [WriteOutcome(True, n + 1)]
        after, files_after = _io(), _size(db) + _size(wal)
        written, grown = after["wchar"] - before["wchar"], files_after - files_before
        print(
            f"20 appends of 2 KiB to a 5 MiB record: {written} bytes written by the process, "
            f"files grew {grown} bytes, {after['rchar'] - before['rchar']} bytes read"
        )
        assert written < 1024 * 1024
        assert grown < 1024 * 1024
        record = await _one(backend, RecordRead(store.id, "k"))
        assert record.version == 21 and record.content_type == CHAIN_CONTENT_TYPE
        pieces = unpack_chain(record.value)
        assert pieces[0] == (snapshot, JSON)
        assert [json.loads(v)[0][2] for v, _ in pieces[1:]] == list(range(1, 21))


async def _write_and_claim(backend: StorageBackend, store_id: str, expected: dict[str, int | None]) -> None:
    """Write each key in one batch, at its expected version (0: new; None: any), claim them all, check them."""
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
