"""EventManager: listeners of every kind, failures, waiting, nesting, the timer."""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import Any

import anyio
import pytest

from recoverable_state import (
    Configuration,
    Event,
    EventManager,
    EventMigratingData,
    EventPersistStateData,
    service_locator,
)

pytestmark = pytest.mark.anyio

DATA = EventPersistStateData(is_migrating=False)


async def test_sync_and_async_listeners_get_the_event_data() -> None:
    got: list[tuple[str, Any]] = []
    threads: list[str] = []

    def sync_listener(data: EventPersistStateData) -> None:
        threads.append(threading.current_thread().name)
        got.append(("sync", data))

    async def async_listener(data: EventPersistStateData) -> None:
        got.append(("async", data))

    class Callable_:
        async def __call__(self, data: EventPersistStateData) -> None:
            got.append(("object", data))

    def no_argument() -> None:
        got.append(("none", None))

    async with EventManager() as manager:
        for listener in (sync_listener, async_listener, Callable_(), no_argument):
            manager.on(event=Event.PERSIST_STATE, listener=listener)
        manager.emit(event=Event.PERSIST_STATE, event_data=DATA)
        await manager.wait_for_all_listeners_to_complete()
    # One call each from the explicit emit, from the first timer tick (it comes as the sources
    # start, after the listeners were registered, as in Crawlee) and from the last persist.
    assert sorted(kind for kind, _ in got) == sorted(["sync", "async", "object", "none"] * 3)
    assert all(data in (DATA, None) or isinstance(data, EventPersistStateData) for _, data in got)
    assert threads and threading.main_thread().name not in threads


async def test_a_failing_listener_is_logged_and_harms_no_other(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []

    async def broken(data: Any) -> None:
        raise ValueError("boom")

    async def good(data: Any) -> None:
        calls.append("good")

    async with EventManager() as manager:
        manager.on(event=Event.MIGRATING, listener=broken)
        manager.on(event=Event.MIGRATING, listener=good)
        with caplog.at_level(logging.ERROR, logger="recoverable_state"):
            manager.emit(event=Event.MIGRATING, event_data=EventMigratingData())
            await manager.wait_for_all_listeners_to_complete()
        assert calls == ["good"]
        assert "broken" in caplog.text and "migrating" in caplog.text and "boom" in caplog.text
        manager.emit(event=Event.MIGRATING, event_data=EventMigratingData())
        await manager.wait_for_all_listeners_to_complete()
        assert calls == ["good", "good"]
        assert manager.active


async def test_off_removes_one_listener_or_all() -> None:
    calls: list[str] = []

    async def a() -> None:
        calls.append("a")

    async def b() -> None:
        calls.append("b")

    async with EventManager() as manager:
        manager.on(event=Event.SYSTEM_INFO, listener=a)
        manager.on(event=Event.SYSTEM_INFO, listener=b)
        manager.off(event=Event.SYSTEM_INFO, listener=a)
        manager.emit(event=Event.SYSTEM_INFO)
        await manager.wait_for_all_listeners_to_complete()
        assert calls == ["b"]
        manager.on(event=Event.SYSTEM_INFO, listener=a)
        manager.off(event=Event.SYSTEM_INFO)
        manager.emit(event=Event.SYSTEM_INFO)
        await manager.wait_for_all_listeners_to_complete()
        assert calls == ["b"]
        assert manager.listener_count(Event.SYSTEM_INFO) == 0


async def test_once_listener_runs_a_single_time() -> None:
    calls: list[Any] = []
    async with EventManager() as manager:
        manager.once(event=Event.EXIT, listener=calls.append)
        manager.emit(event=Event.EXIT, event_data=1)
        manager.emit(event=Event.EXIT, event_data=2)
        await manager.wait_for_all_listeners_to_complete()
    assert calls == [1]


async def test_waiting_times_out_cancels_and_logs_the_slow_listener(caplog: pytest.LogCaptureFixture) -> None:
    finished: list[str] = []

    async def slow() -> None:
        await anyio.sleep(30)
        finished.append("slow")

    async def quick() -> None:
        finished.append("quick")

    async with EventManager() as manager:
        manager.on(event=Event.ABORTING, listener=slow)
        manager.on(event=Event.ABORTING, listener=quick)
        manager.emit(event=Event.ABORTING)
        with caplog.at_level(logging.WARNING, logger="recoverable_state"), anyio.fail_after(5):
            await manager.wait_for_all_listeners_to_complete(timeout=timedelta(milliseconds=100))
        manager.off(event=Event.ABORTING)
    assert finished == ["quick"]
    assert "slow" in caplog.text and "did not finish" in caplog.text


async def test_leaving_emits_a_last_persist_and_waits_for_it() -> None:
    seen: list[EventPersistStateData] = []

    async def listener(data: EventPersistStateData) -> None:
        await anyio.sleep(0.05)
        seen.append(data)

    manager = EventManager(persist_state_interval=timedelta(hours=1))
    async with manager:
        manager.on(event=Event.PERSIST_STATE, listener=listener)
    assert seen == [EventPersistStateData(is_migrating=False)]
    assert not manager.active


async def test_leaving_after_cancellation_still_persists() -> None:
    seen: list[EventPersistStateData] = []

    async def listener(data: EventPersistStateData) -> None:
        await anyio.sleep(0.02)
        seen.append(data)

    with anyio.move_on_after(0.05):
        async with EventManager() as manager:
            manager.on(event=Event.PERSIST_STATE, listener=listener)
            await anyio.sleep(10)
    assert len(seen) == 2  # the first timer tick, and the last persist on the cancelled way out


async def test_every_nested_exit_persists_and_only_the_outermost_closes() -> None:
    calls: list[Any] = []
    manager = EventManager(persist_state_interval=3600)
    async with manager:
        manager.on(event=Event.PERSIST_STATE, listener=calls.append)
        async with manager:
            assert manager.active
        assert manager.active
        # The inner exit persisted and waited for every running listener (the first timer tick's
        # call too, coalesced behind it: the sources start after the listener was registered).
        assert calls == [DATA, DATA]
    assert not manager.active
    assert calls == [DATA, DATA, DATA]


async def test_emitting_outside_the_context_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="not active"):
        EventManager().emit(event=Event.PERSIST_STATE, event_data=DATA)


async def test_the_timer_emits_persist_state_on_its_own() -> None:
    seen: list[Any] = []
    async with EventManager(persist_state_interval=timedelta(milliseconds=20)) as manager:
        manager.on(event=Event.PERSIST_STATE, listener=seen.append)
        with anyio.fail_after(5):
            while len(seen) < 3:
                await anyio.sleep(0.01)
        manager.off(event=Event.PERSIST_STATE)
    assert all(d == EventPersistStateData(is_migrating=False) for d in seen)


async def test_emitting_migrating_also_persists_as_migrating() -> None:
    seen: list[Any] = []
    async with EventManager() as manager:
        manager.on(event=Event.PERSIST_STATE, listener=seen.append)
        notice = EventMigratingData(time_remaining=timedelta(seconds=5))
        manager.emit(event=Event.MIGRATING, event_data=notice)
        await manager.wait_for_all_listeners_to_complete()
        # The migrating persist, and the first timer tick (as the sources start, coalesced behind it).
        assert sorted(seen, key=lambda d: d.is_migrating) == [
            EventPersistStateData(is_migrating=False),
            EventPersistStateData(is_migrating=True),
        ]
        manager.off(event=Event.PERSIST_STATE)


def test_interval_and_timeout_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECOVERABLE_STATE_PERSIST_STATE_INTERVAL", "2.5")
    monkeypatch.setenv("RECOVERABLE_STATE_SHUTDOWN_TIMEOUT", "7")
    service_locator.reset()
    manager = service_locator.get_event_manager()
    assert manager.persist_state_interval == timedelta(seconds=2.5)
    assert manager.close_timeout == timedelta(seconds=7)
    assert Configuration().persist_state_interval == timedelta(seconds=2.5)
    # A manager made by hand takes its settings as arguments only.
    explicit = EventManager(persist_state_interval=timedelta(seconds=1))
    assert explicit.persist_state_interval == timedelta(seconds=1)
    assert explicit.close_timeout == timedelta(seconds=25)


def test_payloads_use_camel_case_aliases() -> None:
    assert EventPersistStateData(isMigrating=True).is_migrating  # type: ignore[call-arg]
    assert EventPersistStateData(is_migrating=True).model_dump(by_alias=True) == {"isMigrating": True}
    data = EventMigratingData.model_validate({"timeRemainingSecs": 12})
    assert data.time_remaining == timedelta(seconds=12)
    assert data.model_dump(by_alias=True) == {"timeRemainingSecs": 12.0}


async def test_a_failing_event_source_stops_alone_and_the_timer_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from recoverable_state.events import PreemptionNoticePoller

    async def broken(self: Any, on_notice: Any) -> None:
        raise RuntimeError("the metadata service answered nonsense")

    monkeypatch.setattr(PreemptionNoticePoller, "watch", broken)
    ticks: list[Any] = []
    manager = EventManager(
        persist_state_interval=0.05,
        preemption_notice_url="http://127.0.0.1:9/x",
        preemption_notice_kind="aws",
    )
    manager.on(event=Event.PERSIST_STATE, listener=ticks.append)

    def failed() -> bool:
        return any("poller of the EventManager failed" in r.getMessage() for r in caplog.records)

    async with manager:
        with anyio.fail_after(20):  # bounded, not timed: a busy machine may be slow
            while not failed():
                await anyio.sleep(0.01)
            after_failure = len(ticks)
            while len(ticks) < after_failure + 3:  # the timer goes on after the poller failed
                await anyio.sleep(0.01)
