"""EventManager: a pyee event bus whose listeners run as tasks of their own on anyio."""

from __future__ import annotations

import contextvars
import inspect
import logging
import signal
import time
from collections.abc import Callable
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

import anyio
from pyee import EventEmitter

from .._config import as_timedelta
from .._errors import RecoverableStateError
from .._metrics import PersistMetrics, PersistStats
from ._loop import LoopHandle, run_in_daemon_thread
from ._shutdown import (
    EXIT_GRACE,
    EXIT_NOT_PERSISTED,
    EventLoopStarved,
    ExitWatchdog,
    SignalHandlers,
    shutdown_signals,
)
from ._sources import system_info, tick
from ._types import (
    Event,
    EventAbortingData,
    EventMigratingData,
    EventPersistedData,
    EventPersistStateData,
    EventSystemInfoData,
)

if TYPE_CHECKING:
    from ._preemption import PreemptionNotice, PreemptionNoticePoller

logger = logging.getLogger("recoverable_state")

Listener = Callable[..., Any]
"""A sync or async callable taking the event data, or nothing."""

OnSignal = Literal["exit", "raise", "return"]
"""What leaving the manager does after a shutdown signal: exit the process, raise, or return."""

PreemptionNoticeKind = Literal["auto", "aws", "gcp"]

NOT_ACTIVE = "the EventManager is not active: enter it first (`async with EventManager(...)`)"
"""The message of every RuntimeError raised for using a manager that is not entered."""

DEFAULT_PERSIST_STATE_INTERVAL = timedelta(seconds=60)
DEFAULT_CLOSE_TIMEOUT = timedelta(seconds=25)

_CANCEL_GRACE = 1.0
"""Seconds a listener cancelled at its timeout gets to unwind before it is left behind."""

_current_call: contextvars.ContextVar[_Call | None] = contextvars.ContextVar(
    "recoverable_state_current_listener_call", default=None
)


class ShutdownSignalReceived(RecoverableStateError):
    """The process got a shutdown signal; raised on leaving the manager with on_signal='raise'."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"received {signal.Signals(signum).name}; every state was persisted")
        self.signum = signum


class _Listener:
    """One registration of a user's listener, adapted so that the manager can `await it(data)`."""

    __slots__ = ("event", "is_async", "name", "once", "takes_data", "target", "while_entered")

    def __init__(self, event: Event, target: Listener, *, once: bool, while_entered: bool) -> None:
        self.event = event
        self.target = target
        self.once = once
        self.while_entered = while_entered
        self.name = getattr(target, "__qualname__", None) or repr(target)
        self.is_async = inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(
            getattr(target, "__call__", None)  # noqa: B004 - objects with an async __call__
        )
        self.takes_data = _takes_data(target)

    async def __call__(self, event_data: Any, loop: LoopHandle) -> None:
        args = (event_data,) if self.takes_data else ()
        if self.is_async:
            await self.target(*args)
        else:
            await run_in_daemon_thread(loop, lambda: self.target(*args), self.name)


def _takes_data(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    positional = (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.VAR_POSITIONAL,
    )
    return any(p.kind in positional for p in params)


class _Call:
    """One running call of a listener: its cancel scope, and whether it finished and how."""

    __slots__ = ("done", "failed", "listener", "scope")

    def __init__(self, listener: _Listener) -> None:
        self.listener = listener
        # Shielded: a listener started while the surrounding scope is being cancelled
        # (the last persist on the way out) must still run; only its own scope, which
        # the timeouts cancel, stops it.
        self.scope = anyio.CancelScope(shield=True)
        self.done = anyio.Event()
        self.failed = False


class _Emitter(EventEmitter):
    """pyee's emitter, with each listener call handed to the manager.

    pyee itself calls `emit("new_listener", ...)` positionally; that path stays
    untouched, only `_emit_run` (how one listener is called) is overridden.
    """

    def __init__(self, spawn: Callable[[_Listener, Any], None]) -> None:
        super().__init__()
        self._spawn = spawn

    def _emit_run(self, f: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._spawn(f, args[0] if args else None)  # type: ignore[arg-type]


class EventManager:
    """Emits events to listeners, each listener call a task of its own.

    Enter it (`async with EventManager() as events:`) to start the sources: the
    PERSIST_STATE timer (its first tick as the manager is entered), SYSTEM_INFO
    when asked for, and with `handle_signals=True` SIGTERM, SIGINT and SIGHUP.
    Leaving it stops them, emits one last PERSIST_STATE and waits for the
    listeners, shielded from cancellation and bounded by `close_timeout`;
    listeners still running after it (and a second of grace) are left behind and
    logged. Entering it again while entered nests: every exit emits PERSIST_STATE
    and waits for it, only the last exit tears down (and forgets the listeners
    registered while entered). The manager may be left from any task, also from
    inside one of its listeners.

    Timer ticks coalesce: while a PERSIST_STATE started by the timer is still
    running, further ticks leave at most one pending, however long the store
    stalls. A PERSIST_STATE emitted by hand always runs.

    On the first SIGTERM or SIGHUP (SIGINT) the manager emits MIGRATING
    (ABORTING), cancels the body of the `async with` block, persists with
    `is_migrating=True`, and then, by `on_signal`: ends the process with 128 +
    the signal number (`"exit"`, the default; EXIT_NOT_PERSISTED, 75, when the
    last persist failed or timed out), raises ShutdownSignalReceived
    (`"raise"`), or lets the block end normally (`"return"`). The shutdown is
    bounded by `close_timeout`, counted from the signal. A second SIGINT ends the
    process at once; other repeated signals are ignored. With `"exit"`, a
    watchdog thread ends the process if anything keeps it alive past the timeout
    plus a grace of 2 s. A signal is noticed even when the loop never yields: the
    running code is interrupted with EventLoopStarved after a second.

    With a preemption notice URL the manager polls the cloud's metadata service
    and, on the first notice, emits MIGRATING once, which persists every state
    with `is_migrating=True`. The body goes on: the platform's SIGTERM ends it.
    """

    def __init__(
        self,
        *,
        persist_state_interval: timedelta | float | None = None,
        close_timeout: timedelta | float | None = None,
        handle_signals: bool = False,
        handle_sighup: bool = True,
        on_signal: OnSignal = "exit",
        system_info_interval: timedelta | float | None = None,
        preemption_notice_url: str | None = None,
        preemption_notice_kind: PreemptionNoticeKind = "auto",
        preemption_poll_interval: timedelta | float | None = None,
    ) -> None:
        """Make a manager. Durations are timedeltas or seconds.

        The manager reads no configuration: `service_locator.get_event_manager()`
        and `run()` build it from RECOVERABLE_STATE_* settings.

        Args:
            persist_state_interval: how often PERSIST_STATE is emitted on its own (60 s).
            close_timeout: how long the last persist on leaving, or on a signal, may take (25 s).
            handle_signals: handle SIGTERM, SIGINT (and SIGHUP) while entered (main thread only).
            handle_sighup: with handle_signals, handle SIGHUP like SIGTERM (exit 129).
            on_signal: what leaving the manager does after a signal: "exit",
                "raise" or "return".
            system_info_interval: emit SYSTEM_INFO this often, the first as the
                manager is entered (None: never).
            preemption_notice_url: poll this metadata URL for a preemption notice;
                `"aws"` and `"gcp"` stand for the clouds' well-known URLs (None or "": off).
            preemption_notice_kind: `"aws"`, `"gcp"`, or `"auto"` to tell it from the URL.
            preemption_poll_interval: how often to poll (5 s).
        """
        self._persist_state_interval = as_timedelta(
            DEFAULT_PERSIST_STATE_INTERVAL if persist_state_interval is None else persist_state_interval,
            name="persist_state_interval",
        )
        self._close_timeout = as_timedelta(
            DEFAULT_CLOSE_TIMEOUT if close_timeout is None else close_timeout, name="close_timeout"
        )
        self._system_info_interval = (
            None
            if system_info_interval is None
            else as_timedelta(system_info_interval, name="system_info_interval")
        )
        if on_signal not in ("exit", "raise", "return"):
            raise ValueError(f"on_signal must be 'exit', 'raise' or 'return', not {on_signal!r}")
        self._handle_signals = handle_signals
        self._handle_sighup = handle_sighup
        self._on_signal: OnSignal = on_signal
        self._preemption: PreemptionNoticePoller | None = None
        if preemption_notice_url:
            from ._preemption import PreemptionNoticePoller

            interval = as_timedelta(
                5.0 if preemption_poll_interval is None else preemption_poll_interval,
                name="preemption_poll_interval",
            )
            self._preemption = PreemptionNoticePoller(
                preemption_notice_url, kind=preemption_notice_kind, interval=interval
            )
        self._emitter = _Emitter(self._spawn)
        self._listeners: dict[tuple[Event, Listener], list[_Listener]] = {}
        self._depth = 0
        self._loop: LoopHandle | None = None
        self._entered_by: int | None = None  # the task that entered (its body scope lives there)
        self._body_scope: anyio.CancelScope | None = None
        self._body_scope_left_open = False
        self._sources_scope: anyio.CancelScope | None = None
        self._sources_done: anyio.Event | None = None
        self._signal_handlers: SignalHandlers | None = None
        self._running: dict[_Call, None] = {}
        self._waiting: set[_Call] = set()
        self._changed: anyio.Event | None = None
        self._round_running = False
        self._round_pending = False
        self._round_done: anyio.Event | None = None
        self._skipping_logged = False
        self._signal: int | None = None
        self._signal_deadline: float | None = None  # time.monotonic() by which shutdown must be done
        self._watchdog: ExitWatchdog | None = None
        self._unfinished: list[str] = []
        self._persisted_all = True
        self._left_by_other_task = False
        self._started: list[_Call] = []  # the calls the emit in progress starts
        self._closing = False
        self._session = 0  # counts enterings, so that a task left behind cannot touch a later one
        self._metrics = PersistMetrics()

    # -- state ---------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Whether the manager is entered (and not yet left for the last time)."""
        return self._loop is not None

    @property
    def persist_state_interval(self) -> timedelta:
        """How often PERSIST_STATE is emitted on its own."""
        return self._persist_state_interval

    @property
    def close_timeout(self) -> timedelta:
        """How long the last persist on leaving (or on a signal) may take."""
        return self._close_timeout

    @property
    def preemption_notice_url(self) -> str | None:
        """The metadata URL polled for a preemption notice, or None when not polling."""
        return self._preemption.url if self._preemption is not None else None

    @property
    def received_signal(self) -> int | None:
        """The shutdown signal received while entered, if any."""
        return self._signal

    @property
    def unfinished_listeners(self) -> list[str]:
        """Listeners still running when the last exit stopped waiting for them (left behind)."""
        return list(self._unfinished)

    @property
    def persisted_all(self) -> bool:
        """Whether the last exit's PERSIST_STATE listeners all finished without failing."""
        return self._persisted_all

    # -- persist figures -----------------------------------------------------

    @property
    def stats(self) -> PersistStats:
        """A plain snapshot of this manager's persist figures (also recorded to OpenTelemetry)."""
        return self._metrics.stats

    @property
    def metric_attributes(self) -> dict[str, int]:
        """The attributes this manager's OpenTelemetry measurements carry, telling managers apart."""
        return self._metrics.attributes

    def last_persist_age(self) -> timedelta | None:
        """How long ago a PERSIST_STATE last saved every state of this manager (None: never yet).

        For a liveness probe: unhealthy when it is None long after start, or more
        than a few `persist_state_interval`s (see the observability guide).
        """
        return self._metrics.last_success_age()

    def record_persist(self, figures: EventPersistedData) -> None:
        """Count one persist of this manager's states, and emit PERSISTED with its figures."""
        self._metrics.persisted(figures)
        if self._loop is not None:
            self._emit(Event.PERSISTED, figures)

    def record_ownership_loss(self) -> None:
        """Count a state of this manager taken over by another process."""
        self._metrics.ownership_lost()

    # -- listeners -----------------------------------------------------------

    def on(self, *, event: Event, listener: Listener) -> None:
        """Call `listener` on every `event`; registered twice, it is called twice."""
        self._add(event, listener, once=False)

    def once(self, *, event: Event, listener: Listener) -> None:
        """Call `listener` on the next `event` only."""
        self._add(event, listener, once=True)

    def _add(self, event: Event, listener: Listener, *, once: bool) -> None:
        event = Event(event)
        wrapped = _Listener(event, listener, once=once, while_entered=self.active)
        self._listeners.setdefault((event, listener), []).append(wrapped)
        self._emitter.add_listener(event.value, wrapped)

    def off(self, *, event: Event, listener: Listener | None = None) -> None:
        """Stop calling `listener` on `event` (every registration of it); without one, any."""
        event = Event(event)
        if listener is None:
            for key in [k for k in self._listeners if k[0] is event]:
                del self._listeners[key]
            self._emitter.remove_all_listeners(event.value)
            return
        for wrapped in self._listeners.pop((event, listener), []):
            self._emitter.remove_listener(event.value, wrapped)

    def _remove(self, wrapped: _Listener) -> None:
        registrations = self._listeners.get((wrapped.event, wrapped.target), [])
        if wrapped in registrations:
            registrations.remove(wrapped)
            if not registrations:
                del self._listeners[(wrapped.event, wrapped.target)]
            self._emitter.remove_listener(wrapped.event.value, wrapped)

    def is_listening(self, *, event: Event, listener: Listener) -> bool:
        """Whether `listener` is registered for `event` (the last exit forgets those added while entered)."""
        return (Event(event), listener) in self._listeners

    def listener_count(self, event: Event) -> int:
        """How many listeners `event` has (a listener registered twice counts twice)."""
        return len(self._emitter.listeners(Event(event).value))

    # -- emitting ------------------------------------------------------------

    def emit(self, *, event: Event, event_data: Any = None) -> None:
        """Start every listener of `event` as a task; returns without waiting for them.

        Emitting MIGRATING also emits PERSIST_STATE with `is_migrating=True`, so
        a migration a user announces is handled like one a signal announces.
        """
        event = Event(event)
        self._emit(event, event_data)
        if event is Event.MIGRATING:
            self._emit(Event.PERSIST_STATE, EventPersistStateData(is_migrating=True))

    def _emit(self, event: Event, event_data: Any) -> list[_Call]:
        if self._loop is None:
            raise RuntimeError(NOT_ACTIVE)
        started: list[_Call] = []
        outer, self._started = self._started, started
        try:
            self._emitter.emit(event.value, event_data)
        finally:
            self._started = outer
        return started

    def _spawn(self, listener: _Listener, event_data: Any) -> None:
        assert self._loop is not None
        if listener.once:
            self._remove(listener)
        call = _Call(listener)
        # Counted as running from now on, so that waiting right after emit waits for it.
        self._running[call] = None
        self._started.append(call)
        self._loop.spawn(lambda: self._run(call, event_data))

    async def _run(self, call: _Call, event_data: Any) -> None:
        assert self._loop is not None
        loop = self._loop
        listener = call.listener
        _current_call.set(call)
        try:
            with call.scope:
                await listener(event_data, loop)
        except Exception:
            call.failed = True
            logger.exception("listener %s of event %s failed", listener.name, listener.event.value)
        except EventLoopStarved:
            call.failed = True
            logger.error("listener %s of event %s was interrupted", listener.name, listener.event.value)
        finally:
            self._running.pop(call, None)
            call.done.set()
            self._notify_changed()
        if call.scope.cancelled_caught:
            call.failed = True
            logger.warning(
                "listener %s of event %s was cancelled before it finished",
                listener.name,
                listener.event.value,
            )

    def _notify_changed(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def wait_for_all_listeners_to_complete(self, *, timeout: timedelta | float | None = None) -> None:
        """Wait until no listener runs; after `timeout`, cancel those still running and log them.

        Called from inside a listener, it does not wait for that listener, nor
        for any other listener that is itself waiting.

        Raises:
            RuntimeError: the manager is not active.
        """
        if self._loop is None:
            raise RuntimeError(NOT_ACTIVE)
        seconds = None if timeout is None else as_timedelta(timeout, name="timeout").total_seconds()
        await self._wait_for_listeners(seconds)

    async def _wait_for_listeners(self, seconds: float | None) -> list[_Call]:
        """Wait for the running listeners (not the waiting ones); return those left behind."""
        me = _current_call.get()
        if me is not None and me in self._running:
            self._waiting.add(me)
            self._notify_changed()  # someone waiting for this listener may be done now
        try:
            with anyio.move_on_after(seconds):
                await self._until_idle()
                return []
            stragglers = self._busy()
            for call in stragglers:
                logger.error(
                    "listener %s of event %s did not finish within %.1f s; cancelling it",
                    call.listener.name,
                    call.listener.event.value,
                    seconds or 0.0,
                )
                call.scope.cancel()
            # Give the cancelled listeners a moment to unwind; what still runs is left behind.
            with anyio.move_on_after(_CANCEL_GRACE):
                await self._until_idle()
            return self._busy()
        finally:
            if me is not None:
                self._waiting.discard(me)

    def _busy(self) -> list[_Call]:
        return [call for call in self._running if call not in self._waiting]

    async def _until_idle(self) -> None:
        while self._busy():
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()

    # -- the timer, coalesced ---------------------------------------------------

    def _persist_on_timer(self) -> None:
        if self._loop is None or self._closing:
            return
        if self._round_running:
            self._round_pending = True
            self._metrics.tick_skipped()
            if not self._skipping_logged:
                self._skipping_logged = True
                logger.warning(
                    "a PERSIST_STATE is still running; timer ticks are coalesced while it runs (at most "
                    "one pending); logged once per entering"
                )
            return
        self._start_round()

    def _start_round(self) -> None:
        assert self._loop is not None
        self._round_running = True
        self._round_done = anyio.Event()
        calls = self._emit(Event.PERSIST_STATE, EventPersistStateData(is_migrating=False))
        session = self._session
        self._loop.spawn(lambda: self._finish_round(calls, session))

    async def _finish_round(self, calls: list[_Call], session: int) -> None:
        for call in calls:
            await call.done.wait()
        if session != self._session:
            return  # left behind by an earlier entering
        self._round_running = False
        if self._round_done is not None:
            self._round_done.set()
        if self._round_pending and self._loop is not None and not self._closing:
            self._round_pending = False
            self._start_round()

    def _emit_system_info(self) -> None:
        if self._loop is not None:
            self._emit(Event.SYSTEM_INFO, EventSystemInfoData(info=system_info()))

    def _on_preemption_notice(self, notice: PreemptionNotice) -> None:
        if self._loop is None:
            return
        remaining = (
            f"{notice.time_remaining.total_seconds():.0f} s left"
            if notice.time_remaining is not None
            else "time left unknown"
        )
        logger.warning("preemption notice from %s (%s): persisting every state", notice.kind, remaining)
        self.emit(event=Event.MIGRATING, event_data=EventMigratingData(time_remaining=notice.time_remaining))

    # -- sources -----------------------------------------------------------------

    async def _run_sources(self, scope: anyio.CancelScope, done: anyio.Event) -> None:
        try:
            with scope:
                async with anyio.create_task_group() as sources:
                    sources.start_soon(tick, self._persist_state_interval, self._persist_on_timer)
                    if self._system_info_interval is not None:
                        sources.start_soon(tick, self._system_info_interval, self._emit_system_info)
                    if self._preemption is not None:
                        sources.start_soon(self._preemption.watch, self._on_preemption_notice)
        except Exception:
            logger.exception("an event source of the EventManager failed")
        finally:
            done.set()

    # -- signals -------------------------------------------------------------------

    def _on_shutdown_signal(self, signum: int, received: float) -> None:
        if self._signal is not None or self._loop is None:
            return
        name = signal.Signals(signum).name
        self._signal = signum
        timeout = self._close_timeout
        self._signal_deadline = received + timeout.total_seconds()
        logger.warning("%s received: persisting every state (at most %.1f s)", name, timeout.total_seconds())
        # A backstop: whatever hangs, the process is gone shortly after the timeout.
        if self._on_signal == "exit":
            self._watchdog = ExitWatchdog(128 + signum, self._signal_deadline)
            self._watchdog.start()
        if signum == signal.SIGINT:
            self._emit(Event.ABORTING, EventAbortingData())
        else:
            self._emit(Event.MIGRATING, EventMigratingData(time_remaining=timeout))
        if self._body_scope is not None:
            self._body_scope.cancel()

    def _time_left(self) -> float:
        """The last persist's time: the close timeout, or what is left of it since a signal."""
        seconds = self._close_timeout.total_seconds()
        if self._signal_deadline is None:
            return seconds
        return min(seconds, max(self._signal_deadline - time.monotonic(), 0.0))

    # -- entering and leaving --------------------------------------------------

    async def __aenter__(self) -> Self:
        self._depth += 1
        if self._depth > 1:
            return self
        try:
            loop = LoopHandle()
            handlers: SignalHandlers | None = None
            if self._handle_signals:
                handlers = SignalHandlers(
                    shutdown_signals(handle_sighup=self._handle_sighup),
                    self._on_shutdown_signal,
                    loop,
                    deadline_after=self._close_timeout.total_seconds(),
                )
                handlers.install()
        except BaseException:
            self._depth -= 1
            raise
        self._session += 1
        self._closing = False
        self._signal = None
        self._signal_deadline = None
        self._unfinished = []
        self._persisted_all = True
        self._round_running = self._round_pending = self._skipping_logged = False
        self._loop = loop
        self._signal_handlers = handlers
        self._entered_by = anyio.get_current_task().id
        self._left_by_other_task = False
        sources_scope, sources_done = anyio.CancelScope(), anyio.Event()
        self._sources_scope, self._sources_done = sources_scope, sources_done
        loop.spawn(lambda: self._run_sources(sources_scope, sources_done))
        # The first tick of each timer comes as the manager is entered, as in Crawlee.
        self._persist_on_timer()
        if self._system_info_interval is not None:
            self._emit_system_info()
        if handlers is not None:
            self._body_scope = anyio.CancelScope()
            self._body_scope.__enter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        in_entering_task = anyio.get_current_task().id == self._entered_by
        if self._depth == 0:
            if self._left_by_other_task and in_entering_task:
                # Left from a listener already: close what belongs to this task, nothing else.
                self._left_by_other_task = False
                return self._close_body_scope(exc_type, exc, tb)
            raise RuntimeError(NOT_ACTIVE)
        self._depth -= 1
        data = EventPersistStateData(is_migrating=self._signal is not None)
        if self._depth > 0:
            # A nested exit: the component that shared the manager saves as it finishes.
            with anyio.CancelScope(shield=True):
                calls = self._emit(Event.PERSIST_STATE, data)
                with anyio.move_on_after(self._time_left()):
                    for call in calls:
                        await call.done.wait()
            return False
        swallowed = False
        if in_entering_task:
            swallowed = self._close_body_scope(exc_type, exc, tb)
        else:
            self._left_by_other_task = True  # the entering task's own `async with` still ends
        if isinstance(exc, EventLoopStarved):
            # The loop never took the signal: handle it now, its deadline counted from its arrival.
            handlers = self._signal_handlers
            received = handlers.received_at if handlers is not None else None
            self._on_shutdown_signal(exc.signum, received if received is not None else time.monotonic())
        final: list[_Call] = []
        left_behind: list[_Call] = []
        try:
            with anyio.CancelScope(shield=True):
                self._closing = True  # no more timer rounds: the last persist follows
                if self._sources_scope is not None:
                    self._sources_scope.cancel()
                self._round_pending = False
                if self._round_running and self._round_done is not None:
                    # The final persist comes after the one in flight.
                    with anyio.move_on_after(self._time_left()):
                        await self._round_done.wait()
                data = EventPersistStateData(is_migrating=self._signal is not None)
                final = self._emit(Event.PERSIST_STATE, data)
                left_behind = await self._wait_for_listeners(self._time_left())
                if self._sources_done is not None:
                    with anyio.move_on_after(_CANCEL_GRACE):
                        await self._sources_done.wait()
        finally:
            self._close(final, left_behind)
        if self._signal is not None:
            signum = self._signal
            if self._on_signal == "exit":
                raise SystemExit(128 + signum if self._persisted_all else EXIT_NOT_PERSISTED)
            if self._on_signal == "raise":
                raise ShutdownSignalReceived(signum)
            return True  # "return": the block ends as if it had finished
        return swallowed

    def _close_body_scope(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        body_scope, self._body_scope = self._body_scope, None
        if body_scope is None:
            return False
        return bool(body_scope.__exit__(exc_type, exc, tb))

    def _close(self, final: list[_Call], left_behind: list[_Call]) -> None:
        """The last exit's teardown: forget this session's listeners, restore signals, judge the persist."""
        self._persisted_all = len(final) == len([c for c in final if c.done.is_set() and not c.failed])
        self._persisted_all = self._persisted_all and not left_behind
        self._unfinished = [f"{c.listener.name} ({c.listener.event.value})" for c in left_behind]
        if left_behind:
            logger.error(
                "left behind, still running %.1f s after the close timeout: %s; not every state may be "
                "persisted",
                _CANCEL_GRACE,
                ", ".join(self._unfinished),
            )
            for call in left_behind:  # a listener may say what it has not finished (the states' keys)
                for what in _unfinished_work(call.listener.target):
                    logger.error("not persisted (left behind): %s", what)
        elif not self._persisted_all:
            logger.error(
                "the last PERSIST_STATE did not finish for every listener; not every state was persisted"
            )
        for registrations in list(self._listeners.values()):
            for wrapped in list(registrations):
                if wrapped.while_entered:
                    self._remove(wrapped)
        self._round_running = self._round_pending = False
        self._running.clear()
        self._waiting.clear()
        if self._signal_handlers is not None:
            self._signal_handlers.remove()
            self._signal_handlers = None
        self._loop = None
        self._sources_scope = self._sources_done = None
        if self._watchdog is not None:
            # With "exit" it stays on guard until the process is gone.
            if self._signal is not None and self._on_signal == "exit":
                code = 128 + self._signal if self._persisted_all else EXIT_NOT_PERSISTED
                self._watchdog.persisted(complete=not left_behind, code=code)
            else:
                self._watchdog.cancel()
            self._watchdog = None


def _unfinished_work(target: Listener) -> list[str]:
    """What a listener left behind says it has not finished (`describe_unfinished()`), if it can."""
    owner = getattr(target, "__self__", target)
    describe = getattr(owner, "describe_unfinished", None)
    if not callable(describe):
        return []
    try:
        return [str(item) for item in describe()]
    except Exception:  # a listener's own report must never break the exit
        logger.exception("a listener's describe_unfinished() failed")
        return []


def exit_guard(code: int = EXIT_NOT_PERSISTED, grace: float = EXIT_GRACE) -> None:
    """End the process with `code` if it is still alive `grace` seconds after its main thread stops.

    For a shutdown that left a listener behind: a thread stuck in a call would
    otherwise keep the interpreter from exiting.
    """
    watchdog = ExitWatchdog(code, time.monotonic(), grace)
    watchdog.start()
    watchdog.persisted(complete=False, code=code)
