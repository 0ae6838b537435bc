"""The SQLite backend's checkpointer: copies the WAL back into the database, off the commit's path."""

from __future__ import annotations

import ctypes
import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from ._backend import RecordWrite

CHECKPOINT_BYTES = 4 * 1024 * 1024  # values committed before the WAL is copied back, in the background
SELF_CHECKPOINT_PAGES = 32 * 1024  # WAL pages from which a commit copies it back itself (SQLite: 1,000)
CHECKPOINTER_IDLE = 5.0  # seconds without work after which the checkpointing thread ends
WAL_KEPT_BYTES = 16 * 1024 * 1024  # the WAL file is cut back to this size once copied back and restarted

_log = logging.getLogger("recoverable_state.storage")


def estimated_bytes(writes: Sequence[RecordWrite]) -> int:
    """About the bytes of the values in `writes`, from a sample of at most 128 of them.

    Summing all 100,000 of a big persist held the event loop 14 ms; the checkpointer
    needs only the order of magnitude.
    """
    step = max(1, len(writes) // 64)
    sample = writes[::step]
    return len(writes) * sum(len(w.value) for w in sample) // max(1, len(sample))


class Checkpointer:
    """Copies committed pages from the WAL back into the database file, in a thread of its own.

    SQLite does it inside the commit that takes the WAL past 1,000 pages, so a big
    persist waited for it: a third of a 10,000-record commit. The copy is not needed
    for durability (the commit has synced the WAL), so it runs here, after the commit
    returned. Should this thread stall, a commit still copies the WAL back itself
    once it passes SELF_CHECKPOINT_PAGES.

    SQLite starts the WAL again from its beginning (and cuts the file back to
    WAL_KEPT_BYTES) only at a commit that finds every frame copied back. A commit
    under way while the copy ran adds frames it did not copy, and the WAL then grew
    by every later commit, a big batch's worth of file kept for good. So while the
    file is bigger than that, every commit wakes the thread to copy what it added,
    until one finds the WAL copied back and starts it again.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._pending = 0
        self._settling = False  # the WAL file is past WAL_KEPT_BYTES: copy back after every commit
        self._working = threading.Lock()  # held while the thread uses its connection
        self._conn: sqlite3.Connection | None = None
        self._idle_at_fork = False

    def committed(self, nbytes: int) -> None:
        """Note `nbytes` of values committed; wake the thread once enough have been."""
        with self._lock:
            self._pending += nbytes
            if (self._pending < CHECKPOINT_BYTES and not self._settling) or self._stopping:
                return
            self._pending = 0
            self._wake.set()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._work, name=f"recoverable-state checkpoint {self._path.name}", daemon=True
                )
                self._thread.start()

    def stop(self) -> None:
        """End the thread, after a checkpoint under way (blocking)."""
        with self._lock:
            thread, self._stopping = self._thread, True
            self._wake.set()
        if thread is not None:
            thread.join()
        with self._lock:
            self._stopping, self._pending = False, 0
            self._wake.clear()

    def _work(self) -> None:
        try:
            while True:
                self._wake.wait(CHECKPOINTER_IDLE)
                with self._lock:
                    if self._stopping or not self._wake.is_set():
                        self._thread = None
                        return
                    self._wake.clear()
                with self._working:
                    self._checkpoint()
        finally:
            with self._working:
                conn, self._conn = self._conn, None
                if conn is not None:
                    conn.close()

    def _checkpoint(self) -> None:
        try:
            if self._conn is None:  # mode=rw: never create a database that went away
                self._conn = sqlite3.connect(
                    f"file:{quote(str(self._path))}?mode=rw",
                    uri=True,
                    isolation_level=None,
                    check_same_thread=False,
                )
                self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:  # the next commit past the limit checkpoints itself
            _log.debug("SQLite database %s: background checkpoint failed: %s", self._path, exc)
        try:
            settling = Path(f"{self._path}-wal").stat().st_size > WAL_KEPT_BYTES
        except OSError:  # gone with its database, or not made yet
            settling = False
        with self._lock:
            self._settling = settling

    # -- fork (see _forks.py) -------------------------------------------------

    def before_fork(self, deadline: float) -> None:
        self._idle_at_fork = self._working.acquire(timeout=max(0.0, deadline - time.monotonic()))

    def after_fork_in_parent(self) -> None:
        if self._idle_at_fork:
            self._working.release()

    def after_fork_in_child(self) -> bool:
        """Start again without the parent's thread; False when its connection was in use at the fork."""
        self._lock, self._working, self._wake = threading.Lock(), threading.Lock(), threading.Event()
        self._thread, self._stopping, self._pending, self._settling = None, False, 0, False
        conn, self._conn = self._conn, None
        return conn is None or let_go(conn, close=self._idle_at_fork)


def let_go(conn: sqlite3.Connection, *, close: bool) -> bool:
    """Close `conn`, or leave it unclosed and never freed; whether it was closed.

    A connection a forked child inherited idle is closed: SQLite's locks on a file are shared by all the
    connections of one process, and the child's new connection takes locks of
    its own only once the inherited one is gone. (Closing cannot delete the WAL
    under the parent: the parent's connection holds its shared lock.) One in use
    at the fork may hold SQLite's mutex for a thread the child does not have:
    it is never touched again, not even freed, which would take that mutex.
    """
    if close:
        try:
            conn.close()
        except sqlite3.Error as exc:
            _log.debug("closing a connection inherited through fork() failed: %s", exc)
        return True
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(conn))  # never freed, even at exit
    return False
