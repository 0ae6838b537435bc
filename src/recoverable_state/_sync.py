"""run_sync(): a worker written without async, its EventManager on an event loop in a background thread.

The worker runs in the main thread, where Python delivers signals; the
manager (timer, preemption notices, batched persists) runs on an anyio loop
in a thread of its own, reached through a blocking portal. Signals are taken
here, in the main thread, by a plain handler that tells the worker (the
`stop_requested()` flag), hands the signal to the manager, and after a grace
raises WorkerInterrupted into the worker.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from types import FrameType
from typing import Any, TypeVar

import anyio
from anyio.abc import TaskStatus
from anyio.from_thread import BlockingPortal, start_blocking_portal

from . import _editing
from ._config import as_timedelta, configuration_service
from ._locator import service_locator
from ._runner import exit_code
from .events import (
    EXIT_NOT_PERSISTED,
    EventManager,
    OnSignal,
    PreemptionNoticeKind,
    event_manager_from_configuration,
    exit_guard,
)
from .events._loop import LoopHandle
from .events._shutdown import ExitWatchdog, hard_exit, shutdown_signals

T = TypeVar("T")

logger = logging.getLogger("recoverable_state")

DEFAULT_STOP_GRACE = 5.0
"""Seconds (at most; a fifth of the shutdown timeout when that is shorter) a worker has to stop."""


class WorkerInterrupted(BaseException):
    """Raised into run_sync()'s worker when it did not return within `stop_grace` after a signal.

    A BaseException, as KeyboardInterrupt is, so that `except Exception` in the
    worker does not swallow it: it unwinds the worker's `with` blocks (each
    RecoverableState persists as it is left) and run_sync() then exits as for
    the signal. It is raised in place of KeyboardInterrupt for SIGINT too.
    Inside `with state.editing():` (and while a state loads, saves or is torn
    down from sync code) it is held back and raised as that block ends.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(
            f"{signal.Signals(signum).name} received and the worker did not return in time; "
            "interrupted so that every state can be persisted"
        )
        self.signum = signum


_current: _SyncRuntime | None = None


def stop_requested() -> bool:
    """Whether the process was asked to stop (SIGTERM, SIGINT, SIGHUP) while run_sync() runs.

    Poll it between units of work and return from the worker when it is True:
    every state is then persisted and the process exits with 128 + the signal.
    A worker that does not return within `stop_grace` gets WorkerInterrupted.
    Outside run_sync() it is always False.
    """
    runtime = _current
    return runtime is not None and runtime.stopping.is_set()


def current_portal(what: str) -> BlockingPortal:
    """The portal to the running run_sync()'s event loop; RuntimeError outside one."""
    runtime = _current
    if runtime is None or runtime.portal is None:
        raise RuntimeError(
            f"{what} from sync code works inside recoverable_state.run_sync(); "
            "in async code use `async with` and await instead"
        )
    if threading.get_ident() == runtime.loop_thread:
        raise RuntimeError(f"{what} was called from the event loop's thread; use the async API there")
    return runtime.portal


def use_state_sync(
    key: str, default: dict[str, Any] | list[Any] | None = None, *, kvs_name: str | None = None
) -> Any:
    """`use_state()` for sync code inside run_sync(): the same auto-saved dict or list, in one line."""
    from ._autosave import use_state

    return current_portal("use_state_sync()").call(lambda: use_state(key, default, kvs_name=kvs_name))


def run_sync(
    main: Callable[..., T],
    *args: Any,
    backend: str = "asyncio",
    backend_options: dict[str, Any] | None = None,
    handle_signals: bool = True,
    handle_sighup: bool = True,
    on_signal: OnSignal = "exit",
    stop_grace: timedelta | float | None = None,
    persist_state_interval: timedelta | float | None = None,
    close_timeout: timedelta | float | None = None,
    preemption_notice_url: str | None = None,
    preemption_notice_kind: PreemptionNoticeKind | None = None,
    preemption_poll_interval: timedelta | float | None = None,
) -> T | None:
    """Run the plain function `main(*args)` in this (the main) thread as a worker; return its result.

    An EventManager runs meanwhile on `backend` ("asyncio" or "trio") in a
    background thread, as the service locator's default: inside `main`,
    `with RecoverableState(...) as value:` loads and saves states from sync code,
    and states are persisted on the timer, on preemption notices, and once more
    when `main` returns.

    On SIGTERM (SIGINT, SIGHUP) `stop_requested()` turns True and MIGRATING
    (ABORTING) is emitted. A worker still running `stop_grace` seconds later
    gets WorkerInterrupted raised into it; one still running `stop_grace` after
    that is given up on: every state is persisted without it and the process
    ends. The exit codes are run()'s: 128 + the signal, EXIT_NOT_PERSISTED (75)
    when not every state was saved; `on_signal="raise"` raises
    ShutdownSignalReceived instead and `"return"` returns None (a worker that
    never returns is still ended). Everything is bounded by the shutdown
    timeout plus a grace of 2 s.

    Args:
        main: the worker, a plain function.
        args: passed to `main`.
        backend: "asyncio" or "trio", for the manager's event loop.
        backend_options: passed to the backend (anyio's `backend_options`).
        handle_signals: handle SIGTERM, SIGINT (and SIGHUP); must then be called in the main thread.
        handle_sighup: with handle_signals, handle SIGHUP like SIGTERM (exit 129).
        on_signal: "exit", "raise" or "return" once every state is saved after a signal.
        stop_grace: how long the worker has to return after a signal, and again to unwind
            after WorkerInterrupted (default: a fifth of the shutdown timeout, at most 5 s).
        persist_state_interval: as run()'s (RECOVERABLE_STATE_PERSIST_STATE_INTERVAL).
        close_timeout: the shutdown timeout (RECOVERABLE_STATE_SHUTDOWN_TIMEOUT).
        preemption_notice_url: as run()'s.
        preemption_notice_kind: as run()'s.
        preemption_poll_interval: as run()'s.
    """
    global _current
    if on_signal not in ("exit", "raise", "return"):
        raise ValueError(f"on_signal must be 'exit', 'raise' or 'return', not {on_signal!r}")
    if handle_signals and threading.current_thread() is not threading.main_thread():
        raise RuntimeError("run_sync(handle_signals=True) must be called in the main thread")
    if _current is not None:
        raise RuntimeError("run_sync() is already running in this process")
    manager = event_manager_from_configuration(
        configuration_service.get(),
        persist_state_interval=persist_state_interval,
        close_timeout=close_timeout,
        handle_signals=False,  # taken here, in the main thread, and handed to the manager
        on_signal="return",
        preemption_notice_url=preemption_notice_url,
        preemption_notice_kind=preemption_notice_kind,
        preemption_poll_interval=preemption_poll_interval,
    )
    shutdown = manager.close_timeout.total_seconds()
    grace = (
        min(DEFAULT_STOP_GRACE, shutdown / 5)
        if stop_grace is None
        else as_timedelta(stop_grace, name="stop_grace").total_seconds()
    )
    runtime = _SyncRuntime(
        manager,
        signums=shutdown_signals(handle_sighup=handle_sighup) if handle_signals else (),
        stop_grace=grace,
        exit_on_signal=on_signal == "exit",
    )
    result: T | None = None
    service_locator.set_event_manager(manager)
    _current = runtime
    try:
        with start_blocking_portal(backend, backend_options) as portal:
            runtime.start(portal)
            try:
                result = main(*args)
            except WorkerInterrupted:
                if runtime.signal is None:
                    raise
                logger.warning("the worker was interrupted; persisting every state")
            finally:
                runtime.worker_done.set()
                runtime.leave()
                runtime.remove_handlers()
    finally:
        _current = None
        service_locator.release_event_manager(manager)
        if manager.unfinished_listeners:
            exit_guard(EXIT_NOT_PERSISTED)  # a thread stuck in a store must not keep the process alive
    return runtime.finish(on_signal, result)


class _SyncRuntime:
    """One run_sync(): the portal, the hosted manager, the signal handlers and the stop watch."""

    def __init__(
        self,
        manager: EventManager,
        *,
        signums: tuple[signal.Signals, ...],
        stop_grace: float,
        exit_on_signal: bool,
    ) -> None:
        self.manager = manager
        self.portal: BlockingPortal | None = None
        self.loop_thread: int | None = None
        self.stopping = threading.Event()
        self.worker_done = threading.Event()
        self.signal: int | None = None
        self._signums = signums
        self._grace = stop_grace
        self._exit_on_signal = exit_on_signal
        self._loop: LoopHandle | None = None
        self._release: anyio.Event | None = None
        self._hosted: Any = None  # the Future of the task holding the manager entered
        self._left = threading.Event()
        self._leave_lock = threading.Lock()
        self._previous: dict[signal.Signals, Any] = {}
        self._interrupting: int | None = None
        self._deferred: int | None = None  # a WorkerInterrupted held back until editing() ends
        self._sigints = 0
        self._watchdog: ExitWatchdog | None = None

    def start(self, portal: BlockingPortal) -> None:
        _editing.after_editing = self._raise_deferred
        self.portal = portal
        self._hosted, _ = portal.start_task(self._host)
        for signum in self._signums:
            self._previous[signum] = signal.signal(signum, self._handle)

    async def _host(self, *, task_status: TaskStatus[None]) -> None:
        self._loop = LoopHandle()
        self._release = anyio.Event()
        self.loop_thread = threading.get_ident()
        async with self.manager:
            task_status.started()
            await self._release.wait()

    def leave(self) -> None:
        """Leave the manager (its last persist) and wait for it; from any thread, once."""
        with self._leave_lock:
            if not self._left.is_set():
                self._left.set()
                assert self._loop is not None
                assert self._release is not None
                self._loop.call_soon_threadsafe(self._release.set)
        self._hosted.result()

    def _raise_deferred(self) -> None:
        signum = self._deferred
        if signum is not None and threading.current_thread() is threading.main_thread():
            self._deferred = None
            if not self.worker_done.is_set():
                raise WorkerInterrupted(signum)

    def remove_handlers(self) -> None:
        _editing.after_editing = None
        for signum, previous in reversed(list(self._previous.items())):
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # The main thread, between two bytecodes of the worker (or of a wait it is in).
        if self._interrupting == signum and not self.worker_done.is_set():
            self._interrupting = None
            if _editing.editing_depth() > 0:
                # Inside editing(): raised as the block ends, so no change is left half done.
                self._deferred = signum
                return
            raise WorkerInterrupted(signum)
        if signum == signal.SIGINT:
            self._sigints += 1
            if self._sigints >= 2:
                hard_exit(128 + signum, "SIGINT received again: exiting at once, without persisting")
        name = signal.Signals(signum).name
        if self.signal is not None:
            logger.warning("%s received again; still stopping", name)
            return
        self.signal = signum
        received = time.monotonic()
        deadline = received + self.manager.close_timeout.total_seconds()
        self.stopping.set()
        logger.warning(
            "%s received: stop_requested() is True; the worker has %.1f s to return before "
            "WorkerInterrupted is raised into it",
            name,
            self._grace,
        )
        if self._exit_on_signal:
            self._watchdog = ExitWatchdog(EXIT_NOT_PERSISTED, deadline)
            self._watchdog.start()
        manager = self.manager
        if self._loop is not None:
            # The manager takes it as its own handler would: MIGRATING or ABORTING, and the
            # shutdown deadline counted from now. Private on purpose: only runners hand signals over.
            self._loop.call_soon_threadsafe(lambda: manager._on_shutdown_signal(signum, received))
        threading.Thread(
            target=self._stop_watch, args=(signum,), name="recoverable-state-stop-watch", daemon=True
        ).start()

    def _stop_watch(self, signum: int) -> None:
        if self.worker_done.wait(self._grace):
            return
        logger.error(
            "the worker did not return %.1f s after %s; raising WorkerInterrupted into it",
            self._grace,
            signal.Signals(signum).name,
        )
        self._interrupting = signum
        main = threading.main_thread().ident
        assert main is not None
        signal.pthread_kill(main, signum)  # a real signal: it also ends a sleep or a blocking call
        if self.worker_done.wait(self._grace):
            return
        logger.error("the worker still runs after WorkerInterrupted; persisting every state without it")
        try:
            self.leave()
            code = exit_code(self.manager)
        except BaseException:
            logger.exception("leaving the event manager failed")
            code = EXIT_NOT_PERSISTED
        hard_exit(
            code if code is not None else 128 + signum,
            "ending the process: its worker thread never returned (exit %d)",
            code if code is not None else 128 + signum,
        )

    def finish(self, on_signal: OnSignal, result: T | None) -> T | None:
        """After the manager was left: exit, raise or return as run() would."""
        from .events import ShutdownSignalReceived

        code = exit_code(self.manager)
        if self._watchdog is not None:
            if on_signal == "exit":
                self._watchdog.persisted(complete=self.manager.persisted_all, code=code)
            else:
                self._watchdog.cancel()
        if self.signal is not None:
            if on_signal == "exit":
                raise SystemExit(code)
            if on_signal == "raise":
                raise ShutdownSignalReceived(self.signal)
            return None
        if code == EXIT_NOT_PERSISTED:
            logger.error("not every state was persisted on the way out; exiting with %d", code)
            raise SystemExit(code)
        return result
