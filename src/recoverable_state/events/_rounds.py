"""PERSIST_STATE rounds, coalesced: at most one running and one pending per manager.

A round is one PERSIST_STATE handed to every listener; it ends when all of
them have. Requests that arrive while a round runs (timer ticks, emits, a
MIGRATING) fold into one pending round, which starts when the running one ends
and is migrating if any of them was. So memory and tasks stay bounded whatever
the emit rate and however long a store stalls, and the pending round still
saves every change made before any of the requests it stands for.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import anyio

from .._concurrency import LoopHandle
from .._forks import watch_forks
from ._bus import ListenerBus, _Call
from ._types import Event, EventPersistStateData


class PersistRounds:
    """The PERSIST_STATE rounds of one manager.

    `on_coalesced(slow)` is told of each timer tick folded in; `slow` when the round
    it waits for was started by the timer too (a persist longer than the interval).
    """

    def __init__(self, bus: ListenerBus, on_coalesced: Callable[[bool], None]) -> None:
        self._bus = bus
        self._on_coalesced = on_coalesced
        self._loop: LoopHandle | None = None
        self._session = 0
        self._running = False
        self._by_timer = False  # whether the running round was started by the timer
        self._pending: EventPersistStateData | None = None
        self._done: anyio.Event | None = None
        self._closing = True
        # Requests from other threads waiting to be handed to the loop: one, however many ask.
        self._handover_lock = threading.Lock()
        self._handover: EventPersistStateData | None = None
        watch_forks(self)

    @property
    def pending(self) -> bool:
        """Whether a round waits for the running one to end."""
        return self._pending is not None

    def open(self, loop: LoopHandle) -> None:
        """Start taking requests (the manager was entered)."""
        self._loop = loop
        self._session += 1
        self._running = False
        self._pending = None
        self._closing = False
        with self._handover_lock:
            self._handover = None

    def close(self) -> None:
        """Take no more timer ticks and drop the pending round: the last persist follows."""
        self._closing = True
        if self._pending is not None:
            self._pending = None
            self._bus.notify_changed()

    def after_fork_in_child(self) -> None:
        """In a forked child: no round of the parent's runs or waits here."""
        self.forget()
        self._done = None
        self._handover_lock = threading.Lock()
        self._handover = None

    def forget(self) -> None:
        """The manager was left: a round still running belongs to no one now."""
        self._loop = None
        self._running = False
        self._pending = None

    def request(self, data: EventPersistStateData, *, from_timer: bool = False) -> None:
        """Run a round now, or fold this request into the pending one if a round runs."""
        if self._loop is None or (self._closing and from_timer):
            return
        if self._closing:  # the last persist is under way: whatever asks now runs at once
            self._bus.emit(Event.PERSIST_STATE, data)
            return
        if self._running:
            pending = self._pending
            if pending is None or (data.is_migrating and not pending.is_migrating):
                self._pending = data
            if from_timer:
                self._on_coalesced(self._by_timer)
            return
        self._start(data, from_timer)

    def request_threadsafe(self, data: EventPersistStateData, loop: LoopHandle) -> None:
        """`request` from a thread other than the loop's.

        Requests made before the loop takes the first of them fold into it (migrating
        if any was): a storm of emits from threads queues one call on the loop, not
        one per emit.
        """
        with self._handover_lock:
            queued = self._handover
            if queued is not None:
                if data.is_migrating and not queued.is_migrating:
                    self._handover = data
                return
            self._handover = data
            session = self._session
        try:
            loop.call_soon_threadsafe(lambda: self._handed_over(session))
        except BaseException:
            with self._handover_lock:
                self._handover = None
            raise

    def _handed_over(self, session: int) -> None:
        with self._handover_lock:
            data, self._handover = self._handover, None
        if data is not None and session == self._session:
            self.request(data)

    def _start(self, data: EventPersistStateData, from_timer: bool = False) -> None:
        loop = self._loop
        assert loop is not None
        self._running = True
        self._by_timer = from_timer
        self._done = anyio.Event()
        calls = self._bus.emit(Event.PERSIST_STATE, data)
        session = self._session
        loop.spawn(lambda: self._finish(calls, session))

    async def _finish(self, calls: list[_Call], session: int) -> None:
        for call in calls:
            await call.done.wait()
        if session != self._session or self._loop is None:
            return  # left behind by an earlier entering
        self._running = False
        if self._done is not None:
            self._done.set()
        pending, self._pending = self._pending, None
        if pending is not None and not self._closing:
            self._start(pending)
        self._bus.notify_changed()  # a waiter counting the pending round may be done now

    async def wait_running(self, seconds: float) -> None:
        """Wait, at most `seconds`, for the round in flight to end."""
        done = self._done
        if self._running and done is not None:
            with anyio.move_on_after(seconds):
                await done.wait()
