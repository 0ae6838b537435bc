"""Schema evolution between deploys, and what happens to records that cannot be used."""

from __future__ import annotations

import json
import logging
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel

from recoverable_state import (
    EventManager,
    KeyValueStore,
    RecordCorruptError,
    RecoverableState,
    SchemaVersionError,
)

pytestmark = pytest.mark.anyio


class V1(BaseModel):
    count: int = 0


class V3(BaseModel):
    schema_version: ClassVar[int] = 3
    total: int = 0
    unit: str = "items"
    tags: list[str] = []


def v1_to_v2(old: dict[str, Any]) -> dict[str, Any]:
    return {"total": old["count"]}


def v2_to_v3(old: dict[str, Any]) -> dict[str, Any]:
    return {**old, "unit": "pages", "tags": ["migrated"]}


MIGRATIONS = {1: v1_to_v2, 2: v2_to_v3}


async def write_v1(count: int) -> KeyValueStore:
    async with EventManager():
        old = RecoverableState(default_state=V1(), persist_state_key="job", persistence_enabled=True)
        (await old.initialize()).count = count
        await old.teardown()
    return await KeyValueStore.open()


async def test_a_v1_record_is_migrated_to_v3_and_written_back() -> None:
    kvs = await write_v1(41)
    async with EventManager():
        new = RecoverableState(
            default_state=V3(), persist_state_key="job", persistence_enabled=True, migrations=MIGRATIONS
        )
        value = await new.initialize()
        assert value == V3(total=41, unit="pages", tags=["migrated"])
        record = await kvs.get_record("job")
        assert record is not None and "schema-version" not in record.content_type  # not yet written
        await new.teardown()
    record = await kvs.get_record("job")
    assert record is not None
    assert record.content_type.endswith("schema-version=3")
    assert json.loads(record.value) == {"total": 41, "unit": "pages", "tags": ["migrated"]}
    # Loading again runs no migration: the record is current.
    async with EventManager():
        again = RecoverableState(default_state=V3(), persist_state_key="job", persistence_enabled=True)
        assert (await again.initialize()).total == 41
        await again.teardown()


async def test_a_record_newer_than_the_code_is_refused_and_kept() -> None:
    kvs = await KeyValueStore.open()
    await kvs.put_record("job", b'{"total":5}', "application/json; schema-version=4")
    state = RecoverableState(
        default_state=V3(),
        persist_state_key="job",
        persistence_enabled=True,
        migrations=MIGRATIONS,
        on_bad_record="quarantine",
    )
    expected = r"store 'default', key 'job'.*version 4, newer than the 3"
    with pytest.raises(SchemaVersionError, match=expected):
        await state.initialize()
    record = await kvs.get_record("job")
    assert record is not None and record.value == b'{"total":5}'


async def test_a_missing_migration_step_is_named() -> None:
    await write_v1(1)
    state = RecoverableState(
        default_state=V3(), persist_state_key="job", persistence_enabled=True, migrations={2: v2_to_v3}
    )
    with pytest.raises(SchemaVersionError, match=r"no migration is given from version\(s\) \[1\]"):
        await state.initialize()


async def test_a_failing_migration_is_a_bad_record() -> None:
    await write_v1(1)

    def broken(old: dict[str, Any]) -> dict[str, Any]:
        raise KeyError("count_typo")

    state = RecoverableState(
        default_state=V3(),
        persist_state_key="job",
        persistence_enabled=True,
        migrations={1: broken, 2: v2_to_v3},
    )
    with pytest.raises(RecordCorruptError, match=r"key 'job'.*from schema version 1 to 2 failed"):
        await state.initialize()


def test_migrations_that_cannot_lead_to_the_model_version_are_refused() -> None:
    with pytest.raises(ValueError, match=r"migrations \[3\] do not lead"):
        RecoverableState(default_state=V3(), persist_state_key="k", migrations={1: v1_to_v2, 3: v2_to_v3})
    with pytest.raises(ValueError, match="schema_version"):
        RecoverableState(default_state=V1(), persist_state_key="k", migrations={1: v1_to_v2})


async def test_quarantine_keeps_the_bad_record_and_starts_from_default(
    caplog: pytest.LogCaptureFixture,
) -> None:
    kvs = await KeyValueStore.open()
    await kvs.put_record("job", b'{"count": "lots"}', "application/json")
    async with EventManager():
        state = RecoverableState(
            default_state=V1(), persist_state_key="job", persistence_enabled=True, on_bad_record="quarantine"
        )
        with caplog.at_level(logging.WARNING, logger="recoverable_state"):
            value = await state.initialize()
        assert value == V1()
        assert "count: Input should be a valid integer" in caplog.text
        quarantine = await KeyValueStore.open(name="default.quarantine")
        kept = await quarantine.list_keys()
        assert len(kept) == 1 and kept[0].key.startswith("job@")
        bad = await quarantine.get_record(kept[0].key)
        assert bad is not None and bad.value == b'{"count": "lots"}'
        value.count = 2
        await state.teardown()
    assert await kvs.get_value("job") == {"count": 2}


async def test_raise_is_the_default_policy_and_nothing_is_written() -> None:
    kvs = await KeyValueStore.open()
    await kvs.put_record("job", b"garbage", "application/json")
    state = RecoverableState(default_state=V1(), persist_state_key="job", persistence_enabled=True)
    with pytest.raises(RecordCorruptError, match="not valid JSON"):
        await state.initialize()
    assert (await kvs.get_record("job")).value == b"garbage"  # type: ignore[union-attr]
    stores = [s.name for s in await kvs.storage.list_stores()]
    assert "default.quarantine" not in stores
