"""Timer ticks coalesce while a persist is running: one in flight, one pending, whatever the stall."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import pytest

from recoverable_state import Event, EventManager, EventMigratingData, EventPersistStateData

pytestmark = pytest.mark.anyio


async def test_ticks_during_a_stalled_persist_leave_one_in_flight_and_one_pending(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = anyio.Event()
    in_flight = 0
    most_in_flight = 0
    calls = 0

    async def stalled(data: EventPersistStateData) -> None:
        nonlocal in_flight, most_in_flight, calls
        calls += 1
        in_flight += 1
        most_in_flight = max(most_in_flight, in_flight)
        try:
            await release.wait()
        finally:
            in_flight -= 1

    manager = EventManager(persist_state_interval=0.01, close_timeout=5)
    manager.on(event=Event.PERSIST_STATE, listener=stalled)
    with caplog.at_level(logging.WARNING, logger="recoverable_state"):
        async with manager:
            await anyio.sleep(0.5)  # some fifty ticks while the store stalls
            assert calls == 1
            assert most_in_flight == 1
            release.set()
            with anyio.fail_after(5):
                while calls < 2:  # the one pending tick runs once the stall ends
                    await anyio.sleep(0.005)
            await anyio.sleep(0.05)
    assert most_in_flight <= 2  # the last persist on leaving may join the one a tick started
    assert caplog.text.count("coalesced") == 1


async def test_emits_coalesce_like_timer_ticks_and_a_migrating_one_wins() -> None:
    release = anyio.Event()
    seen: list[Any] = []

    async def stalled(data: EventPersistStateData) -> None:
        seen.append(data)
        await release.wait()

    async with EventManager(persist_state_interval=3600) as manager:
        manager.on(event=Event.PERSIST_STATE, listener=stalled)
        for _ in range(1000):
            manager.emit(event=Event.PERSIST_STATE, event_data=EventPersistStateData())
        manager.emit(event=Event.MIGRATING, event_data=EventMigratingData())
        await anyio.sleep(0.05)
        assert seen == [EventPersistStateData(is_migrating=False)]  # one runs; the rest wait as one
        release.set()
        with anyio.fail_after(5):
            await manager.wait_for_all_listeners_to_complete()  # it waits for the pending one too
        assert seen == [EventPersistStateData(is_migrating=False), EventPersistStateData(is_migrating=True)]


async def test_the_last_persist_runs_after_the_one_in_flight() -> None:
    order: list[str] = []

    async def listener(data: EventPersistStateData) -> None:
        order.append("start")
        await anyio.sleep(0.2)
        order.append("end")

    manager = EventManager(persist_state_interval=0.01, close_timeout=5)
    manager.on(event=Event.PERSIST_STATE, listener=listener)
    async with manager:
        await anyio.sleep(0.05)
    assert order == ["start", "end", "start", "end"]


async def test_an_emit_storm_runs_at_most_two_rounds_and_memory_stays_bounded(memory_storage: Any) -> None:
    import tracemalloc

    from pydantic import BaseModel

    from recoverable_state import RecoverableState

    class Count(BaseModel):
        n: int = 0

    async with EventManager(persist_state_interval=3600) as manager:
        await manager.wait_for_all_listeners_to_complete()  # the first tick is done
        states = [
            RecoverableState(
                default_state=Count(),
                persist_state_key=f"c{i}",
                persistence_enabled=True,
                event_manager=manager,
            )
            for i in range(2000)
        ]
        await RecoverableState.initialize_many(states)
        for state in states:
            state.current_value.n += 1
        before = manager.stats.persists
        tracemalloc.start()
        try:
            for _ in range(2000):  # without waiting: each would have been a round of its own
                manager.emit(event=Event.PERSIST_STATE, event_data=EventPersistStateData())
            with anyio.fail_after(30):
                await manager.wait_for_all_listeners_to_complete()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert manager.stats.persists - before <= 2  # one round, and one for everything asked meanwhile
        assert peak < 20 * 1024 * 1024
        assert manager.stats.states_written >= 2000


async def test_a_sync_listener_may_emit_persist_state_from_its_thread(memory_storage: Any) -> None:
    from pydantic import BaseModel

    from recoverable_state import KeyValueStore, RecoverableState

    class Count(BaseModel):
        n: int = 0

    async with EventManager(persist_state_interval=3600) as manager:
        state = RecoverableState(
            default_state=Count(), persist_state_key="c", persistence_enabled=True, event_manager=manager
        )
        (await state.initialize()).n = 7

        def on_aborting() -> None:  # runs in a thread of its own
            manager.emit(event=Event.PERSIST_STATE, event_data=EventPersistStateData())

        manager.on(event=Event.ABORTING, listener=on_aborting)
        manager.emit(event=Event.ABORTING)
        kvs = await KeyValueStore.open()
        with anyio.fail_after(5):
            while await kvs.get_value("c") != {"n": 7}:
                await anyio.sleep(0.01)
        await state.teardown()
