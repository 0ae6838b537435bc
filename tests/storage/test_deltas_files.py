"""Deltas in the file store: what an append costs, what a crash or a full disk leaves, old stores.

The conformance checks (`DeltaChecks`) hold the contract; these hold what is the
file store's own: an append writes about its delta (never the 5 MB snapshot
beside it), a SIGKILL mid-append leaves a whole chain, a full disk fails the
record alone, stale logs left by a crash are never read as part of a chain,
and a store written before deltas works unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import anyio.to_thread
import pytest
from small_disk import small_tmpfs

from recoverable_state import StorageError
from recoverable_state.storage import (
    CHAIN_CONTENT_TYPE,
    DELTA_CONTENT_TYPE,
    KeyValueStore,
    RecordAppend,
    RecordDelete,
    RecordRead,
    RecordWrite,
    StorageBackend,
    StoredRecord,
    WriteOutcome,
    open_backend,
    unpack_chain,
)

pytestmark = pytest.mark.anyio

JSON = "application/json"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def delta(n: int, pad: int = 0) -> bytes:
    return json.dumps([{"n": 1, "pad": 1}, {"n": n, "pad": "p" * pad}]).encode()


def pieces(record: StoredRecord | StorageError | None) -> list[tuple[bytes, str]]:
    assert isinstance(record, StoredRecord), record
    if record.content_type != CHAIN_CONTENT_TYPE:
        return [(record.value, record.content_type)]
    return unpack_chain(record.value)


async def one(backend: StorageBackend, store_id: str, key: str) -> StoredRecord:
    (record,) = await backend.read_batch([RecordRead(store_id, key)])
    assert isinstance(record, StoredRecord), record
    return record


def io_counts() -> dict[str, int]:
    """This process's I/O counters: bytes handed to write/read calls, and to the block layer."""
    lines = Path("/proc/self/io").read_text().splitlines()
    return {name: int(value) for name, value in (line.split(": ") for line in lines)}


async def test_an_append_costs_its_delta_not_the_snapshot(tmp_path: Path) -> None:
    backend = open_backend(f"file://{tmp_path}/files")
    try:
        kvs = await KeyValueStore.open(name="big", storage=backend)
        snapshot = json.dumps({"n": 0, "blob": "x" * (5 * 1024 * 1024)}).encode()
        assert await backend.write_batch([RecordWrite(kvs.id, "k", snapshot, JSON, 0)]) == [
            WriteOutcome(True, 1)
        ]
        record_file = next((tmp_path / "files" / kvs.id).glob("k.rec"))
        before_file = os.stat(record_file)
        before = io_counts()
        for n in range(1, 21):
            (outcome,) = await backend.write_batch(
                [RecordAppend(kvs.id, "k", delta(n, pad=2000), DELTA_CONTENT_TYPE, n)]
            )
            assert outcome == WriteOutcome(True, n + 1)
        after = io_counts()
        written = after["wchar"] - before["wchar"]
        read_ = after["rchar"] - before["rchar"]
        to_disk = after["write_bytes"] - before["write_bytes"]
        print(f"20 appends of 2 KB: wchar {written} B, rchar {read_} B, write_bytes {to_disk} B")
        assert written < 1024 * 1024, written  # one snapshot is 5 MB
        assert read_ < 1024 * 1024, read_  # nor is the snapshot read back to append
        assert to_disk < 1024 * 1024, to_disk
        after_file = os.stat(record_file)
        assert (after_file.st_ino, after_file.st_mtime_ns) == (before_file.st_ino, before_file.st_mtime_ns)
        record = await one(backend, kvs.id, "k")
        assert record.version == 21
        assert len(pieces(record)) == 21
        assert (await kvs.get_value("k"))["n"] == 20
    finally:
        await backend.aclose()


CHILD = textwrap.dedent(
    """
    import json, sys
    import anyio
    from recoverable_state.storage import (
        DELTA_CONTENT_TYPE, KeyValueStore, RecordAppend, RecordRead, RecordWrite, open_backend,
    )

    def delta(n):
        return json.dumps([{"n": 1, "pad": 1}, {"n": n, "pad": "p" * 3000}]).encode()

    async def main(url):
        backend = open_backend(url)
        kvs = await KeyValueStore.open(name="kill", storage=backend)
        (record,) = await backend.read_batch([RecordRead(kvs.id, "k")])
        version = record.version
        for turn in range(10**9):
            ops = [RecordAppend(kvs.id, "k", delta(version + 1), DELTA_CONTENT_TYPE, version)]
            if turn % 4 == 3:  # now and then a new snapshot, and a delta after it in the same batch
                snapshot = json.dumps({"n": version + 1, "pad": ""}).encode()
                ops = [
                    RecordWrite(kvs.id, "k", snapshot, "application/json", version),
                    RecordAppend(kvs.id, "k", delta(version + 2), DELTA_CONTENT_TYPE, version + 1),
                ]
            outcomes = await backend.write_batch(ops)
            assert all(o.applied for o in outcomes), outcomes
            version = outcomes[-1].version
            print(version, flush=True)

    anyio.run(main, sys.argv[1])
    """
)


def run_and_kill(url: str, appends: int) -> int:
    """Run the appending child until it acknowledged `appends` deltas, SIGKILL it; its last version told."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert child.stdout is not None and child.stderr is not None
    acked = 0
    try:
        for _ in range(appends):
            line = child.stdout.readline()
            assert line, child.stderr.read()
            acked = int(line)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        child.stderr.close()
    return acked


async def test_sigkill_mid_append_leaves_a_whole_chain(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/files"
    backend = open_backend(url)
    kvs = await KeyValueStore.open(name="kill", storage=backend)
    await backend.write_batch([RecordWrite(kvs.id, "k", b'{"n": 1}', JSON, 0)])
    await backend.aclose()
    acked = 1
    for round_ in range(6):
        acked = await anyio.to_thread.run_sync(run_and_kill, url, 5 + 7 * round_)  # a new point each round
        reader = open_backend(url)
        try:
            record = await one(reader, kvs.id, "k")
            chain = pieces(record)
            assert record.version >= acked  # every acknowledged append is there
            base = json.loads(chain[0][0])["n"]  # the version of the snapshot the deltas follow
            assert len(chain) - 1 == record.version - base  # the version and the pieces agree
            for n, (value, content_type) in enumerate(chain[1:], base + 1):
                assert (value, content_type) == (
                    json.dumps([{"n": 1, "pad": 1}, {"n": n, "pad": "p" * 3000}]).encode(),
                    DELTA_CONTENT_TYPE,
                )
            kept = await KeyValueStore.open(id=kvs.id, storage=reader)
            assert (await kept.get_value("k"))["n"] == record.version
        finally:
            await reader.aclose()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path, "1m") as mount:
        yield mount


async def test_a_full_disk_fails_the_append_alone(small_disk: Path) -> None:
    backend = open_backend(f"file://{small_disk}/files")
    try:
        kvs = await KeyValueStore.open(name="full", storage=backend)
        await backend.write_batch(
            [
                RecordWrite(kvs.id, "big", b'{"n": 1}', JSON, 0),
                RecordWrite(kvs.id, "small", b'{"n": 1}', JSON, 0),
            ]
        )
        assert await backend.write_batch([RecordAppend(kvs.id, "big", delta(2), DELTA_CONTENT_TYPE, 1)]) == [
            WriteOutcome(True, 2)
        ]
        outcomes = await backend.write_batch(
            [
                RecordAppend(kvs.id, "big", delta(3, pad=2 * 1024 * 1024), DELTA_CONTENT_TYPE, 2),
                RecordAppend(kvs.id, "small", delta(2), DELTA_CONTENT_TYPE, 1),
                # a write then an append: the append does not fit, so neither lands
                RecordWrite(kvs.id, "both", b'{"n": 1}', JSON, 0),
                RecordAppend(kvs.id, "both", delta(2, pad=2 * 1024 * 1024), DELTA_CONTENT_TYPE, 1),
            ]
        )
        assert isinstance(outcomes[0], StorageError)
        assert outcomes[1] == WriteOutcome(True, 2)
        assert isinstance(outcomes[2], StorageError) and isinstance(outcomes[3], StorageError)
        reader = open_backend(f"file://{small_disk}/files")
        try:
            big = await one(reader, kvs.id, "big")
            assert big.version == 2 and pieces(big)[1:] == [(delta(2), DELTA_CONTENT_TYPE)]
            assert len(pieces(await one(reader, kvs.id, "small"))) == 2
            assert (await reader.read_batch([RecordRead(kvs.id, "both")])) == [None]
        finally:
            await reader.aclose()
        # The disk has room again for a small one: the chain goes on from where it stood.
        assert await backend.write_batch([RecordAppend(kvs.id, "big", delta(3), DELTA_CONTENT_TYPE, 2)]) == [
            WriteOutcome(True, 3)
        ]
        assert len(pieces(await one(backend, kvs.id, "big"))) == 3
        assert not [
            p for p in (small_disk / "files" / kvs.id / ".deltas").iterdir() if p.name.startswith(".tmp")
        ]
    finally:
        await backend.aclose()


async def test_a_store_written_before_deltas_takes_appends(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/files"
    old = open_backend(url)
    kvs = await KeyValueStore.open(name="old", storage=old)
    await old.write_batch([RecordWrite(kvs.id, f"k{i}", b'{"n": 1}', JSON, 0) for i in range(50)])
    await old.read_batch([RecordRead(kvs.id, f"k{i}", claim=True) for i in range(50)])
    await old.aclose()
    store_dir = tmp_path / "files" / kvs.id
    assert not (store_dir / ".deltas").exists()  # nothing of deltas until the first append

    backend = open_backend(url)
    try:
        records = await backend.read_batch([RecordRead(kvs.id, f"k{i}") for i in range(50)])
        assert all(isinstance(r, StoredRecord) and r.version == 2 and r.value == b'{"n": 1}' for r in records)
        assert not (store_dir / ".deltas").exists()  # reading does not make it
        outcomes = await backend.write_batch([RecordAppend(kvs.id, "k7", delta(3), DELTA_CONTENT_TYPE, 2)])
        assert outcomes == [WriteOutcome(True, 3)]
        assert len(pieces(await one(backend, kvs.id, "k7"))) == 2
        assert pieces(await one(backend, kvs.id, "k8")) == [(b'{"n": 1}', JSON)]
        infos = {info.key: info for info in await backend.list_records(kvs.id)}
        assert (infos["k7"].version, infos["k8"].version) == (3, 2)
        assert os.stat(store_dir / ".deltas").st_mode & 0o777 == 0o700
        assert os.stat(store_dir / ".deltas" / "k7.rec").st_mode & 0o777 == 0o600
    finally:
        await backend.aclose()


async def test_stale_and_torn_logs_are_never_read_as_a_chain(tmp_path: Path) -> None:
    backend = open_backend(f"file://{tmp_path}/files")
    try:
        kvs = await KeyValueStore.open(name="stale", storage=backend)
        log = tmp_path / "files" / kvs.id / ".deltas" / "k.rec"
        await backend.write_batch([RecordWrite(kvs.id, "k", b'{"n": 1}', JSON, 0)])
        await backend.write_batch([RecordAppend(kvs.id, "k", delta(2), DELTA_CONTENT_TYPE, 1)])
        kept = log.read_bytes()
        # A crash after the new snapshot, before its old log was removed: the log comes back.
        assert await backend.write_batch([RecordWrite(kvs.id, "k", b'{"n": 9}', JSON, 2)]) == [
            WriteOutcome(True, 3)
        ]
        log.write_bytes(kept)
        record = await one(backend, kvs.id, "k")
        assert (pieces(record), record.version) == ([(b'{"n": 9}', JSON)], 3)
        # A crash after a delete, before the log went: the record made afresh has none of it,
        # even once it reaches the version the log followed.
        await backend.write_batch([RecordDelete(kvs.id, "k")])
        log.write_bytes(kept)
        await backend.write_batch([RecordWrite(kvs.id, "k", b'{"n": 0}', JSON, 0)])
        assert not log.exists()  # removed before the record was made afresh
        assert (await backend.write_batch([RecordWrite(kvs.id, "k", b'{"n": 1}', JSON, 1)]))[0].applied
        log.write_bytes(kept)  # and again, as if its removal had been lost
        assert pieces(await one(backend, kvs.id, "k")) == [(b'{"n": 1}', JSON)]
        # A torn tail (half a frame) is ignored, then written over by the next append.
        await backend.write_batch([RecordAppend(kvs.id, "k", delta(3), DELTA_CONTENT_TYPE, 2)])
        whole = log.read_bytes()
        with log.open("ab") as fh:
            fh.write(whole[: len(whole) // 2])
        assert len(pieces(await one(backend, kvs.id, "k"))) == 2
        assert (await backend.write_batch([RecordAppend(kvs.id, "k", delta(4), DELTA_CONTENT_TYPE, 3)])) == [
            WriteOutcome(True, 4)
        ]
        record = await one(backend, kvs.id, "k")
        assert [v for v, _ in pieces(record)[1:]] == [delta(3), delta(4)]
        assert len(log.read_bytes()) == 2 * len(whole)
    finally:
        await backend.aclose()


async def test_purge_and_drop_remove_the_logs(tmp_path: Path) -> None:
    backend = open_backend(f"file://{tmp_path}/files")
    try:
        kvs = await KeyValueStore.open(name="purged", storage=backend)
        await backend.write_batch([RecordWrite(kvs.id, "k", b'{"n": 1}', JSON, 0)])
        await backend.write_batch([RecordAppend(kvs.id, "k", delta(2), DELTA_CONTENT_TYPE, 1)])
        await backend.purge_store(kvs.id)
        assert not (tmp_path / "files" / kvs.id / ".deltas").exists()
        await backend.write_batch([RecordWrite(kvs.id, "k", b'{"n": 1}', JSON, 0)])
        assert pieces(await one(backend, kvs.id, "k")) == [(b'{"n": 1}', JSON)]
        await backend.write_batch([RecordAppend(kvs.id, "k", delta(2), DELTA_CONTENT_TYPE, 1)])
        await backend.drop_store(kvs.id)
        assert not (tmp_path / "files" / kvs.id).exists()
        assert not [p for p in (tmp_path / "files").iterdir() if p.name.startswith(".dropped")]
    finally:
        await backend.aclose()
        shutil.rmtree(tmp_path / "files", ignore_errors=True)


async def test_a_large_batch_finds_the_logs_of_its_records(tmp_path: Path) -> None:
    """Past `PROBE` records of a store, a batch lists `.deltas` once instead of looking for each log."""
    backend = open_backend(f"file://{tmp_path}/files")
    try:
        kvs = await KeyValueStore.open(name="large", storage=backend)
        keys = [f"k{i:03d}" for i in range(100)]
        await backend.write_batch([RecordWrite(kvs.id, key, b'{"n": 1}', JSON, 0) for key in keys])
        appended = keys[::10]
        outcomes = await backend.write_batch(
            [RecordAppend(kvs.id, key, delta(2), DELTA_CONTENT_TYPE, 1) for key in appended]
        )
        assert outcomes == [WriteOutcome(True, 2)] * len(appended)
        records = await backend.read_batch([RecordRead(kvs.id, key, claim=True) for key in keys])
        for key, record in zip(keys, records, strict=True):
            assert isinstance(record, StoredRecord)
            assert (record.version, len(pieces(record))) == ((3, 2) if key in appended else (2, 1))
        outcomes = await backend.write_batch(
            [
                op
                for key in keys
                for op in (
                    RecordWrite(kvs.id, key, b'{"n": 5}', JSON),
                    *(
                        [RecordAppend(kvs.id, key, delta(6), DELTA_CONTENT_TYPE, 4)]
                        if key in appended[:5]
                        else []
                    ),
                )
            ]
        )
        assert all(isinstance(o, WriteOutcome) and o.applied for o in outcomes)
        records = await backend.read_batch([RecordRead(kvs.id, key) for key in keys])
        for key, record in zip(keys, records, strict=True):
            assert isinstance(record, StoredRecord)
            expected = [(b'{"n": 5}', JSON)] + (
                [(delta(6), DELTA_CONTENT_TYPE)] if key in appended[:5] else []
            )
            assert pieces(record) == expected
            assert record.version == (5 if key in appended[:5] else (4 if key in appended else 3))
        logs = sorted(p.name for p in (tmp_path / "files" / kvs.id / ".deltas").iterdir())
        assert logs == sorted(f"{key}.rec" for key in appended[:5])
    finally:
        await backend.aclose()
