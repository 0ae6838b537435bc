"""PostgreSQL backend (`postgresql://user@host:port/db`): every batch is one transaction.

psycopg's async API runs on asyncio only, so the sync driver runs in anyio
worker threads, over a small pool of at most `pool_size` connections that the
backend keeps itself (`_postgres_pool.py`; the statements are `_postgres_sql.py`).

Layout: three tables in the schema `recoverable_state`, created on first use
under a transaction-scoped advisory lock (so concurrent first users do not race):

- `stores(id text primary key, name text unique, created_at timestamptz)`
- `records(store_id, key_hash, key, value bytea, content_type, version bigint,
  updated_at timestamptz, primary key (store_id, key_hash))`
- `history(store_id, key_hash, version, value, content_type, updated_at,
  primary key (store_id, key_hash, version))`

`key_hash` is the SHA-256 of the key's UTF-8 bytes: a 1024-character key may
take 4 KiB, more than a B-tree index entry may hold (about 2.7 KiB), so the
key itself is not in the primary key. Listings sort by key in code point order
(`COLLATE "C"`), paged through the index `records_by_key` on the store and the
key's first 200 characters (at most 800 bytes, well within an index entry).

A `write_batch` is one transaction of three round trips (the driver's pipeline
mode sends each group of statements together), as `TransactionalBackend`
writes it: first the stores are checked (`FOR KEY SHARE`, so a concurrent drop
waits) and the batch's existing rows locked with `SELECT ... FOR UPDATE`, in
key order so that concurrent batches cannot deadlock, both in one round trip
(`find_versions`); the planner decides each request in Python; then the
batch's deletes and one statement with all its results travel together
(`UPDATE ... FROM unnest(...)` for existing rows, `INSERT ... SELECT FROM
unnest(...) ON CONFLICT DO NOTHING` for new ones, history inserted and trimmed
alongside; past 64 MiB of values, one such statement per 64 MiB, as an array
parameter must stay under 1 GB); then COMMIT. The template adds no round trip:
each of its lookups is one, as before it. A new key that another transaction
inserted meanwhile shows up as a skipped insert: the batch is rolled back and
run again, now finding that row. A `read_batch` with claims locks and bumps the
claimed rows in one transaction. The whole batch of 10,000 writes of 600 bytes
takes about 0.3 s on loopback.

Durability: a batch returns once PostgreSQL has committed it (with the
server's default `synchronous_commit=on`, flushed to its WAL, and confirmed by a
synchronous standby where `synchronous_standby_names` names one). A store URL's
`?synchronous_commit=...` sets it for each of the backend's mutating
transactions (SET LOCAL, so it works behind PgBouncer); the server's settings
and standbys are reported at open (`_postgres_durability.py`).

Budget: `retry_timeout` seconds bound every wait on the server (see
`_server.py`): a free pooled connection (the pool's slot wait), connecting and
logging in (`connect_timeout`: what is left of the budget, rounded up, and at
least 2 s, as libpq wants), each transaction's statements (`statement_timeout`
and `lock_timeout`, set at the start of each transaction to what is left of
the budget, so a row lock held by another connection or a long statement ends
on the server with a clear error and frees its locks), and the retries in
between. Batches past TRANSACTION_ITEMS go in several transactions, each with a
budget of its own. libpq has no timeout for a reply that never comes, so a server that
goes silent mid-transaction is handled by the caller: past the budget it
shuts the connection's socket down, which ends the waiting worker thread.

Retries: a refused or lost connection ("unreachable"), a server that took
the connection but did not reply ("did not answer within N s"), a server
starting up or shutting down, a lock timeout or a deadlock/serialisation
failure ("did not finish within N s") retry the operation with exponential
backoff (50 ms doubling to 1 s) within the budget, then raise
StorageUnavailableError naming the server and the store. A wrong password, an
unknown user, or a pg_hba.conf rule refusing the connection raise
StorageAuthenticationError at once; a missing database or any other error the
server answered with, StorageError at once. A transaction that
failed before COMMIT was sent was rolled back by the server and is simply run
again. If the connection drops while COMMIT is in flight the outcome is
unknown: each transaction notes its id (`txid_current()`) and, on the next
attempt, asks the server `txid_status()` — committed: the outcome computed
before COMMIT is returned without writing again; aborted (or unknown to a
server that restarted before the commit reached its WAL): run again; still in
progress: the old session is terminated first. A batch is thus applied at most
once and reports what really happened.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import psycopg
import psycopg.errors

from .._errors import StorageError, StoreNotFoundError
from .._forks import watch_forks
from ._backend import Durability, RecordInfo, RecordRead, StoredRecord, StoreInfo, WriteOp, WriteOutcome
from ._contract import Pair, WritePlan
from ._postgres_deltas import attach_deltas, drop_deltas, store_appends, stores_with_deltas
from ._postgres_durability import (
    SET_SYNCHRONOUS_COMMIT,
    describe,
    read_settings,
    report_at_open,
    synchronous_commit_option,
)
from ._postgres_pool import Connection, Pool, PoolBusy, Retry, Transaction, bound, failure
from ._postgres_sql import (
    CHECK_STORES,
    CLAIM_ROWS,
    DDL,
    DELETE_HISTORY,
    DELETE_ROWS,
    DELTAS,
    FIND_STORES,
    KEY_INDEX,
    KEY_PREFIX,
    LOCK_ID,
    LOCK_ROWS,
    READ_ROWS,
    SCHEMA,
    apply_rows,
    key_hash,
    utc,
)
from ._server import Failure, ServerBackend
from ._transactional import TransactionalBackend

T = TypeVar("T")
R = TypeVar("R")

TRANSACTION_ITEMS = 10_000
"""Reads or writes per transaction. A persist of 100,000 states in one took 6-9 s on a 2-core
machine, against the budget of 10 s each transaction gets: a server half as fast failed every
one of them. A batch fails whole if one of its transactions fails (those before it may have
committed): the states are then in doubt, and each is checked before its next write."""


async def _in_transactions(run: Callable[[Sequence[R]], Awaitable[list[T]]], items: Sequence[R]) -> list[T]:
    """`run` over `items` in slices of TRANSACTION_ITEMS, one after another; the answers in order."""
    if len(items) <= TRANSACTION_ITEMS:
        return await run(items)
    answers: list[T] = []
    for start in range(0, len(items), TRANSACTION_ITEMS):
        answers += await run(items[start : start + TRANSACTION_ITEMS])
    return answers


_ALREADY_MADE = (
    psycopg.errors.UniqueViolation,
    psycopg.errors.DuplicateSchema,
    psycopg.errors.DuplicateTable,
)
"""What CREATE ... IF NOT EXISTS raises when another transaction made the object it did not see."""


@dataclass
class _Txn:
    """A transaction's handle: its connection, whether it may write, the key hashes it computed."""

    conn: Connection
    write: bool
    hashes: dict[Pair, bytes] = field(default_factory=dict)
    with_deltas: set[str] = field(default_factory=set)
    """The batch's stores that hold deltas, seen after its rows were locked (`find_versions`)."""

    def hash_of(self, pair: Pair) -> bytes:
        found = self.hashes.get(pair)
        if found is None:
            found = self.hashes[pair] = key_hash(pair[1])
        return found


def _with_synchronous_commit(body: Callable[[Connection], T], value: str) -> Callable[[Connection], T]:
    """`body` with the store's `synchronous_commit` set first, for its transaction only (SET LOCAL)."""

    def run(conn: Connection) -> T:
        conn.execute(SET_SYNCHRONOUS_COMMIT, (value,))
        return body(conn)

    return run


class PostgresBackend(ServerBackend, TransactionalBackend[_Txn]):
    """Stores records in PostgreSQL; every batch is one transaction."""

    server_name = "PostgreSQL server"
    keeps_deltas = True

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 4,
        retry_timeout: float = 10.0,
        synchronous_commit: str | None = None,
    ) -> None:
        super().__init__(url, pool_size=pool_size, retry_timeout=retry_timeout)
        self.synchronous_commit, self._dsn = synchronous_commit_option(url, synchronous_commit)
        """The store's own `synchronous_commit`, set in each mutating transaction (None: the server's)."""
        self._lock = threading.Lock()
        self._pool: Pool | None = None
        self._schema_ready = False
        self._reported = False
        watch_forks(self)

    # -- plumbing -----------------------------------------------------------

    def _get_pool(self) -> Pool:
        with self._lock:
            if self._pool is None:
                self._pool = Pool(self._dsn, self.pool_size)
            return self._pool

    def _ensure_schema(self, conn: Connection, deadline: float) -> None:
        if self._schema_ready:
            return
        for tries_left in (1, 0):
            try:
                with conn.transaction():
                    bound(conn, deadline)
                    # A database made before deltas has the index but not the deltas table: the
                    # DDL (all IF NOT EXISTS) then adds that table alone, rewriting nothing.
                    found = conn.execute(
                        "SELECT to_regclass(%s), to_regclass(%s)",
                        (f"{SCHEMA}.{KEY_INDEX}", f"{SCHEMA}.{DELTAS}"),
                    ).fetchone()
                    if found is None or None in found:
                        conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_ID,))
                        for statement in DDL.split(";"):
                            if statement.strip():
                                conn.execute(statement)
                break
            except _ALREADY_MADE:
                # Another first user made the tables while this one waited for the lock: the
                # server's catalog caches still said "missing" (a wait for an advisory lock
                # does not refresh them), so IF NOT EXISTS tried again. A new transaction
                # sees them (met through PgBouncer, whose fast logins make first users collide).
                if not tries_left:
                    raise
        self._schema_ready = True
        if not self._reported:  # at open: the server's durability settings, reported once
            with conn.transaction():
                bound(conn, deadline)
                settings = read_settings(conn)
            self._reported = True
            report_at_open(self.url, settings, self.synchronous_commit)

    async def _run(self, store: str | None, body: Callable[[Connection], T], *, mutating: bool = True) -> T:
        """Run `body` as one transaction in a worker thread, retried within the budget."""
        if mutating and self.synchronous_commit is not None:
            body = _with_synchronous_commit(body, self.synchronous_commit)
        txn = Transaction(body, mutating)

        async def attempt(deadline: float) -> T:
            pool = self._get_pool()
            result: T = await anyio.to_thread.run_sync(
                pool.attempt, txn, deadline, self._ensure_schema, abandon_on_cancel=True
            )
            return result

        return await self._retrying(store, attempt, interrupt=txn.interrupt)

    def _classify(self, exc: BaseException) -> Failure | None:
        if isinstance(exc, PoolBusy):
            return Failure.BUSY
        if isinstance(exc, psycopg.Error):
            return failure(exc)
        return None

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, psycopg.errors.LockNotAvailable):
            return f"a lock held by another connection was not released ({exc})"
        if isinstance(exc, psycopg.errors.QueryCanceled):
            return f"a statement ran out of time ({exc})"
        return super()._describe(exc)

    def _missing_stores(
        self, conn: Connection, store_ids: Set[str], found: psycopg.Cursor[Any] | None = None
    ) -> dict[str, StorageError]:
        """An error for each of these stores that does not exist (`found`: a pending check)."""
        if found is None:
            found = conn.execute(FIND_STORES, (list(store_ids),))
        missing = store_ids - {row[0] for row in found}
        return {
            s: StoreNotFoundError("no such store (was it dropped?)", store=self._label([s])) for s in missing
        }

    def _require_stores(
        self, conn: Connection, store_ids: Set[str], found: psycopg.Cursor[Any] | None = None
    ) -> None:
        """Raise StoreNotFoundError unless every store exists (`found`: a pending check)."""
        for error in self._missing_stores(conn, store_ids, found).values():
            raise error

    # -- stores -------------------------------------------------------------

    async def open_store(self, *, name: str | None = None, id: str | None = None) -> StoreInfo:
        def find(conn: Connection) -> StoreInfo:
            if id is not None:
                row = conn.execute(f"SELECT name FROM {SCHEMA}.stores WHERE id = %s", (id,)).fetchone()
                if row is None:
                    raise StoreNotFoundError(f"no store has this id in {self.url}", store=id)
                return StoreInfo(id, row[0])
            new_id = uuid.uuid4().hex
            if name is None:
                conn.execute(f"INSERT INTO {SCHEMA}.stores (id) VALUES (%s)", (new_id,))
                return StoreInfo(new_id, None)
            conn.execute(
                f"INSERT INTO {SCHEMA}.stores (id, name) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
                (new_id, name),
            )
            row = conn.execute(f"SELECT id FROM {SCHEMA}.stores WHERE name = %s", (name,)).fetchone()
            assert row is not None
            return StoreInfo(row[0], name)

        info = await self._run(name if id is None else id, find, mutating=id is None)
        self._labels[info.id] = info.label
        return info

    async def list_stores(self) -> list[StoreInfo]:
        def rows(conn: Connection) -> list[StoreInfo]:
            return [StoreInfo(i, n) for i, n in conn.execute(f"SELECT id, name FROM {SCHEMA}.stores")]

        stores = await self._run(None, rows, mutating=False)
        return sorted(stores, key=lambda s: (s.name or "", s.id))

    async def drop_store(self, store_id: str) -> None:
        def drop(conn: Connection) -> None:
            conn.execute(f"DELETE FROM {SCHEMA}.stores WHERE id = %s", (store_id,))
            for table in ("records", "history", DELTAS):
                conn.execute(f"DELETE FROM {SCHEMA}.{table} WHERE store_id = %s", (store_id,))

        await self._run(self._label([store_id]), drop)

    # -- the transactional primitives ---------------------------------------------

    async def read_batch(self, reads: Sequence[RecordRead]) -> list[StoredRecord | StorageError | None]:
        return await _in_transactions(super().read_batch, reads)

    async def write_batch(self, ops: Sequence[WriteOp]) -> list[WriteOutcome | StorageError]:
        return await _in_transactions(super().write_batch, ops)

    async def run_transaction(self, fn: Callable[[_Txn], T], *, write: bool, store_ids: Set[str]) -> T:
        return await self._run(self._label(store_ids), lambda conn: fn(_Txn(conn, write)), mutating=write)

    def find_records(
        self, txn: _Txn, store_ids: Set[str], pairs: Sequence[Pair]
    ) -> tuple[dict[str, StorageError], dict[Pair, StoredRecord]]:
        """The stores and the rows in one round trip; with claims to come, both locked."""
        places = {(pair[0], txn.hash_of(pair)): pair[1] for pair in pairs}
        stores = txn.conn.execute(CHECK_STORES if txn.write else FIND_STORES, (list(store_ids),))
        cur = txn.conn.cursor(binary=True)
        query = READ_ROWS + (" FOR UPDATE" if txn.write else "")
        cur.execute(query, ([p[0] for p in places], [p[1] for p in places]))
        # After the rows: with claims they are locked, so no append lands in between; without,
        # the transaction is REPEATABLE READ (read-only, see _postgres_pool.py): one snapshot.
        deltas = stores_with_deltas(txn.conn, store_ids)
        missing = self._missing_stores(txn.conn, set(store_ids), stores)
        found = {}
        for store_id, hashed, value, ctype, version, at in cur:
            key = places[(store_id, bytes(hashed))]
            found[(store_id, key)] = StoredRecord(key, bytes(value), ctype, version, utc(at))
        with_deltas = {row[0] for row in deltas}
        if with_deltas:
            attach_deltas(txn.conn, found, txn.hash_of, with_deltas)
        return missing, found

    def find_versions(
        self, txn: _Txn, store_ids: Set[str], pairs: Sequence[Pair]
    ) -> tuple[dict[str, StorageError], dict[Pair, int]]:
        """The stores checked (a drop waits) and the rows locked, in one round trip."""
        places = {(pair[0], txn.hash_of(pair)): pair[1] for pair in pairs}
        stores = txn.conn.execute(CHECK_STORES, (list(store_ids),))
        cur = txn.conn.execute(LOCK_ROWS, ([p[0] for p in places], [p[1] for p in places]))
        deltas = stores_with_deltas(txn.conn, store_ids)  # after the locks: no append lands since
        missing = self._missing_stores(txn.conn, set(store_ids), stores)
        txn.with_deltas = {row[0] for row in deltas}
        return missing, {(sid, places[(sid, bytes(h))]): version for sid, h, version in cur}

    def store_claims(self, txn: _Txn, claimed: Mapping[Pair, int]) -> None:
        hashes = [txn.hash_of(pair) for pair in claimed]
        txn.conn.execute(CLAIM_ROWS, ([sid for sid, _ in claimed], hashes, list(claimed.values())))

    def apply_plan(self, txn: _Txn, plan: WritePlan) -> dict[Pair, StorageError]:
        """The deletes, then one statement per 64 MiB of values; all sent together, then fetched.

        A new key that another transaction inserted meanwhile shows up as a skipped
        insert: the transaction is rolled back and run again (Retry), now finding it.
        """
        conn, hash_of, rows = txn.conn, txn.hash_of, plan.rows
        if plan.deletes:
            gone = ([sid for sid, _ in plan.deletes], [hash_of(p) for p in plan.deletes])
            conn.execute(DELETE_ROWS, gone)
            conn.execute(DELETE_HISTORY, gone)
        if txn.with_deltas:  # only stores holding deltas pay for dropping them
            stale = [p for p in (*plan.deletes, *rows) if p[0] in txn.with_deltas]
            drop_deltas(conn, list(dict.fromkeys(stale)), hash_of)
        now = datetime.now(UTC)
        inserted = apply_rows(conn, plan, hash_of, now)
        if plan.appends:
            store_appends(conn, plan, hash_of, now)
        if inserted != len(plan.rows) - len(plan.existing):
            raise Retry
        return {}

    # -- listings ----------------------------------------------------------------

    async def list_records(
        self, store_id: str, *, exclusive_start_key: str | None = None, limit: int | None = None
    ) -> list[RecordInfo]:
        # The index holds each key's first characters (a whole key may be too long for a
        # B-tree entry); ordering by that prefix, then by the key, is ordering by the key.
        # A key after the start key has a prefix at least the start key's, which lets
        # the index find where the page begins.
        query = (
            "SELECT key, octet_length(value), content_type, version, updated_at "
            f"FROM {SCHEMA}.records WHERE store_id = %(store)s "
        )
        if exclusive_start_key is not None:
            query += (
                f'AND left(key, {KEY_PREFIX}) COLLATE "C" >= left(%(start)s, {KEY_PREFIX}) '
                'AND key COLLATE "C" > %(start)s '
            )
        query += f'ORDER BY left(key, {KEY_PREFIX}) COLLATE "C", key COLLATE "C" LIMIT %(limit)s'
        params = {"store": store_id, "start": exclusive_start_key, "limit": limit}

        def listing(conn: Connection) -> list[RecordInfo]:
            self._require_stores(conn, {store_id})
            cur = conn.execute(query, params)
            return [RecordInfo(k, size, ct, v, utc(at)) for k, size, ct, v, at in cur]

        return await self._run(self._label([store_id]), listing, mutating=False)

    async def purge_store(self, store_id: str) -> None:
        def purge(conn: Connection) -> None:
            stores = conn.execute(CHECK_STORES, ([store_id],))
            for table in ("records", "history", DELTAS):
                conn.execute(f"DELETE FROM {SCHEMA}.{table} WHERE store_id = %s", (store_id,))
            self._require_stores(conn, {store_id}, stores)

        await self._run(self._label([store_id]), purge)

    async def read_history(self, store_id: str, key: str) -> list[StoredRecord]:
        def history(conn: Connection) -> list[StoredRecord]:
            self._require_stores(conn, {store_id})
            cur = conn.cursor(binary=True)
            cur.execute(
                "SELECT value, content_type, version, updated_at "
                f"FROM {SCHEMA}.history WHERE store_id = %s AND key_hash = %s "
                "ORDER BY version DESC",
                (store_id, key_hash(key)),
            )
            return [StoredRecord(key, bytes(val), ct, v, utc(at)) for val, ct, v, at in cur]

        return await self._run(self._label([store_id]), history, mutating=False)

    async def describe_durability(self) -> Durability:
        """The server's `synchronous_commit`, standbys and `fsync` as it reports them now; this URL's own."""
        settings = await self._run(None, read_settings, mutating=False)
        return describe(settings, self.synchronous_commit)

    def after_fork_in_child(self) -> None:
        """A lock and a pool of its own: the first call opens this process's connection.

        The parent's connections (idle, or in use by its worker threads, which are not
        here) are let go of without a word to the server, as the parent still uses them.
        """
        self._lock = threading.Lock()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.let_go()

    async def aclose(self) -> None:
        def close() -> None:
            with self._lock:
                pool, self._pool = self._pool, None
            if pool is not None:
                pool.discard_idle()

        await anyio.to_thread.run_sync(close)
