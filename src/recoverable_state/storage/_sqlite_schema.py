"""The SQLite backend's database: its tables, and a connection opened ready for use.

A record's version is the larger of its own and its row in `versions`, if any
(see the schema); databases of 0.1 are given the records' own version column.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from ._files_io import create_private_file, make_private_dirs
from ._sqlite_checkpoint import SELF_CHECKPOINT_PAGES, WAL_KEPT_BYTES

_CACHE_KIB = 64 * 1024  # the most page cache a connection keeps
BUSY_SECONDS = 30.0  # how long a writer waits for another process's transaction

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
-- The deltas appended to a record since its snapshot (_sqlite_deltas.py), in version order.
-- With a rowid: the values may be large, and then belong in the table, not in the key's b-tree.
-- Made here at every open: a database of an earlier release gets it, empty, and nothing else changes.
CREATE TABLE IF NOT EXISTS deltas (
    store_id TEXT NOT NULL,
    key TEXT NOT NULL,
    version INTEGER NOT NULL,
    value BLOB NOT NULL,
    content_type TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (store_id, key, version)
);
"""


def open_database(path: Path, busy_timeout: float = BUSY_SECONDS) -> tuple[sqlite3.Connection, bool]:
    """A connection in WAL mode, synchronous=FULL, the schema made; and whether SQLite has json_each.

    A statement waits up to `busy_timeout` seconds for another process's transaction.
    """
    # Private, as every file the library makes: SQLite gives its -wal and -shm the database's mode.
    if str(path) != ":memory:":  # SQLite's name for a database of this connection alone
        make_private_dirs(path.parent)
        create_private_file(path)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout)
    try:
        # Switching to WAL and creating the schema can meet SQLITE_BUSY without the busy
        # handler being consulted (several processes opening a new file at once): retry.
        deadline = time.monotonic() + busy_timeout
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                # Up to 64 MiB of pages kept (2 MiB by default): a persist of 1% of
                # 100,000 states then finds its rows' pages without reading them again.
                conn.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
                conn.execute(f"PRAGMA wal_autocheckpoint={SELF_CHECKPOINT_PAGES}")
                # The WAL file keeps the size of its largest stretch of writes unless told
                # otherwise: once copied back and started again, it is cut to this size.
                conn.execute(f"PRAGMA journal_size_limit={WAL_KEPT_BYTES}")
                # Debian's SQLite zeroes every page it frees (secure_delete=1), and so wrote a
                # big record's old pages as well as its new ones: twice the record per rewrite,
                # in the WAL and again in the database. FAST zeroes freed content only where it
                # writes the page anyway; what a freed overflow page held stays in the file
                # until the page is used again (docs/guides/secrets.md says so).
                conn.execute("PRAGMA secure_delete=FAST")
                conn.executescript(_SCHEMA)
                _add_record_versions(conn)
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
        return conn, False
    return conn, True


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
