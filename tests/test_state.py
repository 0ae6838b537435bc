"""RecoverableState: load, persist, reset, teardown, ordering, fencing, bad records."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from datetime import timedelta

import anyio
import pytest
from pydantic import BaseModel, Field

from recoverable_state import (
    Event,
    EventManager,
    EventPersistStateData,
    EventStateOwnershipLostData,
    KeyValueStore,
    RecordCorruptError,
    RecoverableState,
    StateAlreadyInUseError,
    StateOwnershipLost,
    StorageError,
    service_locator,
)
from recoverable_state.storage import MemoryBackend, RecordWrite, SQLiteBackend, WriteOutcome

pytestmark = pytest.mark.anyio


class Progress(BaseModel):
    done: int = 0
    seen: list[str] = Field(default_factory=list)


def make_state(key: str = "progress", **kwargs: object) -> RecoverableState[Progress]:
    kwargs.setdefault("persistence_enabled", True)
    return RecoverableState(default_state=Progress(), persist_state_key=key, **kwargs)  # type: ignore[arg-type]


async def stored(key: str, name: str | None = None) -> object:
    kvs = await KeyValueStore.open(name=name)
    return await kvs.get_value(key)


async def persist_event(manager: EventManager) -> None:
    manager.emit(event=Event.PERSIST_STATE, event_data=EventPersistStateData(is_migrating=False))
    await manager.wait_for_all_listeners_to_complete()


async def test_current_value_before_initialize_is_a_clear_error() -> None:
    state = make_state()
    with pytest.raises(RuntimeError, match=r"not initialized.*initialize"):
        _ = state.current_value


async def test_initialize_deep_copies_the_default_when_nothing_is_stored() -> None:
    default = Progress(seen=["a"])
    state = RecoverableState(default_state=default, persist_state_key="k", persistence_enabled=True)
    value = await state.initialize()
    value.seen.append("b")
    assert default.seen == ["a"]
    assert state.current_value is value
    assert state.is_initialized
    assert not await state.has_persisted_state()
    await state.teardown()


async def test_persisted_state_is_loaded_by_the_next_instance() -> None:
    async with EventManager():
        state = make_state()
        value = await state.initialize()
        value.done = 7
        value.seen.append("x")
        await state.persist_state()
        await state.teardown()

        again = make_state()
        loaded = await again.initialize()
        assert loaded == Progress(done=7, seen=["x"])
        await again.teardown()


async def test_persist_state_event_saves_every_enabled_state() -> None:
    manager = EventManager(persist_state_interval=timedelta(hours=1))
    async with manager:
        enabled = make_state("on", event_manager=manager)
        explicit = make_state("explicit", event_manager=manager, persistence_enabled="explicit_only")
        off = make_state("off", event_manager=manager, persistence_enabled=False)
        for s in (enabled, explicit, off):
            (await s.initialize()).done = 1
        await persist_event(manager)
        assert await stored("on") == {"done": 1, "seen": []}
        assert await stored("explicit") is None
        assert await stored("off") is None

        await explicit.persist_state()
        await off.persist_state()
        assert await stored("explicit") == {"done": 1, "seen": []}
        assert await stored("off") is None
        for s in (enabled, explicit, off):
            await s.teardown()
    assert await stored("off") is None


async def test_teardown_stops_listening_and_persists_once_more() -> None:
    manager = EventManager(persist_state_interval=timedelta(hours=1))
    async with manager:
        state = make_state(event_manager=manager)
        value = await state.initialize()
        value.done = 1
        await state.teardown()
        assert await stored("progress") == {"done": 1, "seen": []}
        value.done = 2
        await persist_event(manager)
        assert await stored("progress") == {"done": 1, "seen": []}
        assert manager.listener_count(Event.PERSIST_STATE) == 0


async def test_async_with_initializes_and_tears_down() -> None:
    async with EventManager(), make_state() as value:
        value.done = 3
    assert await stored("progress") == {"done": 3, "seen": []}


async def test_reset_restores_default_and_clears_the_record() -> None:
    async with EventManager():
        state = make_state()
        (await state.initialize()).done = 5
        await state.persist_state()
        assert await state.has_persisted_state()
        await state.reset()
        assert state.current_value == Progress()
        assert not await state.has_persisted_state()
        state.current_value.done = 1
        await state.persist_state()
        assert await stored("progress") == {"done": 1, "seen": []}
        await state.teardown()


async def test_unchanged_state_is_not_written_again(memory_storage: MemoryBackend) -> None:
    writes: list[int] = []
    original = memory_storage.write_batch

    async def counting(batch: Sequence[RecordWrite]) -> list[WriteOutcome]:
        writes.append(len(batch))
        return await original(batch)

    memory_storage.write_batch = counting  # type: ignore[method-assign]
    manager = EventManager()
    async with manager:
        state = make_state(event_manager=manager)
        (await state.initialize()).done = 1
        await persist_event(manager)
        await persist_event(manager)
        await state.persist_state()
        assert sum(writes) == 1
        state.current_value.done = 2
        await persist_event(manager)
        assert sum(writes) == 2
        await state.teardown()
    assert sum(writes) == 2


class SlowMemory(MemoryBackend):
    """Writes take a random while, so overlapping persists finish out of order without care."""

    async def write_batch(self, writes: Sequence[RecordWrite]) -> list[WriteOutcome]:
        await anyio.sleep(random.random() / 100)
        return await super().write_batch(writes)


async def test_overlapping_persists_never_store_an_older_snapshot() -> None:
    service_locator.set_storage(SlowMemory())
    async with EventManager() as manager:
        state = make_state(event_manager=manager)
        value = await state.initialize()
        async with anyio.create_task_group() as tg:
            for i in range(1, 60):
                value.done = i
                tg.start_soon(state.persist_state)
                if i % 3 == 0:
                    manager.emit(event=Event.PERSIST_STATE, event_data=EventPersistStateData())
                await anyio.sleep(random.random() / 500)
        await manager.wait_for_all_listeners_to_complete()
        assert await stored("progress") == {"done": 59, "seen": []}
        await state.teardown()


async def test_two_live_states_on_one_record_is_an_error() -> None:
    async with EventManager():
        first = make_state()
        await first.initialize()
        second = make_state()
        with pytest.raises(StateAlreadyInUseError, match=r"store 'default', key 'progress'"):
            await second.initialize()
        assert not second.is_initialized
        await first.teardown()
        await second.initialize()
        await second.teardown()


async def test_a_record_that_is_not_json_names_store_and_key_and_stays() -> None:
    kvs = await KeyValueStore.open(name="jobs")
    await kvs.set_value("progress", b"{not json", content_type="application/json")
    state = make_state(persist_state_kvs_name="jobs")
    with pytest.raises(RecordCorruptError, match=r"store 'jobs', key 'progress'.*not valid JSON"):
        await state.initialize()
    record = await kvs.get_record("progress")
    assert record is not None and record.value == b"{not json"


async def test_a_record_that_fails_validation_names_the_field() -> None:
    kvs = await KeyValueStore.open()
    await kvs.set_value("progress", {"done": "many", "seen": []})
    state = make_state()
    expected = r"key 'progress'.*done: Input should be a valid integer"
    with pytest.raises(RecordCorruptError, match=expected):
        await state.initialize()
    assert await kvs.get_value("progress") == {"done": "many", "seen": []}
    # The record is free again for a fixed model or a reset.
    assert not state.is_initialized


class FailingWrites(MemoryBackend):
    fail = False

    async def write_batch(self, writes: Sequence[RecordWrite]) -> list[WriteOutcome]:
        if self.fail:
            raise StorageError("disk full", store="default")
        return await super().write_batch(writes)


async def test_a_failing_write_keeps_the_previous_record_and_the_live_state() -> None:
    backend = FailingWrites()
    service_locator.set_storage(backend)
    async with EventManager():
        state = make_state()
        value = await state.initialize()
        value.done = 1
        await state.persist_state()
        backend.fail = True
        value.done = 2
        with pytest.raises(StorageError, match="disk full"):
            await state.persist_state()
        assert state.current_value.done == 2
        assert await stored("progress") == {"done": 1, "seen": []}
        backend.fail = False
        await state.persist_state()
        assert await stored("progress") == {"done": 2, "seen": []}
        await state.teardown()


async def test_two_thousand_states_persist_on_one_event(tmp_path: object) -> None:
    service_locator.set_storage(SQLiteBackend("many.sqlite3"))
    manager = EventManager(persist_state_interval=timedelta(hours=1))
    async with manager:
        states = [make_state(f"worker-{i}", event_manager=manager) for i in range(2000)]
        await RecoverableState.initialize_many(states)
        for i, s in enumerate(states):
            s.current_value.done = i
            s.current_value.seen.append(f"item-{i}")
        await persist_event(manager)
        kvs = await KeyValueStore.open()
        for i in range(2000):
            assert await kvs.get_value(f"worker-{i}") == {"done": i, "seen": [f"item-{i}"]}
        for s in states:
            await s.teardown()


async def test_states_persist_on_their_own_every_interval() -> None:
    manager = EventManager(persist_state_interval=timedelta(milliseconds=50))
    service_locator.set_event_manager(manager)
    async with manager:
        state = make_state()
        (await state.initialize()).done = 42
        with anyio.fail_after(5):
            while await stored("progress") is None:
                await anyio.sleep(0.02)
        assert await stored("progress") == {"done": 42, "seen": []}
        await state.teardown()


async def test_a_successor_fences_off_the_stale_writer() -> None:
    lost: list[EventStateOwnershipLostData] = []
    async with EventManager() as manager:
        manager.on(event=Event.STATE_OWNERSHIP_LOST, listener=lost.append)
        state = make_state(event_manager=manager)
        (await state.initialize()).done = 1
        await state.persist_state()
        # A successor process loads (and so claims) the record and moves on.
        kvs = await KeyValueStore.open()
        claimed = await kvs.get_record("progress", claim=True)
        assert claimed is not None
        await kvs.put_record(
            "progress", b'{"done":100,"seen":[]}', "application/json", expected_version=claimed.version
        )
        state.current_value.done = 2
        with pytest.raises(StateOwnershipLost, match=r"key 'progress'.*another process"):
            await state.persist_state()
        assert state.ownership_lost
        state.current_value.done = 3
        await persist_event(manager)  # the stale state no longer writes
        assert await kvs.get_value("progress") == {"done": 100, "seen": []}
        await manager.wait_for_all_listeners_to_complete()
        assert [(e.store, e.key) for e in lost] == [("default", "progress")]
        await state.teardown()
    assert await stored("progress") == {"done": 100, "seen": []}


async def test_store_chosen_by_name_id_or_factory() -> None:
    named = await KeyValueStore.open(name="named")
    async with EventManager():
        by_name = make_state("a", persist_state_kvs_name="named")
        by_id = make_state("b", persist_state_kvs_id=named.id)

        async def factory() -> KeyValueStore:
            return await KeyValueStore.open(name="made")

        by_factory = make_state("c", persist_state_kvs_factory=factory)
        for s in (by_name, by_id, by_factory):
            (await s.initialize()).done = 9
            await s.teardown()
    assert await named.get_value("a") == {"done": 9, "seen": []}
    assert await named.get_value("b") == {"done": 9, "seen": []}
    assert await stored("c", name="made") == {"done": 9, "seen": []}
    assert await stored("a") is None


async def test_history_keeps_the_last_snapshots() -> None:
    async with EventManager():
        state = make_state(history=3)
        value = await state.initialize()
        for i in range(1, 6):
            value.done = i
            await state.persist_state()
        kvs = await KeyValueStore.open()
        history = await kvs.get_history("progress")
        assert [json.loads(r.value)["done"] for r in history] == [5, 4, 3]
        assert [r.version for r in history] == [5, 4, 3]
        await state.teardown()


async def test_aliased_models_round_trip() -> None:
    class Aliased(BaseModel):
        item_count: int = Field(default=0, alias="itemCount")

    async with EventManager():
        state = RecoverableState(default_state=Aliased(), persist_state_key="a", persistence_enabled=True)
        (await state.initialize()).item_count = 4
        await state.teardown()
        again = RecoverableState(default_state=Aliased(), persist_state_key="a", persistence_enabled=True)
        assert (await again.initialize()).item_count == 4
        await again.teardown()
    assert await stored("a") == {"itemCount": 4}


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="persistence_enabled"):
        RecoverableState(default_state=Progress(), persist_state_key="k", persistence_enabled="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at most one"):
        RecoverableState(
            default_state=Progress(),
            persist_state_key="k",
            persist_state_kvs_name="a",
            persist_state_kvs_id="b",
        )


async def test_a_state_dropped_without_teardown_frees_its_record() -> None:
    import gc

    first = make_state(persistence_enabled="explicit_only")
    await first.initialize()
    del first
    gc.collect()
    second = make_state(persistence_enabled="explicit_only")
    await second.initialize()
    await second.teardown()


async def test_states_added_after_a_manager_was_left_and_entered_again_are_saved_on_its_timer(
    memory_storage: MemoryBackend,
) -> None:
    manager = EventManager(persist_state_interval=timedelta(seconds=0.05))
    async with manager:
        first = make_state("first", event_manager=manager)
        await first.initialize()
    # The last exit forgot what was registered while entered; a new state registers again.
    async with manager:
        second = make_state("second", event_manager=manager)
        (await second.initialize()).done = 7
        with anyio.fail_after(5):  # saved by the timer, not only by teardown
            while await stored("second") != {"done": 7, "seen": []}:
                await anyio.sleep(0.02)
        await second.teardown()
    await first.teardown()
