"""EventManager behaves as Crawlee's does where a ported worker relies on it."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import anyio
import pytest

from recoverable_state import Event, EventManager, EventPersistStateData
from recoverable_state.events import EventSystemInfoData

pytestmark = pytest.mark.anyio

NOT_ACTIVE = "the EventManager is not active"


async def test_a_listener_waiting_for_all_listeners_does_not_wait_for_itself() -> None:
    done: list[str] = []

    async def waiter() -> None:
        await manager.wait_for_all_listeners_to_complete()
        done.append("waiter")

    manager = EventManager(close_timeout=30)
    async with manager:
        manager.on(event=Event.EXIT, listener=waiter)
        manager.emit(event=Event.EXIT)
        with anyio.fail_after(5):
            await manager.wait_for_all_listeners_to_complete()
    assert done == ["waiter"]


async def test_listeners_that_wait_are_left_out_of_every_wait() -> None:
    order: list[str] = []
    release = anyio.Event()

    async def waiter_a() -> None:
        await manager.wait_for_all_listeners_to_complete()
        order.append("a")

    async def waiter_b() -> None:
        await manager.wait_for_all_listeners_to_complete()
        order.append("b")

    async def slow() -> None:
        await release.wait()
        order.append("slow")

    manager = EventManager(close_timeout=30)
    async with manager:
        manager.on(event=Event.EXIT, listener=waiter_a)
        manager.on(event=Event.EXIT, listener=waiter_b)
        manager.on(event=Event.EXIT, listener=slow)
        manager.emit(event=Event.EXIT)
        await anyio.sleep(0.05)
        assert order == []  # both waiters wait for the slow one, not for each other
        release.set()
        with anyio.fail_after(5):
            await manager.wait_for_all_listeners_to_complete()  # from outside: the waiters are waiting
        with anyio.fail_after(5):
            while len(order) < 3:
                await anyio.sleep(0.01)
    assert order[0] == "slow" and sorted(order[1:]) == ["a", "b"]


async def test_leaving_the_manager_from_inside_a_listener() -> None:
    seen: list[Any] = []
    left = anyio.Event()

    async def exit_actor() -> None:
        await manager.__aexit__(None, None, None)
        left.set()

    manager = EventManager(close_timeout=5)
    await manager.__aenter__()
    await manager.wait_for_all_listeners_to_complete()  # the first tick has come and gone
    manager.on(event=Event.PERSIST_STATE, listener=seen.append)
    manager.on(event=Event.ABORTING, listener=exit_actor)
    manager.emit(event=Event.ABORTING)
    with anyio.fail_after(5):
        await left.wait()
    assert not manager.active
    assert seen == [EventPersistStateData(is_migrating=False)]  # the last persist ran
    # It can be entered again afterwards, from this task.
    async with manager:
        assert manager.active
    assert not manager.active


async def test_leaving_from_a_listener_inside_async_with_ends_the_block_quietly() -> None:
    async def exit_actor() -> None:
        await manager.__aexit__(None, None, None)

    manager = EventManager(close_timeout=5)
    async with manager:
        manager.on(event=Event.ABORTING, listener=exit_actor)
        manager.emit(event=Event.ABORTING)
        with anyio.fail_after(5):
            while manager.active:
                await anyio.sleep(0.01)
    assert not manager.active


async def test_listeners_registered_while_entered_are_forgotten_by_the_last_exit() -> None:
    before: list[Any] = []
    during: list[Any] = []
    manager = EventManager(persist_state_interval=3600)
    manager.on(event=Event.EXIT, listener=before.append)
    async with manager:
        manager.on(event=Event.EXIT, listener=during.append)
    async with manager:
        manager.emit(event=Event.EXIT, event_data=1)
        await manager.wait_for_all_listeners_to_complete()
    assert during == []
    assert before == [1]  # registered before entering: part of the manager's set-up


async def test_using_a_manager_that_is_not_active_raises_the_same_error_everywhere() -> None:
    manager = EventManager()
    with pytest.raises(RuntimeError, match=NOT_ACTIVE) as on_wait:
        await manager.wait_for_all_listeners_to_complete()
    with pytest.raises(RuntimeError, match=NOT_ACTIVE) as on_emit:
        manager.emit(event=Event.PERSIST_STATE)
    with pytest.raises(RuntimeError, match=NOT_ACTIVE) as on_exit:
        await manager.__aexit__(None, None, None)
    assert str(on_wait.value) == str(on_emit.value) == str(on_exit.value)


async def test_first_persist_state_and_system_info_come_as_the_manager_is_entered() -> None:
    persists: list[Any] = []
    infos: list[Any] = []
    manager = EventManager(persist_state_interval=3600, system_info_interval=timedelta(hours=1))
    manager.on(event=Event.PERSIST_STATE, listener=persists.append)
    manager.on(event=Event.SYSTEM_INFO, listener=infos.append)
    async with manager:
        with anyio.fail_after(5):
            await manager.wait_for_all_listeners_to_complete()
        assert persists == [EventPersistStateData(is_migrating=False)]
        assert len(infos) == 1 and isinstance(infos[0], EventSystemInfoData)
        assert infos[0].info["cpu_count"] >= 1


async def test_a_listener_registered_twice_runs_twice_and_off_removes_both() -> None:
    calls: list[Any] = []
    async with EventManager(persist_state_interval=3600) as manager:
        manager.on(event=Event.EXIT, listener=calls.append)
        manager.on(event=Event.EXIT, listener=calls.append)
        assert manager.listener_count(Event.EXIT) == 2
        manager.emit(event=Event.EXIT, event_data=1)
        await manager.wait_for_all_listeners_to_complete()
        assert calls == [1, 1]
        manager.off(event=Event.EXIT, listener=calls.append)
        manager.emit(event=Event.EXIT, event_data=2)
        await manager.wait_for_all_listeners_to_complete()
        assert calls == [1, 1]
        assert manager.listener_count(Event.EXIT) == 0


@pytest.mark.parametrize(
    "arguments",
    [
        {"persist_state_interval": 0.05, "close_timeout": 2, "system_info_interval": 0.05},
        {
            "persist_state_interval": timedelta(milliseconds=50),
            "close_timeout": timedelta(seconds=2),
            "system_info_interval": timedelta(milliseconds=50),
        },
    ],
    ids=["seconds", "timedelta"],
)
async def test_intervals_and_timeouts_take_seconds_or_a_timedelta(arguments: dict[str, Any]) -> None:
    ticks: list[Any] = []
    manager = EventManager(**arguments)
    assert manager.persist_state_interval == timedelta(milliseconds=50)
    assert manager.close_timeout == timedelta(seconds=2)
    async with manager:
        manager.on(event=Event.PERSIST_STATE, listener=ticks.append)
        manager.on(event=Event.SYSTEM_INFO, listener=ticks.append)
        with anyio.fail_after(5):
            while len(ticks) < 4:
                await anyio.sleep(0.01)
        await manager.wait_for_all_listeners_to_complete(timeout=0.5)


def test_a_bad_interval_names_the_argument() -> None:
    with pytest.raises(TypeError, match="persist_state_interval"):
        EventManager(persist_state_interval="soon")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="close_timeout"):
        EventManager(close_timeout=-1)
