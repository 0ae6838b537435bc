"""States joining and leaving a manager, also while its persist is under way.

The manager's persist goes over its member states as they were when it began;
a state that joined meanwhile is persisted from the next one on, and a state
that left is never written again.
"""

from __future__ import annotations

import gc
import weakref

import anyio
import pytest
from pydantic import BaseModel

from recoverable_state import Event, EventManager, EventPersistStateData, KeyValueStore, RecoverableState
from recoverable_state.storage import StorageBackend, open_backend
from recoverable_state.testing import FaultInjectingBackend

pytestmark = pytest.mark.anyio


class Progress(BaseModel):
    done: int = 0


def state(manager: EventManager, backend: StorageBackend, key: str) -> RecoverableState[Progress]:
    async def store() -> KeyValueStore:
        return await KeyValueStore.open(name="jobs", storage=backend)

    return RecoverableState(
        default_state=Progress(),
        persist_state_key=key,
        persistence_enabled=True,
        persist_state_kvs_factory=store,
        event_manager=manager,
    )


async def persist(manager: EventManager) -> None:
    manager.emit(event=Event.PERSIST_STATE, event_data=EventPersistStateData(is_migrating=False))
    await manager.wait_for_all_listeners_to_complete()


async def stored(backend: StorageBackend) -> dict[str, object]:
    kvs = await KeyValueStore.open(name="jobs", storage=backend)
    return {info.key: await kvs.get_value(info.key) for info in await kvs.list_keys()}


async def test_a_state_that_joins_during_a_persist_is_persisted_from_the_next_one() -> None:
    async with (
        FaultInjectingBackend(open_backend("memory://")) as backend,
        EventManager(persist_state_interval=3600) as manager,
    ):
        first = [state(manager, backend, f"first-{i}") for i in range(3)]
        await RecoverableState.initialize_many(first)
        for n, s in enumerate(first, 1):
            s.current_value.done = n
        backend.delay_next(0.3)  # the persist's batch waits in the store
        manager.emit(event=Event.PERSIST_STATE, event_data=EventPersistStateData(is_migrating=False))
        await anyio.sleep(0.1)
        assert backend.injected == 1  # under way
        joined = [state(manager, backend, f"joined-{i}") for i in range(2)]
        await RecoverableState.initialize_many(joined)  # their empty records, read meanwhile
        for s in joined:
            s.current_value.done = 10
        await manager.wait_for_all_listeners_to_complete()
        assert await stored(backend) == {f"first-{i}": {"done": i + 1} for i in range(3)}

        for s in (*first, *joined):
            s.current_value.done += 100
        await persist(manager)
        assert await stored(backend) == {
            **{f"first-{i}": {"done": i + 101} for i in range(3)},
            **{f"joined-{i}": {"done": 110} for i in range(2)},
        }
        for s in (*first, *joined):
            await s.teardown()


async def test_a_state_that_left_is_not_written_and_one_joining_after_it_is() -> None:
    async with EventManager(persist_state_interval=3600) as manager:
        backend = open_backend("memory://")
        states = [state(manager, backend, f"s-{i}") for i in range(4)]
        await RecoverableState.initialize_many(states)
        await persist(manager)  # the manager's persist has gone over its members once
        await states[1].teardown()
        states[1].current_value.done = 99  # left: never written again
        late = state(manager, backend, "late")
        await late.initialize()
        for s in (states[0], states[2], states[3], late):
            s.current_value.done = 5
        await persist(manager)
        assert await stored(backend) == {
            **{f"s-{i}": {"done": 5} for i in (0, 2, 3)},
            "s-1": {"done": 0},  # torn down: its last persisted value (the default, stored at teardown)
            "late": {"done": 5},
        }
        for s in (states[0], states[2], states[3], late):
            await s.teardown()
        await backend.aclose()


async def test_a_persist_under_way_leaves_alone_the_write_of_a_state_that_joined_meanwhile() -> None:
    # The manager's persist lets go of the states it went over, and of no other: a state that
    # joined meanwhile keeps its own write's turn, so its writes stay one at a time, in order.
    async with (
        FaultInjectingBackend(open_backend("memory://")) as backend,
        EventManager(persist_state_interval=3600) as manager,
    ):
        first = [state(manager, backend, f"first-{i}") for i in range(2)]
        await RecoverableState.initialize_many(first)
        for s in first:
            s.current_value.done = 1
        backend.delay_next(0.3)  # the manager's persist
        manager.emit(event=Event.PERSIST_STATE, event_data=EventPersistStateData(is_migrating=False))
        await anyio.sleep(0.05)
        joined = state(manager, backend, "joined")
        await joined.initialize()
        finished: list[int] = []

        async def write(n: int) -> None:
            joined.current_value.done = n
            await joined.persist_state()
            finished.append(n)

        async with anyio.create_task_group() as tg:
            backend.delay_next(0.6)  # the joined state's first write
            tg.start_soon(write, 1)
            await anyio.sleep(0.05)
            await manager.wait_for_all_listeners_to_complete()  # the manager's persist is done
            tg.start_soon(write, 2)  # waits for the first write of its state, then lands
        assert finished == [1, 2]
        assert (await stored(backend))["joined"] == {"done": 2}
        for s in (*first, joined):
            await s.teardown()


async def test_a_state_torn_down_after_a_persist_is_freed_without_waiting_for_the_next_one() -> None:
    async with EventManager(persist_state_interval=3600) as manager:
        backend = open_backend("memory://")
        kept, gone = state(manager, backend, "kept"), state(manager, backend, "gone")
        await RecoverableState.initialize_many([kept, gone])
        await persist(manager)
        value = weakref.ref(gone.current_value)
        await gone.teardown()
        del gone
        gc.collect()
        assert value() is None  # the manager's persist let go of its list of states
        await kept.teardown()
        await backend.aclose()
