"""Conformance checks of whole batches: order inside a batch, deletes among writes, failing alone."""

from __future__ import annotations

import os

import anyio
import pytest

from .._errors import StoreNotFoundError
from ..storage import (
    KeyValueStore,
    RecordDelete,
    RecordRead,
    RecordWrite,
    StorageBackend,
    StoredRecord,
    WriteOutcome,
)
from ._suite import BYTES, Suite, open_store, read, version_of, write


class BatchChecks(Suite):
    """Batches handed to `read_batch` and `write_batch` directly, as the group commit hands them."""

    async def test_big_values_among_small_ones_and_a_refused_write(self, backend: StorageBackend) -> None:
        """Values of a few MiB beside small ones, conditional and not, with a stale write in the batch.

        A stale write sends a batch to its planned path after its conditional one
        found a version short: what the first attempt began must not show.
        """
        self.needs("large_values")
        kvs = await open_store(backend)
        one, two, three = (os.urandom(n * 1024 * 1024 + n) for n in (2, 3, 1))
        await kvs.put_record("k", b"small", BYTES)
        outcomes = await write(
            backend,
            [
                RecordWrite(kvs.id, "big", one, BYTES, expected_version=0),
                RecordWrite(kvs.id, "k", two, BYTES, expected_version=1),
                RecordWrite(kvs.id, "s", b"s", BYTES, expected_version=0),
            ],
        )
        assert outcomes == [WriteOutcome(True, 1), WriteOutcome(True, 2), WriteOutcome(True, 1)]
        outcomes = await write(
            backend,
            [
                RecordWrite(kvs.id, "big", three, BYTES, expected_version=1),
                RecordWrite(kvs.id, "k", one, BYTES, expected_version=1),  # stale: k is at 2
                RecordWrite(kvs.id, "new", two, BYTES, expected_version=0),
            ],
        )
        assert outcomes == [WriteOutcome(True, 2), WriteOutcome(False, 2), WriteOutcome(True, 1)]
        found = await read(backend, [RecordRead(kvs.id, key) for key in ("big", "k", "s", "new")])
        assert [r.value if isinstance(r, StoredRecord) else r for r in found] == [three, two, b"s", two]
        await kvs.put_record("big", b"small again", BYTES)
        assert await kvs.get_value("big") == b"small again"

    async def test_requests_of_a_batch_act_one_after_another(self, backend: StorageBackend) -> None:
        """Two claimants never share a version; a second write to a key sees the first."""
        kvs = await open_store(backend)
        await kvs.put_record("k", b"v1", BYTES)
        reads = await read(
            backend,
            [
                RecordRead(kvs.id, "k"),
                RecordRead(kvs.id, "k", claim=True),
                RecordRead(kvs.id, "k", claim=True),
                RecordRead(kvs.id, "k"),
                RecordRead(kvs.id, "missing", claim=True),
            ],
        )
        assert [version_of(r) for r in reads] == [1, 2, 3, 3, None]
        outcomes = await write(
            backend,
            [
                RecordWrite(kvs.id, "k", b"a", BYTES, expected_version=3),
                RecordWrite(kvs.id, "k", b"b", BYTES, expected_version=3),
                RecordWrite(kvs.id, "k", b"c", BYTES),
                RecordWrite(kvs.id, "n", b"d", BYTES, expected_version=0),
                RecordWrite(kvs.id, "n", b"e", BYTES, expected_version=0),
                RecordWrite(kvs.id, "n", b"f", BYTES, expected_version=1),
            ],
        )
        assert outcomes == [
            WriteOutcome(True, 4),
            WriteOutcome(False, 4),
            WriteOutcome(True, 5),
            WriteOutcome(True, 1),
            WriteOutcome(False, 1),
            WriteOutcome(True, 2),
        ]
        assert await kvs.get_value("k") == b"c"
        assert await kvs.get_value("n") == b"f"

    async def test_deletes_answer_what_they_did(self, backend: StorageBackend) -> None:
        kvs = await open_store(backend)
        await write(backend, [RecordWrite(kvs.id, k, b"v", BYTES) for k in ("a", "b", "c")])
        outcomes = await write(
            backend,
            [
                RecordDelete(kvs.id, "a"),
                RecordDelete(kvs.id, "a"),
                RecordDelete(kvs.id, "b", expected_version=7),
                RecordDelete(kvs.id, "b", expected_version=1),
                RecordDelete(kvs.id, "c", expected_version=0),
                RecordDelete(kvs.id, "never"),
            ],
        )
        assert outcomes == [
            WriteOutcome(True, 0),
            WriteOutcome(False, 0),
            WriteOutcome(False, 1),
            WriteOutcome(True, 0),
            WriteOutcome(False, 1),
            WriteOutcome(False, 0),
        ]
        assert [info.key for info in await kvs.list_keys()] == ["c"]

    async def test_a_write_then_a_delete_of_one_key_in_one_batch(self, backend: StorageBackend) -> None:
        kvs = await open_store(backend)
        keep = 3 if self.keeps_history else 0
        await kvs.put_record("k", b"old", BYTES, keep_history=keep)
        outcomes = await write(
            backend,
            [
                RecordWrite(kvs.id, "k", b"new", BYTES, expected_version=1, keep_history=keep),
                RecordDelete(kvs.id, "k", expected_version=2),
                RecordWrite(kvs.id, "fresh", b"x", BYTES, keep_history=keep),
                RecordDelete(kvs.id, "fresh"),
            ],
        )
        assert outcomes == [
            WriteOutcome(True, 2),
            WriteOutcome(True, 0),
            WriteOutcome(True, 1),
            WriteOutcome(True, 0),
        ]
        assert await kvs.list_keys() == []
        assert await kvs.get_history("k") == []
        assert await kvs.get_history("fresh") == []

    async def test_a_delete_then_a_write_of_one_key_in_one_batch(self, backend: StorageBackend) -> None:
        """The record is made afresh: version 1, none of the old history, none of the old claims."""
        kvs = await open_store(backend)
        keep = 3 if self.keeps_history else 0
        for n in range(3):
            await kvs.put_record("k", f"old{n}".encode(), BYTES, keep_history=keep)
        await kvs.get_record("k", claim=True)  # version 4
        outcomes = await write(
            backend,
            [
                RecordDelete(kvs.id, "k", expected_version=4),
                RecordWrite(kvs.id, "k", b"new", BYTES, expected_version=0, keep_history=keep),
                RecordWrite(kvs.id, "k", b"newer", BYTES, expected_version=1, keep_history=keep),
            ],
        )
        assert outcomes == [WriteOutcome(True, 0), WriteOutcome(True, 1), WriteOutcome(True, 2)]
        record = await kvs.get_record("k")
        assert record is not None
        assert (record.value, record.version) == (b"newer", 2)
        if self.keeps_history:
            assert [(h.version, h.value) for h in await kvs.get_history("k")] == [(2, b"newer"), (1, b"new")]
        (info,) = await kvs.list_keys()
        assert info.version == 2

    async def test_history_in_one_batch(self, backend: StorageBackend) -> None:
        self.needs("keeps_history")
        kvs = await open_store(backend)
        await kvs.put_record("k", b"old", BYTES, keep_history=5)
        outcomes = await write(
            backend, [RecordWrite(kvs.id, "k", f"b{n}".encode(), BYTES, keep_history=3) for n in range(4)]
        )
        assert [o.version for o in outcomes if isinstance(o, WriteOutcome)] == [2, 3, 4, 5]
        assert [h.value for h in await kvs.get_history("k")] == [b"b3", b"b2", b"b1"]

    async def test_a_missing_store_fails_only_its_own_requests(self, backend: StorageBackend) -> None:
        live, gone = await open_store(backend), await open_store(backend)
        await gone.put_record("old", b"o", BYTES)
        await gone.drop()
        outcomes = await write(
            backend,
            [
                RecordWrite(live.id, "a", b"1", BYTES),
                RecordWrite(gone.id, "b", b"2", BYTES),
                RecordDelete(gone.id, "old"),
                RecordWrite(live.id, "c", b"3", BYTES),
            ],
        )
        assert isinstance(outcomes[1], StoreNotFoundError)
        assert isinstance(outcomes[2], StoreNotFoundError)
        assert outcomes[0] == WriteOutcome(True, 1)
        assert outcomes[3] == WriteOutcome(True, 1)
        assert await live.get_value("a") == b"1"
        assert await live.get_value("c") == b"3"
        reads = await read(backend, [RecordRead(gone.id, "b", claim=True), RecordRead(live.id, "a")])
        assert isinstance(reads[0], StoreNotFoundError)
        assert isinstance(reads[1], StoredRecord)
        assert reads[1].value == b"1"

    async def test_concurrent_writers_to_one_key_never_tear(self, backend: StorageBackend) -> None:
        kvs = await open_store(backend)
        values = [bytes([i]) * (64 * 1024 + i) for i in range(40)]
        async with anyio.create_task_group() as tg:
            for value in values:
                tg.start_soon(kvs.put_record, "shared", value, BYTES)
        record = await kvs.get_record("shared")
        assert record is not None
        assert record.value in values
        assert record.version == len(values)  # every unconditional write applied once

    async def test_concurrent_compare_and_set_writers_have_one_winner(self, backend: StorageBackend) -> None:
        kvs = await open_store(backend)
        await kvs.put_record("k", b"start", BYTES)
        for key, expected in (("k", 1), ("fresh", 0)):
            outcomes: dict[int, WriteOutcome] = {}

            async def cas(
                i: int, key: str = key, expected: int = expected, out: dict[int, WriteOutcome] = outcomes
            ) -> None:
                out[i] = await kvs.put_record(key, f"w{i}".encode(), BYTES, expected_version=expected)

            async with anyio.create_task_group() as tg:
                for i in range(25):
                    tg.start_soon(cas, i)
            winners = [i for i, o in outcomes.items() if o.applied]
            assert len(winners) == 1, key
            assert all(o.version == expected + 1 for o in outcomes.values()), key
            assert await kvs.get_value(key) == f"w{winners[0]}".encode()

    async def test_concurrent_reads_and_writes_keep_the_event_loop_running(
        self, backend: StorageBackend
    ) -> None:
        """Blocking work runs in threads: a ticker keeps ticking through big reads and writes.

        A busy machine can stall the ticker once by chance, so the measurement is
        repeated, on new keys, up to three times, and one run without a stall passes.
        """
        kvs = await open_store(backend)
        size = 5 * 1024 * 1024 if self.large_values else 256 * 1024
        big = b"\x5a" * size
        stalls: list[float] = []
        for run in range(3):
            gaps: list[float] = []
            done = anyio.Event()

            async def ticker(gaps: list[float] = gaps, done: anyio.Event = done) -> None:
                last = anyio.current_time()
                while not done.is_set():
                    await anyio.sleep(0.005)
                    gaps.append(anyio.current_time() - last)
                    last = anyio.current_time()

            async with anyio.create_task_group() as tg:
                tg.start_soon(ticker)
                async with anyio.create_task_group() as writers:
                    for i in range(3):
                        writers.start_soon(kvs.put_record, f"big-{run}-{i}", big, BYTES)
                    for i in range(1000):
                        writers.start_soon(kvs.put_record, f"small-{run}-{i}", b"x" * 600, BYTES)
                await KeyValueStore.get_together([(kvs, f"big-{run}-{i}", False) for i in range(3)])
                await kvs.list_keys()
                done.set()
            stalls.append(max(gaps, default=0.0))
            if stalls[-1] < 0.3:
                break
        shown = ", ".join(f"{s:.3f} s" for s in stalls)
        assert min(stalls) < 0.3, f"the event loop stalled in every run: {shown}"

    @pytest.mark.parametrize("seed", range(3))
    async def test_random_batches_answer_as_the_planner(self, backend: StorageBackend, seed: int) -> None:
        """Random batches of writes, deletes, claims and history, against the memory backend.

        The memory backend applies the planner and nothing else: the expected answers.
        """
        from ._suite_model import check_random_batches

        await check_random_batches(backend, f"{type(self).__name__}-{seed}", keeps_history=self.keeps_history)
