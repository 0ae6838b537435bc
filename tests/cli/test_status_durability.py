"""`recoverable-state status` says what an acknowledged write means for the storage it looks at.

A line under the table, and `durability` in each row of --json, as the medium or
the server reports it: SQLite's `synchronous` and journal mode, Redis's AOF
settings, PostgreSQL's `synchronous_commit` (the server's, or the URL's own).
"""

from __future__ import annotations

import json

import pytest
from cli_support import Cli, run_async

from fleet_servers import RedisClusterServer
from recoverable_state.storage import KeyValueStore, StorageBackend
from servers import flush_postgres, flush_redis

pytestmark = pytest.mark.slow


async def _fill(storage: StorageBackend) -> None:
    kvs = await KeyValueStore.open(name="jobs", storage=storage)
    await kvs.set_value("job-1", {"page": 3})


def test_status_shows_sqlites_durability(cli: Cli, filled_url: str) -> None:
    rows = json.loads(cli.ok("status", "--json", url=filled_url))
    assert rows
    for row in rows:
        durability = row["durability"]
        assert durability["store_kind"] == "sqlite"
        assert durability["durable_on_ack"] is True
        assert durability["details"]["synchronous"] == "FULL"
        assert durability["details"]["journal_mode"] == "wal"
    table = cli.ok("status", url=filled_url)
    assert "durability (sqlite): acknowledged writes durable: durable on commit: synchronous=FULL" in table


def test_status_shows_redis_durability(cli: Cli, redis_url: str) -> None:
    flush_redis(redis_url)
    run_async(_fill, redis_url)
    (row,) = json.loads(cli.ok("status", "--json", url=redis_url))
    durability = row["durability"]
    assert durability["store_kind"] == "redis"
    assert durability["durable_on_ack"] is True  # the test server: appendonly yes, appendfsync always
    assert durability["details"]["appendfsync"] == "always"
    assert durability["details"]["wait_replicas"] == "0"
    table = cli.ok("status", url=redis_url + "?wait_replicas=0")
    assert (
        "durability (redis): acknowledged writes durable: durable on ack: appendonly yes, appendfsync always"
        in table
    )


def test_status_shows_postgresqls_durability_and_the_urls_own_setting(cli: Cli, postgres_url: str) -> None:
    flush_postgres(postgres_url)
    run_async(_fill, postgres_url)
    (row,) = json.loads(cli.ok("status", "--json", url=postgres_url))
    assert row["durability"]["store_kind"] == "postgresql"
    assert row["durability"]["durable_on_ack"] is True
    assert row["durability"]["details"]["synchronous_commit"] == "on"
    (row,) = json.loads(cli.ok("status", "--json", url=postgres_url + "?synchronous_commit=off"))
    assert row["durability"]["durable_on_ack"] is False
    assert row["durability"]["details"]["store_synchronous_commit"] == "off"
    assert "synchronous_commit=off" in row["durability"]["summary"]
    table = cli.ok("status", url=postgres_url + "?synchronous_commit=off")
    assert "durability (postgresql): acknowledged writes NOT durable" in table


def test_status_shows_a_redis_clusters_durability_over_its_masters(
    cli: Cli, redis_cluster: RedisClusterServer
) -> None:
    redis_cluster.restore()
    waited = redis_cluster.url + "?wait_replicas=1"
    run_async(_fill, waited)
    (row,) = json.loads(cli.ok("status", "--json", url=waited))
    durability = row["durability"]
    assert durability["store_kind"] == "redis-cluster"
    assert durability["durable_on_ack"] is True  # every master: appendfsync always, and WAIT 1
    assert len(durability["details"]["masters"].split(", ")) == 3
    table = cli.ok("status", url=redis_cluster.url)
    assert "durability (redis-cluster): acknowledged writes NOT durable: " in table
    assert "can be lost in a failover: replication is asynchronous" in table
    redis_cluster.restore()
