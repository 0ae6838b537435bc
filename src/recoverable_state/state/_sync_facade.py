"""A state used from sync code inside run_sync(): `with RecoverableState(...)` and `persist_state_sync()`.

Each call goes to run_sync()'s event loop through the portal of the running
session (`_bridge`), with run_sync's WorkerInterrupted held back until it is done,
so a load, a save or a teardown is never abandoned halfway.
"""

from __future__ import annotations

from collections.abc import Awaitable
from types import TracebackType
from typing import Any, Protocol

from .._bridge import current_portal, interrupts_held
from ._editing import EditGuard


class _State(Protocol):
    """What the facade needs of the state it is mixed into."""

    @property
    def persist_state_key(self) -> str: ...
    def initialize(self) -> Awaitable[Any]: ...
    def teardown(self) -> Awaitable[None]: ...
    def persist_state(self) -> Awaitable[None]: ...
    def editing(self) -> EditGuard: ...
    def _edit_guard(self) -> EditGuard | None: ...


class SyncFacade:
    """The sync side of a RecoverableState (its async methods, run through run_sync's portal)."""

    def __enter__(self: _State) -> Any:
        """`with RecoverableState(...) as value:` in a run_sync() worker: initialize() through its loop."""
        portal = current_portal("`with RecoverableState(...)`")
        with interrupts_held():  # a WorkerInterrupted waits until the state is loaded
            value = portal.call(self.initialize)
        self.editing()  # made before the worker's first change, so no snapshot can miss it
        return value

    def __exit__(
        self: _State,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        portal = current_portal("`with RecoverableState(...)`")
        with interrupts_held():  # the last persist of this state is not abandoned halfway
            portal.call(self.teardown)

    def persist_state_sync(self: _State) -> None:
        """`persist_state()` for sync code inside run_sync(): returns once the write is durable."""
        guard = self._edit_guard()
        if guard is not None and guard.held_here:
            raise RuntimeError(
                f"key {self.persist_state_key!r}: persist_state_sync() inside `with state.editing():` would "
                "wait for itself; persist after the block"
            )
        portal = current_portal("persist_state_sync()")
        with interrupts_held():
            portal.call(self.persist_state)
