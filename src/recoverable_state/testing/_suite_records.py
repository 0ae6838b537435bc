"""Conformance checks of single records: values, keys, versions and claims, history, deletes."""

from __future__ import annotations

import os
from typing import Any

import pytest

from ..storage import JSON_CONTENT_TYPE, KeyValueStore, StorageBackend, StoredRecord, WriteOutcome
from ._suite import BYTES, Suite, open_store

ODD_KEYS = [
    "ключ/значение",
    "日本語のキー",
    "emoji 🙂🚀",
    "../x",
    "../../etc/passwd",
    "/etc/passwd",
    "a/b/c",
    "a",
    "a/",
    "..",
    ".",
    ".hidden",
    "C:\\Windows\\system32",
    "%2e%2e%2f",
    "with space and 'quotes' \"double\"",
    "Key",
    "key",
    "k" * 1000,
    "é" * 1024,
    "🙂" * 1024,
]
"""Keys a backend must keep apart and inside its store: paths, dots, cases, long UTF-8."""


class RecordChecks(Suite):
    """One record at a time, through the KeyValueStore facade."""

    async def test_set_get_exists_delete(self, backend: StorageBackend) -> None:
        kvs = await open_store(backend)
        assert await kvs.get_value("k") is None
        assert await kvs.get_value("k", default="fallback") == "fallback"
        assert not await kvs.record_exists("k")
        await kvs.set_value("k", {"a": 1, "b": [1, 2, None]})
        assert await kvs.get_value("k") == {"a": 1, "b": [1, 2, None]}
        assert await kvs.record_exists("k")
        await kvs.set_value("k", {"a": 2})
        assert await kvs.get_value("k") == {"a": 2}
        await kvs.delete_value("k")
        assert not await kvs.record_exists("k")
        assert await kvs.get_value("k") is None
        await kvs.delete_value("k")  # deleting what is absent is no error
        assert await kvs.list_keys() == []

    @pytest.mark.parametrize(
        ("value", "content_type", "expected_type", "expected_value"),
        [
            ({"x": [1, 2.5, "é", None, True]}, None, JSON_CONTENT_TYPE, {"x": [1, 2.5, "é", None, True]}),
            (None, None, JSON_CONTENT_TYPE, None),
            ("plain text ✓", None, "text/plain; charset=utf-8", "plain text ✓"),
            ("a JSON string", "application/json", "application/json", "a JSON string"),
            (b"\x00\x01\xffbinary", None, BYTES, b"\x00\x01\xffbinary"),
            (b"", "image/png", "image/png", b""),
            ("<p>hi</p>", "text/html; charset=utf-8", "text/html; charset=utf-8", "<p>hi</p>"),
        ],
        ids=["dict", "null", "text", "json-str", "bytes", "empty", "html"],
    )
    async def test_values_and_content_types_round_trip(
        self,
        backend: StorageBackend,
        value: Any,
        content_type: str | None,
        expected_type: str,
        expected_value: Any,
    ) -> None:
        kvs = await open_store(backend)
        await kvs.set_value("v", value, content_type)
        record = await kvs.get_record("v")
        assert record is not None
        assert record.content_type == expected_type
        assert await kvs.get_value("v") == expected_value
        (info,) = await kvs.list_keys()
        assert (info.key, info.content_type, info.size) == ("v", expected_type, len(record.value))

    async def test_unusual_keys_stay_apart(self, backend: StorageBackend) -> None:
        kvs = await open_store(backend)
        for i, key in enumerate(ODD_KEYS):
            await kvs.set_value(key, {"i": i})
        for i, key in enumerate(ODD_KEYS):
            assert await kvs.get_value(key) == {"i": i}, key[:20]
        assert [info.key for info in await kvs.list_keys()] == sorted(ODD_KEYS)
        for key in ODD_KEYS:
            await kvs.delete_value(key)
        assert await kvs.list_keys() == []

    async def test_unusual_keys_are_claimed_and_fenced_in_one_batch(self, backend: StorageBackend) -> None:
        kvs, other = await open_store(backend), await open_store(backend)
        for key in ODD_KEYS:
            await kvs.set_value(key, 1)
            await other.set_value(key, 2)  # the same keys in another store stay as they are
        read = await KeyValueStore.get_together([(kvs, key, True) for key in ODD_KEYS])
        assert [r.version if isinstance(r, StoredRecord) else r for r in read] == [2] * len(ODD_KEYS)
        for key in ODD_KEYS:
            record = await kvs.get_record(key)
            assert (record and record.version) == 2, key[:20]
            assert await kvs.put_record(key, b"stale", BYTES, expected_version=1) == WriteOutcome(False, 2)
            assert await kvs.put_record(key, b"owner", BYTES, expected_version=2) == WriteOutcome(True, 3)
            stays = await other.get_record(key)
            assert (stays and stays.version) == 1, key[:20]

    async def test_large_values(self, backend: StorageBackend) -> None:
        self.needs("large_values")
        kvs = await open_store(backend)
        big = os.urandom(5 * 1024 * 1024 + 17)
        outcome = await kvs.put_record("big", big, BYTES, keep_history=2 if self.keeps_history else 0)
        assert outcome == WriteOutcome(applied=True, version=1)
        record = await kvs.get_record("big")
        assert record is not None
        assert record.value == big
        (info,) = await kvs.list_keys()
        assert info.size == len(big)
        if self.keeps_history:
            (kept,) = await kvs.get_history("big")
            assert kept.value == big
        text = "ß" * (3 * 1024 * 1024)  # 6 MiB of UTF-8
        await kvs.set_value("big-json", {"text": text})
        assert await kvs.get_value("big-json") == {"text": text}

    async def test_versions_compare_and_set_and_claims(self, backend: StorageBackend) -> None:
        kvs = await open_store(backend)
        assert await kvs.put_record("k", b"1", BYTES) == WriteOutcome(True, 1)
        assert await kvs.put_record("k", b"2", BYTES) == WriteOutcome(True, 2)
        claimed = await kvs.get_record("k", claim=True)
        assert claimed is not None
        assert (claimed.version, claimed.value) == (3, b"2")
        record = await kvs.get_record("k")
        assert record is not None
        assert record.version == 3
        assert await kvs.put_record("k", b"stale", BYTES, expected_version=2) == WriteOutcome(False, 3)
        assert await kvs.get_value("k") == b"2"
        assert await kvs.put_record("k", b"4", BYTES, expected_version=3) == WriteOutcome(True, 4)
        assert await kvs.put_record("k", b"x", BYTES, expected_version=0) == WriteOutcome(False, 4)
        assert await kvs.put_record("new", b"n", BYTES, expected_version=0) == WriteOutcome(True, 1)
        assert await kvs.put_record("absent", b"a", BYTES, expected_version=1) == WriteOutcome(False, 0)
        assert not await kvs.record_exists("absent")
        assert await kvs.get_record("nothing", claim=True) is None  # a claim creates nothing
        assert not await kvs.record_exists("nothing")
        (info,) = [i for i in await kvs.list_keys() if i.key == "k"]
        assert info.version == 4

    async def test_history_keeps_trims_and_reads(self, backend: StorageBackend) -> None:
        self.needs("keeps_history")
        kvs = await open_store(backend)
        for n in range(1, 6):
            assert await kvs.put_record("k", f"v{n}".encode(), BYTES, keep_history=3) == WriteOutcome(True, n)
        history = await kvs.get_history("k")
        assert [(h.version, h.value) for h in history] == [(5, b"v5"), (4, b"v4"), (3, b"v3")]
        assert all(h.key == "k" and h.content_type == BYTES for h in history)
        await kvs.put_record("k", b"v6", BYTES)  # keeps no history: the kept ones stay
        assert [h.version for h in await kvs.get_history("k")] == [5, 4, 3]
        await kvs.put_record("k", b"v7", "text/plain", keep_history=1)
        (only,) = await kvs.get_history("k")
        assert (only.version, only.value, only.content_type) == (7, b"v7", "text/plain")
        assert await kvs.get_history("never-written") == []
        await kvs.put_record("other", b"o", BYTES)
        assert await kvs.get_history("other") == []

    async def test_history_counts_written_snapshots_not_versions(self, backend: StorageBackend) -> None:
        self.needs("keeps_history")
        kvs = await open_store(backend)
        await kvs.put_record("k", b"one", BYTES, keep_history=2)
        await kvs.get_record("k", claim=True)  # version 2, nothing written
        await kvs.put_record("k", b"three", BYTES, keep_history=2)
        assert [(h.version, h.value) for h in await kvs.get_history("k")] == [(3, b"three"), (1, b"one")]

    async def test_delete_with_and_without_expected_version(self, backend: StorageBackend) -> None:
        kvs = await open_store(backend)
        keep = 5 if self.keeps_history else 0
        await kvs.put_record("k", b"1", BYTES, keep_history=keep)
        await kvs.put_record("k", b"2", BYTES, keep_history=keep)
        assert not await kvs.delete_record("k", expected_version=1)
        assert await kvs.get_value("k") == b"2"
        assert len(await kvs.get_history("k")) == (2 if keep else 0)
        assert await kvs.delete_record("k", expected_version=2)
        assert await kvs.get_record("k") is None
        assert await kvs.get_history("k") == []
        assert not await kvs.delete_record("k")
        assert not await kvs.delete_record("k", expected_version=2)
        await kvs.put_record("k", b"again", BYTES)
        record = await kvs.get_record("k")
        assert record is not None
        assert record.version == 1
        assert await kvs.delete_record("k")
        assert await kvs.list_keys() == []

    async def test_claims_of_a_deleted_record_never_reach_the_one_written_again(
        self, backend: StorageBackend
    ) -> None:
        kvs = await open_store(backend)
        await kvs.put_record("k", b"first", BYTES)
        for _ in range(3):
            await kvs.get_record("k", claim=True)
        assert await kvs.delete_record("k", expected_version=4)
        assert await kvs.put_record("k", b"second", BYTES, expected_version=0) == WriteOutcome(True, 1)
        record = await kvs.get_record("k")
        assert record is not None
        assert (record.version, record.value) == (1, b"second")
        (info,) = await kvs.list_keys()
        assert info.version == 1
