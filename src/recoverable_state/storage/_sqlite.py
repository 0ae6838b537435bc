"""SQLite backend, the default: one database file, WAL, synchronous=FULL, group commit."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import anyio.to_thread

from .._errors import StorageError, StoreNotFoundError
from ._backend import (
    RecordInfo,
    RecordRead,
    RecordWrite,
    StorageBackend,
    StoredRecord,
    StoreInfo,
    WriteOutcome,
)
from ._contract import by_store, claim_reads, compare_and_set, expected_outcomes, plan_writes

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS stores (
    id TEXT PRIMARY KEY,
    name TEXT UNIQUE
);
CREATE TABLE IF NOT EXISTS records (
    store_id TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    content_type TEXT NOT NULL,
    updated_at REAL NOT NULL,
    version INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (store_id, key)
);
-- A record's version is the larger of its own and its row here, if any. A claim bumps the
-- version here, in a narrow table: claiming 10,000 records on load rewrites 10,000 small rows
-- instead of 10,000 whole records. A write sets the record's own version, past any claim,
-- and writes nothing here: a persist then touches the records' pages alone.
-- (Databases of 0.1 kept every version here; their records' own version reads 0.)
CREATE TABLE IF NOT EXISTS versions (
    store_id TEXT NOT NULL,
    key TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (store_id, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS history (
    store_id TEXT NOT NULL,
    key TEXT NOT NULL,
    version INTEGER NOT NULL,
    value BLOB NOT NULL,
    content_type TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (store_id, key, version)
);
"""

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

_CACHE_KIB = 64 * 1024  # the most page cache a connection keeps
_CHECKPOINT_BYTES = 4 * 1024 * 1024  # values committed before the WAL is copied back, in the background
_SELF_CHECKPOINT_PAGES = 32 * 1024  # WAL pages from which a commit copies it back itself (SQLite: 1,000)
_CHECKPOINTER_IDLE = 5.0  # seconds without work after which the checkpointing thread ends

_BUSY_SECONDS = 30.0  # how long a writer waits for another process's transaction
_CHUNK = 500  # placeholders per IN (...) query, well under SQLite's limit
_SCAN_FROM = 1000  # keys of one store in a batch from which reading the store's range may be cheaper


def _chunks(items: Sequence[T], size: int = _CHUNK) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _ts(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def _stamp(known: dict[float, datetime], value: float) -> datetime:
    known[value] = stamp = _ts(value)
    return stamp


_log = logging.getLogger("recoverable_state.storage")


def _estimated_bytes(writes: Sequence[RecordWrite]) -> int:
    """About the bytes of the values in `writes`, from a sample of at most 128 of them.

    Summing all 100,000 of a big persist held the event loop 14 ms; the checkpointer
    needs only the order of magnitude.
    """
    step = max(1, len(writes) // 64)
    sample = writes[::step]
    return len(writes) * sum(len(w.value) for w in sample) // max(1, len(sample))


class _Checkpointer:
    """Copies committed pages from the WAL back into the database file, in a thread of its own.

    SQLite does it inside the commit that takes the WAL past 1,000 pages, so a big
    persist waited for it: a third of a 10,000-record commit. The copy is not needed
    for durability (the commit has synced the WAL), so it runs here, after the commit
    returned. Should this thread stall, a commit still copies the WAL back itself
    once it passes _SELF_CHECKPOINT_PAGES.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._pending = 0

    def committed(self, nbytes: int) -> None:
        """Note `nbytes` of values committed; wake the thread once enough have been."""
        with self._lock:
            self._pending += nbytes
            if self._pending < _CHECKPOINT_BYTES or self._stopping:
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
        conn: sqlite3.Connection | None = None
        try:
            while True:
                self._wake.wait(_CHECKPOINTER_IDLE)
                with self._lock:
                    if self._stopping or not self._wake.is_set():
                        self._thread = None
                        return
                    self._wake.clear()
                try:
                    if conn is None:  # mode=rw: never create a database that went away
                        conn = sqlite3.connect(
                            f"file:{quote(str(self._path))}?mode=rw", uri=True, isolation_level=None
                        )
                        conn.execute("PRAGMA synchronous=FULL")
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:  # the next commit past the limit checkpoints itself
                    _log.debug("SQLite database %s: background checkpoint failed: %s", self._path, exc)
        finally:
            if conn is not None:
                conn.close()


class SQLiteBackend(StorageBackend):
    """Stores records in one SQLite file; every batch is one durable transaction."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._checkpointer = _Checkpointer(self.path.absolute())
        self._json = True  # whether this SQLite has json_each (built in since 3.38)

    # -- plumbing -----------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=_BUSY_SECONDS
            )
            try:
                # Switching to WAL and creating the schema can meet SQLITE_BUSY without the busy
                # handler being consulted (several processes opening a new file at once): retry.
                deadline = time.monotonic() + _BUSY_SECONDS
                while True:
                    try:
                        conn.execute("PRAGMA journal_mode=WAL")
                        conn.execute("PRAGMA synchronous=FULL")
                        # Up to 64 MiB of pages kept (2 MiB by default): a persist of 1% of
                        # 100,000 states then finds its rows' pages without reading them again.
                        conn.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
                        conn.execute(f"PRAGMA wal_autocheckpoint={_SELF_CHECKPOINT_PAGES}")
                        conn.executescript(_SCHEMA)
                        self._add_record_versions(conn)
                        break
                    except sqlite3.OperationalError as exc:
                        if "locked" not in str(exc) or time.monotonic() > deadline:
                            raise
                        time.sleep(0.01)
            except BaseException:
                conn.close()
                raise
            try:
                conn.execute("SELECT count(*) FROM json_each('{}')")
            except sqlite3.OperationalError:
                self._json = False
            self._conn = conn
        return self._conn

    @staticmethod
    def _add_record_versions(conn: sqlite3.Connection) -> None:
        """Give a database of 0.1 (every version in `versions`) the records' own version column."""
        columns = [row[1] for row in conn.execute("PRAGMA table_info(records)")]
        if "version" in columns:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            columns = [row[1] for row in conn.execute("PRAGMA table_info(records)")]
            if "version" not in columns:  # another process may have added it meanwhile
                conn.execute("ALTER TABLE records ADD COLUMN version INTEGER NOT NULL DEFAULT 0")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    async def _run(self, fn: Callable[[sqlite3.Connection], T], write: bool = False, wrote: int = 0) -> T:
        """`fn` on the connection in a worker thread; with `write`, in one transaction.

        `wrote`: the bytes of values the transaction writes (the checkpointer's measure).
        """

        def call() -> T:
            with self._lock:
                try:
                    conn = self._connect()
                    if not write:
                        return fn(conn)
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        result = fn(conn)
                    except BaseException:
                        conn.execute("ROLLBACK")
                        raise
                    conn.execute("COMMIT")
                    if wrote:
                        self._checkpointer.committed(wrote)
                    return result
                except sqlite3.Error as exc:
                    raise StorageError(f"SQLite database {str(self.path)!r} failed: {exc}") from exc
                except OSError as exc:  # its directory cannot be made or reached
                    raise StorageError(
                        f"SQLite database {str(self.path)!r} cannot be opened: {exc.strerror or exc}"
                        f" ({exc.filename or self.path.parent})"
                    ) from exc

        return await anyio.to_thread.run_sync(call)

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
            for table in ("records", "versions", "history"):
                conn.execute(f"DELETE FROM {table} WHERE store_id = ?", (store_id,))
            conn.execute("DELETE FROM stores WHERE id = ?", (store_id,))

        await self._run(drop, write=True)

    # -- records ------------------------------------------------------------

    @staticmethod
    def _select(
        conn: sqlite3.Connection, columns: str, table: str, pairs: Sequence[tuple[str, str]]
    ) -> Iterator[tuple[Any, ...]]:
        """Rows of `table` for these (store_id, key) pairs, `key` first, then `columns`."""
        # `store_id = ? AND key IN (...)` uses the primary key; a row-value IN scans the table.
        for store_id, keys in by_store(pairs).items():
            if len(keys) >= _SCAN_FROM and 2 * len(keys) >= conn.execute(
                f"SELECT count(*) FROM {table} WHERE store_id = ?", (store_id,)
            ).fetchone()[0]:
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

    async def read_batch(self, reads: Sequence[RecordRead]) -> list[StoredRecord | StorageError | None]:
        claims = any(r.claim for r in reads)

        def read(conn: sqlite3.Connection) -> list[StoredRecord | StorageError | None]:
            missing = self._missing_stores(conn, {r.store_id for r in reads})
            pairs = [(r.store_id, r.key) for r in reads if r.store_id not in missing]
            rows = self._select(conn, f"value, content_type, {_VERSION}, updated_at", "records", pairs)
            found = {(row[0], row[1]): row for row in rows}
            answers, bumped = claim_reads(reads, {pair: row[4] for pair, row in found.items()}, missing)
            stamps: dict[float, datetime] = {}  # the records written in one batch share their time
            results: list[StoredRecord | StorageError | None] = []
            for r, answer in zip(reads, answers, strict=True):
                if answer is None or isinstance(answer, StorageError):
                    results.append(answer)
                    continue
                _, key, value, content_type, _, at = found[(r.store_id, r.key)]
                stamp = stamps.get(at) or _stamp(stamps, at)
                results.append(StoredRecord(key, value, content_type, answer, stamp))
            self._claim(conn, bumped)
            return results

        return await self._run(read, write=claims)

    def _claim(self, conn: sqlite3.Connection, bumped: dict[tuple[str, str], int]) -> None:
        """Store the claimed versions: one statement per store, its claims as one JSON object.

        A statement per claim took 44 ms for 10,000 claims, most of it binding and
        stepping each; one statement with their JSON takes about 25 ms. (A SQLite built
        without JSON gets a statement per claim.)
        """
        if not self._json:
            conn.executemany(
                "INSERT INTO versions (store_id, key, version) VALUES (?, ?, ?) "
                "ON CONFLICT (store_id, key) DO UPDATE SET version = excluded.version",
                [(sid, key, version) for (sid, key), version in bumped.items()],
            )
            return
        claims: dict[str, dict[str, int]] = {}
        for (store_id, key), version in bumped.items():
            claims.setdefault(store_id, {})[key] = version
        for store_id, versions in claims.items():
            conn.execute(
                "INSERT INTO versions (store_id, key, version) "
                "SELECT ?, key, value FROM json_each(?) WHERE true "
                "ON CONFLICT (store_id, key) DO UPDATE SET version = excluded.version",
                (store_id, json.dumps(versions, ensure_ascii=False)),
            )

    async def write_batch(self, writes: Sequence[RecordWrite]) -> list[WriteOutcome | StorageError]:
        def write(conn: sqlite3.Connection) -> list[WriteOutcome | StorageError]:
            missing = self._missing_stores(conn, {w.store_id for w in writes})
            expected = None if missing else expected_outcomes(writes)
            if expected is not None and self._write_as_expected(conn, writes):
                return list(expected)
            pairs = [(w.store_id, w.key) for w in writes if w.store_id not in missing]
            stored = {(sid, key): v for sid, key, v in self._select(conn, _VERSION, "records", pairs)}
            plan = plan_writes(writes, stored, missing)
            now = time.time()
            conn.executemany(
                _UPSERT_RECORD,
                [(sid, key, w.value, w.content_type, now, v) for (sid, key), (w, v) in plan.rows.items()],
            )
            conn.executemany(
                "INSERT OR REPLACE INTO history (store_id, key, value, content_type, version, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (sid, key, w.value, w.content_type, version, now)
                    for (sid, key), change in plan.history.items()
                    for version, w in change.added
                ],
            )
            conn.executemany(
                "DELETE FROM history WHERE store_id = ? AND key = ? AND version NOT IN "
                "(SELECT version FROM history WHERE store_id = ? AND key = ? ORDER BY version DESC LIMIT ?)",
                [
                    (sid, key, sid, key, change.keep_total)
                    for (sid, key), change in plan.history.items()
                ],
            )
            return plan.outcomes

        return await self._run(write, write=True, wrote=_estimated_bytes(writes))

    @staticmethod
    def _write_as_expected(conn: sqlite3.Connection, writes: Sequence[RecordWrite]) -> bool:
        """Apply a batch that `expected_outcomes` answers, if every write finds its expected version.

        Each version moves on only where it is the expected one; when the count of moves
        falls short, nothing is kept and the caller plans the batch from the stored versions.
        Skipping that read of every version saves a third of a big batch's time.
        """
        now = time.time()
        conn.execute("SAVEPOINT expected")
        done = conn.executemany(
            "UPDATE records SET value = ?, content_type = ?, updated_at = ?, version = ? "
            f"WHERE store_id = ? AND key = ? AND {_VERSION} = ?",
            [
                (w.value, w.content_type, now, w.expected_version + 1, w.store_id, w.key, w.expected_version)
                for w in writes
                if w.expected_version
            ],
        ).rowcount
        done += conn.executemany(
            "INSERT INTO records (store_id, key, value, content_type, updated_at, version) "
            "VALUES (?, ?, ?, ?, ?, 1) ON CONFLICT DO NOTHING",
            [(w.store_id, w.key, w.value, w.content_type, now) for w in writes if not w.expected_version],
        ).rowcount
        if done != len(writes):
            conn.execute("ROLLBACK TO expected")
        conn.execute("RELEASE expected")
        return done == len(writes)

    @classmethod
    def _missing_stores(cls, conn: sqlite3.Connection, store_ids: set[str]) -> dict[str, StorageError]:
        """An error for each of these stores that does not exist."""
        return {
            store_id: StoreNotFoundError("no such store (was it dropped?)", store=store_id)
            for store_id in store_ids
            if conn.execute("SELECT 1 FROM stores WHERE id = ?", (store_id,)).fetchone() is None
        }

    @classmethod
    def _require_stores(cls, conn: sqlite3.Connection, store_ids: set[str]) -> None:
        for error in cls._missing_stores(conn, store_ids).values():
            raise error

    async def delete(self, store_id: str, key: str, expected_version: int | None = None) -> bool:
        def delete(conn: sqlite3.Connection) -> bool:
            self._require_stores(conn, {store_id})
            row = conn.execute(
                f"SELECT {_VERSION} FROM records WHERE store_id = ? AND key = ?", (store_id, key)
            ).fetchone()
            if row is None or not compare_and_set(expected_version, row[0]):
                return False
            for table in ("records", "versions", "history"):
                conn.execute(f"DELETE FROM {table} WHERE store_id = ? AND key = ?", (store_id, key))
            return True

        return await self._run(delete, write=True)

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
                f"SELECT key, length(value), content_type, {_VERSION}, updated_at FROM records "
                f"WHERE store_id = ? {after}ORDER BY key LIMIT ?",
                (*params, -1 if limit is None else limit),
            )
            return [RecordInfo(k, size, ct, v, _ts(u)) for k, size, ct, v, u in cur]

        return await self._run(listing)

    async def purge_store(self, store_id: str) -> None:
        def purge(conn: sqlite3.Connection) -> None:
            self._require_stores(conn, {store_id})
            for table in ("records", "versions", "history"):
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

    async def aclose(self) -> None:
        def close() -> None:
            with self._lock:
                # First: the last connection to close then copies the WAL back and removes it.
                self._checkpointer.stop()
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None

        await anyio.to_thread.run_sync(close)
