"""The PostgreSQL backend's connections: a small pool, and one transaction run to a known outcome.

Connections open on demand in the calling worker thread, so the retry budget
alone decides how long, and how often, an unreachable server is tried
(psycopg_pool reconnects in the background on a schedule of its own). A
transaction whose COMMIT reply was lost is asked about on the next attempt
(`txid_status`), so that it is applied at most once and reports what happened.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import psycopg
import psycopg.errors
from psycopg.pq import TransactionStatus

from ._server import Failure

Connection: TypeAlias = "psycopg.Connection[Any]"

_REFUSED_LOGIN = re.compile(
    r"authentication failed|no password supplied|pg_hba\.conf|role \".*\" does not exist"
    r"|does not have CONNECT privilege|SCRAM|password",
    re.IGNORECASE,
)
"""A failed connection whose text says the credentials were refused. libpq reports a
failed login without a SQLSTATE, so its message (the server's, in English) is all there is."""

_TRANSIENT_LOGIN = re.compile(
    r"starting up|shutting down|in recovery|too many|connection slots|not yet accepting",
    re.IGNORECASE,
)
"""A failed connection whose text says the server will take connections again soon."""


def failure(exc: psycopg.Error) -> Failure:
    """What kind of failure a driver error is."""
    if isinstance(exc, psycopg.errors.ConnectionTimeout):  # took the connection, no reply
        return Failure.SILENT
    if isinstance(
        exc,
        psycopg.errors.LockNotAvailable  # lock_timeout
        | psycopg.errors.QueryCanceled  # statement_timeout
        | psycopg.errors.TransactionRollback,  # deadlock, serialisation
    ):
        return Failure.BUSY
    if not isinstance(exc, psycopg.OperationalError):
        return Failure.FAILED
    state = exc.sqlstate
    if state is None:  # the client lost, or never had, a connection
        text = str(exc)
        if _REFUSED_LOGIN.search(text):
            return Failure.AUTHENTICATION
        if "FATAL:" in text and not _TRANSIENT_LOGIN.search(text):
            return Failure.FAILED  # the server answered: no such database, and the like
        return Failure.UNREACHABLE
    if state.startswith("28"):  # invalid authorization specification, invalid password
        return Failure.AUTHENTICATION
    # 08: connection exceptions, 53: too many connections and the like, 57P: shutdown, startup.
    if state[:2] in ("08", "53") or state.startswith("57P"):
        return Failure.UNREACHABLE
    return Failure.FAILED


def millis(seconds: float) -> int:
    """A server timeout setting in ms (never 0, which would mean "no limit")."""
    return max(math.ceil(seconds * 1000), 1)


def bound(conn: Connection, deadline: float) -> None:
    """Bound the current transaction's lock waits and statements by `deadline`.

    Set per transaction (not per session, which PgBouncer's transaction pooling
    would not keep, and whose startup `options` it refuses). The lock timeout
    comes first, for its clearer message.
    """
    left = deadline - time.monotonic()
    conn.execute(
        "SELECT set_config('lock_timeout', %s, true), set_config('statement_timeout', %s, true)",
        (str(millis(left)), str(millis(left + 0.1))),
    )


def shut_down(conn: Connection) -> None:
    """Shut the connection's socket down, from any thread: its waiting user wakes with an error."""
    with contextlib.suppress(Exception):
        fd = conn.pgconn.socket
        with socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as sock:  # a duplicate fd
            sock.shutdown(socket.SHUT_RDWR)


class Retry(Exception):
    """A concurrent insert beat this batch to a new key: roll back, run again at once."""


class PoolBusy(Exception):
    """Every pooled connection stayed in use until the deadline."""


@dataclass
class Pending:
    """A transaction whose COMMIT was in flight when its connection dropped."""

    xid: int
    backend_pid: int
    result: Any


@dataclass
class Transaction:
    """One logical operation, run in attempts until it is known to have committed once."""

    body: Callable[[Connection], Any]
    mutating: bool
    pending: Pending | None = None
    conn: Connection | None = None
    """The connection an attempt is using right now (to interrupt it)."""

    def interrupt(self) -> None:
        """Make the attempt in progress, if any, end at once (its connection is lost)."""
        conn = self.conn
        if conn is not None:
            shut_down(conn)


class Pool:
    """At most `size` connections, opened on demand in the calling (worker) thread."""

    def __init__(self, conninfo: str, size: int) -> None:
        self._conninfo = conninfo
        self._idle: list[Connection] = []
        self._size = size
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()

    def get(self, deadline: float) -> Connection:
        """A connection, waiting for a free slot and connecting by `deadline` at most."""
        wait = max(deadline - time.monotonic(), 0.01)
        if not self._slots.acquire(timeout=wait):
            raise PoolBusy(f"all {self._size} connections stayed in use")
        try:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None or conn.closed:
                # libpq counts whole seconds, at least 2; the caller stops waiting at the deadline.
                left = math.ceil(max(deadline - time.monotonic(), 0))
                # No server-side prepared statements: behind PgBouncer's transaction pooling the
                # next transaction may meet another server connection (docs/dev/fleet-findings.md).
                conn = psycopg.connect(
                    self._conninfo, autocommit=False, connect_timeout=max(left, 2), prepare_threshold=None
                )
            return conn
        except BaseException:
            self._slots.release()
            raise

    def put(self, conn: Connection) -> None:
        try:
            if conn.closed or conn.broken or conn.info.transaction_status != TransactionStatus.IDLE:
                conn.close()
            else:
                with self._lock:
                    self._idle.append(conn)
        finally:
            self._slots.release()

    def let_go(self) -> None:
        """In a forked child: drop the parent's idle connections without a word to the server.

        Their sockets are the parent's too: closing them the usual way would end the
        parent's sessions (libpq's Terminate message), and using them would interleave
        two processes on one session. Only this process's copy of each socket is
        closed; psycopg never finishes a connection made in another process.
        """
        idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                os.close(conn.pgconn.socket)

    def discard_idle(self) -> None:
        """Close idle connections: after a lost connection the others are likely dead too."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def attempt(self, txn: Transaction, deadline: float, prepare: Callable[[Connection, float], None]) -> Any:
        """One attempt at a transaction, in a worker thread; `prepare(conn, deadline)` comes first.

        The body runs in pipeline mode: its statements travel together until it
        fetches a result (so a body reads results by fetching, never `rowcount`).
        A body may raise Retry to be rolled back and run again at once.
        """
        conn = self.get(deadline)
        txn.conn = conn
        try:
            prepare(conn, deadline)
            if txn.pending is not None:
                committed, result = self._resolve(conn, txn.pending, deadline)
                txn.pending = None
                if committed:
                    return result
            while True:
                try:
                    with conn.pipeline():
                        if not txn.mutating:
                            # One snapshot for the whole read: a record's row and its deltas,
                            # read by two statements, must not see a batch committed between
                            # them. Read-only, it cannot meet a serialisation failure.
                            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                        bound(conn, deadline)
                        xid = conn.execute("SELECT txid_current()") if txn.mutating else None
                        result = txn.body(conn)
                except Retry:
                    conn.rollback()
                    continue
                if xid is not None:
                    row = xid.fetchone()
                    assert row is not None
                    txn.pending = Pending(int(row[0]), conn.info.backend_pid, result)
                conn.commit()  # if this raises, txn.pending says what to ask next time
                txn.pending = None
                return result
        except BaseException:
            if not conn.closed and conn.info.transaction_status != TransactionStatus.IDLE:
                try:
                    conn.rollback()
                except psycopg.Error:
                    conn.close()
            if conn.closed or conn.broken:
                self.discard_idle()  # the server likely dropped those too
            raise
        finally:
            txn.conn = None
            self.put(conn)

    @staticmethod
    def _resolve(conn: Connection, pending: Pending, deadline: float) -> tuple[bool, Any]:
        """Whether a transaction whose COMMIT outcome was lost did commit."""
        while True:
            try:
                bound(conn, deadline)
                row = conn.execute("SELECT txid_status(%s)", (pending.xid,)).fetchone()
            except psycopg.errors.InvalidParameterValue:
                # "in the future": the server restarted before that id reached its WAL.
                conn.rollback()
                return False, None
            conn.commit()
            status = row[0] if row is not None else None
            if status == "committed":
                return True, pending.result
            if status != "in progress":
                return False, None
            if time.monotonic() > deadline:
                raise PoolBusy(f"transaction {pending.xid} stayed in progress")
            # Its session lives on (the connection broke on our side only): end it.
            conn.execute("SELECT pg_terminate_backend(%s)", (pending.backend_pid,))
            conn.commit()
            time.sleep(0.01)
