"""The raw-client baselines of the worker benchmark on PostgreSQL and Redis (run in the child).

Each does the library's work with its server's plain sync client and nothing
else, in as few round trips as the client allows:

- PostgreSQL (psycopg, the driver the library uses): a table of the same
  columns as the raw sqlite3 baseline. Cold start: connect, one SELECT of all
  N rows (key, value; binary results), then `WorkerState.model_validate_json`
  of each. Persist: ONE statement, in autocommit, so one round trip and one
  transaction: `INSERT ... SELECT FROM unnest(keys, values) ON CONFLICT DO
  UPDATE`, durable on its COMMIT (the server's `synchronous_commit=on`).
- Redis (redis-py): plain keys `raw:<key>` holding the JSON bytes. Cold start:
  connect, one MGET of all N keys, then validate each. Persist: one pipeline
  in a transaction (MULTI, the SETs, EXEC), one round trip; as durable as the
  server's AOF settings make an acknowledged write (the same server the library
  uses: see `_worker_servers.py`).

Imports pydantic (through `_worker_model`) and the client only: nothing of the library.
`prepare_*` fill a template database (setup, never timed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from _worker_model import WorkerState, dump, key_of
from _worker_timing import clock, record, timed_rounds

PG_TABLE = (
    "CREATE TABLE IF NOT EXISTS records (store_id text NOT NULL, key text NOT NULL, "
    "value bytea NOT NULL, content_type text NOT NULL, version bigint NOT NULL, "
    "updated_at timestamptz NOT NULL, PRIMARY KEY (store_id, key))"
)
PG_UPSERT = (
    "INSERT INTO records (store_id, key, value, content_type, version, updated_at) "
    "SELECT 'raw', k, v, 'application/json', 1, now() FROM unnest(%b::text[], %b::bytea[]) AS u(k, v) "
    "ON CONFLICT (store_id, key) DO UPDATE SET value = excluded.value, "
    "content_type = excluded.content_type, version = excluded.version, updated_at = excluded.updated_at"
)
PG_ALL = "SELECT key, value FROM records WHERE store_id = 'raw'"
PG_ONE = "SELECT value FROM records WHERE store_id = 'raw' AND key = %s"
REDIS_PREFIX = "raw:"
PREPARE_CHUNK = 10_000


def pg_write(conn: Any, rows: Sequence[tuple[str, bytes]]) -> None:
    """Every row in one statement: one round trip, one transaction (autocommit)."""
    conn.execute(PG_UPSERT, ([key for key, _ in rows], [value for _, value in rows]))


def run_raw_postgres(n: int, url: str) -> dict[str, Any]:
    import psycopg

    started = clock()
    conn = psycopg.connect(url, autocommit=True)
    found = dict(conn.cursor(binary=True).execute(PG_ALL).fetchall())
    values = [WorkerState.model_validate_json(found[key_of(i)]) for i in range(n)]
    out: dict[str, Any] = {}
    record(out, "cold", started)
    del found

    def write(indexes: range) -> None:
        pg_write(conn, [(key_of(i), dump(values[i])) for i in indexes])

    def read(i: int) -> bytes:
        return bytes(conn.cursor(binary=True).execute(PG_ONE, (key_of(i),)).fetchone()[0])

    timed_rounds(out, n, values, write, read)
    conn.close()
    return out


def redis_write(client: Any, rows: Sequence[tuple[str, bytes]]) -> None:
    """Every row in one MULTI/EXEC pipeline: one round trip."""
    pipe = client.pipeline(transaction=True)
    for key, value in rows:
        pipe.set(REDIS_PREFIX + key, value)
    pipe.execute()


def run_raw_redis(n: int, url: str) -> dict[str, Any]:
    import redis

    started = clock()
    client = redis.Redis.from_url(url)
    found = client.mget([REDIS_PREFIX + key_of(i) for i in range(n)])
    values = [WorkerState.model_validate_json(data) for data in found]
    out: dict[str, Any] = {}
    record(out, "cold", started)
    del found
    if values[-1].worker_id != n - 1:
        raise AssertionError("the last state did not load its stored model")

    def write(indexes: range) -> None:
        redis_write(client, [(key_of(i), dump(values[i])) for i in indexes])

    timed_rounds(out, n, values, write, lambda i: bytes(client.get(REDIS_PREFIX + key_of(i))))
    client.close()
    return out


def run_raw_server(n: int, url: str) -> dict[str, Any]:
    if url.startswith("postgresql://"):
        return run_raw_postgres(n, url)
    if url.startswith("redis://"):
        return run_raw_redis(n, url)
    raise ValueError(f"no raw client for {url}")


# -- the templates (setup, never timed) ----------------------------------------------


def prepare_raw_postgres(url: str, payloads: Sequence[bytes]) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(PG_TABLE)
        for start in range(0, len(payloads), PREPARE_CHUNK):
            chunk = payloads[start : start + PREPARE_CHUNK]
            pg_write(conn, [(key_of(start + i), data) for i, data in enumerate(chunk)])


def prepare_raw_redis(url: str, payloads: Sequence[bytes]) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        for start in range(0, len(payloads), PREPARE_CHUNK):
            chunk = payloads[start : start + PREPARE_CHUNK]
            redis_write(client, [(key_of(start + i), data) for i, data in enumerate(chunk)])
    finally:
        client.close()
