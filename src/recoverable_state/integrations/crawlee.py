"""Run a Crawlee crawler on this library's event bus: one bus for Crawlee's persisters and ours.

`CrawleeEventManager` is an EventManager of this library that Crawlee also takes
as its own (`crawlee.service_locator.set_event_manager(events)`). Crawlee's
components (Statistics, SessionPool, the request queue's state, the
Snapshotter) register with Crawlee's `Event` enum and get Crawlee's payloads;
RecoverableState registers with this library's `Event` and gets ours. Both
ride on the same listeners, timer, signals and last persist.

Crawlee runs on asyncio only; the bridge itself is runtime-neutral. Needs the
`[crawlee]` extra: `pip install 'recoverable-state[crawlee]'`.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import signal
import threading
from collections.abc import Callable, Coroutine, Sequence
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
import sniffio
from pydantic import BaseModel

from recoverable_state import (
    Event,
    EventAbortingData,
    EventExitData,
    EventManager,
    EventMigratingData,
    EventPersistStateData,
    EventSystemInfoData,
)

try:
    import crawlee.events as crawlee_events
except ImportError as exc:  # pragma: no cover - the extra is installed wherever the tests run
    raise ImportError(
        "recoverable_state.integrations.crawlee needs Crawlee: pip install 'recoverable-state[crawlee]'"
    ) from exc

__all__ = ["CrawleeEventManager"]

logger = logging.getLogger("recoverable_state")

Listener = Callable[..., Any]
"""A listener as either framework takes it: sync or async, taking the event data or nothing."""

AnyEvent = Event | crawlee_events.Event
"""An event of this library, or one of Crawlee's."""

DEFAULT_SYSTEM_INFO_INTERVAL = timedelta(seconds=1)
"""How often SYSTEM_INFO is emitted by default: Crawlee's default, which its autoscaling relies on."""

_NOT_ACTIVE = "the EventManager is not active: enter it first (`async with EventManager(...)`)"
_LAST_EXIT_GRACE = 1.0
"""Seconds the last exit waits for listeners of Crawlee-only events before cancelling them."""

_SHARED: dict[str, Event] = {
    event.value: event for event in Event if event.value in {e.value for e in crawlee_events.Event}
}
"""The events both frameworks have, by value: PERSIST_STATE, MIGRATING, ABORTING, EXIT, SYSTEM_INFO."""


if TYPE_CHECKING:  # crawlee.crawlers takes a second to import; only the annotation needs it
    from crawlee.crawlers import BasicCrawler

    Crawler = BasicCrawler[Any, Any]
    """What `run_crawler` runs: Crawlee's BasicCrawler, or any crawler built on it."""


_CRAWLEE_PAYLOADS = (
    crawlee_events.EventPersistStateData,
    crawlee_events.EventMigratingData,
    crawlee_events.EventAbortingData,
    crawlee_events.EventExitData,
    crawlee_events.EventSystemInfoData,
)


def _seconds(duration: timedelta | float) -> float:
    return duration.total_seconds() if isinstance(duration, timedelta) else float(duration)


def _split(event: AnyEvent | str) -> tuple[Event | None, crawlee_events.Event | None]:
    """(our event, Crawlee's event): a Crawlee event may have no counterpart here; ours no Crawlee side."""
    if isinstance(event, crawlee_events.Event):
        return _SHARED.get(event.value), event
    return Event(event), None


def _to_ours(event: Event, data: Any) -> Any:
    """A payload emitted by Crawlee's code, as this library's listeners expect it."""
    if event is Event.PERSIST_STATE:
        return EventPersistStateData(is_migrating=bool(getattr(data, "is_migrating", False)))
    if event is Event.MIGRATING:
        return EventMigratingData(time_remaining=getattr(data, "time_remaining", None))
    if event is Event.ABORTING:
        return EventAbortingData()
    if event is Event.EXIT:
        return EventExitData()
    if isinstance(data, EventSystemInfoData):
        return data
    info = data.model_dump(mode="json", by_alias=True) if isinstance(data, BaseModel) else {}
    return EventSystemInfoData(info=info)


class _ToCrawlee:
    """Our payloads as Crawlee's listeners expect them; SYSTEM_INFO measured as Crawlee measures it.

    Crawlee's Snapshotter reads CPU and memory figures from SYSTEM_INFO; our
    payload has none, so they are measured with Crawlee's own functions, once
    per emitted event however many Crawlee listeners it has.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: tuple[object, crawlee_events.EventSystemInfoData] | None = None

    def __call__(self, event: Event, data: Any) -> Any:
        if isinstance(data, _CRAWLEE_PAYLOADS):
            return data
        if event is Event.PERSIST_STATE:
            migrating = bool(getattr(data, "is_migrating", False))
            return crawlee_events.EventPersistStateData(is_migrating=migrating)
        if event is Event.MIGRATING:
            return crawlee_events.EventMigratingData(time_remaining=getattr(data, "time_remaining", None))
        if event is Event.ABORTING:
            return crawlee_events.EventAbortingData()
        if event is Event.EXIT:
            return crawlee_events.EventExitData()
        return self._system_info(data)

    def _system_info(self, data: object) -> crawlee_events.EventSystemInfoData:
        # Crawlee has no public measuring API; these are what its LocalEventManager emits.
        from crawlee._utils.system import get_cpu_info, get_memory_info

        with self._lock:
            if data is not None and self._last is not None and self._last[0] is data:
                return self._last[1]
            measured = crawlee_events.EventSystemInfoData(
                cpu_info=get_cpu_info(), memory_info=get_memory_info()
            )
            self._last = (data, measured)
            return measured


def _takes_event_data(listener: Listener) -> bool:
    """Whether `listener` takes the event data, decided as Crawlee decides it."""
    try:
        inspect.signature(listener).bind(None)
    except TypeError:
        return False
    except ValueError:  # no signature to read (some builtins): hand it the data
        return True
    return True


def _is_async(listener: Listener) -> bool:
    call = getattr(listener, "__call__", None)  # noqa: B004 - objects with an async __call__
    return inspect.iscoroutinefunction(listener) or inspect.iscoroutinefunction(call)


class _CrawleeListener:
    """A Crawlee listener of an event both frameworks have, on the bus: it is handed Crawlee's payload."""

    def __init__(self, target: Listener, event: Event, translate: _ToCrawlee) -> None:
        self.target = target
        self.event = event
        self._translate = translate
        self._takes_data = _takes_event_data(target)
        # The name the manager logs this listener by: the Crawlee listener's own.
        self.__qualname__ = getattr(target, "__qualname__", None) or repr(target)

    def _args(self, event_data: Any) -> tuple[Any, ...]:
        return (self._translate(self.event, event_data),) if self._takes_data else ()


class _AsyncCrawleeListener(_CrawleeListener):
    async def __call__(self, event_data: Any = None) -> None:
        if self._takes_data and self.event is Event.SYSTEM_INFO:
            args = await anyio.to_thread.run_sync(self._args, event_data)  # measuring blocks briefly
        else:
            args = self._args(event_data)
        await self.target(*args)


class _SyncCrawleeListener(_CrawleeListener):
    def __call__(self, event_data: Any = None) -> None:  # the manager calls it in a thread of its own
        self.target(*self._args(event_data))


_Bridged = _AsyncCrawleeListener | _SyncCrawleeListener


_current_call: contextvars.ContextVar[anyio.CancelScope | None] = contextvars.ContextVar(
    "recoverable_state_crawlee_only_call", default=None
)
_tasks: set[Any] = set()  # asyncio holds tasks weakly


def _spawn(make: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Start `make()` as a task outside any task group (it must not raise)."""
    if sniffio.current_async_library() == "trio":
        import trio

        trio.lowlevel.spawn_system_task(make)
    else:
        import asyncio

        task = asyncio.get_running_loop().create_task(make())
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)


class _CrawleeOnlyEvents:
    """Listeners of Crawlee's events that have no counterpart here (CRAWLER_STATUS, SESSION_RETIRED, the
    browser and page events): called as Crawlee calls them, each call a task of its own."""

    def __init__(self) -> None:
        self._listeners: dict[crawlee_events.Event, list[tuple[Listener, bool, bool]]] = {}
        """Per event: (listener, registered while entered, once)."""
        self._running: set[anyio.CancelScope] = set()
        self._changed: anyio.Event | None = None

    def on(self, event: crawlee_events.Event, listener: Listener, *, while_entered: bool, once: bool) -> None:
        self._listeners.setdefault(event, []).append((listener, while_entered, once))

    def off(self, event: crawlee_events.Event, listener: Listener | None) -> None:
        entries = self._listeners.get(event, [])
        self._listeners[event] = [e for e in entries if listener is not None and e[0] != listener]

    def listeners(self, event: crawlee_events.Event) -> list[Listener]:
        return [entry[0] for entry in self._listeners.get(event, [])]

    def forget_entered(self) -> None:
        """Forget the listeners registered while the manager was entered, as its last exit does."""
        for event, entries in self._listeners.items():
            self._listeners[event] = [entry for entry in entries if not entry[1]]

    def emit(self, event: crawlee_events.Event, event_data: Any) -> None:
        entries = self._listeners.get(event, [])
        self._listeners[event] = [entry for entry in entries if not entry[2]]
        for listener, _, _ in entries:
            scope = anyio.CancelScope()
            self._running.add(scope)
            _spawn(functools.partial(self._call, event, listener, event_data, scope))

    async def _call(
        self, event: crawlee_events.Event, listener: Listener, event_data: Any, scope: anyio.CancelScope
    ) -> None:
        _current_call.set(scope)
        args = (event_data,) if _takes_event_data(listener) else ()
        try:
            with scope:
                if _is_async(listener):
                    await listener(*args)
                else:
                    await anyio.to_thread.run_sync(lambda: listener(*args), abandon_on_cancel=True)
        except Exception:
            logger.exception("listener %r of Crawlee's event %s failed", listener, event.value)
        finally:
            self._running.discard(scope)
            if self._changed is not None:
                self._changed.set()
                self._changed = None

    async def wait(self, seconds: float | None) -> None:
        """Wait for the running calls (not the caller's own); after `seconds`, cancel those left."""
        me = _current_call.get()
        with anyio.move_on_after(seconds):
            while self._running - {me}:
                if self._changed is None:
                    self._changed = anyio.Event()
                await self._changed.wait()
            return
        for scope in self._running - {me}:
            logger.error("a listener of a Crawlee event did not finish within %.1f s; cancelling it", seconds)
            scope.cancel()


# Both bases declare `_close_timeout`; only ours is ever set (Crawlee's __init__ never runs).
class CrawleeEventManager(EventManager, crawlee_events.EventManager):  # type: ignore[misc]
    """An EventManager that Crawlee takes as its own: one bus for Crawlee's persisters and this library's.

    Hand it to Crawlee (`crawlee.service_locator.set_event_manager(events)`)
    and to RecoverableState (`event_manager=events`, or this library's
    service locator). A listener registered with Crawlee's `Event` is handed
    Crawlee's payloads, one registered with this library's `Event` gets ours,
    whichever side emitted. SYSTEM_INFO, emitted every second by default as
    Crawlee's LocalEventManager does, carries Crawlee's CPU and memory figures
    to Crawlee's listeners (its autoscaling reads them). Crawlee's events that
    have no counterpart here (CRAWLER_STATUS, SESSION_RETIRED, the browser
    and page events) reach only Crawlee's listeners; this library's own
    (PERSISTED, STATE_OWNERSHIP_LOST) only this library's.

    Entering nests, so the crawler may enter it again inside your `async with`.
    After a shutdown signal, a Crawlee component that deregisters from
    PERSIST_STATE as the crawler unwinds stays registered until the last exit:
    its state is saved by the last persist, which is shielded and bounded by
    `close_timeout`, and counts towards the exit code (75 when it failed).

    `run_crawler()` runs a crawler so that a shutdown signal stops it the way
    Crawlee stops one, instead of cancelling it in the middle of a request.

    Crawlee's base class is there for Crawlee's type checks only (Crawlee
    checks no type at run time; `set_event_manager` is annotated with its
    EventManager): every method Crawlee calls is this library's, and the
    base's own state is never made.
    """

    def __init__(
        self, *, system_info_interval: timedelta | float | None = DEFAULT_SYSTEM_INFO_INTERVAL, **options: Any
    ) -> None:
        """Make a manager; `options` are EventManager's (`persist_state_interval`, `handle_signals`, ...)."""
        EventManager.__init__(self, system_info_interval=system_info_interval, **options)
        self._crawlee_handles_signals = bool(options.get("handle_signals", False))
        self._crawlee_translate = _ToCrawlee()
        self._crawlee_bridged: dict[tuple[Event, Listener], list[_Bridged]] = {}
        self._crawlee_kept: list[_Bridged] = []
        self._crawlee_only = _CrawleeOnlyEvents()

    async def run_crawler(
        self,
        crawler: Crawler,
        requests: Sequence[Any] | None = None,
        *,
        stop_timeout: timedelta | float | None = None,
        **run_options: Any,
    ) -> Any:
        """`await crawler.run(requests, **run_options)`; a shutdown signal stops it as Crawlee would.

        Cancelling a crawler in the middle of a request can leave its request
        queue unable to resume: Crawlee's file-system queue records a new
        request in its state before it writes the request's file, and a
        restart then waits for that file forever. So, when this manager
        handles signals, the crawl is shielded from the signal's cancellation;
        SIGTERM, SIGINT or SIGHUP calls `crawler.stop()` instead (no new
        request starts, the running ones finish), and only if the crawler has
        not stopped `stop_timeout` after the signal (half the close timeout by
        default) is it cancelled. The rest of the close timeout is left for
        the last persist. A preemption notice does not stop the crawl.

        Returns what `crawler.run()` returns (Crawlee's FinalStatistics), or
        None when it was cancelled at `stop_timeout`.

        Warning:
            While it runs under a manager that handles signals, cancelling
            the caller does not stop the crawl: call `crawler.stop()`.
        """
        if not self._crawlee_handles_signals:
            return await crawler.run(requests, **run_options)
        budget = self.close_timeout.total_seconds() / 2 if stop_timeout is None else _seconds(stop_timeout)
        crawl = anyio.CancelScope(shield=True)

        async def on_signal() -> None:  # async: called on the loop, where the crawler lives
            signum = self.received_signal
            if signum is None:
                return  # a migration announced by a preemption notice: the crawl goes on
            crawler.stop(f"{signal.Signals(signum).name} received: finishing the running requests")
            crawl.deadline = min(crawl.deadline, anyio.current_time() + budget)

        for event in (Event.MIGRATING, Event.ABORTING):
            EventManager.on(self, event=event, listener=on_signal)
        try:
            with crawl:
                return await crawler.run(requests, **run_options)
            logger.error("the crawler did not stop within %.1f s of the signal; it was cancelled", budget)
            return None
        finally:
            for event in (Event.MIGRATING, Event.ABORTING):
                EventManager.off(self, event=event, listener=on_signal)

    def on(self, *, event: AnyEvent, listener: Listener) -> None:
        """Call `listener` on every `event`, with the payload of the framework the event belongs to."""
        self._crawlee_register(event, listener, once=False)

    def once(self, *, event: AnyEvent, listener: Listener) -> None:
        """Call `listener` on the next `event` only."""
        self._crawlee_register(event, listener, once=True)

    def _crawlee_register(self, event: AnyEvent, listener: Listener, *, once: bool) -> None:
        ours, theirs = _split(event)
        register = EventManager.once if once else EventManager.on
        if ours is None:
            assert theirs is not None
            self._crawlee_only.on(theirs, listener, while_entered=self.active, once=once)
        elif theirs is None:
            register(self, event=ours, listener=listener)
        else:
            kind = _AsyncCrawleeListener if _is_async(listener) else _SyncCrawleeListener
            wrapped = kind(listener, ours, self._crawlee_translate)
            self._crawlee_bridged.setdefault((ours, listener), []).append(wrapped)
            register(self, event=ours, listener=wrapped)

    def off(self, *, event: AnyEvent, listener: Listener | None = None) -> None:
        """Stop calling `listener` on `event`; without one, every listener of that framework's side.

        `off(event=crawlee.events.Event.PERSIST_STATE)` removes Crawlee's
        listeners of PERSIST_STATE, never this library's states.
        """
        ours, theirs = _split(event)
        if ours is None:
            assert theirs is not None
            self._crawlee_only.off(theirs, listener)
            return
        if theirs is None:
            EventManager.off(self, event=ours, listener=listener)
            return
        keys = [k for k in self._crawlee_bridged if k[0] is ours and (listener is None or k[1] == listener)]
        shutting_down = self.active and self.received_signal is not None
        for key in keys:
            for wrapped in self._crawlee_bridged.pop(key):
                if shutting_down and ours is Event.PERSIST_STATE:
                    # Crawlee's components leave as the crawler is cancelled, before the last persist:
                    # they stay registered for it (see the class docstring).
                    self._crawlee_kept.append(wrapped)
                else:
                    EventManager.off(self, event=ours, listener=wrapped)

    def is_listening(self, *, event: AnyEvent, listener: Listener) -> bool:
        """Whether `listener` is registered for `event` (on that event's framework's side)."""
        ours, theirs = _split(event)
        if ours is None:
            assert theirs is not None
            return listener in self._crawlee_only.listeners(theirs)
        if theirs is None:
            return EventManager.is_listening(self, event=ours, listener=listener)
        return any(
            EventManager.is_listening(self, event=ours, listener=wrapped)
            for wrapped in self._crawlee_bridged.get((ours, listener), [])
        )

    def listener_count(self, event: AnyEvent) -> int:
        """How many listeners `event` has, of both frameworks (a Crawlee-only event: Crawlee's)."""
        ours, theirs = _split(event)
        if ours is None:
            assert theirs is not None
            return len(self._crawlee_only.listeners(theirs))
        return EventManager.listener_count(self, ours)

    def emit(self, *, event: AnyEvent, event_data: Any = None) -> None:
        """Start every listener of `event`, each handed the payload of its own framework."""
        ours, theirs = _split(event)
        if ours is None:
            assert theirs is not None
            if not self.active:
                raise RuntimeError(_NOT_ACTIVE)
            self._crawlee_only.emit(theirs, event_data)
        elif theirs is None:
            EventManager.emit(self, event=ours, event_data=event_data)
        else:
            EventManager.emit(self, event=ours, event_data=_to_ours(ours, event_data))

    async def wait_for_all_listeners_to_complete(self, *, timeout: timedelta | float | None = None) -> None:
        """Wait until no listener of either framework runs; after `timeout`, cancel those still running."""
        started = anyio.current_time()
        await EventManager.wait_for_all_listeners_to_complete(self, timeout=timeout)
        if timeout is None:
            await self._crawlee_only.wait(None)
            return
        await self._crawlee_only.wait(max(_seconds(timeout) - (anyio.current_time() - started), 0.0))

    async def __aexit__(  # type: ignore[override]  # Crawlee's returns None, ours whether it swallowed
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        try:
            return await EventManager.__aexit__(self, exc_type, exc, tb)
        finally:
            if not self.active:
                await self._crawlee_after_last_exit()

    async def _crawlee_after_last_exit(self) -> None:
        """Drop what the last persist kept, forget what the base forgot; let Crawlee-only calls end."""
        kept, self._crawlee_kept = self._crawlee_kept, []
        for wrapped in kept:
            EventManager.off(self, event=Event.PERSIST_STATE, listener=wrapped)
        for key, registrations in list(self._crawlee_bridged.items()):
            alive = [w for w in registrations if EventManager.is_listening(self, event=key[0], listener=w)]
            if alive:
                self._crawlee_bridged[key] = alive
            else:
                del self._crawlee_bridged[key]
        self._crawlee_only.forget_entered()
        with anyio.CancelScope(shield=True):
            await self._crawlee_only.wait(_LAST_EXIT_GRACE)
