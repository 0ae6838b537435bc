"""Where the worker benchmark's data lives: SQLite files, or a throwaway PostgreSQL or Redis server.

A store makes each system's template (N states as that system stores them,
once per N, never timed) and, for every measurement, a fresh copy of it that
no other child has seen; `fresh()` yields the child's extra arguments.

- sqlite: the template directory is copied (`_worker_setup.py`).
- postgres: a PostgreSQL 15 from `tests/servers.py` on loopback, started by the
  benchmark and stopped on exit (also on failure or Ctrl-C), with its settings
  (`synchronous_commit=on`, `fsync=on`, shared_buffers=64MB). A template
  database per system and N (`tmpl_<system>_<n>`, filled then VACUUM ANALYZEd);
  each child gets its own `CREATE DATABASE run_<i> TEMPLATE tmpl_...`, then a
  CHECKPOINT (so that no checkpoint of the copy's WAL lands in a timed phase),
  dropped after the child.
- redis: a redis-server from `tests/servers.py` on loopback (appendonly yes,
  appendfsync always: an acknowledged write is on disk), the same one for the
  library and the raw client. A template database number per system and N
  (15, 14, ...); each child works in database 0, emptied (FLUSHDB) and filled
  with a COPY of every template key before it starts. Automatic AOF rewrites
  are turned off (CONFIG SET auto-aof-rewrite-percentage 0) so that none forks
  during a timed phase; the AOF is rewritten between children once it passes
  1 GiB.

The servers stay up between measurements: a child meets a warm server (its
caches and the OS page cache hold the copied data), not a restarted one.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

HERE = Path(__file__).resolve().parent
if str(HERE.parent / "tests") not in sys.path:
    sys.path.insert(0, str(HERE.parent / "tests"))

from _worker_model import payloads  # noqa: E402
from _worker_setup import fill_library, fresh_copy, template  # noqa: E402

from servers import PostgresServer, RedisServer, ServerUnavailable  # noqa: E402

__all__ = ["STORES", "ServerUnavailable", "Store", "open_store"]
STORES = ("sqlite", "postgres", "redis")
AOF_REWRITE_BYTES = 1 << 30
COPY_CHUNK = 10_000


class Store(Protocol):
    name: str
    port: int
    """The server's port on 127.0.0.1 (0: no server)."""
    parallel: bool
    """Whether children may run side by side (a smoke run does so when it may)."""

    def describe(self) -> str: ...

    def template(self, system: str, n: int) -> None: ...

    def fresh(self, system: str, n: int, work: Path) -> contextlib.AbstractContextManager[list[str]]: ...


class SqliteStore:
    name = "sqlite"
    parallel = True
    port = 0

    def __init__(self, root: Path) -> None:
        self.root = root

    def describe(self) -> str:
        return f"SQLite {__import__('sqlite3').sqlite_version} (WAL, synchronous=FULL)"

    def template(self, system: str, n: int) -> None:
        template(self.root, system, n)

    @contextlib.contextmanager
    def fresh(self, system: str, n: int, work: Path) -> Iterator[list[str]]:
        try:
            fresh_copy(template(self.root, system, n), work)
            yield []
        finally:
            shutil.rmtree(work, ignore_errors=True)


def fill(url: str, system: str, n: int) -> None:
    """The template of `system` at `url`: through the library, or the raw client's own rows."""
    from _worker_raw_servers import prepare_raw_postgres, prepare_raw_redis

    if system == "ours":
        fill_library(url, n)
    elif url.startswith("postgresql://"):
        prepare_raw_postgres(url, payloads(n))
    else:
        prepare_raw_redis(url, payloads(n))


class PostgresStore:
    name = "postgres"
    parallel = True

    def __init__(self, server: Any) -> None:
        self.port = server.port
        self.made: set[str] = set()
        self.runs = itertools.count()

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def admin(self, sql: str, database: str = "postgres") -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True) as conn:
            cursor = conn.execute(sql)
            return cursor.fetchall() if cursor.description else []

    def describe(self) -> str:
        settings = ("server_version", "synchronous_commit", "fsync", "full_page_writes", "shared_buffers")
        values = [self.admin(f"SHOW {name}")[0][0] for name in settings]
        shown = ", ".join(f"{k}={v}" for k, v in zip(settings[1:], values[1:], strict=True))
        return f"PostgreSQL {values[0]} on loopback ({shown}), psycopg {__import__('psycopg').__version__}"

    def template(self, system: str, n: int) -> None:
        name = f"tmpl_{system}_{n}"
        if name not in self.made:
            self.admin(f"CREATE DATABASE {name}")
            fill(self.url(name), system, n)
            self.admin("VACUUM ANALYZE", name)
            self.made.add(name)

    @contextlib.contextmanager
    def fresh(self, system: str, n: int, work: Path) -> Iterator[list[str]]:
        self.template(system, n)
        database = f"run_{next(self.runs)}"
        try:
            self.admin(f"CREATE DATABASE {database} TEMPLATE tmpl_{system}_{n}")
            self.admin("CHECKPOINT")
            work.mkdir(parents=True)
            yield ["--url", self.url(database)]
        finally:
            shutil.rmtree(work, ignore_errors=True)
            self.admin(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


class RedisStore:
    name = "redis"
    parallel = False
    """Every child works in database 0."""

    def __init__(self, server: Any) -> None:
        self.port = server.port
        self.databases: dict[tuple[str, int], int] = {}
        self.clients: dict[int, Any] = {}
        self.client(0).config_set("auto-aof-rewrite-percentage", 0)

    def url(self, database: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{database}"

    def client(self, database: int) -> Any:
        """A client of `database`, made once (idle while a child runs)."""
        import redis

        if database not in self.clients:
            self.clients[database] = redis.Redis(host="127.0.0.1", port=self.port, db=database)
        return self.clients[database]

    def describe(self) -> str:
        client = self.client(0)
        config = {**client.config_get("appendonly"), **client.config_get("appendfsync")}
        config.update(client.config_get("save"))
        version = client.info("server")["redis_version"]
        shown = ", ".join(f"{k} {v!r}" if k == "save" else f"{k} {v}" for k, v in sorted(config.items()))
        return (
            f"Redis {version} on loopback ({shown}; automatic AOF rewrite off), "
            f"redis-py {__import__('redis').__version__}"
        )

    def template(self, system: str, n: int) -> None:
        if (system, n) not in self.databases:
            database = 15 - len(self.databases)
            if database < 1:
                raise RuntimeError("more templates than Redis has databases (16)")
            fill(self.url(database), system, n)
            self.databases[system, n] = database

    def copy(self, database: int) -> None:
        """Database 0 emptied, then holding a copy of every key of `database`."""
        source, target = self.client(database), self.client(0)
        target.flushdb()
        keys = list(source.scan_iter(count=COPY_CHUNK))
        for start in range(0, len(keys), COPY_CHUNK):
            pipe = source.pipeline(transaction=False)
            for key in keys[start : start + COPY_CHUNK]:
                pipe.copy(key, key, destination_db=0)
            pipe.execute()
        if target.dbsize() != len(keys):
            raise RuntimeError(f"copied {target.dbsize()} keys of {len(keys)}")

    def rewrite_if_large(self) -> None:
        client = self.client(0)
        if client.info("persistence").get("aof_current_size", 0) < AOF_REWRITE_BYTES:
            return
        client.bgrewriteaof()
        while client.info("persistence")["aof_rewrite_in_progress"]:
            time.sleep(0.1)

    @contextlib.contextmanager
    def fresh(self, system: str, n: int, work: Path) -> Iterator[list[str]]:
        self.template(system, n)
        try:
            self.rewrite_if_large()
            self.copy(self.databases[system, n])
            work.mkdir(parents=True)
            yield ["--url", self.url(0)]
        finally:
            shutil.rmtree(work, ignore_errors=True)
            self.client(0).flushdb()


def open_store(name: str, root: Path, stack: contextlib.ExitStack) -> Store:
    """The store `name`, its server (if any) started in `root` and stopped when `stack` closes.

    Raises `servers.ServerUnavailable` when a server's binary is missing.
    """
    if name == "sqlite":
        return SqliteStore(root)
    root.chmod(0o755)  # the postgres user must reach its data directory inside
    server = PostgresServer(root / "postgres") if name == "postgres" else RedisServer(root / "redis")
    stack.callback(server.stop)  # before start(): a half-started server is stopped too
    server.start()
    return PostgresStore(server) if name == "postgres" else RedisStore(server)
