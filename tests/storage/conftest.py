"""Storage fixtures: real Redis and PostgreSQL servers, and one URL per backend.

The servers start once per session, on first use, on free loopback ports. When a
server binary is missing the tests that need it are skipped, or fail when the
`CI` environment variable is set (CI must run every backend).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/servers.py

from recoverable_state.storage import StorageBackend, open_backend
from servers import PostgresServer, RedisServer, flush_postgres, flush_redis, start_or_skip

BACKENDS = ["memory", "sqlite", "file", "redis", "postgresql"]
SHARED_BACKENDS = ["sqlite", "file", "redis", "postgresql"]
"""Backends whose data two backend instances (as two processes would) share."""


@pytest.fixture(scope="session")
def server_dir() -> Iterator[Path]:
    """A directory the `postgres` user can reach (pytest's tmp dirs are private to root).

    Set RECOVERABLE_STATE_TEST_SERVER_DIR to keep the servers' data and logs there.
    """
    kept = os.environ.get("RECOVERABLE_STATE_TEST_SERVER_DIR")
    path = Path(kept) if kept else Path(tempfile.mkdtemp(prefix="rs-test-servers-"))
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)
    yield path
    if not kept:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server(server_dir: Path) -> Iterator[RedisServer]:
    server = start_or_skip(lambda: RedisServer(server_dir / "redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_server(server_dir: Path) -> Iterator[PostgresServer]:
    server = start_or_skip(lambda: PostgresServer(server_dir / "postgres"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    """`redis://127.0.0.1:<port>/0` of the session's Redis server."""
    return redis_server.url


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """`postgresql://postgres@127.0.0.1:<port>/rs_test` of the session's PostgreSQL server."""
    return postgres_server.url


def empty_storage_url(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty storage of this kind (servers are flushed first)."""
    if kind == "memory":
        return "memory://"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/s.sqlite3"
    if kind == "file":
        return f"file://{tmp_path}/files"
    if kind == "redis":
        url = str(request.getfixturevalue("redis_url"))
        flush_redis(url)
        return url
    url = str(request.getfixturevalue("postgres_url"))
    flush_postgres(url)
    return url


@pytest.fixture(params=BACKENDS)
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty storage of each kind."""
    return empty_storage_url(str(request.param), request, tmp_path)


@pytest.fixture(params=SHARED_BACKENDS)
def shared_storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty storage of each kind that several backend instances share."""
    return empty_storage_url(str(request.param), request, tmp_path)


@pytest.fixture
async def backend(storage_url: str) -> AsyncIterator[StorageBackend]:
    """An opened backend of each kind, closed after the test."""
    storage = open_backend(storage_url)
    yield storage
    await storage.aclose()


@pytest.fixture
def backend_kind(storage_url: str) -> str:
    """`memory`, `sqlite`, `file`, `redis` or `postgresql`."""
    return storage_url.split(":", 1)[0]
