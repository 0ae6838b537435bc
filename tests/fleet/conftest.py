"""Fixtures of the fleet tests: the session's servers, healthy and empty for each test.

A test may kill a Redis master, kill a PostgreSQL primary or promote a standby:
these fixtures bring the servers back before and after it (`restore()`), so the
next test, and any other user of the session fixtures, finds them as started.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from fleet_servers import PostgresPrimaryStandby, RedisClusterServer

SCHEMA = "fleet_test"
"""The schema the PostgreSQL tests make their tables in (emptied for each test)."""


@pytest.fixture
def cluster(redis_cluster: RedisClusterServer) -> Iterator[RedisClusterServer]:
    """The session's Redis Cluster, every node up and every master empty."""
    redis_cluster.restore()
    yield redis_cluster
    redis_cluster.restore()


def _fresh(pair: PostgresPrimaryStandby) -> PostgresPrimaryStandby:
    if not pair.healthy():
        pair.restore()
    with psycopg.connect(pair.primary_url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        conn.execute(f"CREATE SCHEMA {SCHEMA}")
    pair.wait_replayed()
    return pair


@pytest.fixture
def sync_pair(postgres_standby_sync: PostgresPrimaryStandby) -> Iterator[PostgresPrimaryStandby]:
    """The session's primary with a synchronous standby, streaming, with an empty `fleet_test` schema."""
    yield _fresh(postgres_standby_sync)
    if not postgres_standby_sync.healthy():
        postgres_standby_sync.restore()


@pytest.fixture
def async_pair(postgres_standby_async: PostgresPrimaryStandby) -> Iterator[PostgresPrimaryStandby]:
    """The session's primary with an asynchronous standby, streaming, with an empty `fleet_test` schema."""
    yield _fresh(postgres_standby_async)
    if not postgres_standby_async.healthy():
        postgres_standby_async.restore()
