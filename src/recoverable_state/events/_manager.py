"""EventManager: a pyee event bus whose listeners run in an anyio task group."""

from __future__ import annotations

import inspect
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

import anyio
import anyio.to_thread
from anyio.abc import TaskGroup
from pyee import EventEmitter

from .._errors import RecoverableStateError
from ._sources import system_info, tick, watch_signals
from ._types import (
    Event,
    EventAbortingData,
    EventMigratingData,
    EventPersistStateData,
    EventSystemInfoData,
)

if TYPE_CHECKING:
    from ._preemption import PreemptionNotice, PreemptionNoticePoller

logger = logging.getLogger("recoverable_state")

Listener = Callable[..., Any]
"""A sync or async callable taking the event data, or nothing."""

OnSignal = Literal["exit", "raise", "return"]

PreemptionNoticeKind = Literal["auto", "aws", "gcp"]

_EXIT_GRACE = 2.0
"""Seconds the watchdog allows past the shutdown timeout, and past the end of the main thread."""


def _hard_exit(code: int, message: str, *args: object) -> None:
    """Log `message` and end the process now, without unwinding.

    The message is logged from a helper thread given half a second: a log
    handler stuck on a full pipe (held by a thread that hangs) must not stop
    the exit, which is all that matters here.
    """
    logging_thread = threading.Thread(target=logger.error, args=(message, *args), daemon=True)
    logging_thread.start()
    logging_thread.join(0.5)
    os._exit(code)


class _ExitWatchdog:
    """Ends the process when shutting down after a signal hangs past its deadline.

    Until the manager has persisted, it fires at `deadline` (a time.monotonic()
    value) plus `grace`. Once the manager has persisted and raised SystemExit, it
    waits for the main thread to end and then gives the interpreter `grace` seconds
    to exit: a thread that cannot be cancelled (a sync listener stuck in a call)
    would otherwise keep the process alive for good, as Python waits for such
    threads. A main thread still running past the deadline caught the SystemExit;
    the watchdog then stands down.
    """

    def __init__(self, code: int, deadline: float, grace: float = _EXIT_GRACE) -> None:
        self._code = code
        self._deadline = deadline
        self._grace = grace
        self._persisted = threading.Event()
        self._cancelled = False
        self._thread = threading.Thread(target=self._watch, name="recoverable-state-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def persisted(self) -> None:
        """The manager is done; from now on only a stuck interpreter exit is ended."""
        self._persisted.set()

    def cancel(self) -> None:
        """The process goes on (no exit follows): stand down."""
        self._cancelled = True
        self._persisted.set()

    def _watch(self) -> None:
        if not self._persisted.wait(max(self._deadline - time.monotonic(), 0.0) + self._grace):
            _hard_exit(
                self._code, "shutdown did not finish in time; ending the process now (exit %d)", self._code
            )
        if self._cancelled:
            return
        # SystemExit is on its way; if the main thread is still running well past the
        # deadline, someone caught it and the process goes on: stand down then.
        main = threading.main_thread()
        main.join(max(self._deadline + self._grace - time.monotonic(), self._grace))
        if main.is_alive():
            return
        time.sleep(self._grace)
        _hard_exit(
            self._code,
            "the process did not end %.0f s after its main thread (a thread still runs); "
            "ending it now (exit %d)",
            self._grace,
            self._code,
        )


class ShutdownSignalReceived(RecoverableStateError):
    """The process got SIGTERM or SIGINT; raised on leaving the manager with on_signal='raise'."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"received {signal.Signals(signum).name}; every state was persisted")
        self.signum = signum


class _Listener:
    """A user's listener, adapted so that the manager can always `await it(data)`."""

    __slots__ = ("event", "is_async", "name", "once", "takes_data", "target")

    def __init__(self, event: Event, target: Listener, once: bool) -> None:
        self.event = event
        self.target = target
        self.once = once
        self.name = getattr(target, "__qualname__", None) or repr(target)
        self.is_async = inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(
            getattr(target, "__call__", None)  # noqa: B004 - objects with an async __call__
        )
        self.takes_data = _takes_data(target)

    async def __call__(self, event_data: Any) -> None:
        args = (event_data,) if self.takes_data else ()
        if self.is_async:
            await self.target(*args)
        else:
            await anyio.to_thread.run_sync(lambda: self.target(*args), abandon_on_cancel=True)


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


class _TaskGroupEmitter(EventEmitter):
    """pyee's emitter, with each listener call handed to the manager's task group.

    pyee itself calls `emit("new_listener", ...)` positionally; that path stays
    untouched, only `_emit_run` (how one listener is called) is overridden.
    """

    def __init__(self, spawn: Callable[[_Listener, Any], None]) -> None:
        super().__init__()
        self._spawn = spawn

    def _emit_run(self, f: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._spawn(f, args[0] if args else None)  # type: ignore[arg-type]


class EventManager:
    """Emits events to listeners, each listener call a task in an anyio task group.

    Enter it (`async with EventManager() as events:`) to open the task group and
    start the sources: the PERSIST_STATE timer and, with `handle_signals=True`,
    SIGTERM and SIGINT. Leaving it stops them, emits one last PERSIST_STATE and
    waits for the listeners, shielded from cancellation and bounded by
    `close_timeout`. Entering it again while entered only counts the nesting.

    On the first SIGTERM (SIGINT) the manager emits MIGRATING (ABORTING), cancels
    the body of the `async with` block, persists with `is_migrating=True`, and
    then, by `on_signal`: ends the process with 128 + the signal number
    (`"exit"`, the default), raises ShutdownSignalReceived (`"raise"`), or lets the
    block end normally (`"return"`). The whole shutdown is bounded by
    `close_timeout`, counted from the signal. A second SIGINT ends the process at
    once; a second SIGTERM is ignored. With `"exit"`, a watchdog thread ends the
    process if anything (a stuck thread, say) keeps it alive past the timeout.

    With a preemption notice URL (`preemption_notice_url`, or
    RECOVERABLE_STATE_PREEMPTION_NOTICE_URL), the manager polls the cloud's
    metadata service and, on the first notice, emits MIGRATING once (with the
    time remaining when the notice tells it), which persists every state with
    `is_migrating=True`. The body goes on: the platform's SIGTERM ends it.
    """

    def __init__(
        self,
        *,
        persist_state_interval: timedelta | None = None,
        close_timeout: timedelta | None = None,
        handle_signals: bool = False,
        on_signal: OnSignal = "exit",
        system_info_interval: timedelta | None = None,
        preemption_notice_url: str | None = None,
        preemption_notice_kind: PreemptionNoticeKind | None = None,
        preemption_poll_interval: timedelta | None = None,
    ) -> None:
        """Make a manager; intervals and timeouts default to the configuration.

        Args:
            persist_state_interval: how often PERSIST_STATE is emitted on its own
                (RECOVERABLE_STATE_PERSIST_STATE_INTERVAL, 60 s by default).
            close_timeout: how long the last persist on leaving, or on a signal,
                may take (RECOVERABLE_STATE_SHUTDOWN_TIMEOUT, 25 s by default).
            handle_signals: handle SIGTERM and SIGINT while entered (main thread only).
            on_signal: what leaving the manager does after a signal: "exit",
                "raise" or "return".
            system_info_interval: emit SYSTEM_INFO this often (None: never).
            preemption_notice_url: poll this metadata URL for a preemption notice;
                `"aws"` and `"gcp"` stand for the clouds' well-known URLs, `""` turns
                polling off (RECOVERABLE_STATE_PREEMPTION_NOTICE_URL, off by default).
            preemption_notice_kind: `"aws"`, `"gcp"`, or `"auto"` to tell it from the
                URL (RECOVERABLE_STATE_PREEMPTION_NOTICE_KIND).
            preemption_poll_interval: how often to poll
                (RECOVERABLE_STATE_PREEMPTION_POLL_INTERVAL, 5 s by default).
        """
        from .._locator import service_locator

        config = service_locator.get_configuration()
        self._persist_state_interval = persist_state_interval or config.persist_state_interval
        self._close_timeout = close_timeout or config.shutdown_timeout
        self._handle_signals = handle_signals
        self._on_signal: OnSignal = on_signal
        self._system_info_interval = system_info_interval
        url = config.preemption_notice_url if preemption_notice_url is None else preemption_notice_url
        self._preemption: PreemptionNoticePoller | None = None
        if url:
            from ._preemption import PreemptionNoticePoller

            kind = config.preemption_notice_kind if preemption_notice_kind is None else preemption_notice_kind
            interval = preemption_poll_interval
            if interval is None:
                interval = config.preemption_poll_interval
            self._preemption = PreemptionNoticePoller(url, kind=kind, interval=interval)
        self._emitter = _TaskGroupEmitter(self._spawn)
        self._listeners: dict[tuple[Event, Listener], _Listener] = {}
        self._depth = 0
        self._task_group: TaskGroup | None = None
        self._body_scope: anyio.CancelScope | None = None
        self._sources_scope: anyio.CancelScope | None = None
        self._running: dict[anyio.CancelScope, _Listener] = {}
        self._idle: anyio.Event | None = None
        self._signal: int | None = None
        self._signal_deadline: float | None = None  # time.monotonic() by which shutdown must be done
        self._watchdog: _ExitWatchdog | None = None

    # -- state ---------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Whether the manager is entered (its task group is open)."""
        return self._task_group is not None

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

    # -- listeners -----------------------------------------------------------

    def on(self, *, event: Event, listener: Listener) -> None:
        """Call `listener` on every `event` (registering the same one twice does nothing)."""
        self._add(event, listener, once=False)

    def once(self, *, event: Event, listener: Listener) -> None:
        """Call `listener` on the next `event` only."""
        self._add(event, listener, once=True)

    def _add(self, event: Event, listener: Listener, *, once: bool) -> None:
        event = Event(event)
        if (event, listener) in self._listeners:
            return
        wrapped = _Listener(event, listener, once)
        self._listeners[(event, listener)] = wrapped
        self._emitter.add_listener(event.value, wrapped)

    def off(self, *, event: Event, listener: Listener | None = None) -> None:
        """Stop calling `listener` on `event`; without a listener, stop calling any."""
        event = Event(event)
        if listener is None:
            for key in [k for k in self._listeners if k[0] is event]:
                del self._listeners[key]
            self._emitter.remove_all_listeners(event.value)
            return
        wrapped = self._listeners.pop((event, listener), None)
        if wrapped is not None:
            self._emitter.remove_listener(event.value, wrapped)

    def listener_count(self, event: Event) -> int:
        """How many listeners `event` has."""
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

    def _emit(self, event: Event, event_data: Any) -> None:
        if self._task_group is None:
            raise RuntimeError(
                f"cannot emit {event.name}: the EventManager is not active; "
                "emit inside `async with EventManager(...)`"
            )
        self._emitter.emit(event.value, event_data)

    def _spawn(self, listener: _Listener, event_data: Any) -> None:
        assert self._task_group is not None
        if listener.once:
            self.off(event=listener.event, listener=listener.target)
        # Counted as running from now on, so that waiting right after emit waits for it.
        # Shielded: a listener started while the surrounding scope is being cancelled
        # (the last persist on the way out) must still run; only its own scope, which
        # the timeouts cancel, can stop it.
        scope = anyio.CancelScope(shield=True)
        self._running[scope] = listener
        self._task_group.start_soon(self._run, listener, event_data, scope)

    async def _run(self, listener: _Listener, event_data: Any, scope: anyio.CancelScope) -> None:
        try:
            with scope:
                await listener(event_data)
        except Exception:
            logger.exception("listener %s of event %s failed", listener.name, listener.event.value)
        finally:
            del self._running[scope]
            if not self._running and self._idle is not None:
                self._idle.set()
                self._idle = None
        if scope.cancelled_caught:
            logger.warning(
                "listener %s of event %s was cancelled before it finished",
                listener.name,
                listener.event.value,
            )

    async def wait_for_all_listeners_to_complete(self, *, timeout: timedelta | None = None) -> None:
        """Wait until no listener runs; after `timeout`, cancel those still running and log them."""
        with anyio.move_on_after(timeout.total_seconds() if timeout is not None else None):
            await self._idle_listeners()
            return
        for scope, listener in list(self._running.items()):
            logger.error(
                "listener %s of event %s did not finish within %.1f s; cancelling it",
                listener.name,
                listener.event.value,
                timeout.total_seconds() if timeout is not None else 0,
            )
            scope.cancel()
        # Give the cancelled listeners a moment to unwind; threads are abandoned.
        with anyio.move_on_after(1.0):
            await self._idle_listeners()

    async def _idle_listeners(self) -> None:
        """Return once no listener runs."""
        while self._running:
            if self._idle is None:
                self._idle = anyio.Event()
            await self._idle.wait()

    # -- entering and leaving --------------------------------------------------

    async def __aenter__(self) -> Self:
        self._depth += 1
        if self._depth > 1:
            return self
        self._signal = None
        self._signal_deadline = None
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        try:
            self._sources_scope = anyio.CancelScope()
            await task_group.start(self._run_sources, self._sources_scope)
            if self._handle_signals:
                # Outside the sources' scope: signals stay handled during the last persist
                # (a second SIGINT ends the process, a second SIGTERM is ignored), until
                # the task group closes.
                await task_group.start(watch_signals, self._on_shutdown_signal)
        except BaseException as exc:
            self._task_group = None
            self._depth -= 1
            task_group.cancel_scope.cancel()
            await task_group.__aexit__(None, None, None)
            if self._handle_signals and threading.current_thread() is not threading.main_thread():
                raise RuntimeError(
                    "EventManager(handle_signals=True) must be entered in the main thread, "
                    "where signals are delivered"
                ) from exc
            raise
        self._body_scope = anyio.CancelScope()
        self._body_scope.__enter__()
        return self

    async def _run_sources(
        self, scope: anyio.CancelScope, *, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        with scope:
            async with anyio.create_task_group() as sources:
                await sources.start(tick, self._persist_state_interval, self._persist_on_timer)
                if self._system_info_interval is not None:
                    await sources.start(tick, self._system_info_interval, self._emit_system_info)
                if self._preemption is not None:
                    await sources.start(self._preemption.watch, self._on_preemption_notice)
                task_status.started()

    def _persist_on_timer(self) -> None:
        self._emit(Event.PERSIST_STATE, EventPersistStateData(is_migrating=False))

    def _emit_system_info(self) -> None:
        self._emit(Event.SYSTEM_INFO, EventSystemInfoData(info=system_info()))

    def _on_preemption_notice(self, notice: PreemptionNotice) -> None:
        if self._task_group is None:
            return
        remaining = (
            f"{notice.time_remaining.total_seconds():.0f} s left"
            if notice.time_remaining is not None
            else "time left unknown"
        )
        logger.warning("preemption notice from %s (%s): persisting every state", notice.kind, remaining)
        self.emit(event=Event.MIGRATING, event_data=EventMigratingData(time_remaining=notice.time_remaining))

    def _on_shutdown_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._signal is not None:
            if signum == signal.SIGINT:
                _hard_exit(128 + signum, "second SIGINT: exiting at once, without persisting")
            logger.warning("%s received again; still persisting before exit", name)
            return
        self._signal = signum
        timeout = self._close_timeout
        self._signal_deadline = time.monotonic() + timeout.total_seconds()
        logger.warning("%s received: persisting every state (at most %.1f s)", name, timeout.total_seconds())
        # A backstop: whatever hangs, the process is gone shortly after the timeout.
        if self._on_signal == "exit":
            self._watchdog = _ExitWatchdog(128 + signum, self._signal_deadline)
            self._watchdog.start()
        if signum == signal.SIGTERM:
            self._emit(Event.MIGRATING, EventMigratingData(time_remaining=timeout))
        else:
            self._emit(Event.ABORTING, EventAbortingData())
        if self._body_scope is not None:
            self._body_scope.cancel()

    def _time_left(self) -> timedelta:
        """The last persist's time: the close timeout, or what is left of it since a signal."""
        if self._signal_deadline is None:
            return self._close_timeout
        left = max(self._signal_deadline - time.monotonic(), 0.0)
        return min(self._close_timeout, timedelta(seconds=left))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if self._depth == 0:
            raise RuntimeError("EventManager exited more often than it was entered")
        self._depth -= 1
        if self._depth > 0:
            return False
        assert self._task_group is not None
        assert self._body_scope is not None
        body_scope, self._body_scope = self._body_scope, None
        swallowed = bool(body_scope.__exit__(exc_type, exc, tb))
        try:
            with anyio.CancelScope(shield=True):
                if self._sources_scope is not None:
                    self._sources_scope.cancel()
                self._emit(Event.PERSIST_STATE, EventPersistStateData(is_migrating=self._signal is not None))
                await self.wait_for_all_listeners_to_complete(timeout=self._time_left())
        finally:
            task_group, self._task_group = self._task_group, None
            task_group.cancel_scope.cancel()  # anything a listener left behind, the signal watcher
            await task_group.__aexit__(None, None, None)
            if self._watchdog is not None:
                # With "exit" it stays on guard until the process is gone.
                if self._signal is not None and self._on_signal == "exit":
                    self._watchdog.persisted()
                else:
                    self._watchdog.cancel()
                self._watchdog = None
        if self._signal is not None:
            signum = self._signal
            if self._on_signal == "exit":
                raise SystemExit(128 + signum)
            if self._on_signal == "raise":
                raise ShutdownSignalReceived(signum)
            return True  # "return": the block ends as if it had finished
        return swallowed
