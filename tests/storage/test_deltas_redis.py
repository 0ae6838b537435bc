"""Deltas on the Redis backend: what an append costs, and what it answers when things go wrong.

The conformance suite (tests/storage/test_conformance.py, TestRedis) checks the rules;
these checks are Redis's own: an append adds about the delta's size to the record's
memory and to the append-only file (never the snapshot again), a batch failing in part
or whole leaves every record with all of its deltas or none, a store written before
deltas existed takes appends, a server restarted without its data answers appends with
the truth, two processes fence each other's appends, and `wait_replicas` covers them.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from recoverable_state import NotDurableError, StorageError, StoreNotFoundError
from recoverable_state.storage import (
    RecordAppend,
    RecordRead,
    RecordWrite,
    StorageBackend,
    WriteOutcome,
    open_backend,
)
from recoverable_state.storage._chain import CHAIN_CONTENT_TYPE, DELTA_CONTENT_TYPE, unpack_chain
from recoverable_state.storage._redis import RedisBackend
from recoverable_state.testing import FaultInjectingBackend
from servers import RedisServer, flush_redis, start_or_skip

pytestmark = pytest.mark.anyio

JSON = "application/json"


def delta(n: int) -> bytes:
    return b'[{"n":1},{"n":%d}]' % n


@pytest.fixture
async def backend(redis_url: str) -> AsyncIterator[StorageBackend]:
    flush_redis(redis_url)
    made = open_backend(redis_url)
    yield made
    await made.aclose()


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    made = redis.Redis.from_url(redis_url)
    yield made
    made.close()


async def chain(backend: StorageBackend, store_id: str, key: str) -> tuple[list[tuple[bytes, str]], int]:
    (found,) = await backend.read_batch([RecordRead(store_id, key)])
    assert found is not None and not isinstance(found, StorageError)
    if found.content_type != CHAIN_CONTENT_TYPE:
        return [(found.value, found.content_type)], found.version
    return unpack_chain(found.value), found.version


async def test_appends_to_a_5_mb_snapshot_grow_memory_and_aof_by_the_deltas_only(
    backend: StorageBackend, client: redis.Redis
) -> None:
    store = await backend.open_store(name="big")
    snapshot = b'{"n":0,"pad":"' + b"x" * (5 * 1024 * 1024) + b'"}'
    assert await backend.write_batch([RecordWrite(store.id, "big", snapshot, JSON)]) == [
        WriteOutcome(True, 1)
    ]
    key = f"rs:r:{store.id}:big"
    memory_before = int(client.memory_usage(key, samples=0) or 0)
    aof_before = int(client.info("persistence")["aof_current_size"])
    deltas = [delta(n) for n in range(1, 21)]
    for n, piece in enumerate(deltas, 1):
        outcome = await backend.write_batch([RecordAppend(store.id, "big", piece, DELTA_CONTENT_TYPE, n)])
        assert outcome == [WriteOutcome(True, n + 1)]
    memory_growth = int(client.memory_usage(key, samples=0) or 0) - memory_before
    aof_growth = int(client.info("persistence")["aof_current_size"]) - aof_before
    added = sum(map(len, deltas))
    # Each append logs one HSET of a few small fields plus its batch marker: a few
    # hundred bytes, against 5 MB for a snapshot written again.
    assert memory_growth < 20 * 200, memory_growth
    assert added < aof_growth < 20 * 1500, aof_growth
    pieces, version = await chain(backend, store.id, "big")
    assert version == 21
    assert pieces == [(snapshot, JSON), *((d, DELTA_CONTENT_TYPE) for d in deltas)]
    (info,) = await backend.list_records(store.id)
    assert (info.version, info.size) == (21, len(snapshot))  # the size is the snapshot's


async def test_a_batch_failing_in_part_or_whole_leaves_all_of_a_record_s_deltas_or_none(
    backend: StorageBackend,
) -> None:
    faulty = FaultInjectingBackend(backend)
    store = await backend.open_store(name="faults")
    gone = await backend.open_store(name="gone")
    await backend.write_batch([RecordWrite(store.id, k, b'{"n":0}', JSON) for k in "ab"])
    await backend.drop_store(gone.id)
    batch = [
        RecordAppend(store.id, "a", delta(1), DELTA_CONTENT_TYPE, 1),
        RecordAppend(store.id, "a", delta(2), DELTA_CONTENT_TYPE, 2),
        RecordAppend(store.id, "b", delta(1), DELTA_CONTENT_TYPE, 1),
    ]

    faulty.fail_next(when="before")
    with pytest.raises(StorageError):
        await faulty.write_batch(batch)
    assert [await chain(backend, store.id, k) for k in "ab"] == [([(b'{"n":0}', JSON)], 1)] * 2

    # Applied, then the answer lost: the retry of the same appends is refused with the
    # version they made, and every record holds its deltas once.
    faulty.fail_next(when="after")
    with pytest.raises(StorageError):
        await faulty.write_batch(batch)
    assert await backend.write_batch(batch) == [WriteOutcome(False, 3)] * 2 + [WriteOutcome(False, 2)]
    pieces, version = await chain(backend, store.id, "a")
    assert (len(pieces), version) == (3, 3)

    # In part: a dropped store and a stale version fail alone, the rest applies.
    outcomes = await backend.write_batch(
        [
            RecordAppend(gone.id, "a", delta(9), DELTA_CONTENT_TYPE, 1),
            RecordAppend(store.id, "a", delta(3), DELTA_CONTENT_TYPE, 2),
            RecordAppend(store.id, "b", delta(2), DELTA_CONTENT_TYPE, 2),
            RecordAppend(store.id, "missing", delta(1), DELTA_CONTENT_TYPE, 1),
        ]
    )
    assert isinstance(outcomes[0], StoreNotFoundError)
    assert outcomes[1:] == [WriteOutcome(False, 3), WriteOutcome(True, 3), WriteOutcome(False, 0)]
    pieces, version = await chain(backend, store.id, "b")
    assert pieces[1:] == [(delta(1), DELTA_CONTENT_TYPE), (delta(2), DELTA_CONTENT_TYPE)]
    assert version == 3


async def test_a_store_written_before_deltas_takes_appends(
    backend: StorageBackend, client: redis.Redis
) -> None:
    store = await backend.open_store(name="old")
    # The layout of a record as the backend wrote it before deltas existed.
    client.hset(
        f"rs:r:{store.id}:old",
        mapping={
            "value": b'{"n":0}',
            "content_type": JSON,
            "version": 4,
            "updated_at": 1_700_000_000_000_000,
        },
    )
    client.zadd(f"rs:k:{store.id}", {"old": 0})
    assert await chain(backend, store.id, "old") == ([(b'{"n":0}', JSON)], 4)
    (claimed,) = await backend.read_batch([RecordRead(store.id, "old", claim=True)])
    assert claimed is not None and not isinstance(claimed, StorageError) and claimed.version == 5
    append = RecordAppend(store.id, "old", delta(1), DELTA_CONTENT_TYPE, 5)
    assert await backend.write_batch([append]) == [WriteOutcome(True, 6)]
    (claimed,) = await backend.read_batch([RecordRead(store.id, "old", claim=True)])  # keeps the delta
    assert claimed is not None and not isinstance(claimed, StorageError)
    assert (claimed.content_type, claimed.version) == (CHAIN_CONTENT_TYPE, 7)
    assert await backend.write_batch([RecordWrite(store.id, "old", b'{"n":1}', JSON, 7)]) == [
        WriteOutcome(True, 8)
    ]
    assert await chain(backend, store.id, "old") == ([(b'{"n":1}', JSON)], 8)
    assert not client.hexists(f"rs:r:{store.id}:old", "d1")  # the snapshot dropped the delta


async def test_two_backends_fence_each_other_s_appends(redis_url: str) -> None:
    flush_redis(redis_url)
    old, new = open_backend(redis_url), open_backend(redis_url)
    try:
        store = await old.open_store(name="fenced")
        await old.write_batch([RecordWrite(store.id, "s", b'{"n":0}', JSON)])
        (mine,) = await old.read_batch([RecordRead(store.id, "s", claim=True)])
        (theirs,) = await new.read_batch([RecordRead(store.id, "s", claim=True)])
        assert mine is not None and theirs is not None
        assert not isinstance(mine, StorageError) and not isinstance(theirs, StorageError)
        assert (mine.version, theirs.version) == (2, 3)
        refused = await old.write_batch([RecordAppend(store.id, "s", delta(1), DELTA_CONTENT_TYPE, 2)])
        assert refused == [WriteOutcome(False, 3)]
        taken = await new.write_batch([RecordAppend(store.id, "s", delta(2), DELTA_CONTENT_TYPE, 3)])
        assert taken == [WriteOutcome(True, 4)]
        assert await chain(old, store.id, "s") == ([(b'{"n":0}', JSON), (delta(2), DELTA_CONTENT_TYPE)], 4)
    finally:
        await old.aclose()
        await new.aclose()


@pytest.fixture(scope="module")
def private_redis(server_dir: Path) -> Iterator[RedisServer]:
    server = start_or_skip(lambda: RedisServer(server_dir / "deltas-redis"))
    yield server
    server.stop()


async def test_appends_to_a_server_restarted_without_its_data_tell_the_truth(
    private_redis: RedisServer,
) -> None:
    server = private_redis
    if server.proc is None or server.proc.poll() is not None:
        server.start()
    flush_redis(server.url)
    backend = RedisBackend(server.url, retry_timeout=10)
    try:
        store = await backend.open_store(name="amnesia")
        await backend.write_batch([RecordWrite(store.id, "s", b'{"n":0}', JSON)])
        first = RecordAppend(store.id, "s", delta(1), DELTA_CONTENT_TYPE, 1)
        assert await backend.write_batch([first]) == [WriteOutcome(True, 2)]
        server.kill()
        for name in ("appendonlydir", "appendonly.aof", "dump.rdb"):
            shutil.rmtree(server.directory / name, ignore_errors=True)
            (server.directory / name).unlink(missing_ok=True)
        server.start()
        # The store itself is gone with the data: the append fails, applying nothing.
        (outcome,) = await backend.write_batch([RecordAppend(store.id, "s", delta(2), DELTA_CONTENT_TYPE, 2)])
        assert isinstance(outcome, StoreNotFoundError)
        again = await backend.open_store(name="amnesia")
        (outcome,) = await backend.write_batch([RecordAppend(again.id, "s", delta(2), DELTA_CONTENT_TYPE, 2)])
        assert outcome == WriteOutcome(False, 0)  # the record is not there: nothing to append to
        assert await backend.read_batch([RecordRead(again.id, "s")]) == [None]
    finally:
        await backend.aclose()
        if server.proc is None or server.proc.poll() is not None:
            server.start()


async def test_an_append_a_replica_did_not_confirm_carries_its_outcome(redis_url: str) -> None:
    flush_redis(redis_url)
    plain = open_backend(redis_url)
    waiting = RedisBackend(redis_url, wait_replicas=1, wait_timeout=0.2)  # the server has no replica
    try:
        store = await plain.open_store(name="durable")
        await plain.write_batch([RecordWrite(store.id, "s", b'{"n":0}', JSON)])
        (outcome,) = await waiting.write_batch([RecordAppend(store.id, "s", delta(1), DELTA_CONTENT_TYPE, 1)])
        assert isinstance(outcome, NotDurableError)
        assert outcome.outcome == WriteOutcome(True, 2)  # applied on the master, not confirmed
        (refused,) = await waiting.write_batch([RecordAppend(store.id, "s", delta(1), DELTA_CONTENT_TYPE, 1)])
        assert refused == WriteOutcome(False, 2)  # not applied: nothing to confirm
        assert (await chain(plain, store.id, "s"))[1] == 2
    finally:
        await plain.aclose()
        await waiting.aclose()
