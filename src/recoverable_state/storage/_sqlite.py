"""SQLite backend, the default: one database file, WAL, synchronous=FULL, group commit."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence, Set
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread

from .._errors import StorageError, StoreNotFoundError
from .._forks import FORK_WAIT, watch_forks
from ._backend import Durability, RecordInfo, RecordWrite, StoredRecord, StoreInfo
from ._contract import Pair, WritePlan, by_store
from ._sqlite_checkpoint import Checkpointer, estimated_bytes, let_go
from ._sqlite_deltas import add_chains, append_deltas, drop_deltas, listing_columns, stores_with_deltas
from ._sqlite_schema import BUSY_SECONDS, open_database
from ._transactional import TransactionalBackend

T = TypeVar("T")

_UPSERT_RECORD = (
    "INSERT INTO records (store_id, key, value, content_type, updated_at, version) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (store_id, key) DO UPDATE SET "
    "value = excluded.value, content_type = excluded.content_type, "
    "updated_at = excluded.updated_at, version = excluded.version"
)

_VERSION = (
    "max(records.version, coalesce((SELECT v.version FROM versions AS v "
    "WHERE v.store_id = records.store_id AND v.key = records.key), 0))"
)
"""A record's version, in a query over `records`: its own, or a later claim's."""

_VERSION_OF_CHAINS = (
    "CASE WHEN EXISTS (SELECT 1 FROM deltas AS d "
    "WHERE d.store_id = records.store_id AND d.key = records.key) "
    "THEN (SELECT v.version FROM versions AS v WHERE v.store_id = records.store_id AND v.key = records.key) "
    f"ELSE {_VERSION} END"
)
"""The same, in a store with deltas. A record with deltas has its version in `versions` (each append
put it there), and reading its own column, stored after its value, would read every page of its
snapshot (SQLite follows the value's overflow pages to reach it): an append would cost the snapshot."""

_CHUNK = 500  # placeholders per IN (...) query, well under SQLite's limit
_SCAN_FROM = 1000  # keys of one store in a batch from which reading the store's range may be cheaper
_BUSY = re.compile(r"database is locked|database table is locked|database is busy")
_TABLES = ("records", "versions", "history", "deltas")  # what a store's or a record's rows live in


def _chunks(items: Sequence[T], size: int = _CHUNK) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _select(
    conn: sqlite3.Connection, columns: str, table: str, pairs: Sequence[tuple[str, str]]
) -> Iterator[tuple[Any, ...]]:
    """Rows of `table` for these (store_id, key) pairs, `key` first, then `columns`."""
    # `store_id = ? AND key IN (...)` uses the primary key; a row-value IN scans the table.
    for store_id, keys in by_store(pairs).items():
        if (
            len(keys) >= _SCAN_FROM
            and 2 * len(keys)
            >= conn.execute(f"SELECT count(*) FROM {table} WHERE store_id = ?", (store_id,)).fetchone()[0]
        ):
            # Most of the store: one pass over its range beats the IN lists by a third.
            wanted = set(keys)
            rows = conn.execute(f"SELECT key, {columns} FROM {table} WHERE store_id = ?", (store_id,))
            yield from ((store_id, *row) for row in rows if row[0] in wanted)
            continue
        for chunk in _chunks(keys):
            yield from (
                (store_id, *row)
                for row in conn.execute(
                    f"SELECT key, {columns} FROM {table} WHERE store_id = ? "
                    f"AND key IN ({','.join('?' * len(chunk))})",
                    (store_id, *chunk),
                )
            )


def _file_of(path: Path) -> tuple[int, int] | None:
    """The device and inode of the file at `path`, None when there is none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _ts(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def _stamp(known: dict[float, datetime], value: float) -> datetime:
    known[value] = stamp = _ts(value)
    return stamp


_new_record = tuple.__new__  # a record from its fields, without the NamedTuple's Python constructor


_SYNCHRONOUS = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
"""`PRAGMA synchronous` levels by number."""


class SQLiteBackend(TransactionalBackend[sqlite3.Connection]):
    """Stores records in one SQLite file; every batch is one durable transaction.

    One connection, used by one worker thread at a time; a transaction's handle is that connection.
    `busy_timeout`: how long, in seconds, a statement waits for another process's
    transaction before failing with a StorageError saying another process holds the
    database (set before first use; the CLI sets it from `--timeout`).
    """

    keeps_deltas = True

    def __init__(self, path: str | Path, *, busy_timeout: float = BUSY_SECONDS) -> None:
        super().__init__()
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self.url = f"sqlite:///{self.path}"
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._checkpointer = Checkpointer(self.path.absolute())
        self._wrote = 0  # bytes of values the transaction under way writes (the checkpointer's measure)
        self._json = True  # whether this SQLite has json_each (built in since 3.38)
        self._opened = self.path
        self._file: tuple[int, int] | None = None  # the database file's device and inode, once opened
        self._idle_at_fork = False
        self._inherited_busy = False  # forked while a transaction was under way: unusable here
        watch_forks(self)

    # -- plumbing -----------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn, self._json = open_database(self.path, self.busy_timeout)
            self._opened = self.path.absolute()  # as opened: a later chdir changes nothing
            self._file = _file_of(self._opened)
        elif _file_of(self._opened) != self._file:
            raise self._moved()
        return self._conn

    def _moved(self) -> StorageError:
        """The database file was deleted or replaced: what the connection wrote, no one would read."""
        what = "deleted" if _file_of(self._opened) is None else "replaced by another file"
        return StorageError(
            f"SQLite database {str(self.path)!r} was {what} while this process had it open: nothing is "
            "written to the file this process still holds, which no one would read again; the states "
            "stay in memory, and the process must be restarted to use the file now at that path"
        )

    async def _run(self, fn: Callable[[sqlite3.Connection], T], write: bool = False) -> T:
        """`fn` on the connection in a worker thread, in one transaction (BEGIN IMMEDIATE with `write`)."""

        def call() -> T:
            if self._inherited_busy:
                raise StorageError(
                    f"SQLite database {str(self.path)!r}: this process was forked while a transaction of "
                    f"its parent on it was under way (a fork waits {FORK_WAIT:g} s for one to end), and "
                    "cannot use the connection it inherited; use the 'spawn' or 'forkserver' start "
                    "method, or fork while nothing is being persisted"
                )
            with self._lock:
                try:
                    conn = self._connect()
                    self._wrote = 0
                    conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                    try:
                        result = fn(conn)
                    except BaseException:
                        conn.execute("ROLLBACK")
                        raise
                    conn.execute("COMMIT")
                    if self._wrote:
                        self._checkpointer.committed(self._wrote)
                    return result
                except sqlite3.Error as exc:
                    raise self._failed(exc) from exc
                except OSError as exc:  # its directory cannot be made or reached
                    raise StorageError(
                        f"SQLite database {str(self.path)!r} cannot be opened: {exc.strerror or exc}"
                        f" ({exc.filename or self.path.parent})"
                    ) from exc

        return await anyio.to_thread.run_sync(call)

    def _failed(self, exc: sqlite3.Error) -> StorageError:
        if isinstance(exc, sqlite3.OperationalError) and _BUSY.search(str(exc)):
            return StorageError(
                f"another process holds the SQLite database {str(self.path)!r}: it was still locked "
                f"after {self.busy_timeout:g} s of waiting ({exc})"
            )
        return StorageError(f"SQLite database {str(self.path)!r} failed: {exc}")

    async def run_transaction(
        self, fn: Callable[[sqlite3.Connection], T], *, write: bool, store_ids: Set[str]
    ) -> T:
        return await self._run(fn, write)

    # -- stores -------------------------------------------------------------

    async def open_store(self, *, name: str | None = None, id: str | None = None) -> StoreInfo:
        def find(conn: sqlite3.Connection) -> StoreInfo:
            if id is not None:
                row = conn.execute("SELECT id, name FROM stores WHERE id = ?", (id,)).fetchone()
                if row is None:
                    raise StoreNotFoundError(f"no store has this id in {self.url}", store=id)
                return StoreInfo(row[0], row[1])
            row = conn.execute("SELECT id, name FROM stores WHERE name = ?", (name,)).fetchone()
            if row is None:
                new_id = uuid.uuid4().hex
                conn.execute("INSERT INTO stores (id, name) VALUES (?, ?)", (new_id, name))
                return StoreInfo(new_id, name)
            return StoreInfo(row[0], row[1])

        return await self._run(find, write=True)

    async def list_stores(self) -> list[StoreInfo]:
        def rows(conn: sqlite3.Connection) -> list[StoreInfo]:
            cur = conn.execute("SELECT id, name FROM stores ORDER BY name, id")
            return [StoreInfo(i, n) for i, n in cur]

        return await self._run(rows)

    async def drop_store(self, store_id: str) -> None:
        def drop(conn: sqlite3.Connection) -> None:
            for table in _TABLES:
                conn.execute(f"DELETE FROM {table} WHERE store_id = ?", (store_id,))
            conn.execute("DELETE FROM stores WHERE id = ?", (store_id,))

        await self._run(drop, write=True)

    # -- records ------------------------------------------------------------

    def find_records(
        self, txn: sqlite3.Connection, store_ids: Set[str], pairs: Sequence[Pair]
    ) -> tuple[dict[str, StorageError], dict[Pair, StoredRecord]]:
        missing = self._missing_stores(txn, store_ids)
        if missing:
            pairs = [pair for pair in pairs if pair[0] not in missing]
        rows = _select(txn, f"value, content_type, {_VERSION}, updated_at", "records", pairs)
        stamps: dict[float, datetime] = {}  # the records written in one batch share their time
        found = {
            (sid, key): _new_record(StoredRecord, (key, value, ct, v, stamps.get(at) or _stamp(stamps, at)))
            for sid, key, value, ct, v, at in rows
        }
        add_chains(txn, found, store_ids - missing.keys())
        return missing, found

    def find_versions(
        self, txn: sqlite3.Connection, store_ids: Set[str], pairs: Sequence[Pair]
    ) -> tuple[dict[str, StorageError], dict[Pair, int]]:
        missing = self._missing_stores(txn, store_ids)
        if missing:
            pairs = [pair for pair in pairs if pair[0] not in missing]
        version = _VERSION_OF_CHAINS if stores_with_deltas(txn, store_ids - missing.keys()) else _VERSION
        return missing, {(sid, key): v for sid, key, v in _select(txn, version, "records", pairs)}

    def store_claims(self, txn: sqlite3.Connection, claimed: Mapping[Pair, int]) -> None:
        """Store the claimed versions: one statement per store, its claims as one JSON object.

        A statement per claim took 44 ms for 10,000 claims, most of it binding and
        stepping each; one statement with their JSON takes about 25 ms. (A SQLite built
        without JSON gets a statement per claim.)
        """
        if not self._json:
            txn.executemany(
                "INSERT INTO versions (store_id, key, version) VALUES (?, ?, ?) "
                "ON CONFLICT (store_id, key) DO UPDATE SET version = excluded.version",
                ((sid, key, version) for (sid, key), version in claimed.items()),
            )
            return
        claims: dict[str, dict[str, int]] = {}
        for (store_id, key), version in claimed.items():
            claims.setdefault(store_id, {})[key] = version
        for store_id, versions in claims.items():
            txn.execute(
                "INSERT INTO versions (store_id, key, version) "
                "SELECT ?, key, value FROM json_each(?) WHERE true "
                "ON CONFLICT (store_id, key) DO UPDATE SET version = excluded.version",
                (store_id, json.dumps(versions, ensure_ascii=False)),
            )

    def apply_plan(self, txn: sqlite3.Connection, plan: WritePlan) -> dict[Pair, StorageError]:
        now = time.time()
        if plan.deletes:
            for table in _TABLES:
                txn.executemany(f"DELETE FROM {table} WHERE store_id = ? AND key = ?", list(plan.deletes))
        writes = [w for w, _ in plan.rows.values()]
        if plan.rows:
            drop_deltas(txn, {sid for sid, _ in plan.rows}, plan.rows, self._json)
        txn.executemany(
            _UPSERT_RECORD,
            ((sid, key, w.value, w.content_type, now, v) for (sid, key), (w, v) in plan.rows.items()),
        )
        txn.executemany(
            "INSERT OR REPLACE INTO history (store_id, key, value, content_type, version, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [
                (sid, key, w.value, w.content_type, version, now)
                for (sid, key), change in plan.history.items()
                for version, w in change.added
            ],
        )
        txn.executemany(
            "DELETE FROM history WHERE store_id = ? AND key = ? AND version NOT IN "
            "(SELECT version FROM history WHERE store_id = ? AND key = ? ORDER BY version DESC LIMIT ?)",
            [(sid, key, sid, key, change.keep_total) for (sid, key), change in plan.history.items()],
        )
        if plan.appends:  # after the rows: a write then an append in one batch keeps the append
            self._wrote += append_deltas(txn, plan.appends, now)
        self._wrote += estimated_bytes(writes)
        return {}

    def apply_expected(self, txn: sqlite3.Connection, writes: Sequence[RecordWrite]) -> bool:
        """Each version moves on only where it is the expected one; when the count of moves
        falls short, nothing is kept and the batch is planned from the stored versions.

        Skipping that read of every version saves a third of a big batch's time. The
        snapshots written drop their records' deltas, looked for only in a store that has any.
        """
        if self._missing_stores(txn, store_ids := {w.store_id for w in writes}):
            return False
        now = time.time()
        txn.execute("SAVEPOINT expected")
        done = txn.executemany(
            "UPDATE records SET value = ?, content_type = ?, updated_at = ?, version = ? "
            f"WHERE store_id = ? AND key = ? AND {_VERSION} = ?",
            (  # a generator: 100,000 rows made and freed one at a time, not freed at once in C
                (w.value, w.content_type, now, w.expected_version + 1, w.store_id, w.key, w.expected_version)
                for w in writes
                if w.expected_version
            ),
        ).rowcount
        done += txn.executemany(
            "INSERT INTO records (store_id, key, value, content_type, updated_at, version) "
            "VALUES (?, ?, ?, ?, ?, 1) ON CONFLICT DO NOTHING",
            ((w.store_id, w.key, w.value, w.content_type, now) for w in writes if not w.expected_version),
        ).rowcount
        if done != len(writes):
            txn.execute("ROLLBACK TO expected")
        txn.execute("RELEASE expected")
        if done != len(writes):
            return False
        drop_deltas(txn, store_ids, ((w.store_id, w.key) for w in writes), self._json)
        self._wrote += estimated_bytes(writes)
        return True

    @classmethod
    def _missing_stores(cls, conn: sqlite3.Connection, store_ids: Set[str]) -> dict[str, StorageError]:
        """An error for each of these stores that does not exist."""
        return {
            store_id: StoreNotFoundError("no such store (was it dropped?)", store=store_id)
            for store_id in store_ids
            if conn.execute("SELECT 1 FROM stores WHERE id = ?", (store_id,)).fetchone() is None
        }

    @classmethod
    def _require_stores(cls, conn: sqlite3.Connection, store_ids: Set[str]) -> None:
        for error in cls._missing_stores(conn, store_ids).values():
            raise error

    async def list_records(
        self, store_id: str, *, exclusive_start_key: str | None = None, limit: int | None = None
    ) -> list[RecordInfo]:
        # A range over the primary key (store_id, key); BINARY collation compares the
        # UTF-8 bytes, which is code point order.
        after = ""
        params: tuple[Any, ...] = (store_id,)
        if exclusive_start_key is not None:
            after, params = "AND key > ? ", (store_id, exclusive_start_key)

        def listing(conn: sqlite3.Connection) -> list[RecordInfo]:
            self._require_stores(conn, {store_id})
            cur = conn.execute(
                f"SELECT key, {listing_columns(conn, store_id)}, {_VERSION} FROM records "
                f"WHERE store_id = ? {after}ORDER BY key LIMIT ?",
                (*params, -1 if limit is None else limit),
            )
            return [RecordInfo(k, size, ct, v, _ts(u)) for k, size, ct, u, v in cur]

        return await self._run(listing)

    async def purge_store(self, store_id: str) -> None:
        def purge(conn: sqlite3.Connection) -> None:
            self._require_stores(conn, {store_id})
            for table in _TABLES:
                conn.execute(f"DELETE FROM {table} WHERE store_id = ?", (store_id,))

        await self._run(purge, write=True)

    async def read_history(self, store_id: str, key: str) -> list[StoredRecord]:
        def history(conn: sqlite3.Connection) -> list[StoredRecord]:
            self._require_stores(conn, {store_id})
            cur = conn.execute(
                "SELECT key, value, content_type, version, updated_at FROM history "
                "WHERE store_id = ? AND key = ? ORDER BY version DESC",
                (store_id, key),
            )
            return [StoredRecord(k, val, ct, v, _ts(u)) for k, val, ct, v, u in cur]

        return await self._run(history)

    async def describe_durability(self) -> Durability:
        """The database's `synchronous` setting and journal mode, as SQLite reports them."""

        def read(conn: sqlite3.Connection) -> tuple[int, str]:
            return conn.execute("PRAGMA synchronous").fetchone()[0], conn.execute(
                "PRAGMA journal_mode"
            ).fetchone()[0]

        level, mode = await self._run(read)
        synchronous = _SYNCHRONOUS.get(level, str(level))
        durable = level >= 2 and mode.lower() in ("wal", "delete", "truncate", "persist")
        summary = (
            f"durable on commit: synchronous={synchronous}, journal_mode={mode} (each commit is fsynced)"
            if durable
            else "a commit can be lost at a power cut or an OS crash: "
            f"synchronous={synchronous}, journal_mode={mode}"
        )
        return Durability(
            "sqlite",
            durable,
            summary,
            {"path": str(self.path), "synchronous": synchronous, "journal_mode": mode},
        )

    # -- fork (see _forks.py) -------------------------------------------------

    def before_fork(self, deadline: float) -> None:
        """Wait (a bounded time) for the transaction under way: the child then inherits it idle."""
        self._idle_at_fork = self._lock.acquire(timeout=max(0.0, deadline - time.monotonic()))
        self._checkpointer.before_fork(deadline)

    def after_fork_in_parent(self) -> None:
        self._checkpointer.after_fork_in_parent()
        if self._idle_at_fork:
            self._lock.release()

    def after_fork_in_child(self) -> None:
        """A lock of its own; the parent's connection let go of, a new one opened at first use."""
        self._lock = threading.Lock()
        conn, self._conn = self._conn, None
        idle = conn is None or let_go(conn, close=self._idle_at_fork)
        if not self._checkpointer.after_fork_in_child() or not idle:
            self._inherited_busy = True

    async def aclose(self) -> None:
        def close() -> None:
            with self._lock:
                # First: the last connection to close then copies the WAL back and removes it.
                self._checkpointer.stop()
                # (Of a file since deleted or replaced, SQLite neither copies the WAL back
                # nor removes the -wal and -shm at the path: those of the file there now.)
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None

        await anyio.to_thread.run_sync(close)
