"""`recoverable-state status`: per store, the newest write and the record count, to spot a stuck worker."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from cli_support import Cli, read_all, run_async

from recoverable_state.storage import KeyValueStore, StorageBackend

pytestmark = pytest.mark.slow


def test_status_gives_each_store_its_newest_write_key_and_count(cli: Cli, filled_url: str) -> None:
    async def newest(storage: StorageBackend) -> dict[str, tuple[str, datetime, int]]:
        found = {}
        for info in await storage.list_stores():
            records = await storage.list_records(info.id)
            top = max(records, key=lambda r: r.updated_at)
            found[info.name or info.id] = (top.key, top.updated_at, len(records))
        return found

    expected = run_async(newest, filled_url)
    rows = {row["name"]: row for row in json.loads(cli.ok("status", "--json", url=filled_url))}
    assert set(rows) == set(expected)
    for name, (key, at, count) in expected.items():
        assert rows[name]["records"] == count
        assert rows[name]["newest_key"] == key
        assert datetime.fromisoformat(rows[name]["newest_write"]) == at
        assert rows[name]["age_seconds"] >= 0
    assert sum(r["records"] for r in rows.values()) == len(read_all(filled_url))

    table = cli.ok("status", url=filled_url)
    assert "default" in table
    assert "other" in table
    assert "ago" in table


def test_status_stale_after_fails_for_a_store_not_written_recently(cli: Cli, filled_url: str) -> None:
    assert cli("status", "--stale-after", "3600", url=filled_url).returncode == 0

    async def written_within_an_hour(storage: StorageBackend) -> bool:
        kvs = await KeyValueStore.open(storage=storage, name="other")
        return datetime.now(UTC) - (await kvs.list_keys())[0].updated_at < timedelta(hours=1)

    assert run_async(written_within_an_hour, filled_url)
    done = cli("status", "--stale-after", "0", url=filled_url)
    assert done.returncode == 3
    assert "'default'" in done.stderr
    assert "'other'" in done.stderr


def test_status_of_an_empty_storage_says_so(cli: Cli) -> None:
    done = cli("status", url="memory://")
    assert done.returncode == 0
    assert "no stores" in done.stderr
