"""`state.editing()`: a worker groups its changes so that no snapshot is taken between them.

The worker (any thread, usually run_sync's main thread) holds an EditGuard while
it changes the value; a persist claims the guard only while it serialises the
value, which is a synchronous pass with no await in it. So a worker waits at
most one serialisation, and a persist writes the other states and then waits
(without blocking the event loop) until the worker lets go.
"""

from __future__ import annotations

import threading
from types import TracebackType

from .. import _bridge

_GIVE_WAY = 0.1
"""Seconds a worker entering editing() waits for a persist that wants a snapshot (so it is never
starved by a worker that holds the state nearly all the time); after that it goes in anyway."""


class EditGuard:
    """Held by a worker while it changes a state (re-entrant in its thread); claimed by a snapshot."""

    __slots__ = ("_cond", "_depth", "_owner", "_snapshotting", "_wanted")

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self._snapshotting = False
        self._wanted = False  # a persist waits for the worker to let go

    def __enter__(self) -> EditGuard:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                _bridge.hold(1)
                return self
            if not self._cond.wait_for(self._free_and_unwanted, _GIVE_WAY):
                self._cond.wait_for(self._free)
            self._owner, self._depth = me, 1
        _bridge.hold(1)
        return self

    def _free(self) -> bool:
        return self._owner is None and not self._snapshotting

    def _free_and_unwanted(self) -> bool:
        return self._owner is None and not self._snapshotting and not self._wanted

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with self._cond:
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()
        if _bridge.hold(-1) == 0 and exc_type is None:
            _bridge.released()  # run_sync raises a WorkerInterrupted it held back meanwhile

    @property
    def held_here(self) -> bool:
        """Whether the calling thread holds the guard."""
        return self._owner == threading.get_ident()

    def try_claim(self) -> bool:
        """Claim the guard for a snapshot if no worker holds it; never waits."""
        with self._cond:
            if self._owner is not None or self._snapshotting:
                self._wanted = True
                return False
            self._snapshotting = True
            self._wanted = False
            return True

    def withdraw(self) -> None:
        """The persist no longer waits for this guard."""
        with self._cond:
            self._wanted = False
            self._cond.notify_all()

    def release_claim(self) -> None:
        """The snapshot is taken: let the worker in again."""
        with self._cond:
            self._snapshotting = False
            self._cond.notify_all()
