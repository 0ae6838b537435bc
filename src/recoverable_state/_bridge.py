"""What sync code inside run_sync() shares with the event loop's thread.

run_sync() runs a plain function in the main thread while an event loop runs
in a background thread. Sync code reaches that loop through the session run_sync
opens here: its portal (`with RecoverableState(...)`, `use_state_sync()`), and
its hold on interrupts: a WorkerInterrupted that arrives while a thread is inside
`with state.editing():` (or loads, saves or tears a state down from sync code)
waits until the thread leaves the outermost such block.

A process runs at most one run_sync() at a time; the session is that one.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Protocol

from anyio.from_thread import BlockingPortal


class SyncSession(Protocol):
    """The running run_sync(), as sync code sees it."""

    portal: BlockingPortal
    loop_thread: int | None

    def released(self) -> None:
        """A thread left its outermost hold: raise an interrupt held back meanwhile, if any."""


_session: SyncSession | None = None
_held = threading.local()  # how many holds (editing() blocks, sync state calls) the thread is inside


def open_session(session: SyncSession) -> None:
    """Make `session` the running run_sync() (RuntimeError when one runs already)."""
    global _session
    if _session is not None:
        raise RuntimeError("run_sync() is already running in this process")
    _session = session


def close_session(session: SyncSession) -> None:
    """The run_sync() of `session` ended."""
    global _session
    if _session is session:
        _session = None


def current_portal(what: str) -> BlockingPortal:
    """The portal to the running run_sync()'s event loop; RuntimeError outside one."""
    session = _session
    if session is None:
        raise RuntimeError(
            f"{what} from sync code works inside recoverable_state.run_sync(); "
            "in async code use `async with` and await instead"
        )
    if threading.get_ident() == session.loop_thread:
        raise RuntimeError(f"{what} was called from the event loop's thread; use the async API there")
    return session.portal


def hold_depth() -> int:
    """How many holds the calling thread is inside (0: an interrupt may be raised here)."""
    depth: int = getattr(_held, "depth", 0)
    return depth


def hold(step: int) -> int:
    """Enter (+1) or leave (-1) a hold in the calling thread; the depth now."""
    depth = hold_depth() + step
    _held.depth = depth
    return depth


def released() -> None:
    """Tell the session that the calling thread left its outermost hold normally."""
    session = _session
    if session is not None:
        session.released()


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold run_sync's WorkerInterrupted back while the block runs, as editing() does."""
    hold(1)
    try:
        yield
    except BaseException:
        hold(-1)
        raise
    if hold(-1) == 0:
        released()
