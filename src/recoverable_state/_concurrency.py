"""Everything in the library that differs between asyncio and trio, in one place.

Two things: starting a task that belongs to no task group (so a manager can be
left from any task, and a listener stuck past its timeout can be left behind),
and scheduling a call on the loop from another thread or from a signal handler.
Everything else stays runtime-neutral and goes through anyio or this module.

The one place where the library holds tasks outside a task group is
`LoopHandle.spawn`: each such task is owned by the EventManager that spawned it
(a listener call, a persist round) and ends with it, or is logged as left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import sniffio


class LoopHandle:
    """The running loop, as the manager uses it; made inside the loop."""

    def __init__(self) -> None:
        self._library = sniffio.current_async_library()
        self.thread = threading.get_ident()
        """The thread the loop runs in."""
        self._tasks: set[asyncio.Task[None]] = set()
        if self._library == "trio":
            import trio

            self._trio_token = trio.lowlevel.current_trio_token()
        else:
            self._loop = asyncio.get_running_loop()

    def spawn(self, make: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Start `make()` as a task of its own, outside any task group.

        The coroutine must not raise: a trio system task that raises ends the
        whole run. It runs with a copy of the caller's context variables.
        """
        context = contextvars.copy_context()
        if self._library == "trio":
            import trio

            trio.lowlevel.spawn_system_task(make, context=context)
        else:
            task = self._loop.create_task(make(), context=context)
            self._tasks.add(task)  # the loop holds tasks weakly
            task.add_done_callback(self._tasks.discard)

    def in_loop_thread(self) -> bool:
        """Whether the caller runs in the loop's thread (else it must hand calls over)."""
        return threading.get_ident() == self.thread

    def call_soon_threadsafe(self, fn: Callable[[], object]) -> None:
        """Run `fn()` in the loop soon, in a task of its own; safe from other threads and signal handlers.

        In a task, `fn` may use anyio (a plain loop callback cannot: anyio, through
        sniffio, finds no async library outside a task on asyncio). `fn` must not
        raise. Does nothing once the loop is closed.
        """
        if self._library == "trio":
            import trio

            with contextlib.suppress(trio.RunFinishedError):
                self._trio_token.run_sync_soon(self.spawn, lambda: _call(fn))
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed
                self._loop.call_soon_threadsafe(self.spawn, lambda: _call(fn))


async def _call(fn: Callable[[], object]) -> None:
    fn()


async def run_in_daemon_thread(loop: LoopHandle, fn: Callable[[], object], name: str) -> None:
    """Call `fn()` in a new daemon thread and wait for it; cancelling the wait abandons the thread.

    Unlike anyio's worker threads (which asyncio joins when the interpreter
    exits), a daemon thread stuck in a call never keeps the process alive.
    """
    done = anyio.Event()
    failure: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # handed to the awaiting task
            failure.append(exc)
        finally:
            loop.call_soon_threadsafe(done.set)

    threading.Thread(target=target, name=f"recoverable-state listener {name}", daemon=True).start()
    await done.wait()
    if failure:
        raise failure[0]
