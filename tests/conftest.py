"""Shared fixtures: every async test runs on asyncio and on trio; real servers on demand.

The Redis and PostgreSQL servers start once per session (once in each
pytest-xdist worker), on first use, on free loopback ports. When a server
binary is missing the tests that need it are skipped, or fail when the `CI`
environment variable is set (CI runs every backend). So do the servers past
one machine (tests/fleet_servers.py): a Redis Cluster, PostgreSQL primaries
with a synchronous and an asynchronous standby, PgBouncer; a test that kills
or promotes one restores it afterwards (`restore()`), see tests/fleet/conftest.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/servers.py

from fleet_servers import PgBouncerServer, PostgresPrimaryStandby, RedisClusterServer
from recoverable_state import Configuration, service_locator
from recoverable_state.storage import MemoryBackend
from servers import PostgresServer, RedisServer, start_or_skip


def pytest_configure(config: pytest.Config) -> None:
    # A suite started in the background of a non-interactive shell (`./scripts/test &`)
    # inherits SIGINT ignored, and so would every worker it starts: the library leaves
    # an ignored SIGINT alone, as Python does, and the tests that send one would wait for
    # ever. The children of this process get SIGINT's default action back.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def _fresh_services(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts with default services that write under its own tmp_path."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("RECOVERABLE_STATE_"):  # a developer's settings must not leak in
            monkeypatch.delenv(name)
    service_locator.reset()
    yield
    service_locator.reset()


@pytest.fixture
def memory_storage() -> MemoryBackend:
    """A memory backend installed as the default storage."""
    backend = MemoryBackend()
    service_locator.set_storage(backend)
    service_locator.set_configuration(Configuration(storage_url="memory://"))
    return backend


@pytest.fixture(scope="session")
def server_dir() -> Iterator[Path]:
    """A directory the `postgres` user can reach (pytest's tmp dirs are private to root).

    Set RECOVERABLE_STATE_TEST_SERVER_DIR to keep the servers' data and logs there.
    Each pytest-xdist worker starts servers of its own, so each keeps them in a
    directory of its own under it (`gw0`, `gw1`, ...).
    """
    kept = os.environ.get("RECOVERABLE_STATE_TEST_SERVER_DIR")
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if kept:
        path = Path(kept) / worker if worker else Path(kept)
    else:
        path = Path(tempfile.mkdtemp(prefix=f"rs-test-servers-{worker or 'main'}-"))
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


# -- past one machine (tests/fleet_servers.py) ------------------------------------------


@pytest.fixture(scope="session")
def redis_cluster(server_dir: Path) -> Iterator[RedisClusterServer]:
    """A Redis Cluster: 3 masters with a replica each, AOF fsynced on every write, 1 s node timeout."""
    server = start_or_skip(lambda: RedisClusterServer(server_dir / "redis-cluster"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster_url(redis_cluster: RedisClusterServer) -> str:
    """`redis+cluster://127.0.0.1:<p1>,...,127.0.0.1:<p6>`: every node of the cluster as a seed."""
    return redis_cluster.url


@pytest.fixture(scope="session")
def postgres_standby_sync(server_dir: Path) -> Iterator[PostgresPrimaryStandby]:
    """A PostgreSQL primary whose commits wait for its standby (`synchronous_standby_names`)."""
    server = start_or_skip(lambda: PostgresPrimaryStandby(server_dir / "postgres-sync", synchronous=True))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_standby_sync_url(postgres_standby_sync: PostgresPrimaryStandby) -> str:
    """`postgresql://postgres@127.0.0.1:<primary>,127.0.0.1:<standby>/rs_test?target_session_attrs=read-write`."""
    return postgres_standby_sync.url


@pytest.fixture(scope="session")
def postgres_standby_async(server_dir: Path) -> Iterator[PostgresPrimaryStandby]:
    """A PostgreSQL primary with an asynchronous standby (which may lag behind)."""
    server = start_or_skip(lambda: PostgresPrimaryStandby(server_dir / "postgres-async", synchronous=False))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_standby_async_url(postgres_standby_async: PostgresPrimaryStandby) -> str:
    """The multi-host URL of the asynchronous pair (as `postgres_standby_sync_url`)."""
    return postgres_standby_async.url


@pytest.fixture(scope="session")
def pgbouncer(server_dir: Path, postgres_server: PostgresServer) -> Iterator[PgBouncerServer]:
    """PgBouncer (`pool_mode = transaction`) in front of the session's PostgreSQL server."""
    server = start_or_skip(lambda: PgBouncerServer(server_dir / "pgbouncer", postgres_server))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pgbouncer_url(pgbouncer: PgBouncerServer) -> str:
    """`postgresql://postgres@127.0.0.1:<port>/rs_test` through PgBouncer (the database of `postgres_url`)."""
    return pgbouncer.url
