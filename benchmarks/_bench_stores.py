"""The stores the persist benchmarks run on: fresh places, library backends, raw drivers.

Every repetition gets a fresh place (a new directory, database file, or store
name on a shared server), so no measurement sees data another one left behind.
A place is used twice: by the library through `open_backend(place.url)`, and
by the raw baseline, which writes the same bytes with the store's driver
directly, in the best batch that driver offers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread

from recoverable_state import KeyValueStore, StorageBackend, open_backend
from recoverable_state.storage import MemoryBackend

T = TypeVar("T")

Rows = Sequence[tuple[str, bytes]]
"""(key, serialised model) pairs, in key order."""

RAW_FILE_THREADS = 8

log = logging.getLogger("bench")


@dataclass(frozen=True)
class Place:
    """Where one repetition keeps its data."""

    url: str
    """The storage URL the library opens."""
    kvs_name: str
    """The key-value store name the states use."""
    path: Path | None
    """The directory holding the data (None on a server or in memory)."""
    tag: str
    """A unique tag: raw tables and key prefixes on servers carry it."""


class RawStore:
    """The raw baseline: the store's driver used directly, with no library in between."""

    async def write(self, rows: Rows, *, durable: bool = True) -> None:
        """Write every row in the best batch the driver offers; durable when asked."""
        raise NotImplementedError

    async def read_all(self, keys: Sequence[str]) -> list[bytes]:
        """Read the value of every key (one query, or every file), in the order of `keys`."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections and threads."""


class Store:
    """One kind of store: hands out places, library backends on them, and raw drivers."""

    name = ""
    durable_on_disk = False
    """Whether data goes to local files (then dirty pages are synced before each timing)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def new_place(self) -> Place:
        raise NotImplementedError

    def backend(self, place: Place) -> StorageBackend:
        """A library backend on `place`; a new one each call, as after a restart."""
        return open_backend(place.url)

    def raw(self, place: Place) -> RawStore:
        raise NotImplementedError

    async def drop(self, place: Place) -> None:
        """Remove everything this place holds."""
        if place.path is not None:
            await anyio.to_thread.run_sync(lambda: shutil.rmtree(place.path, ignore_errors=True))


@contextlib.contextmanager
def _logged(what: str) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        log.warning("%s: %s: %s", what, type(exc).__name__, exc)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- SQLite -------------------------------------------------------------------


class SQLiteStore(Store):
    name = "sqlite"
    durable_on_disk = True

    def new_place(self) -> Place:
        tag = uuid.uuid4().hex[:12]
        path = self.root / f"sqlite-{tag}"
        path.mkdir(parents=True)
        return Place(f"sqlite:///{path / 'state.sqlite3'}", "bench", path, tag)

    def raw(self, place: Place) -> RawStore:
        assert place.path is not None
        return RawSQLite(place.path / "raw.sqlite3")


class RawSQLite(RawStore):
    """sqlite3 with the library's pragmas (WAL, synchronous=FULL, 64 MiB cache), in a worker thread."""

    _UPSERT = (
        "INSERT INTO records (store_id, key, value, content_type, version, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (store_id, key) DO UPDATE SET "
        "value = excluded.value, content_type = excluded.content_type, "
        "version = excluded.version, updated_at = excluded.updated_at"
    )

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA cache_size=-65536")  # the library's 64 MiB
            conn.execute(
                "CREATE TABLE IF NOT EXISTS records (store_id TEXT NOT NULL, key TEXT NOT NULL, "
                "value BLOB NOT NULL, content_type TEXT NOT NULL, version INTEGER NOT NULL, "
                "updated_at REAL NOT NULL, PRIMARY KEY (store_id, key))"
            )
            self._conn = conn
        return self._conn

    async def write(self, rows: Rows, *, durable: bool = True) -> None:
        def write() -> None:
            conn = self._connect()
            now = time.time()
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                self._UPSERT,
                [("raw", key, value, "application/json", 1, now) for key, value in rows],
            )
            conn.execute("COMMIT")

        await anyio.to_thread.run_sync(write)

    async def read_all(self, keys: Sequence[str]) -> list[bytes]:
        def read() -> list[bytes]:
            conn = self._connect()
            found = dict(conn.execute("SELECT key, value FROM records WHERE store_id = 'raw'"))
            return [found[key] for key in keys]

        return await anyio.to_thread.run_sync(read)

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await anyio.to_thread.run_sync(conn.close)


# -- files --------------------------------------------------------------------


class FileStore(Store):
    name = "file"
    durable_on_disk = True

    def new_place(self) -> Place:
        tag = uuid.uuid4().hex[:12]
        path = self.root / f"file-{tag}"
        path.mkdir(parents=True)
        return Place(f"file://{path / 'lib'}", "bench", path, tag)

    def raw(self, place: Place) -> RawStore:
        assert place.path is not None
        return RawFiles(place.path / "raw")


class RawFiles(RawStore):
    """One file per record: temp file, fsync, rename, on 8 threads; then one directory fsync."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._pool: ThreadPoolExecutor | None = None

    def _put(self, row: tuple[str, bytes], durable: bool) -> None:
        key, value = row
        tmp = self.directory / f".tmp-{key}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(value)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.directory / f"{key}.json")

    async def write(self, rows: Rows, *, durable: bool = True) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(RAW_FILE_THREADS, thread_name_prefix="bench-raw-files")
        pool = self._pool

        def write() -> None:
            self.directory.mkdir(parents=True, exist_ok=True)
            for _ in pool.map(lambda row: self._put(row, durable), rows):
                pass
            if durable:
                _fsync_dir(self.directory)

        await anyio.to_thread.run_sync(write)

    async def read_all(self, keys: Sequence[str]) -> list[bytes]:
        def read() -> list[bytes]:
            out = []
            for key in keys:
                with open(self.directory / f"{key}.json", "rb") as fh:
                    out.append(fh.read())
            return out

        return await anyio.to_thread.run_sync(read)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await anyio.to_thread.run_sync(pool.shutdown)


# -- memory -------------------------------------------------------------------


class MemoryStore(Store):
    name = "memory"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self._backends: dict[str, MemoryBackend] = {}
        self._raw: dict[str, dict[str, bytes]] = {}

    def new_place(self) -> Place:
        return Place("memory://", "bench", None, uuid.uuid4().hex[:12])

    def backend(self, place: Place) -> StorageBackend:
        # Memory does not outlive its backend: "reopening" hands back the same one.
        return self._backends.setdefault(place.tag, MemoryBackend())

    def raw(self, place: Place) -> RawStore:
        return RawMemory(self._raw.setdefault(place.tag, {}))

    async def drop(self, place: Place) -> None:
        self._backends.pop(place.tag, None)
        self._raw.pop(place.tag, None)


class RawMemory(RawStore):
    """A dict assignment per record."""

    def __init__(self, data: dict[str, bytes]) -> None:
        self.data = data

    async def write(self, rows: Rows, *, durable: bool = True) -> None:
        data = self.data
        for key, value in rows:
            data[key] = value

    async def read_all(self, keys: Sequence[str]) -> list[bytes]:
        return [self.data[key] for key in keys]


# -- servers ------------------------------------------------------------------


class _ServerStore(Store):
    """A store on a server shared by all repetitions: a place is a store name of its own."""

    def __init__(self, root: Path, url: str) -> None:
        super().__init__(root)
        self.url = url

    def new_place(self) -> Place:
        tag = uuid.uuid4().hex[:12]
        return Place(self.url, f"bench-{tag}", None, tag)

    async def drop(self, place: Place) -> None:
        # Cleaning up must never hide the error of the case that ran (a dead server, say).
        with _logged(f"{self.name}: could not drop store {place.kvs_name!r}"):
            backend = self.backend(place)
            try:
                kvs = await KeyValueStore.open(name=place.kvs_name, storage=backend)
                await kvs.drop()
            finally:
                await backend.aclose()


class RedisStore(_ServerStore):
    name = "redis"

    def raw(self, place: Place) -> RawStore:
        return RawRedis(self.url, f"bench-raw:{place.tag}:")

    async def drop(self, place: Place) -> None:
        try:
            await super().drop(place)
        finally:
            with _logged(f"redis: could not delete keys bench-raw:{place.tag}:*"):
                raw = RawRedis(self.url, f"bench-raw:{place.tag}:")
                try:
                    await raw.delete_all()
                finally:
                    await raw.close()


class RawRedis(RawStore):
    """redis-py's sync client in a worker thread: one pipeline of SETs, one MGET."""

    def __init__(self, url: str, prefix: str) -> None:
        import redis

        self.prefix = prefix
        self._client: Any = redis.Redis.from_url(url)

    async def write(self, rows: Rows, *, durable: bool = True) -> None:
        def write() -> None:
            with self._client.pipeline(transaction=False) as pipe:
                for key, value in rows:
                    pipe.set(self.prefix + key, value)
                pipe.execute()

        await anyio.to_thread.run_sync(write)

    async def read_all(self, keys: Sequence[str]) -> list[bytes]:
        return await anyio.to_thread.run_sync(self._client.mget, [self.prefix + key for key in keys])

    async def delete_all(self) -> None:
        def delete() -> None:
            batch = []
            for key in self._client.scan_iter(match=self.prefix + "*", count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    self._client.unlink(*batch)
                    batch.clear()
            if batch:
                self._client.unlink(*batch)

        await anyio.to_thread.run_sync(delete)

    async def close(self) -> None:
        await anyio.to_thread.run_sync(self._client.close)


class PostgresStore(_ServerStore):
    name = "postgres"

    def raw(self, place: Place) -> RawStore:
        return RawPostgres(self.url, f"bench_raw_{place.tag}")

    async def drop(self, place: Place) -> None:
        try:
            await super().drop(place)
        finally:
            with _logged(f"postgres: could not drop table bench_raw_{place.tag}"):
                raw = RawPostgres(self.url, f"bench_raw_{place.tag}")
                try:
                    await raw.drop_table()
                finally:
                    await raw.close()


class RawPostgres(RawStore):
    """psycopg's sync driver in a worker thread: one unnest upsert in one transaction."""

    def __init__(self, url: str, table: str) -> None:
        self.url = url
        self.table = table
        self._conn: Any = None

    def _connect(self) -> Any:
        if self._conn is None:
            import psycopg

            self._conn = psycopg.connect(self.url, autocommit=True)
            self._conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self.table} (key text PRIMARY KEY, value bytea NOT NULL)"
            )
        return self._conn

    async def _run(self, fn: Callable[[Any], T]) -> T:
        return await anyio.to_thread.run_sync(lambda: fn(self._connect()))

    async def write(self, rows: Rows, *, durable: bool = True) -> None:
        keys = [key for key, _ in rows]
        values = [value for _, value in rows]

        def write(conn: Any) -> None:
            with conn.transaction():
                conn.execute(
                    f"INSERT INTO {self.table} (key, value) "
                    "SELECT * FROM unnest(%s::text[], %s::bytea[]) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (keys, values),
                )

        await self._run(write)

    async def read_all(self, keys: Sequence[str]) -> list[bytes]:
        def read(conn: Any) -> list[bytes]:
            found = dict(conn.execute(f"SELECT key, value FROM {self.table}").fetchall())
            return [bytes(found[key]) for key in keys]

        return await self._run(read)

    async def drop_table(self) -> None:
        await self._run(lambda conn: conn.execute(f"DROP TABLE IF EXISTS {self.table}"))

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(Exception):
                await anyio.to_thread.run_sync(conn.close)


def make_store(name: str, root: Path, urls: dict[str, str]) -> Store:
    """The store called `name`; servers need their URL in `urls`."""
    if name == "sqlite":
        return SQLiteStore(root)
    if name == "file":
        return FileStore(root)
    if name == "memory":
        return MemoryStore(root)
    if name == "redis":
        return RedisStore(root, urls["redis"])
    if name == "postgres":
        return PostgresStore(root, urls["postgres"])
    raise ValueError(f"unknown store {name!r}: use sqlite, file, memory, redis or postgres")
