"""The listener bus of an EventManager: one registry over pyee, and the listener calls running now.

pyee keeps the registry; each registration is a `_Listener` adapting the user's
callable. Every call of a listener is a task of its own (a `_Call`), started
through pyee's one hook, `_emit_run`, so that pyee's positional path
(`emit("new_listener", ...)`, `emit("error", ...)`) stays untouched.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import weakref
from collections.abc import Callable
from typing import Any

import anyio
from pyee import EventEmitter

from .._concurrency import LoopHandle, run_in_daemon_thread
from .._forks import watch_forks
from ._shutdown import EventLoopStarved
from ._types import Event, ReportsUnfinished

logger = logging.getLogger("recoverable_state")

Listener = Callable[..., Any]
"""A sync or async callable taking the event data, or nothing."""

_CANCEL_GRACE = 1.0
"""Seconds a listener cancelled at its timeout gets to unwind before it is left behind."""

_current_call: contextvars.ContextVar[weakref.ref[_Call] | None] = contextvars.ContextVar(
    "recoverable_state_current_listener_call", default=None
)
"""The listener call the running code belongs to, weakly: a context lives on in whatever it was
copied into (a thread, a task the listener started), and must not keep the call's listener, and
what that listener holds (every state of a manager), alive."""


class _Listener:
    """One registration of a user's listener, adapted so that the bus can `await it(data)`."""

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

    async def __call__(self, event_data: Any, loop: LoopHandle) -> Any:
        args = (event_data,) if self.takes_data else ()
        if self.is_async:
            return await self.target(*args)
        result: list[Any] = []
        await run_in_daemon_thread(loop, lambda: result.append(self.target(*args)), self.name)
        return result[0] if result else None


def _takes_data(fn: Callable[..., Any]) -> bool:
    """Whether `fn` can be called with the event data (a listener may take nothing)."""
    try:
        inspect.signature(fn).bind(None)
    except TypeError:
        return False
    except ValueError:  # no signature to read (some builtins): hand the data over
        return True
    return True


class _Call:
    """One running call of a listener: its cancel scope, whether it finished, how, and what it returned."""

    __slots__ = ("__weakref__", "done", "failed", "listener", "result", "scope", "session")

    def __init__(self, listener: _Listener, session: int) -> None:
        self.listener = listener
        self.session = session
        """Which entering of the manager started it (a call left behind belongs to an earlier one)."""
        # Shielded: a listener started while the surrounding scope is being cancelled
        # (the last persist on the way out) must still run; only its own scope, which
        # the timeouts cancel, stops it.
        self.scope = anyio.CancelScope(shield=True)
        self.done = anyio.Event()
        self.failed = False
        self.result: Any = None


class _Emitter(EventEmitter):
    """pyee's emitter, with each listener call handed to the bus (pyee's `_emit_run` hook)."""

    def __init__(self, spawn: Callable[[_Listener, Any], None]) -> None:
        super().__init__()
        self._spawn = spawn

    def _emit_run(self, f: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._spawn(f, args[0] if args else None)  # type: ignore[arg-type]


class ListenerBus:
    """Registered listeners and their running calls, for one EventManager.

    `on_done(call)` is told of every call that ended (the manager reads the
    result of a PERSIST_STATE call there). `pending_work()` says whether work the
    bus does not see yet is due (a coalesced persist round): waiting for the
    listeners waits for it too.
    """

    def __init__(self, on_done: Callable[[_Call], None]) -> None:
        self._emitter = _Emitter(self._spawn)
        self._on_done = on_done
        self._loop: LoopHandle | None = None
        self._running: dict[_Call, None] = {}
        self._waiting: set[_Call] = set()
        self._changed: anyio.Event | None = None
        self._started: list[_Call] = []  # the calls the emit in progress starts
        self.session = 0
        """Counts the times the bus was opened (once per entering of the manager)."""
        self.pending_work: Callable[[], bool] = lambda: False
        watch_forks(self)

    # -- the registry -----------------------------------------------------------

    def add(self, event: Event, listener: Listener, *, once: bool, while_entered: bool) -> None:
        """Register `listener` for `event` (twice registered, it is called twice)."""
        self._emitter.add_listener(
            event.value, _Listener(event, listener, once=once, while_entered=while_entered)
        )

    def remove(self, event: Event, listener: Listener | None = None) -> None:
        """Forget every registration of `listener` for `event`; without one, of any listener."""
        if listener is None:
            self._emitter.remove_all_listeners(event.value)
            return
        for wrapped in self._registrations(event):
            if wrapped.target == listener:
                self._emitter.remove_listener(event.value, wrapped)

    def forget_entered(self) -> None:
        """Forget the registrations made while the manager was entered (its last exit does it)."""
        for event in Event:
            for wrapped in self._registrations(event):
                if wrapped.while_entered:
                    self._emitter.remove_listener(event.value, wrapped)

    def registered(self, event: Event, listener: Listener) -> bool:
        """Whether `listener` is registered for `event`."""
        return any(wrapped.target == listener for wrapped in self._registrations(event))

    def count(self, event: Event) -> int:
        """How many registrations `event` has."""
        return len(self._emitter.listeners(event.value))

    def _registrations(self, event: Event) -> list[_Listener]:
        return list(self._emitter.listeners(event.value))  # type: ignore[arg-type]

    # -- calls -----------------------------------------------------------------

    def open(self, loop: LoopHandle) -> None:
        """Start calling listeners on `loop` (the manager was entered)."""
        self._loop = loop
        self.session += 1

    def after_fork_in_child(self) -> None:
        """In a forked child: the parent's entering, its loop and its calls are not here."""
        if self._loop is not None:
            self.forget_entered()
            self.close()
        self._changed = None

    def close(self) -> None:
        """Stop calling listeners; calls still running are left behind (the manager's last exit)."""
        self._loop = None
        self._running.clear()
        self._waiting.clear()

    def emit(self, event: Event, event_data: Any) -> list[_Call]:
        """Start a call of every listener of `event`; the calls started."""
        started: list[_Call] = []
        outer, self._started = self._started, started
        try:
            self._emitter.emit(event.value, event_data)
        finally:
            self._started = outer
        return started

    def _spawn(self, listener: _Listener, event_data: Any) -> None:
        loop = self._loop
        assert loop is not None
        if listener.once:
            self._emitter.remove_listener(listener.event.value, listener)
        call = _Call(listener, self.session)
        # Counted as running from now on, so that waiting right after emit waits for it.
        self._running[call] = None
        self._started.append(call)
        loop.spawn(lambda: self._run(call, event_data, loop))

    async def _run(self, call: _Call, event_data: Any, loop: LoopHandle) -> None:
        listener = call.listener
        _current_call.set(weakref.ref(call))
        try:
            with call.scope:
                call.result = await listener(event_data, loop)
        except Exception:
            call.failed = True
            logger.exception("listener %s of event %s failed", listener.name, listener.event.value)
        except EventLoopStarved:
            call.failed = True
            logger.error("listener %s of event %s was interrupted", listener.name, listener.event.value)
        finally:
            self._running.pop(call, None)
            call.done.set()
            self.notify_changed()
        if call.scope.cancelled_caught:
            call.failed = True
            logger.warning(
                "listener %s of event %s was cancelled before it finished",
                listener.name,
                listener.event.value,
            )
        self._on_done(call)

    def notify_changed(self) -> None:
        """Wake whoever waits for the listeners: a call ended, or pending work started."""
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    # -- waiting ---------------------------------------------------------------

    async def wait(self, seconds: float | None) -> list[_Call]:
        """Wait for the running calls (not the waiting ones), at most `seconds`; return those left behind.

        Calls still running at the deadline are cancelled and logged, and given
        `_CANCEL_GRACE` to unwind. A listener that waits does not wait for itself,
        nor for work coalesced behind its own call.
        """
        ref = _current_call.get()
        me = ref() if ref is not None else None
        inside = me is not None and me in self._running
        if inside:
            assert me is not None
            self._waiting.add(me)
            self.notify_changed()  # someone waiting for this listener may be done now
        try:
            with anyio.move_on_after(seconds):
                await self._until_idle(pending=not inside)
                return []
            stragglers = self.busy()
            for call in stragglers:
                logger.error(
                    "listener %s of event %s did not finish within %.1f s; cancelling it",
                    call.listener.name,
                    call.listener.event.value,
                    seconds or 0.0,
                )
                call.scope.cancel()
            with anyio.move_on_after(_CANCEL_GRACE):
                await self._until_idle(pending=False)
            return self.busy()
        finally:
            if inside:
                assert me is not None
                self._waiting.discard(me)

    def busy(self) -> list[_Call]:
        """The running calls that are not themselves waiting for the others."""
        return [call for call in self._running if call not in self._waiting]

    async def _until_idle(self, *, pending: bool) -> None:
        while self.busy() or (pending and self.pending_work()):
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()


def unfinished_work(target: Callable[..., Any]) -> list[str]:
    """What a listener left behind says it has not finished, if it reports it (`ReportsUnfinished`)."""
    owner = getattr(target, "__self__", target)
    if not isinstance(owner, ReportsUnfinished):
        return []
    try:
        return [str(item) for item in owner.describe_unfinished()]
    except Exception:  # a listener's own report must never break the exit
        logger.exception("a listener's describe_unfinished() failed")
        return []
