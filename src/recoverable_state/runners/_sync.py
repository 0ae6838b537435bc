"""run_sync(): a worker written without async, its EventManager on an event loop in a background thread.

The runtime itself (the loop's thread, the signal handlers, the stop watch) is
in `_sync_runtime.py`; here are the functions a sync worker calls.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from .. import _bridge
from .._config import as_timedelta, configuration_service
from ..events import (
    EXIT_NOT_PERSISTED,
    OnSignal,
    PreemptionNoticeKind,
    default_event_manager,
    event_manager_from_configuration,
    exit_guard,
    shutdown_signals,
)
from ..state import use_state
from ._run import check_backend
from ._sync_runtime import SyncRuntime

T = TypeVar("T")

DEFAULT_STOP_GRACE = 5.0
"""Seconds (at most; a fifth of the shutdown timeout when that is shorter) a worker has to stop."""


def stop_requested() -> bool:
    """Whether the process was asked to stop (SIGTERM, SIGINT, SIGHUP) while run_sync() runs.

    Poll it between units of work and return from the worker when it is True:
    every state is then persisted and the process exits with 128 + the signal.
    A worker that does not return within `stop_grace` gets WorkerInterrupted.
    Outside run_sync() it is always False.
    """
    runtime = SyncRuntime.current
    return runtime is not None and runtime.stopping.is_set()


def use_state_sync(
    key: str, default: dict[str, Any] | list[Any] | None = None, *, kvs_name: str | None = None
) -> Any:
    """`use_state()` for sync code inside run_sync(): the same auto-saved dict or list, in one line."""
    return _bridge.current_portal("use_state_sync()").call(lambda: use_state(key, default, kvs_name=kvs_name))


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
    check_backend(backend)
    if on_signal not in ("exit", "raise", "return"):
        raise ValueError(f"on_signal must be 'exit', 'raise' or 'return', not {on_signal!r}")
    if handle_signals and threading.current_thread() is not threading.main_thread():
        raise RuntimeError("run_sync(handle_signals=True) must be called in the main thread")
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
    runtime = SyncRuntime(
        manager,
        signums=shutdown_signals(handle_sighup=handle_sighup) if handle_signals else (),
        stop_grace=grace,
        exit_on_signal=on_signal == "exit",
    )
    _bridge.open_session(runtime)  # RuntimeError when a run_sync() runs already
    try:
        default_event_manager.set(manager)
        result = runtime.run(main, args, backend, backend_options)
    finally:
        _bridge.close_session(runtime)
        default_event_manager.release(manager)
        if manager.unfinished_listeners or runtime.unsaved:
            exit_guard(EXIT_NOT_PERSISTED)  # a thread stuck in a store must not keep the process alive
    return runtime.finish(on_signal, result)
