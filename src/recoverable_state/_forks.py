"""What a child of fork() inherits from its parent, made safe to use.

A forked child has one thread. The worker threads, checkpointers, event loop
and batches in flight of its parent are not there, but whatever they held is:
a lock held at the fork stays held in the child for ever, a batch in flight
has no leader to end it, a SQLite connection in the middle of a call must not
be touched again, and a manager the parent had entered is not entered in the
child. Objects holding such things register here (weakly), and are called
around every fork: before it (the parent waits, a bounded time, for the
transactions under way to end, so that the child inherits them idle), in the
parent after it, and in the child after it (fresh locks, no threads, nothing
in flight). Each of the three methods is optional.

The hooks are registered with `os.register_at_fork` when the first object
registers, not at import.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Callable
from typing import Any

FORK_WAIT = 1.0
"""Seconds a fork() waits, in all, for the storage transactions under way to end.

A transaction still under way then (a database another process holds) leaves
its backend unusable in the child, which is told so at its first call.
"""

_log = logging.getLogger("recoverable_state")


_watched: weakref.WeakSet[Any] = weakref.WeakSet()
_forking: list[Any] = []  # the objects one fork quiesced, from `before` to `after`
_hooked: list[bool] = []


def watch_forks(obj: object) -> None:
    """Call `obj` around every fork from now on, for as long as it lives.

    Any of its methods: `before_fork(deadline)` in the parent before the fork (quiesce,
    waiting at most until `deadline`, monotonic), `after_fork_in_parent()` (release what
    `before_fork` took), `after_fork_in_child()` (fresh locks, no threads, nothing in flight).
    """
    if not _hooked:
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(before=_before, after_in_parent=_in_parent, after_in_child=_in_child)
        _hooked.append(True)
    _watched.add(obj)


def _before() -> None:
    deadline = time.monotonic() + FORK_WAIT
    _forking[:] = list(_watched)
    for obj in _forking:
        _call(obj, "before_fork", deadline)


def _in_parent() -> None:
    for obj in _forking:
        _call(obj, "after_fork_in_parent")
    _forking.clear()


def _in_child() -> None:
    for obj in _forking:
        _call(obj, "after_fork_in_child")
    _forking.clear()


def _call(obj: object, name: str, *args: float) -> None:
    hook: Callable[..., Any] | None = getattr(obj, name, None)
    if hook is None:
        return
    # An error raised here would be printed and dropped by the interpreter; logged instead.
    try:
        hook(*args)
    except Exception:
        _log.exception("%s of %r around fork() failed", name, obj)
