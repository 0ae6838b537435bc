"""CrawleeEventManager: one bus, each framework's listeners handed their own framework's payloads."""

from __future__ import annotations

import os
import signal
import threading
from datetime import timedelta
from typing import Any

import anyio
import pytest

pytest.importorskip("crawlee")

import crawlee.events as ce
from crawlee import service_locator as crawlee_services

from recoverable_state import (
    Event,
    EventManager,
    EventMigratingData,
    EventPersistStateData,
    EventSystemInfoData,
    KeyValueStore,
    RecoverableState,
)
from recoverable_state.integrations.crawlee import CrawleeEventManager

pytestmark = pytest.mark.anyio


def quiet(**options: Any) -> CrawleeEventManager:
    """A manager whose timers stay silent during a test (no tick after the first)."""
    return CrawleeEventManager(persist_state_interval=3600, system_info_interval=None, **options)


def test_it_is_an_event_manager_of_both_frameworks_and_crawlee_takes_it() -> None:
    events = quiet()
    assert isinstance(events, EventManager)
    assert isinstance(events, ce.EventManager)
    locator = type(crawlee_services)()  # not the process-wide one: other tests must not see it
    locator.set_event_manager(events)
    assert locator.get_event_manager() is events
    assert crawlee_services is not locator


async def test_each_side_gets_its_own_payloads_whichever_side_emits() -> None:
    got: list[tuple[str, Any]] = []

    async def crawlee_listener(data: Any) -> None:
        got.append(("crawlee", data))

    def crawlee_sync_listener(data: Any) -> None:  # called in a thread, as Crawlee calls sync listeners
        got.append(("crawlee-sync", data))

    async def our_listener(data: Any) -> None:
        got.append(("ours", data))

    events = quiet()
    async with events:
        await events.wait_for_all_listeners_to_complete(timeout=5)  # the first tick, as entered
        events.on(event=ce.Event.PERSIST_STATE, listener=crawlee_listener)
        events.on(event=ce.Event.PERSIST_STATE, listener=crawlee_sync_listener)
        events.on(event=Event.PERSIST_STATE, listener=our_listener)
        events.emit(event=ce.Event.PERSIST_STATE, event_data=ce.EventPersistStateData(is_migrating=True))
        await events.wait_for_all_listeners_to_complete(timeout=5)
        events.emit(event=Event.PERSIST_STATE, event_data=EventPersistStateData(is_migrating=False))
        await events.wait_for_all_listeners_to_complete(timeout=5)
    by_side: dict[str, list[Any]] = {}
    for side, data in got:
        by_side.setdefault(side, []).append(data)
    for side in ("crawlee", "crawlee-sync"):
        assert [type(d) for d in by_side[side]] == [ce.EventPersistStateData] * 3
        assert [d.is_migrating for d in by_side[side]] == [True, False, False]  # the last: the last exit's
    assert by_side["ours"] == [EventPersistStateData(is_migrating=True), *[EventPersistStateData()] * 2]


async def test_a_migration_announced_by_crawlee_reaches_both_and_persists_ours() -> None:
    crawlee_migrating: list[Any] = []
    our_persists: list[Any] = []
    events = quiet()
    async with events:
        await events.wait_for_all_listeners_to_complete(timeout=5)
        events.on(event=ce.Event.MIGRATING, listener=crawlee_migrating.append)
        events.on(event=Event.PERSIST_STATE, listener=our_persists.append)
        data = ce.EventMigratingData(time_remaining=timedelta(seconds=7))
        events.emit(event=ce.Event.MIGRATING, event_data=data)
        await events.wait_for_all_listeners_to_complete(timeout=5)
    assert [type(d) for d in crawlee_migrating] == [ce.EventMigratingData]
    assert crawlee_migrating[0].time_remaining == timedelta(seconds=7)
    assert our_persists[0] == EventPersistStateData(is_migrating=True)


async def test_our_migration_reaches_crawlee_as_crawlee_data() -> None:
    seen: list[Any] = []
    events = quiet()
    async with events:
        events.on(event=ce.Event.MIGRATING, listener=seen.append)
        events.emit(event=Event.MIGRATING, event_data=EventMigratingData(time_remaining=3))
        await events.wait_for_all_listeners_to_complete(timeout=5)
    assert len(seen) == 1 and isinstance(seen[0], ce.EventMigratingData)
    assert seen[0].time_remaining == timedelta(seconds=3)


async def test_crawlee_only_events_reach_only_crawlee_listeners_and_are_waited_for() -> None:
    seen: list[Any] = []
    release = anyio.Event()

    async def slow_status(data: ce.EventCrawlerStatusData) -> None:
        await release.wait()
        seen.append(data.message)

    events = quiet()
    async with events:
        events.on(event=ce.Event.CRAWLER_STATUS, listener=slow_status)
        assert events.listener_count(ce.Event.CRAWLER_STATUS) == 1
        assert events.is_listening(event=ce.Event.CRAWLER_STATUS, listener=slow_status)
        status = ce.EventCrawlerStatusData(message="m", crawler_id=1)
        events.emit(event=ce.Event.CRAWLER_STATUS, event_data=status)
        with pytest.raises(TimeoutError):
            with anyio.fail_after(0.3):
                await events.wait_for_all_listeners_to_complete()
        release.set()
        with anyio.fail_after(5):
            await events.wait_for_all_listeners_to_complete()
        assert seen == ["m"]
        events.off(event=ce.Event.CRAWLER_STATUS, listener=slow_status)
        assert events.listener_count(ce.Event.CRAWLER_STATUS) == 0


async def test_a_stuck_crawlee_only_listener_is_cancelled_at_the_timeout() -> None:
    cancelled = anyio.Event()

    async def stuck() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()

    events = quiet()
    async with events:
        events.on(event=ce.Event.SESSION_RETIRED, listener=stuck)
        events.emit(event=ce.Event.SESSION_RETIRED)
        with anyio.fail_after(5):
            await events.wait_for_all_listeners_to_complete(timeout=0.2)
            await cancelled.wait()


async def test_crawlee_events_need_an_entered_manager_like_ours() -> None:
    events = quiet()
    with pytest.raises(RuntimeError, match="the EventManager is not active"):
        events.emit(event=ce.Event.CRAWLER_STATUS)
    with pytest.raises(RuntimeError, match="the EventManager is not active"):
        events.emit(event=ce.Event.PERSIST_STATE)


async def test_off_without_a_listener_removes_only_that_frameworks_side() -> None:
    crawlee_seen: list[Any] = []
    ours_seen: list[Any] = []
    events = quiet()
    events.on(event=ce.Event.PERSIST_STATE, listener=crawlee_seen.append)
    events.on(event=Event.PERSIST_STATE, listener=ours_seen.append)
    assert events.is_listening(event=ce.Event.PERSIST_STATE, listener=crawlee_seen.append)
    assert not events.is_listening(event=Event.PERSIST_STATE, listener=crawlee_seen.append)
    events.off(event=ce.Event.PERSIST_STATE)
    assert not events.is_listening(event=ce.Event.PERSIST_STATE, listener=crawlee_seen.append)
    async with events:
        await events.wait_for_all_listeners_to_complete(timeout=5)
    assert crawlee_seen == []
    assert ours_seen == [EventPersistStateData()] * 2  # the first tick and the last persist


async def test_crawlee_listeners_get_crawlees_system_info_with_memory_figures() -> None:
    infos: list[Any] = []
    ours: list[Any] = []

    async def snapshot(data: ce.EventSystemInfoData) -> None:  # what Crawlee's Snapshotter reads
        infos.append((data.cpu_info.used_ratio, data.memory_info.total_size, data.memory_info.current_size))

    events = CrawleeEventManager(persist_state_interval=3600, system_info_interval=0.1)
    events.on(event=ce.Event.SYSTEM_INFO, listener=snapshot)
    events.on(event=Event.SYSTEM_INFO, listener=ours.append)
    async with events:
        with anyio.fail_after(5):
            while len(infos) < 2:
                await anyio.sleep(0.05)
    ratio, total, current = infos[0]
    assert 0.0 <= ratio <= 1.0
    assert total.bytes > current.bytes > 0
    assert all(isinstance(d, EventSystemInfoData) for d in ours)


async def test_system_info_is_on_by_default_as_crawlee_autoscaling_needs_it() -> None:
    infos: list[Any] = []
    events = CrawleeEventManager(persist_state_interval=3600)
    events.on(event=ce.Event.SYSTEM_INFO, listener=infos.append)
    async with events:
        with anyio.fail_after(5):
            while not infos:
                await anyio.sleep(0.05)
    assert isinstance(infos[0], ce.EventSystemInfoData)


async def test_nested_entering_by_a_crawler_persists_both_sides_at_each_exit() -> None:
    crawlee_persists: list[bool] = []
    events = quiet()
    kvs = await KeyValueStore.open(name="crawl")
    events.on(event=ce.Event.PERSIST_STATE, listener=lambda d: crawlee_persists.append(d.is_migrating))
    async with events:
        await events.wait_for_all_listeners_to_complete(timeout=5)
        async with _pages(events, kvs) as pages:
            async with events:  # as Crawlee's crawler enters the service locator's manager
                pages.count = 5
            assert await kvs.get_value("pages") == {"count": 5}  # the nested exit persisted ours
    assert crawlee_persists == [False, False, False]  # the first tick, the nested exit, the last exit


def _pages(events: EventManager, kvs: KeyValueStore) -> RecoverableState[Any]:
    from pydantic import BaseModel

    class Pages(BaseModel):
        count: int = 0

    async def factory() -> KeyValueStore:
        return kvs

    return RecoverableState(
        default_state=Pages(),
        persist_state_key="pages",
        persistence_enabled=True,
        event_manager=events,
        persist_state_kvs_factory=factory,
    )


async def test_a_crawlee_listener_leaving_during_a_shutdown_still_gets_the_last_persist() -> None:
    """Crawlee's components deregister as the cancelled crawler unwinds; the last persist must reach them."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    persisted: list[bool] = []

    async def crawlee_state_persist(data: ce.EventPersistStateData) -> None:
        persisted.append(data.is_migrating)

    events = quiet(handle_signals=True, on_signal="return", close_timeout=5)
    async with events:
        await events.wait_for_all_listeners_to_complete(timeout=5)
        events.on(event=ce.Event.PERSIST_STATE, listener=crawlee_state_persist)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            await anyio.sleep(5)  # cancelled by the signal
        finally:
            # What Crawlee's RecoverableState.teardown does first as the crawler unwinds.
            events.off(event=ce.Event.PERSIST_STATE, listener=crawlee_state_persist)
    assert persisted == [True]
    assert events.received_signal == signal.SIGTERM
    assert not events.is_listening(event=ce.Event.PERSIST_STATE, listener=crawlee_state_persist)


async def test_outside_a_shutdown_off_takes_effect_at_once() -> None:
    persisted: list[Any] = []
    events = quiet()
    async with events:
        await events.wait_for_all_listeners_to_complete(timeout=5)
        events.on(event=ce.Event.PERSIST_STATE, listener=persisted.append)
        events.off(event=ce.Event.PERSIST_STATE, listener=persisted.append)
    assert persisted == []


async def test_once_holds_for_crawlee_events_too() -> None:
    persisted: list[Any] = []
    statuses: list[Any] = []
    events = quiet()
    async with events:
        await events.wait_for_all_listeners_to_complete(timeout=5)
        events.once(event=ce.Event.PERSIST_STATE, listener=persisted.append)
        events.once(event=ce.Event.CRAWLER_STATUS, listener=statuses.append)
        for _ in range(2):
            events.emit(event=ce.Event.PERSIST_STATE)
            events.emit(event=ce.Event.CRAWLER_STATUS, event_data="status")
            await events.wait_for_all_listeners_to_complete(timeout=5)
    assert len(persisted) == 1 and isinstance(persisted[0], ce.EventPersistStateData)
    assert statuses == ["status"]


class FakeCrawler:
    """A crawler as run_crawler sees one: `run()` goes on until `stop()` (or forever, if it ignores it)."""

    def __init__(self, *, obeys_stop: bool = True) -> None:
        self.obeys_stop = obeys_stop
        self.stopped: list[str] = []
        self.running = anyio.Event()
        self._stop = anyio.Event()

    async def run(self, requests: Any = None, **options: Any) -> str:
        self.running.set()
        await self._stop.wait()
        await anyio.sleep(0.2)  # the requests still running finish
        return f"finished {requests}"

    def stop(self, reason: str = "") -> None:
        self.stopped.append(reason)
        if self.obeys_stop:
            self._stop.set()


async def test_a_shutdown_signal_stops_the_crawler_gracefully_instead_of_cancelling_it() -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    crawler = FakeCrawler()
    result: list[Any] = []
    events = quiet(handle_signals=True, on_signal="return", close_timeout=10)
    async with events:
        os.kill(os.getpid(), signal.SIGTERM)
        result.append(await events.run_crawler(crawler, ["u"]))
    assert result == ["finished ['u']"]  # it ran to its end although the body was cancelled
    assert crawler.stopped and "SIGTERM" in crawler.stopped[0]


async def test_a_crawler_that_does_not_stop_is_cancelled_at_the_stop_timeout() -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    crawler = FakeCrawler(obeys_stop=False)
    events = quiet(handle_signals=True, on_signal="return", close_timeout=10)
    started = anyio.current_time()
    result: list[Any] = ["not returned"]
    async with events:

        async def signal_when_running() -> None:
            await crawler.running.wait()
            os.kill(os.getpid(), signal.SIGTERM)

        async with anyio.create_task_group() as tg:
            tg.start_soon(signal_when_running)
            result = [await events.run_crawler(crawler, stop_timeout=0.5)]
    assert result == [None]
    assert crawler.stopped
    assert anyio.current_time() - started < 5


async def test_a_migration_without_a_signal_lets_the_crawl_go_on() -> None:
    crawler = FakeCrawler()
    events = quiet(handle_signals=True, on_signal="return", close_timeout=10)
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    async with events, anyio.create_task_group() as tg:
        tg.start_soon(events.run_crawler, crawler)
        await crawler.running.wait()
        events.emit(event=Event.MIGRATING)  # as a preemption notice does: persist, and go on
        await events.wait_for_all_listeners_to_complete(timeout=5)
        assert crawler.stopped == []
        crawler.stop("done")
