"""What a child of fork() inherits from the storage layer, made safe to use.

A forked child has one thread. The worker threads, checkpointers and batches
in flight of its parent are not there, but whatever they held is: a lock
held at the fork stays held in the child for ever, a batch in flight has no
leader to end it, and a SQLite connection in the middle of a call must not be
touched again. Objects holding such things register here (weakly), and are
called around every fork: before it (the parent waits, a bounded time, for
the transactions under way to end, so that the child inherits them idle), in
the parent after it, and in the child after it (fresh locks, no threads, no
batch in flight).

The hooks are registered with `os.register_at_fork` when the first object
registers, not at import.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Callable
from typing import Any, Protocol

FORK_WAIT = 1.0
"""Seconds a fork() waits, in all, for the storage transactions under way to end.

A transaction still under way then (a database another process holds) leaves
its backend unusable in the child, which is told so at its first call.
"""

_log = logging.getLogger("recoverable_state.storage")


class ForkAware(Protocol):
    def before_fork(self, deadline: float) -> None:
        """In the parent, before the fork: quiesce, waiting at most until `deadline` (monotonic)."""

    def after_fork_in_parent(self) -> None:
        """In the parent, after the fork: release what `before_fork` took."""

    def after_fork_in_child(self) -> None:
        """In the child, after the fork: fresh locks, no threads, nothing in flight."""


_watched: weakref.WeakSet[ForkAware] = weakref.WeakSet()
_forking: list[ForkAware] = []  # the objects one fork quiesced, from `before` to `after`
_hooked: list[bool] = []


def watch_forks(obj: ForkAware) -> None:
    """Call `obj` around every fork from now on, for as long as it lives."""
    if not _hooked:
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(before=_before, after_in_parent=_in_parent, after_in_child=_in_child)
        _hooked.append(True)
    _watched.add(obj)


def _before() -> None:
    deadline = time.monotonic() + FORK_WAIT
    _forking[:] = list(_watched)
    for obj in _forking:
        _call(obj.before_fork, deadline)


def _in_parent() -> None:
    for obj in _forking:
        _call(obj.after_fork_in_parent)
    _forking.clear()


def _in_child() -> None:
    for obj in _forking:
        _call(obj.after_fork_in_child)
    _forking.clear()


def _call(hook: Callable[..., Any], *args: float) -> None:
    # An error raised here would be printed and dropped by the interpreter; logged instead.
    try:
        hook(*args)
    except Exception:
        _log.exception("storage: preparing for fork() failed")
