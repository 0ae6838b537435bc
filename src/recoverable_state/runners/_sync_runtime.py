"""The runtime of one run_sync(): the loop in a background thread, signals in the main thread.

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
from types import FrameType
from typing import Any, TypeVar

import anyio
from anyio.abc import TaskStatus
from anyio.from_thread import BlockingPortal, start_blocking_portal

from .. import _bridge
from .._concurrency import LoopHandle
from ..events import (
    EXIT_NOT_PERSISTED,
    EventManager,
    ExitWatchdog,
    OnSignal,
    ShutdownSignalReceived,
    exit_code,
    hard_exit,
)
from ._run import is_unsaved

T = TypeVar("T")

logger = logging.getLogger("recoverable_state")


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


class SyncRuntime:
    """One run_sync(): the portal, the hosted manager, the signal handlers and the stop watch.

    It is the `_bridge.SyncSession` of the process while it runs: sync code reaches
    the loop through its portal, and leaving an editing() block calls `released()`.
    """

    current: SyncRuntime | None = None
    """The run_sync() running in this process (for `stop_requested()`)."""

    def __init__(
        self,
        manager: EventManager,
        *,
        signums: tuple[signal.Signals, ...],
        stop_grace: float,
        exit_on_signal: bool,
    ) -> None:
        self.manager = manager
        self.portal: BlockingPortal  # set as the loop starts
        self.unsaved = False
        """Whether the worker ended with an error that says a state was not saved."""
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

    def run(
        self,
        main: Callable[..., T],
        args: tuple[Any, ...],
        backend: str,
        backend_options: dict[str, Any] | None,
    ) -> T | None:
        """Run `main(*args)` in this thread while the manager is entered on a loop in another."""
        result: T | None = None
        SyncRuntime.current = self
        try:
            with start_blocking_portal(backend, backend_options) as portal:
                self.start(portal)
                try:
                    result = main(*args)
                except WorkerInterrupted:
                    if self.signal is None:
                        raise
                    logger.warning("the worker was interrupted; persisting every state")
                except Exception as exc:
                    if not is_unsaved(exc):
                        raise
                    self.unsaved = True
                    logger.error("a state was not saved: %s", exc)
                finally:
                    self.worker_done.set()
                    self.leave()
                    self.remove_handlers()
        finally:
            SyncRuntime.current = None
        return result

    def start(self, portal: BlockingPortal) -> None:
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

    def released(self) -> None:
        """A thread left its outermost editing() block: raise the WorkerInterrupted held back, if any."""
        signum = self._deferred
        if signum is not None and threading.current_thread() is threading.main_thread():
            self._deferred = None
            if not self.worker_done.is_set():
                raise WorkerInterrupted(signum)

    def remove_handlers(self) -> None:
        for signum, previous in reversed(list(self._previous.items())):
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # The main thread, between two bytecodes of the worker (or of a wait it is in).
        if self._interrupting == signum and not self.worker_done.is_set():
            self._interrupting = None
            if _bridge.hold_depth() > 0:
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
            # shutdown deadline counted from now.
            self._loop.call_soon_threadsafe(
                lambda: manager.handle_shutdown_signal(signum, received_at=received)
            )
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
            code = self.exit_code()
        except BaseException:
            logger.exception("leaving the event manager failed")
            code = EXIT_NOT_PERSISTED
        hard_exit(
            code if code is not None else 128 + signum,
            "ending the process: its worker thread never returned (exit %d)",
            code if code is not None else 128 + signum,
        )

    def exit_code(self) -> int | None:
        """The code the process ends with now (None: no exit is due)."""
        persisted_all = self.manager.persisted_all and not self.unsaved
        return exit_code(self.manager.received_signal, persisted_all=persisted_all)

    def finish(self, on_signal: OnSignal, result: T | None) -> T | None:
        """After the manager was left: exit, raise or return as run() would."""
        code = self.exit_code()
        if self._watchdog is not None:
            if on_signal == "exit":
                self._watchdog.persisted(complete=self.manager.persisted_all, code=code or EXIT_NOT_PERSISTED)
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
